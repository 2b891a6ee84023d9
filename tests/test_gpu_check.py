"""scripts/gpu_check.py on CPU: its --dry-run runs the GPU check's code path on a tiny model.

    .venv/bin/python -m pytest -q tests/test_gpu_check.py

The dry run must show isolation (packed == alone within fp32 tolerance on sdpa,
eager and raypack_varlen, the last with the reference kernel injected) with a
negative control (`cross` differs), report every arm (the isolated ones on
raypack_varlen), and import no ray/deepspeed/numba/pyarrow module: the
accelerator machine has none.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
ARMS = ("padding", "padfree", "bfd-isolated", "bfd-cross", "bfd-isolated/sdpa")
BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "raypack_varlen")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "x.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], check=False,
                          capture_output=True, text=True, timeout=240, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result  # stdout is the one JSON object
    return result


def test_every_section_and_arm(report):
    for key in ("device", "date", "torch", "transformers", "model", "data", "isolation", "arms", "loss", "seconds"):
        assert key in report
    assert report["dry_run"] is True and report["device"] == "cpu"
    for dtype in ("bf16", "fp32"):
        assert set(report["isolation"][dtype]) == set(BACKENDS)
    assert set(report["arms"]) == set(ARMS)
    assert all(3 <= len(lens) <= 8 for lens in report["isolation"]["seq_lens"])


def test_loss_section_compares_full_and_fused(report):
    """The loss step full vs fused on the same inputs: the same mean loss and gradients (fp32 on CPU); the
    timing and the fused / full ratio are reported (memory: null on CPU)."""
    loss = report["loss"]
    assert loss["kernel"] in ("torch", "chunked") and loss["tokens"] == 2 * 256
    assert abs(loss["fused"]["loss"] - loss["full"]["loss"]) < 1e-5 and loss["max_grad_difference"] < 1e-5
    assert loss["full"]["step_time_s"] > 0 and loss["fused_over_full"]["step_time_s"] > 0
    assert loss["full"]["peak_memory_mb"] is None


def test_isolated_equals_alone_and_cross_differs(report):
    assert report["varlen_kernel"] == "reference (injected)"
    varlen = report["isolation"]["fp32"]["raypack_varlen"]  # one flat row with boundaries; alone on sdpa
    assert varlen["isolated_max_abs_diff"] < 1e-5 and varlen["cross_max_abs_diff"] > 1e-3, varlen
    assert varlen["ok"] is True and "isolated_flat_max_abs_diff" not in varlen
    for backend in ("sdpa", "eager"):
        check = report["isolation"]["fp32"][backend]
        assert check["isolated_max_abs_diff"] < 1e-5, check
        assert check["isolated_flat_max_abs_diff"] < 1e-5, check  # padfree's layout on a row-isolating backend
        assert check["cross_max_abs_diff"] > 1e-3, check  # negative control: the check can fail
        assert check["ok"] is True
    flex = report["isolation"]["fp32"]["flex_attention"]
    assert flex.get("ok") is True or "skipped" in flex  # flex may not compile on every CPU; never a crash
    assert "skipped" in report["isolation"]["fp32"]["flash_attention_2"]  # no fp32 kernels


def test_arms_report_speed_and_padding(report):
    arms = report["arms"]
    for arm in ARMS:
        assert arms[arm]["tokens_per_sec"] > 0
        assert arms[arm]["row_tokens_per_sec"] >= arms[arm]["tokens_per_sec"]
        assert arms[arm]["attn_implementation"] == ("raypack_varlen" if arm in ("padfree", "bfd-isolated") else "sdpa")
        assert arms[arm]["auto_attn_implementation"] == "sdpa"  # auto on CPU
        assert arms[arm]["mfu"] is None  # no peak known for a CPU
    assert arms["padding"]["padding_fraction"] > max(arms["bfd-isolated/sdpa"]["padding_fraction"],
                                                     arms["bfd-cross"]["padding_fraction"])
    # sdpa gets isolated [B, T] rows, as in the loop; raypack_varlen one padding-free row.
    assert arms["bfd-isolated/sdpa"]["padding_fraction"] == pytest.approx(arms["bfd-cross"]["padding_fraction"])
    assert arms["bfd-isolated"]["padding_fraction"] == 0.0
    assert report["tokens_per_sec_vs_cross"]["bfd-cross"] == 1.0 and "bfd-isolated" in report["tokens_per_sec_vs_cross"]
    # padfree: padding's samples as one flat row, so every token computed is real (and as many as padding's).
    assert arms["padfree"]["padding_fraction"] == 0.0
    assert arms["padfree"]["tokens_per_sec"] * arms["padfree"]["step_time_s"] == \
        pytest.approx(arms["padding"]["tokens_per_sec"] * arms["padding"]["step_time_s"])


def test_no_ray_deepspeed_numba_or_pyarrow(report):
    assert report["forbidden_modules"] == []


def test_best_fit_decreasing_keeps_every_sample_within_capacity():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    lengths = np.random.default_rng(0).integers(1, 300, 500).tolist()
    bins = gpu_check.best_fit_decreasing(lengths, 300)
    assert sorted(i for b in bins for i in b) == list(range(500))
    fills = [sum(lengths[i] for i in b) for b in bins]
    assert max(fills) <= 300
    # A new bin opens only when nothing fits, so at most one bin is at most half full.
    assert sum(fill <= 150 for fill in fills) <= 1
