"""A sweep's trials as records: what Ray Tune holds, read through Tune's own result API with no Ray running, and
each trial's per-step log. `raypack analyze` (raypack.tune.analyze) tabulates the records; `raypack sweep` counts
their statuses.

    records = load_trials("out/sweep/sweep-quick")    # one dict per trial: the columns of trials.csv

From Tune, `ray.tune.ExperimentAnalysis(SWEEP_DIR)`: it loads the newest experiment_state-*.json (a resumed
sweep leaves one per session, named by its start time; Tune picks the newest name, as its --resume does) and
gives each trial's id, config (the trial's overrides), status and last result (time_total_s). A trial is what
that state lists: a folder Tune does not know is not a trial. Loading it needs no Ray instance and starts none
(Trial.local_path would need one; it is never read). Tune's loader unpickles parts of the state (cloudpickle),
among them the sweep's trial-name functions, kept here so that loading imports this light module rather than
raypack.tune.sweep (torch, Ray Train): analyze sweep folders you trust.

From the trial's own log, runs/<trial_id>-<arm>/raypack/metrics.jsonl and events.jsonl: steps, tokens, losses and
the planned step count, the one source for finished, early-stopped and errored trials alike (a finished trial's
last Tune result is run_summary of that same file, reported when its fit() returns).
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from raypack.train.metrics import read_events, read_metrics


def run_summary(metrics: list[dict]) -> dict:
    """What a run's per-step log (metrics.jsonl) says: last step, final and best losses, totals.

    The keys step, loss and val_loss are those of the loop's own reports, so a trial's last Tune result
    reads like the others."""
    val = [(m["step"], m["val_loss"]) for m in metrics
           if isinstance(m.get("val_loss"), (int, float)) and math.isfinite(m["val_loss"])]
    best_step, best = min(val, key=lambda v: v[1]) if val else (None, math.nan)
    return {"step": metrics[-1]["step"] if metrics else 0, "loss": metrics[-1]["loss"] if metrics else math.nan,
            "val_loss": val[-1][1] if val else math.nan, "best_val_loss": best, "best_val_step": best_step,
            "num_tokens": sum(m["num_tokens"] for m in metrics),
            "num_supervised_tokens": sum(m["num_supervised_tokens"] for m in metrics),
            "num_samples": sum(m["num_samples"] for m in metrics),
            "train_seconds": sum(m["step_time_s"] for m in metrics)}


def trial_dirname(trial) -> str:
    """A trial's folder in the sweep: its trial id (the runs/<trial_id>-<arm> folders match it)."""
    return trial.trial_id


def trial_name(trial) -> str:
    """arm_lr<lr>_b<batch>_s<seed>, as Tune's progress table shows the trial."""
    c = trial.config
    tags = (("lr", "optim.lr"), ("b", "train.global_batch_size"), ("s", "train.seed"))
    return "_".join([c["arm"]] + [f"{tag}{c[key]:.3g}" if isinstance(c[key], float) else f"{tag}{c[key]}"
                                  for tag, key in tags if key in c])


def tune_trials(sweep: Path) -> list:
    """Tune's trials of the sweep (ray.tune.experiment.Trial), by trial id, from its newest experiment state."""
    from ray.tune import ExperimentAnalysis

    if not any(sweep.glob("experiment_state-*.json")):
        raise ValueError(f"{sweep}: no trials found (no Ray Tune experiment_state-*.json); is it a `raypack sweep` "
                         "folder?")
    # Tune takes the folder as a URI: a relative path would have no scheme.
    return sorted(ExperimentAnalysis(str(sweep.resolve())).trials, key=lambda trial: trial.trial_id)


def trial_status(tune_status: str, steps: int, planned: int | None) -> str:
    """finished, stopped early (Tune ended it before its planned steps: ASHA), error or incomplete (pending, or
    running when its driver stopped: Tune restores a running trial as PENDING)."""
    if tune_status == "ERROR":
        return "error"
    if tune_status == "TERMINATED":
        return "finished" if planned is None or steps >= planned else "stopped early"
    return "incomplete"


def load_trials(sweep_dir: str | Path) -> list[dict]:
    """One record per trial of the sweep in `sweep_dir` (the columns of trials.csv), ordered by trial id."""
    sweep = Path(sweep_dir)
    base = yaml.safe_load((sweep / "config.yaml").read_text()) if (sweep / "config.yaml").exists() else {}
    defaults = {"optim.lr": base.get("optim", {}).get("lr"),
                "train.global_batch_size": base.get("train", {}).get("global_batch_size"),
                "train.seed": base.get("train", {}).get("seed", 0)}
    objective = "loss" if base.get("sweep", {}).get("metric") == "loss" else "val_loss"
    records = []
    for trial in tune_trials(sweep):
        params = {**defaults, **trial.config}
        run = sweep / "runs" / f"{trial.trial_id}-{params['arm']}" / "raypack"
        summary = run_summary(read_metrics(run))
        starts = [e for e in read_events(run) if e.get("event") in ("start", "resume")]
        planned = starts[-1].get("stop_step") if starts else None
        records.append({
            "trial_id": trial.trial_id, "arm": params["arm"], "lr": float(params["optim.lr"]),
            "global_batch_size": int(params["train.global_batch_size"]), "seed": int(params["train.seed"]),
            "status": trial_status(trial.status, summary["step"], planned), "steps": summary["step"],
            "planned_steps": planned, "tokens": summary["num_tokens"],
            "supervised_tokens": summary["num_supervised_tokens"], "samples": summary["num_samples"],
            "train_seconds": summary["train_seconds"], "wall_seconds": trial.last_result.get("time_total_s", math.nan),
            "final_train_loss": summary["loss"], "best_val_loss": summary["best_val_loss"],
            "best_val_step": summary["best_val_step"], "final_val_loss": summary["val_loss"],
            "objective": summary[objective], "run_dir": str(run.parent)})
    return records
