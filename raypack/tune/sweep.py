"""`raypack sweep`: Ray Tune over learning rate x global batch size (x seed) for each arm; the one module
running Ray Tune. `raypack analyze` (raypack.tune.analyze) reads what it leaves, through Tune's result API
(raypack.tune.trials).

    raypack sweep jobs/sweep-quick.yaml [key=value ...]
    raypack sweep jobs/sweep-quick.yaml --resume out/sweep/sweep-quick    # finish an interrupted sweep
    raypack analyze out/sweep/sweep-quick

1. Every swept arm is prepared once, with the shared validation split (raypack.data.pipeline; reused).
2. A Tune grid over sweep.arms x sweep.lr x sweep.global_batch_size x seeds (sweep.lr may instead draw
   log-uniform values). A trial is the base config plus dotted overrides, the same ones the CLI takes:
       {"arm": "bfd-isolated", "optim.lr": 0.0003, "train.global_batch_size": 16, "train.seed": 0}
   is `raypack train CONFIG train.arm=bfd-isolated optim.lr=3.0e-4 train.global_batch_size=16 train.seed=0`.
   The trial's function builds the arm's TorchTrainer (raypack.train.launch.build_trainer) with Tune's
   TuneReportCallback and calls fit(). The loop reports every evaluation step (step, loss, val_loss, ...)
   to Ray Train, with or without a checkpoint, and the callback hands every report to Tune while the run
   trains, so ASHA (sweep.asha) can stop poor trials at rungs counted in optimizer steps. When fit()
   returns, the trial reports the run's summary (raypack.tune.trials.run_summary) once more.
3. The sweep folder (sweep.out):
       config.yaml                    the resolved base config
       <trial_id>/                    Tune's trial folder: params.json (the overrides), result.json
       runs/<trial_id>-<arm>/         the trial's Ray Train run: checkpoints, raypack/metrics.jsonl, events
       experiment_state-*.json, ...   Tune's experiment state, what --resume restores
       best_eval.json                 with sweep.eval_best: lm-eval scores of each arm's best trial, one per
                                      benchmark as a study reports them (raypack.eval.scores); facts data's
                                      held-out questions among them (tasks/, raypack.eval.qa_task)

Resources: a trial's driver reserves sweep.trial_cpus / trial_gpus; the Ray Train workers it starts reserve
their own (train.worker_cpus each on CPU, one GPU each on GPU). At most sweep.max_concurrent_trials run at
once (default 1: on 2 cores a trial holds 0.1 + 2 x 0.5 CPU).

Resume: `Tuner.restore(..., resume_unfinished=True, restart_errored=True)`: finished trials are kept, the
others run again under their trial id, so their Ray Train run resumes from its latest checkpoint.

A Ray 2.60 caveat: a trial that Tune stops (ASHA) leaves its Ray Train placement group to Ray Train's
placement-group cleaner, which finds the State API by auto-detection; on a machine running several Ray
instances it may query the wrong one, and either never clean up or remove a live run's placement group.
One Ray instance per machine (or a real cluster) avoids it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import yaml

from raypack.config import (Config, ConfigError, EvalConfig, SweepConfig, TrainConfig, apply_overrides, from_dict,
                            to_dict, validate)
from raypack.data.pipeline import prepare
from raypack.data.prepared import read_manifest
from raypack.eval.harness import score_on_ray
from raypack.eval.qa_task import check_heldout_task, heldout_task
from raypack.ray_start import ensure_ray
from raypack.tracking import Run, end_unfinished, numeric, open_run
from raypack.train.launch import arm_config, build_trainer, log_run_inputs, run_dir
from raypack.train.metrics import read_metrics
from raypack.train.plan import EVAL_POINTS, RunPlan, run_plan
from raypack.tune.analyze import best_trials
from raypack.tune.trials import load_trials, run_summary, trial_dirname, trial_name

# Keys that may differ between a sweep and its --resume: where things run, not what is trained.
RESUME_MAY_CHANGE = ("sweep.trial_cpus", "sweep.trial_gpus", "sweep.eval_best", "sweep.out", "prepare.",
                     "eval.", "output_dir", "tracking.")


def sweep_dir(cfg: Config) -> Path:
    return Path(cfg.sweep.out or Path(cfg.output_dir) / "sweep" / cfg.name).resolve()


def sweep_arms(cfg: Config) -> list[str]:
    return list(cfg.sweep.arms or cfg.pack.arms)


def _yaml_scalar(value) -> str:
    """A value as the CLI would write it; floats keep a '.' before any exponent (YAML reads 1e-05 as text)."""
    if isinstance(value, float):
        text = repr(float(value))
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return json.dumps(value)


def trial_overrides(params: dict) -> list[str]:
    """A trial's parameters as CLI overrides: {"arm": "padding", "optim.lr": 1e-05} -> ["optim.lr=1.0e-05"]."""
    return [f"{key}={_yaml_scalar(value)}" for key, value in sorted(params.items()) if key != "arm"]


def trial_config(base: Config, params: dict) -> Config:
    """The base config with a trial's overrides, validated like any config."""
    return validate(from_dict(Config, apply_overrides(to_dict(base), trial_overrides(params))))


def search_space(cfg: Config) -> tuple[dict, int]:
    """Tune's param_space and num_samples (how many draws of sweep.lr when it is log-uniform)."""
    from ray import tune

    sweep = cfg.sweep
    space: dict = {"arm": tune.grid_search(sweep_arms(cfg))}
    num_samples = 1
    if isinstance(sweep.lr, dict):
        space["optim.lr"] = tune.loguniform(*sweep.lr["loguniform"])
        num_samples = sweep.lr["samples"]
    elif sweep.lr:
        space["optim.lr"] = tune.grid_search(list(sweep.lr))
    if sweep.global_batch_size:
        space["train.global_batch_size"] = tune.grid_search(list(sweep.global_batch_size))
    space["train.seed"] = tune.grid_search([cfg.train.seed + k for k in range(sweep.seeds)])
    return space, num_samples


def run_trial(params: dict, base: dict, folders: dict, out: str, parent: dict | None = None) -> None:
    """One trial, run by Tune: the arm's TorchTrainer under the trial's overrides, its own run folder, its own
    MLflow run (a child of the sweep's run `parent`; Ray's MLflowLoggerCallback would log only what reaches Tune,
    from Tune's driver, where the loop's rank 0 cannot add every step)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    arm, trial_id = params["arm"], tune.get_context().get_trial_id()
    # The run plan's rows per step (train.global_batch_tokens) and about EVAL_POINTS validation points.
    cfg = arm_config(trial_config(from_dict(Config, base), params), folders[arm], EVAL_POINTS)
    cfg = replace(cfg, name=trial_id, train=replace(cfg.train, storage_path=str(Path(out) / "runs"),
                                                    export=cfg.sweep.eval_best))
    tracking = open_run(cfg.tracking, cfg.output_dir, run_dir(cfg, arm), trial_id, "trial",
                        parent=Run.attach(parent, "sweep"), tags={"raypack.arm": arm, "raypack.trial_id": trial_id})
    log_run_inputs(tracking, cfg, folders[arm])
    start = time.perf_counter()
    try:
        build_trainer(cfg, arm, folders[arm], folders["val"], callbacks=[TuneReportCallback()],
                      tracking=tracking).fit()
    except BaseException:  # an error, or Tune stopping the trial (ASHA)
        if tracking:
            tracking.end("KILLED")
        raise
    summary = {**run_summary(read_metrics(run_dir(cfg, arm))), "fit_seconds": time.perf_counter() - start}
    if tracking:
        tracking.log_metrics(numeric(summary, "final/"), step=summary["step"])
        tracking.end()
    tune.report(summary)


# Sweeps made before the trial-name functions moved to raypack.tune.trials pickled them under these names.
_trial_dirname, _trial_name = trial_dirname, trial_name


def _check_resume(cfg: Config, out: Path) -> None:
    """--resume must train what the sweep started with; only where things run may change."""
    from ray import tune

    if not tune.Tuner.can_restore(str(out)):
        raise ValueError(f"--resume {out}: no Ray Tune experiment there (experiment_state-*.json)")
    saved = _flat(yaml.safe_load((out / "config.yaml").read_text()))
    given = _flat(to_dict(cfg))
    changed = sorted(k for k in saved.keys() | given.keys() if saved.get(k) != given.get(k)
                     and not k.startswith(RESUME_MAY_CHANGE))
    if changed:
        raise ConfigError(f"--resume {out}: the config differs from the sweep's ({out / 'config.yaml'}) in "
                          f"{', '.join(changed)}; resume with that config")


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _warn_if_trials_cannot_fit(s: SweepConfig, t: TrainConfig) -> None:
    """Trials' drivers holding what one trial's workers need would wait forever; say so up front."""
    import ray

    kind, per_worker, per_trial = ("GPU", 1.0, s.trial_gpus) if t.use_gpu else ("CPU", t.worker_cpus, s.trial_cpus)
    need = s.max_concurrent_trials * per_trial + t.num_workers * per_worker
    have = ray.cluster_resources().get(kind, 0.0)
    if need > have:
        print(f"warning: {s.max_concurrent_trials} trial drivers x {per_trial} {kind} + one trial's "
              f"{t.num_workers} workers x {per_worker} {kind} = {need} > the cluster's {have} {kind}: trials may "
              "wait forever unless the cluster scales up; lower sweep.max_concurrent_trials or "
              "sweep.trial_cpus/trial_gpus", flush=True)


def run_sweep(cfg: Config, resume: str | None = None) -> Path:
    """Run the sweep (or finish the one in `resume`); returns its folder."""
    from ray import tune

    out = Path(resume).resolve() if resume else sweep_dir(cfg)
    if resume:
        _check_resume(cfg, out)
    elif tune.Tuner.can_restore(str(out)):
        raise ValueError(f"a sweep already exists in {out}: finish it with --resume {out}, or set sweep.out "
                         "or name for a new one")
    specs = _eval_specs(cfg)  # bad task names, held-out questions without the chat template: before any training
    ensure_ray()
    folders = prepare(replace(cfg, pack=replace(cfg.pack, arms=sweep_arms(cfg))))
    folders = {name: str(Path(folder).resolve()) for name, folder in folders.items()}  # trials chdir
    trial_plans(cfg, folders)  # a plan no trial could run is refused before the sweep's folder is made
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    _warn_if_trials_cannot_fit(cfg.sweep, cfg.train)
    # Checkpoint reports at epoch ends may carry no val_loss; Tune would reject them as incomplete results.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # The sweep's MLflow run, parent of the trials' (a --resume reuses it); `raypack analyze` adds its analysis.
    parent = open_run(cfg.tracking, cfg.output_dir, out, f"sweep {out.name}", "sweep", params=to_dict(cfg))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), folders=folders, out=str(out),
                             parent=parent.ref() if parent else None),
        {"CPU": cfg.sweep.trial_cpus, "GPU": cfg.sweep.trial_gpus})
    if resume:
        tuner = tune.Tuner.restore(str(out), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = _new_tuner(cfg, trainable, folders, out)
    tuner.fit()
    if cfg.sweep.eval_best:
        heldout = heldout_task(cfg, out / "tasks")  # facts data: its held-out questions, as a study scores them
        _evaluate_best(cfg.eval, out, specs + ([heldout] if heldout else []), cfg.data.max_seq_len)
    if parent:
        end_unfinished(out / "runs")
        parent.log_artifacts([out / "config.yaml", out / "best_eval.json"])
        parent.end()
    return out


def _new_tuner(cfg: Config, trainable, folders: dict, out: Path):
    """The Tuner of a new sweep: the grid, ASHA (its rungs in optimizer steps) when asked, Tune's storage."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space, num_samples = search_space(cfg)
    scheduler = None
    if cfg.sweep.asha:
        max_t = max(plan.stop_step for plan in trial_plans(cfg, folders))
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(cfg.sweep.grace_period, max_t),
                                  reduction_factor=3)
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.sweep.metric, mode="min", scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=cfg.sweep.max_concurrent_trials,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=out.name, storage_path=str(out.parent)))


def trial_plans(cfg: Config, folders: dict) -> list[RunPlan]:
    """The run plan of every swept arm at every swept batch size (a trial's learning rate and seed change no step
    count), on the driver: a plan no trial could run (train.schedule_steps below its stop step) fails here, in
    one line, before Tune starts a trial."""
    trials = [trial_config(cfg, {"train.global_batch_size": b})
              for b in cfg.sweep.global_batch_size or [cfg.train.global_batch_size]]
    return [run_plan(t.train, t.optim, read_manifest(folders[arm]), t.train.num_workers)
            for arm in sweep_arms(cfg) for t in trials]


def _eval_specs(cfg: Config) -> list:
    """sweep.eval_best's lm-eval tasks from eval.*; with facts data the held-out questions come on top
    (raypack.eval.qa_task, written into the sweep's folder once trained), so they alone are enough."""
    if not cfg.sweep.eval_best:
        return []
    from raypack.eval.tasks import eval_tasks

    specs, skipped = eval_tasks(cfg.eval)
    if not check_heldout_task(cfg) and not specs:
        what = "eval.preset is none and eval.tasks is empty"
        if skipped:
            what = f"every task is skipped ({', '.join(skipped)}: eval.allow_code_execution is off)"
        raise ConfigError(f"sweep.eval_best needs lm-eval tasks: {what}, and the data has no held-out questions "
                          "(synth.task=facts has)")
    return specs


def _evaluate_best(ev: EvalConfig, out: Path, specs, max_seq_len: int) -> None:
    """lm-eval scores of each arm's best trial (its exported model) into best_eval.json, with the tasks skipped
    and why (raypack.eval.tasks.eval_tasks)."""
    from raypack.eval.tasks import eval_tasks

    skipped = eval_tasks(ev)[1]
    scores = {}
    for arm, trial in best_trials(load_trials(out)).items():
        model_dir = Path(trial["run_dir"]) / "raypack" / "model"
        print(f"[{arm}] lm-eval on the best trial {trial['trial_id']}: {model_dir}", flush=True)
        scores[arm] = {**{k: trial[k] for k in ("trial_id", "lr", "global_batch_size", "seed")},
                       "scores": score_on_ray(str(model_dir), specs, ev, max_seq_len), "skipped": skipped}
    (out / "best_eval.json").write_text(json.dumps(scores, indent=2))
