"""What `raypack eval` and `raypack probe` score, and how: the checkpoints (eval.model_dir, or the models
`raypack train` exported for train.arm or every arm), the validation split (eval.val_dir, or the config's
own), lm-eval's tasks and the validation loss, or the context probe. With synthetic facts data (synth.task facts,
no data.sources) `eval` also scores the held-out questions by exact match (raypack.eval.qa_task), a task written
into <output_dir>/tasks/<name>.

    raypack eval jobs/quickstart.yaml [eval.preset=paper eval.tasks=[gsm8k:4] eval.limit=N eval.out=F]
    raypack probe jobs/quickstart.yaml train.arm=bfd-cross probe.num_samples=64 [probe.out=F.json]
"""

from __future__ import annotations

import time
from pathlib import Path

from raypack.config import Config, ConfigError, setting_configs
from raypack.eval.qa_task import heldout_task
from raypack.eval.tasks import eval_tasks
from raypack.tables import write_json


def checkpoints(cfg: Config) -> dict[str, str]:
    """What `eval` and `probe` score, by name: eval.model_dir, else the model `raypack train` exported for
    train.arm or each arm of pack.arms (of study.setting's arms). Each must be a Hugging Face folder."""
    if cfg.eval.model_dir:
        models = {cfg.eval.model_dir: cfg.eval.model_dir}
    else:
        from raypack.train.launch import run_dir

        arms = [cfg.train.arm] if cfg.train.arm else [arm for c in setting_configs(cfg) for arm in c.pack.arms]
        models = {arm: str(run_dir(cfg, arm) / "model") for arm in arms}
    for name, folder in models.items():
        if not (Path(folder) / "config.json").is_file():
            todo = ("give eval.model_dir=<the folder a trained model was saved to>" if cfg.eval.model_dir else
                    f"train it first (raypack train with this config, train.arm={name}), or give "
                    "eval.model_dir=<a checkpoint folder>")
            raise ConfigError(f"{folder}: no Hugging Face checkpoint there (no config.json); {todo}")
    return models


def val_split(cfg: Config) -> str | None:
    """eval.val_dir, which must hold a prepared split; else this config's validation split, None until prepared."""
    if cfg.eval.val_dir:
        folder = Path(cfg.eval.val_dir)
        if not folder.is_dir() or not (any(folder.glob("*.parquet")) or (folder / "flat").is_dir()):
            raise ConfigError(f"eval.val_dir: {folder} holds no prepared split; give the val-<hash> folder "
                              "`raypack prepare` wrote (under prepare.output_dir/tok-<hash>/)")
        return str(folder)
    from raypack.data.pipeline import prepared_folders

    folder = prepared_folders(cfg)["val"]
    return str(folder) if (folder / "manifest.json").is_file() else None


NO_VAL_SPLIT = ("this config's validation split is not prepared: run raypack prepare with the same config and "
                "overrides, or give eval.val_dir=<a val-<hash> folder>")


def evaluate_checkpoints(cfg: Config) -> dict:
    """`raypack eval`: every checkpoint's lm-eval scores and validation loss, printed and written to eval.out."""
    ev = cfg.eval
    specs, skipped = eval_tasks(ev)  # code tasks skipped or refused before Ray or lm-eval start
    heldout = heldout_task(cfg, Path(cfg.output_dir) / "tasks" / cfg.name)  # facts data: its held-out questions
    specs += [heldout] if heldout else []
    models = checkpoints(cfg)
    val = val_split(cfg)
    if not specs and not val:
        what = "eval.preset=none and no eval.tasks"
        if skipped:
            what = f"every task is skipped ({', '.join(f'{t}: {why}' for t, why in skipped.items())})"
        raise ConfigError(f"nothing to evaluate: {what}, and {NO_VAL_SPLIT}")
    if specs and ev.ray:
        from raypack.ray_start import ensure_ray

        ensure_ray()
    results = {name: _eval_model(ev, model_dir, specs, skipped, val, cfg.data.max_seq_len)
               for name, model_dir in _announced(models)}
    write_results(results, ev.out)
    return results


def _announced(models: dict[str, str]):
    """The checkpoints one by one, each named as its turn comes when there are several."""
    for name, model_dir in models.items():
        if len(models) > 1:
            print(f"[{name}] {model_dir}", flush=True)
        yield name, model_dir


def _eval_model(ev, model_dir: str, specs: list, skipped: dict, val: str | None, max_seq_len: int) -> dict:
    """One checkpoint's lm-eval scores and validation loss, printed, with the tasks skipped and why; returns them
    as JSON-ready data."""
    loss = {}
    if val:  # the held-out loss every arm is compared on (raypack.train.validate)
        import torch

        from raypack.train.validate import validation_loss_of_model

        device = ev.device if ev.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        loss = validation_loss_of_model(model_dir, val, device=device)
        print(f"validation loss {loss['val_loss']:.4f} over {loss['val_tokens']:,} supervised tokens "
              f"({loss['val_rows']:,} held-out samples in {val})")
    if not specs:
        for task, why in skipped.items():
            print(f"{task}: {why}")
        return {"model": model_dir, "results": [], "skipped": skipped, **loss}
    from raypack.eval.harness import evaluate, evaluate_on_ray, format_results

    run = evaluate_on_ray if ev.ray else evaluate
    result = {**run(model_dir, specs, ev, max_seq_len), "skipped": skipped}
    print(format_results(result))
    return {**result, **loss}


def probe_checkpoints(cfg: Config) -> dict:
    """`raypack probe`: every checkpoint's context reliance, printed and written to probe.out."""
    if not cfg.probe.num_samples:
        raise ConfigError("probe.num_samples=0: nothing to probe; give the number of held-out targets, e.g. 256")
    models = checkpoints(cfg)
    val = val_split(cfg)
    if not val:
        raise ConfigError(f"the probe needs held-out samples: {NO_VAL_SPLIT}")
    from raypack.eval.probe import format_probe, probe_model  # torch

    results = {}
    for name, model_dir in _announced(models):
        start = time.perf_counter()
        result = probe_model(model_dir, val, cfg.probe, seed=cfg.seed, log=lambda line: print(line, flush=True),
                             by_topic=cfg.pack.group_backend == "topic")
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(format_probe(result))
        results[name] = result
    write_results(results, cfg.probe.out)
    return results


def write_results(results: dict, path: str) -> None:
    """Write one result as it is, several as {name: result} (several checkpoints); nothing when path is ''."""
    if path:
        write_json(next(iter(results.values())) if len(results) == 1 else results, path)
