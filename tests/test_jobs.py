"""`ray job submit` of a study to a real Ray head on 127.0.0.1, with token authentication.

The head is started with the real `ray start --head` CLI (its own temp dir, ports
and token), the study is submitted with the real `ray job submit --working-dir .`
(the repo is uploaded as a runtime-env package), the test waits for SUCCEEDED,
reads the report, checks that a client without the token is refused, and stops
the head (tests/ray_nodes.py: its whole process group; never `ray stop`, which
would also stop the test session's own Ray instance).

    .venv/bin/pytest tests/test_jobs.py -q
"""

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from ray_nodes import RayNodes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture()
def ray_head():
    nodes = RayNodes(Path(f"/tmp/rpj-{uuid.uuid4().hex[:8]}"))  # short: Ray's socket paths must stay < 108 chars
    try:
        nodes.start("head", num_cpus=2, dashboard=True)
        yield {"address": f"http://127.0.0.1:{nodes.dashboard}", "env": nodes.env, "tmp": nodes.tmp}
    finally:
        nodes.stop()
        shutil.rmtree(nodes.tmp, ignore_errors=True)


def test_study_submitted_with_ray_job_submit_succeeds(ray_head, tmp_path):
    address, env = ray_head["address"], ray_head["env"]
    study = tmp_path / "study"
    overrides = [f"study.out={study}", f"prepare.output_dir={tmp_path / 'prepared'}", "synth.num_samples=80",
                 "data.max_seq_len=256", "pack.arms=[padding, bfd-isolated]", "train.max_steps=2",
                 "train.num_workers=1", "train.worker_cpus=0.25", "eval.limit=4", "eval.num_cpus=0.25", "prepare.num_tokenizer_actors=1"]
    for _ in range(24):  # the dashboard answers before its job agent is up: "try again later"
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
             "--", "raypack", "study", "jobs/quickstart.yaml", *overrides],
            env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert "succeeded" in submit.stdout + submit.stderr
    status = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in status.stdout
    report = json.loads((study / "report.json").read_text())
    assert list(report["arms"]) == ["padding", "bfd-isolated"]
    assert all(arm["steps"] == 2 and arm["val_loss"] > 0 for arm in report["arms"].values())
    assert (study / "report.md").exists() and (study / "loss_vs_step.png").exists()
    # Negative control: a client without the cluster's token is refused.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    no_token.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=no_token,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
