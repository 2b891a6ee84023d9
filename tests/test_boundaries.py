"""The pure core imports neither ray, deepspeed nor lm_eval (STYLE.md); training workers import no ray.data of ours.

Each core module is imported in a fresh interpreter and the loaded modules are
checked; its source is also read for imports inside functions, which importing
it does not run.

    .venv/bin/pytest tests/test_boundaries.py -q
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

CORE = ["raypack.config", "raypack.model", "raypack.attention", "raypack.tables", "raypack.every",
        "raypack.data.formats", "raypack.data.hub", "raypack.data.tokenize", "raypack.data.overlength",
        "raypack.data.bins", "raypack.data.pack",
        "raypack.data.compose", "raypack.data.arm", "raypack.data.features", "raypack.data.order",
        "raypack.data.collate", "raypack.data.synth", "raypack.data.facts", "raypack.data.local",
        "raypack.data.prepared",
        "raypack.data.summary", "raypack.data.holdout", "raypack.bench.pack", "raypack.train.memory",
        "raypack.train.resume", "raypack.train.restore", "raypack.train.plan", "raypack.train.metrics",
        "raypack.train.loss", "raypack.train.flops", "raypack.train.extensions", "raypack.eval.tasks",
        "raypack.eval.scores", "raypack.eval.backend", "raypack.eval.cost", "raypack.eval.credentials",
        "raypack.eval.qa_task", "raypack.study.report", "raypack.study.grid", "raypack.tune.analyze", "raypack.stats",
        "raypack.tracking"]
FORBIDDEN = ("ray", "deepspeed", "lm_eval")
# What the driver, a notebook or `raypack plan` reads without torch: rows and manifest, the run plan, the logs.
TORCH_FREE = ("raypack.data.prepared", "raypack.train.plan", "raypack.train.metrics", "raypack.train.restore",
              "raypack.eval.scores", "raypack.eval.backend", "raypack.stats")


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_engine(module):
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def imported_roots(module: str) -> set[str]:
    """The top-level package of every import statement in the module's source, at any depth (lazy ones too)."""
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    return roots | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level}


@pytest.mark.parametrize("module", CORE)
def test_core_module_source_has_no_engine_import_even_inside_a_function(module):
    forbidden = FORBIDDEN + (("torch",) if module in TORCH_FREE else ())
    assert not imported_roots(module) & set(forbidden), f"{module} imports {imported_roots(module) & set(forbidden)}"


# What every Ray Data actor and task imports: torch must not be among it (seconds of CPU per worker).
DATA_WORKER = ["raypack.data.pipeline", "raypack.data.tokenize", "raypack.data.features", "raypack.data.compose",
               "raypack.model"]


@pytest.mark.parametrize("module", DATA_WORKER)
def test_data_worker_modules_do_not_import_torch(module):
    code = (f"import sys, {module}; from raypack.model import load_tokenizer; load_tokenizer('tiny'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"{module} imports torch"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_prepared_rows_plan_and_logs_import_neither_ray_nor_torch(module):
    """raypack.data.prepared (rows and manifest) is what training reads: a worker or a notebook opens them with
    numpy alone; the run plan, the log reader and the benchmark scores need no more."""
    code = (f"import sys, {module}; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


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


def loaded(code: str, condition: str) -> str:
    """Run `code` in a fresh interpreter, then print the sorted loaded modules `m` for which `condition` holds."""
    script = f"import sys; {code}; print(','.join(sorted(m for m in sys.modules if {condition})))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()


def test_ray_data_reaches_a_training_worker_only_through_ray_train():
    """A training worker's modules import ray.data exactly when ray.train itself does.

    Ray 2.x's ray/air/__init__.py runs `import ray.data` ("to avoid circular
    import"), and `import ray.train` imports ray.air: so today both find ray.data
    loaded. Once Ray drops that import, this asserts that the loop loads no
    ray.data at all; test_training_loop_does_not_import_the_data_pipeline checks
    meanwhile that the loop adds no ray.data module to ray.train's.
    """
    through_ray_train = loaded("import ray.train, ray.train.torch", "m == 'ray.data'")
    assert loaded("import raypack.train.loop", "m == 'ray.data'") == through_ray_train


def test_the_training_loops_own_modules_import_no_ray():
    """Every raypack module the loop loads (rows, manifest, collate, engine, loss ...), without the loop: no ray.

    So the loop's `import ray.train` lines are the only way Ray reaches a training
    worker, and nothing of ours (raypack.data.pipeline above all) adds ray.data.
    """
    modules = loaded("import raypack.train.loop", "m.startswith('raypack.') and m != 'raypack.train.loop'").split(",")
    assert "raypack.data.prepared" in modules and "raypack.data.pipeline" not in modules
    got = loaded(f"import {', '.join(modules)}", "m.split('.')[0] == 'ray'")
    assert got == "", f"the training loop's modules pull in ray: {got[:200]}..."


def test_no_module_imports_another_modules_private_names():
    """`from raypack.x import _name` nowhere in raypack/: what a module shares, it names publicly."""
    root = Path(importlib.util.find_spec("raypack").origin).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "raypack"):
                found += [f"{path.relative_to(root.parent)}:{node.lineno} {alias.name}" for alias in node.names
                          if alias.name.startswith("_")]
    assert found == [], f"private names imported across modules: {found}"


# Each outside engine and the one module that touches it (STYLE.md): Ray Data by the pipeline package, in the
# stages that build datasets (read, tokenize into the cache, group) and the module that keeps their rows in order
# (planning and packing are plain Ray tasks, and prepare only starts them), Ray Train by the launcher, the loop
# and the progress line (its callback runs in Ray Train's controller), Ray Tune by the sweep that runs it and by
# the reader of its results (raypack.tune.trials: Tune's result API, no Ray running; apart from the sweep so that
# the pure analysis needs neither), DeepSpeed by its engine module, lm-eval by the harness, MLflow by
# raypack.tracking.
PIPELINE = "raypack/data/pipeline"
ENGINE_OWNERS = {"ray.data": {f"{PIPELINE}/{stage}.py" for stage in ("read", "cache", "group", "ordered")},
                 "ray.train": {"raypack/train/launch.py", "raypack/train/loop.py", "raypack/train/progress.py"},
                 "ray.tune": {"raypack/tune/sweep.py", "raypack/tune/trials.py"},
                 "deepspeed": {"raypack/train/engine.py"}, "lm_eval": {"raypack/eval/harness.py"},
                 "mlflow": {"raypack/tracking.py"}}


def engine_importers(root: Path) -> dict[str, set[str]]:
    """{engine: the raypack files whose source imports it, at any depth}; `from ray import tune` counts as ray.tune."""
    found = {engine: set() for engine in ENGINE_OWNERS}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for engine in found:
                if any(name == engine or name.startswith(engine + ".") for name in names):
                    found[engine].add(str(path.relative_to(root.parent)))
    return found


def test_each_engine_is_imported_by_its_one_module(tmp_path):
    root = Path(importlib.util.find_spec("raypack").origin).parent
    assert engine_importers(root) == ENGINE_OWNERS
    # Negative control: a second module importing an engine is seen.
    stray = tmp_path / "raypack"
    (stray / "study").mkdir(parents=True)
    (stray / "study" / "run.py").write_text("def f():\n    from ray import tune\n")
    assert engine_importers(stray)["ray.tune"] == {"raypack/study/run.py"}


def pipeline_stage_importers(root: Path) -> list[str]:
    """Files outside raypack/data/pipeline/ that import one of its stage modules instead of the package."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.is_relative_to(root / "data" / "pipeline"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(root.parent)}:{node.lineno} {name}" for name in names
                      if name.startswith("raypack.data.pipeline.")]
    return found


def test_the_rest_of_raypack_uses_the_pipeline_through_its_package(tmp_path):
    """`from raypack.data.pipeline import prepare` everywhere outside the package: its modules (read, cache, group,
    pack, prepare, ordered) are the package's inside, free to move. Negative control: a stray stage import is seen."""
    root = Path(importlib.util.find_spec("raypack").origin).parent
    assert pipeline_stage_importers(root) == []
    stray = tmp_path / "raypack"
    (stray / "train").mkdir(parents=True)
    (stray / "train" / "launch.py").write_text("from raypack.data.pipeline.cache import kept\n")
    assert pipeline_stage_importers(stray) == ["raypack/train/launch.py:1 raypack.data.pipeline.cache"]
