"""Check an installed wheelhouse: imports and a small run of Ray Data, Tune and Train, with what is on PYTHONPATH.

scripts/wheelhouse.py --verify runs it after installing a bundle into a fresh folder; by hand, on the host:

    PYTHONPATH=$PWD:/tmp/rp python3 scripts/wheelhouse_check.py --checks train,eval

Checks (the last thing on stdout is one JSON object; Ray Tune prints its table before it; exit 1 if one
failed):
train  import ray.train, ray.data, ray.tune and deepspeed; a local Ray started as raypack starts it
       (raypack.ray_start: the dashboard's extras absent must not stop it); a Ray Data map over 100 rows, a
       Tune grid of 2 trials, and a 1-worker TorchTrainer on CPU;
eval   import lm_eval and its task index (TaskManager);
cli    `python -m raypack.cli --help` (raypack from the repository, on PYTHONPATH);
and that none of it imported mlflow (tracking off imports nothing of it).
A check that stops on a missing torch where torch is not installed is "skipped" (ok: null), with the
reason; never passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path


def run(name: str, results: dict, fn) -> None:
    try:
        results[name] = {"ok": True, **(fn() or {})}
    except ModuleNotFoundError as err:
        if missing_torch(err) and not has_torch():
            results[name] = {"ok": None, "skipped": f"needs torch, which does not import here ({err})"}
        else:
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:800],
                             "traceback": traceback.format_exc()[-1500:]}
    except Exception as err:  # noqa: BLE001  (each check reports; the others still run)
        results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:800],
                         "traceback": traceback.format_exc()[-1500:]}


def missing_torch(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, is torch not being found (ray.train.torch re-raises it
    with a message of its own)."""
    while err is not None:
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "torch":
            return True
        err = err.__cause__ or err.__context__
    return False


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def ray_runs() -> dict:
    import ray
    from ray import tune

    from raypack.ray_start import ensure_ray

    os.environ.setdefault("RAY_ADDRESS", "")
    ensure_ray()
    total = ray.data.range(100).map(lambda r: {"id": r["id"] * 2}).sum("id")
    assert total == 9900, total

    def trainable(config):
        tune.report({"score": config["x"] * 10})

    grid = tune.Tuner(trainable, param_space={"x": tune.grid_search([1, 2])},
                      tune_config=tune.TuneConfig(metric="score", mode="max")).fit()
    best = grid.get_best_result().metrics["score"]
    assert best == 20, best
    out = {"ray": ray.__version__, "data_sum": total, "tune_best": best,
           "dashboard_deps": _dashboard_deps()}
    ray.shutdown()
    return out


def _dashboard_deps() -> bool:
    """Whether Ray's dashboard extras import here (the host's image lacks them: False there)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def torch_trainer() -> dict:
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from raypack.ray_start import ensure_ray

    ensure_ray()

    def loop(config):
        import torch

        model = torch.nn.Linear(4, 1)
        loss = model(torch.ones(2, 4)).sum()
        loss.backward()
        # Ray Train keeps a report's metrics in the result only with a checkpoint: the worker's own file says
        # that it ran, and what it computed.
        Path(config["out"]).write_text(json.dumps({"loss": float(loss), "rank": ray.train.get_context().get_world_rank(),
                                                   "grad_norm": float(model.weight.grad.norm())}))
        ray.train.report({"loss": float(loss)})

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        result = TorchTrainer(loop, train_loop_config={"out": str(out)},
                              scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                                           resources_per_worker={"CPU": 0.5})).fit()
        worker = json.loads(out.read_text())
    ray.shutdown()
    assert result.error is None and worker["rank"] == 0 and worker["grad_norm"] > 0, (result.error, worker)
    return worker


def train_imports() -> dict:
    import ray.data
    import ray.train
    import ray.tune  # noqa: F401

    return {}


def deepspeed_import() -> dict:
    import deepspeed

    return {"deepspeed": deepspeed.__version__}


def eval_imports() -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return {"lm_eval": getattr(lm_eval, "__version__", "?"), "num_tasks": len(TaskManager().all_tasks)}


def cli_help() -> dict:
    done = subprocess.run([sys.executable, "-m", "raypack.cli", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "bench" in done.stdout, done.stderr[-2000:]
    return {"lines": len(done.stdout.splitlines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", default="train,eval", help="comma separated: train, eval")
    args = parser.parse_args(argv)
    checks = set(args.checks.split(","))
    results = {"python": sys.version.split()[0], "torch": has_torch()}
    if "train" in checks:
        run("train_imports", results, train_imports)
        run("deepspeed_import", results, deepspeed_import)
        run("ray_runs", results, ray_runs)
        run("torch_trainer", results, torch_trainer)
    if "eval" in checks:
        run("eval_imports", results, eval_imports)
    run("cli_help", results, cli_help)
    results["mlflow_imported"] = any(m.split(".")[0] == "mlflow" for m in sys.modules)
    print(json.dumps(results, indent=1))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    skipped = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is None]
    print(f"wheelhouse_check: {len(failed)} failed {failed}, {len(skipped)} skipped {skipped}", file=sys.stderr)
    return 1 if failed or results["mlflow_imported"] else 0


if __name__ == "__main__":
    sys.exit(main())
