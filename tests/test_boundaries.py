"""The pure core imports neither ray, deepspeed nor lm_eval (STYLE.md).

Each core module is imported in a fresh interpreter and the loaded modules are checked.

    .venv/bin/pytest tests/test_boundaries.py -q
"""

import subprocess
import sys

import pytest

CORE = ["raypack.config", "raypack.model", "raypack.data.formats", "raypack.data.tokenize",
        "raypack.data.pack", "raypack.data.compose", "raypack.data.features", "raypack.data.order",
        "raypack.data.collate", "raypack.data.synth", "raypack.data.local", "raypack.data.prepared",
        "raypack.bench", "raypack.train.memory", "raypack.train.resume"]
FORBIDDEN = ("ray", "deepspeed", "lm_eval")


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_engine(module):
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


# What every Ray Data actor and task imports: torch must not be among it (seconds of CPU per worker).
DATA_WORKER = ["raypack.data.pipeline", "raypack.data.tokenize", "raypack.data.features", "raypack.data.compose",
               "raypack.model"]


@pytest.mark.parametrize("module", DATA_WORKER)
def test_data_worker_modules_do_not_import_torch(module):
    code = (f"import sys, {module}; from raypack.model import load_tokenizer; load_tokenizer('tiny'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"{module} imports torch"


def test_prepared_rows_import_neither_ray_nor_torch():
    """raypack.data.prepared is what training reads: a worker or a notebook can open rows with numpy alone."""
    code = ("import sys, raypack.data.prepared; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"raypack.data.prepared pulls in {out.stdout.strip()}"


def test_training_loop_does_not_import_the_data_pipeline():
    """The loop reads rows through raypack.data.prepared, never raypack.data.pipeline (Ray Data).

    `import ray.train` itself loads ray.data (through ray.air, Ray 2.x), so the check
    is that the loop loads no ray.data module beyond those ray.train brings, and
    not the pipeline.
    """
    code = ("import sys, ray.train, ray.train.torch; base = {m for m in sys.modules if m.startswith('ray.data')}; "
            "import raypack.train.loop; "
            "extra = sorted(m for m in sys.modules if (m.startswith('ray.data') and m not in base) "
            "or m == 'raypack.data.pipeline'); print(','.join(extra))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"raypack.train.loop pulls in {out.stdout.strip()}"
