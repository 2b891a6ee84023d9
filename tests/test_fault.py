"""Fault tolerance proven against the truth: interrupted runs end exactly where an uninterrupted one does.

One Ray cluster of real `ray start` processes for the module (a head node; a second
and third node join for the lost-node test), and every run is a `raypack` command
in its own driver process, killed from outside as a crash, a lost node or a spot
notice would. The truth is one uninterrupted `raypack study` of two arms (no
lm-eval, no probe): every interrupted run must give, for its arm,
    the same row ids at every step on every rank (rows-rank<r>.jsonl),
    the same per-step losses within 1e-6 (fp32 on CPU),
    the same final weights within 1e-6 (the exported model).
Interruptions: (a) a training worker SIGKILLed at a random step between two
checkpoints and, later in the same run, (d) SIGTERM to the driver: a checkpoint at
the next step boundary, exit 143, and the same command resumes; (b) the node
holding a worker lost mid-run, the run finishing once a node returns; (c) the
study's driver SIGKILLed mid-arm and the same command run again. Plus the safer defaults: a relaunch with another
batch size is refused naming the key, and train.resume=false starts afresh.

    .venv/bin/pytest tests/test_fault.py -q
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ray_nodes import RayNodes, free_port
from safetensors.numpy import load_file

ARMS = ["padding", "bfd-isolated"]
ARM = "bfd-isolated"
CHECKPOINT_EVERY = 4


def base_overrides(root: Path) -> list[str]:
    """The study's settings; a `raypack train` of one arm repeats what the study sets for it (a validation
    point every 2 steps, export) so that its run is the study's run of that arm."""
    return [f"prepare.output_dir={root / 'prepared'}", "synth.num_samples=200", "data.max_seq_len=256",
            f"pack.arms={json.dumps(ARMS)}", "train.num_workers=2", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.epochs=1", "optim.lr=0.001", "optim.warmup_ratio=0.0",
            "prepare.num_tokenizer_actors=1", f"train.checkpoint_every_steps={CHECKPOINT_EVERY}",
            "eval.preset=none", "probe.num_samples=0", "train.worker_cpus=1", "train.max_failures=2"]


def train_overrides(root: Path, name: str) -> list[str]:
    return [*base_overrides(root), f"name={name}", f"train.arm={ARM}", "train.eval_every_steps=2",
            f"train.storage_path={root / 'runs'}"]


@pytest.fixture(scope="module")
def cluster():
    """The head node, with room for both training workers (1 CPU each)."""
    nodes = RayNodes(Path(f"/tmp/rpf-{uuid.uuid4().hex[:8]}"))  # short: Ray's socket paths must stay < 108 chars
    # Ray 2.60's placement-group cleaner finds the state API by auto-detection, which on a machine running several
    # Ray instances (the test session's own) can reach another one and remove a live run's placement group
    # (ray-project/ray#65447); pointed at a closed port, a failed query means "keep watching".
    nodes.env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{free_port()}"
    try:
        nodes.start("head", num_cpus=2, resources='{"head": 2}')
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(nodes.tmp, ignore_errors=True)


DRIVERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_driver_left():
    """A test that fails while a driver runs kills it, so that it cannot disturb the next test."""
    yield
    while DRIVERS:
        proc = DRIVERS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def raypack(cluster: RayNodes, args: list[str], log: Path, wait: bool = True):
    """`raypack ARGS` as its own driver process on the cluster; its output goes to `log`."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    out = log.open("a")
    proc = subprocess.Popen([sys.executable, "-m", "raypack.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    DRIVERS.append(proc)
    if wait:
        rc = proc.wait(timeout=900)
        assert rc == 0, log.read_text()[-4000:]
    return proc


@pytest.fixture(scope="module")
def truth(cluster, tmp_path_factory, finished_studies):
    """The uninterrupted study: both arms trained one after the other, exported, never disturbed."""
    root = tmp_path_factory.mktemp("truth")
    raypack(cluster, ["study", "jobs/compare.yaml", *base_overrides(root), "name=fault",
                      f"study.out={root / 'study'}"], root / "study.log")
    finished_studies["fault"] = root / "study"  # test_study's grid test combines it with its own
    return root


def run_dir_of_study(study: Path, arm: str) -> Path:
    return study / "train" / f"fault-seed0-{arm}" / "raypack"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def assert_same_run(run: Path, reference: Path) -> None:
    """Rows of every step on every rank, per-step losses and final weights equal the reference's."""
    for rank in range(2):
        rows, ref_rows = read_jsonl(run / f"rows-rank{rank}.jsonl"), read_jsonl(reference / f"rows-rank{rank}.jsonl")
        assert rows == ref_rows, f"rank {rank} trained other rows"
    losses = [m["loss"] for m in read_jsonl(run / "metrics.jsonl")]
    ref_losses = [m["loss"] for m in read_jsonl(reference / "metrics.jsonl")]
    assert len(losses) == len(ref_losses)
    assert np.max(np.abs(np.array(losses) - np.array(ref_losses))) <= 1e-6
    weights, ref_weights = load_file(run / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert np.max(np.abs(weights[key].astype(np.float64) - ref_weights[key])) <= 1e-6, key


def wait_for_step(metrics: Path, step: int, proc, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while True:
        if metrics.exists() and any(m["step"] >= step for m in read_jsonl(metrics)):
            return
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def test_reference_is_sensitive(truth):
    """Negative control: the two arms of the truth differ in rows, losses and weights, so assert_same_run can fail."""
    study = truth / "study"
    with pytest.raises(AssertionError):
        assert_same_run(run_dir_of_study(study, "padding"), run_dir_of_study(study, ARM))


def registered_checkpoint_step(run: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (what a restart restores), 0 if none.

    A reported checkpoint counts only once the controller has polled every rank's report,
    which can lag the save by a few steps; before that a restart would begin at step 0.
    """
    try:
        snapshot = json.loads((run.parent / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    latest = snapshot.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else 0


def kill_between_checkpoints(run: Path, proc, kill) -> tuple[int, int]:
    """Call kill() at a random step after a checkpoint has been registered; returns (that checkpoint's step,
    the last step logged before the kill)."""
    step = random.Random(os.getpid()).randint(CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY - 1)
    wait_for_step(run / "metrics.jsonl", step, proc)
    deadline = time.time() + 120
    while registered_checkpoint_step(run) == 0:
        assert proc.poll() is None and time.time() < deadline, "no checkpoint registered before the run ended"
        time.sleep(0.05)
    registered = registered_checkpoint_step(run)
    last = read_jsonl(run / "metrics.jsonl")[-1]["step"]
    kill()
    assert last < 16, "the run had ended before the kill"
    return registered, last


def test_a_killed_worker_then_sigterm_then_the_same_command(cluster, truth, tmp_path):
    """One run, two interruptions. (a) SIGKILL to rank 1's process at a random step between two checkpoints:
    Ray restarts the workers from the last registered checkpoint. (d) Later, SIGTERM to the driver (a spot
    notice, `ray job stop`): the workers checkpoint at the next step boundary, the driver exits 143, and the
    same command again resumes from exactly there. The run ends as the truth did."""
    args = ["train", "jobs/compare.yaml", *train_overrides(truth, "interrupted")]
    run = truth / "runs" / f"interrupted-{ARM}" / "raypack"
    proc = raypack(cluster, args, tmp_path / "train.log", wait=False)

    def kill():
        os.kill(json.loads((run / "init-rank1.json").read_text())["pid"], signal.SIGKILL)

    registered, last = kill_between_checkpoints(run, proc, kill)
    deadline = time.time() + 900
    while not any(e["event"] == "resume" for e in read_jsonl(run / "events.jsonl")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "train.log").read_text()[-4000:]
        time.sleep(0.05)
    (resumed,) = [e["step"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert registered <= resumed <= last, (registered, resumed, last)

    wait_for_step(run / "metrics.jsonl", last + 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "train.log").read_text()[-4000:]
    events = read_jsonl(run / "events.jsonl")
    (stopped,) = [e["step"] for e in events if e["event"] == "preempted"]
    assert last + 2 <= stopped < 16 and "done" not in [e["event"] for e in events]
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, stopped + 1))
    assert registered_checkpoint_step(run) == stopped  # the stop's own checkpoint, uploaded and registered
    assert "run the same command again" in (tmp_path / "train.log").read_text()

    raypack(cluster, args, tmp_path / "train.log")
    events = read_jsonl(run / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [resumed, stopped]
    assert_same_run(run, run_dir_of_study(truth / "study", ARM))


def test_a_killed_study_driver_and_the_same_command_again(cluster, truth, tmp_path):
    """(c) `raypack study` SIGKILLed while training its second arm; the same command again does not retrain
    the finished arm and resumes the half-trained one from its checkpoint."""
    study = tmp_path / "study"
    args = ["study", "jobs/compare.yaml", *base_overrides(truth), "name=fault", f"study.out={study}"]
    proc = raypack(cluster, args, tmp_path / "study.log", wait=False)
    run = run_dir_of_study(study, ARM)
    kill_between_checkpoints(run, proc, lambda: os.kill(proc.pid, signal.SIGKILL))
    proc.wait()
    finished = study / "runs" / "padding" / "seed0" / "result.json"
    before = finished.stat().st_mtime_ns
    time.sleep(3)  # let Ray clean up the dead driver's actors

    raypack(cluster, args, tmp_path / "again.log")
    assert finished.stat().st_mtime_ns == before
    assert "[padding seed 0] done before" in (tmp_path / "again.log").read_text()
    assert len([e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]) == 1
    for arm in ARMS:
        assert_same_run(run_dir_of_study(study, arm), run_dir_of_study(truth / "study", arm))


def test_a_lost_node(cluster, truth, tmp_path):
    """(b) One worker runs on a second node, which is lost mid-run (its whole process group SIGKILLed); the run
    goes on once a node returns, restarting from its last checkpoint, and ends as the truth did."""
    # The head keeps one CPU for training: a second driver holds the other with an actor pinned to it.
    hold = ("import ray, time; ray.init(); "
            "a = ray.remote(num_cpus=1, resources={'head': 1})(type('Hold', (), {'ok': lambda self: 1})).remote(); "
            "ray.get(a.ok.remote()); print('held', flush=True); time.sleep(3600)")
    blocker = subprocess.Popen(
        [sys.executable, "-c", hold],
        env={**cluster.env, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout.readline().strip() == "held"
        cluster.start("second", num_cpus=1)
        args = ["train", "jobs/compare.yaml", *train_overrides(truth, "lost-node")]
        run = truth / "runs" / f"lost-node-{ARM}" / "raypack"
        proc = raypack(cluster, args, tmp_path / "train.log", wait=False)
        wait_for_step(run / "metrics.jsonl", 1, proc)
        nodes = {json.loads((run / f"init-rank{r}.json").read_text())["node_id"] for r in range(2)}
        assert len(nodes) == 2, "both workers landed on one node"
        kill_between_checkpoints(run, proc, lambda: cluster.lose("second"))
        cluster.start("third", num_cpus=1)
        assert proc.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        blocker.kill()
    events = read_jsonl(run / "events.jsonl")
    assert len([e for e in events if e["event"] == "resume"]) == 1, events
    assert_same_run(run, run_dir_of_study(truth / "study", ARM))


def test_a_relaunch_that_would_change_the_step_rows_is_refused(truth, tmp_path):
    """A checkpoint's position.json names what fixes a step's rows: another batch size or seed is refused
    naming each key; train.resume=false moves the old run aside instead (nothing is deleted)."""
    from raypack.config import ConfigError, load_config
    from raypack.data.pipeline import prepared_folders
    from raypack.train.launch import _check_resume, latest_checkpoint

    storage = tmp_path / "train"
    shutil.copytree(truth / "study" / "train" / f"fault-seed0-{ARM}", storage / f"fault-seed0-{ARM}")
    overrides = [*base_overrides(truth), "name=fault-seed0", f"train.storage_path={storage}"]
    cfg = load_config("jobs/compare.yaml", overrides)
    folder = prepared_folders(cfg)[ARM]
    assert latest_checkpoint(cfg, ARM) is not None
    _check_resume(cfg, ARM, folder)  # the same settings: accepted
    changed = load_config("jobs/compare.yaml", [*overrides, "train.global_batch_size=16", "train.seed=3"])
    with pytest.raises(ConfigError) as err:
        _check_resume(changed, ARM, folder)
    assert "train.global_batch_size: 8 in the checkpoint, 16 now" in str(err.value)
    assert "train.seed: 0 in the checkpoint, 3 now" in str(err.value)
    assert "train.micro_batch_size" not in str(err.value)
    _check_resume(load_config("jobs/compare.yaml", [*overrides, "train.global_batch_size=16",
                                                    "train.resume=false"]), ARM, folder)
    assert latest_checkpoint(changed, ARM) is None
    (aside,) = storage.glob(f"fault-seed0-{ARM}.replaced-*")
    assert (aside / "checkpoint_manager_snapshot.json").exists()


def test_a_checkpoint_in_object_storage_is_downloaded_once_per_node(tmp_path):
    """The loop's `restored`: two ranks of a node (threads here, as the function sees only its local rank
    and a barrier) get one local copy, downloaded once, however late the second one asks; removed after.
    Negative control: Ray's own as_directory, asked one after the other, downloads twice."""
    import threading

    import fsspec.implementations.local
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from raypack.train.loop import restored

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "weights.bin").write_bytes(os.urandom(1 << 16))
    downloads = []

    class CountingFS(fsspec.implementations.local.LocalFileSystem):
        """Object storage stand-in: a non-local pyarrow filesystem that counts whole-file reads."""

        def _open(self, path, mode="rb", **kwargs):
            if "r" in mode and path.endswith("weights.bin"):
                downloads.append(path)
            return super()._open(path, mode, **kwargs)

    checkpoint = Checkpoint(str(tmp_path / "ckpt"), filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(CountingFS())))
    barrier, seen = threading.Barrier(2), {}

    def rank(local_rank: int) -> None:
        time.sleep(local_rank * 0.5)  # the second rank asks well after the first has downloaded
        with restored(checkpoint, local_rank, barrier.wait) as folder:
            seen[local_rank] = (folder, (Path(folder) / "weights.bin").read_bytes())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(downloads) == 1
    assert seen[0] == seen[1] and seen[0][1] == (tmp_path / "ckpt" / "weights.bin").read_bytes()
    assert not Path(seen[0][0]).exists()

    downloads.clear()
    for _ in range(2):
        with checkpoint.as_directory():
            pass
    assert len(downloads) == 2
