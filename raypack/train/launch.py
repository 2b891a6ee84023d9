"""Launch the training loop of each arm on Ray Train (`raypack train`); the one module building a trainer.

    raypack train jobs/quickstart.yaml [key=value ...]            every arm of pack.arms in turn
    raypack train jobs/quickstart.yaml train.arm=bfd-isolated     one arm

`train(cfg)` prepares the data (reused when already prepared), then runs one V2
`TorchTrainer` per arm with `raypack.train.loop.train_loop_per_worker`. A run
is named <cfg.name>-<arm> under train.storage_path. On CPU each worker reserves
train.worker_cpus (0.5 lets two workers share two cores).

Failures and relaunches:
- a lost worker or node: Ray Train restarts the worker group from the latest
  checkpoint, up to train.max_failures times (default 1), waiting for resources
  to return when the cluster is short of them;
- launching a run that has checkpoints again resumes from its latest one (Ray
  Train V2), after checking that the settings which fix a step's rows match the
  checkpoint's (raypack.train.resume; a mismatch is refused, naming each key);
  train.resume=false moves the old run aside to <run>.replaced-<UTC time> and
  starts afresh;
- SIGTERM to the driver (a spot instance's notice, `ray job stop`): the run
  checkpoints at the next step boundary and `train_arm` raises Preempted (the CLI
  exits 143); the same command resumes it.

The driver prints a progress line every train.log_every steps from what the loop
reports to Ray Train (raypack.train.progress), not from the logs, which the driver's machine
need not see.

The loop's own logs (metrics.jsonl, rows-rank<r>.jsonl, events.jsonl) and the
exported model are written under <storage_path>/<name>/raypack/ (Ray Train V2
keeps only checkpointed metrics in its Result, so the per-step log is ours).
train.storage_path may be a URI (s3://bucket/runs, gs://...): Ray Train then
uploads the checkpoints there and restores from there, and the logs and model
go to <output_dir>/runs/<name>/raypack/.

Each arm is an MLflow run (raypack.tracking; a study's arms are children of the study's run): the driver
creates it and logs the config, the manifest's counts and the logs at the end; rank 0 logs every step.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyarrow.fs as pafs
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypack.config import Config, ConfigError, TrainConfig, to_dict
from raypack.data.pipeline import prepare
from raypack.data.prepared import read_manifest
from raypack.every import every
from raypack.tracking import Run, flat_params, open_run
from raypack.train.loop import train_loop_per_worker
from raypack.train.metrics import EVENTS_FILE, METRICS_FILE, read_events, read_metrics
from raypack.train.plan import run_plan
from raypack.train.progress import Progress
from raypack.train.resume import PREEMPT_FILE, Preempted, resume_mismatch, step_identity


def storage_path(cfg: Config) -> str:
    """Ray Train storage for checkpoints: a URI (s3://, gs://, ...) as given, else an absolute path."""
    path = cfg.train.storage_path or str(Path(cfg.output_dir) / "train")
    return path if "://" in path else str(Path(path).resolve())


def run_name(cfg: Config, arm: str) -> str:
    return f"{cfg.name}-{arm}"


def run_dir(cfg: Config, arm: str) -> Path:
    """Where the loop writes its logs and the exported model: beside the checkpoints when they are on a
    filesystem path, else (checkpoints in object storage) under <output_dir>/runs, a path every worker
    must reach (one node, or a shared filesystem on a cluster)."""
    storage = storage_path(cfg)
    if "://" in storage:
        return Path(cfg.output_dir).resolve() / "runs" / run_name(cfg, arm) / "raypack"
    return Path(storage) / run_name(cfg, arm) / "raypack"


def build_trainer(cfg: Config, arm: str, folder: str, val_folder: str | None = None,
                  callbacks: list | None = None, loop=train_loop_per_worker, tracking: Run | None = None,
                  progress: Progress | None = None) -> TorchTrainer:
    """A TorchTrainer running train_loop_per_worker on the prepared rows of one arm; `callbacks` go to its
    RunConfig (raypack.tune.sweep passes Ray Tune's TuneReportCallback). `loop` is another worker function
    taking the same config (raypack.bench.train's limit run). Rank 0 logs each step to the MLflow run
    `tracking` (raypack.tracking). Given `progress` (the driver's progress line), the loop's reports carry its
    lines and progress's callback forwards them to the driver."""
    train = cfg.train
    if progress:
        callbacks = [*(callbacks or []), progress.callback()]
    run = RunConfig(name=run_name(cfg, arm), storage_path=storage_path(cfg),
                    failure_config=FailureConfig(max_failures=train.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks)
    loop_config = {"config": to_dict(cfg), "arm": arm, "folder": str(folder), "run_dir": str(run_dir(cfg, arm)),
                   "val_folder": str(val_folder) if val_folder else None,
                   "tracking": tracking.ref() if tracking else None, "report_progress": progress is not None}
    return TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling_config(train),
                        run_config=run)


def scaling_config(train: TrainConfig) -> ScalingConfig:
    """The workers Ray Train asks the cluster for: train.num_workers, each one GPU (train.use_gpu) or
    train.worker_cpus CPUs. k8s/raycluster.yaml's worker groups are sized to it (tests/test_k8s.py)."""
    return ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                         resources_per_worker=None if train.use_gpu else {"CPU": train.worker_cpus})


def arm_config(cfg: Config, folder: str, eval_points: int = 0) -> Config:
    """cfg for the arm prepared in `folder`, with what its run plan (raypack.train.plan) resolves: the
    global_batch_size in rows (under train.global_batch_tokens, about that many real tokens per step) and,
    given eval_points (a study arm, a sweep trial), eval_every_steps when it is 0."""
    plan = run_plan(cfg.train, cfg.optim, read_manifest(folder), cfg.train.num_workers, eval_points)
    return replace(cfg, train=replace(cfg.train, global_batch_size=plan.rows_per_step,
                                      eval_every_steps=plan.eval_every_steps))


def train_arm(cfg: Config, arm: str, folder: str, val_folder: str | None = None, tracking: Run | None = None) -> dict:
    """Train one arm; returns a summary (steps, last metrics, paths) read back from the loop's logs.

    The MLflow run: `tracking` when the caller (a study) owns it, else one this arm opens and closes."""
    cfg = arm_config(cfg, folder)
    if cfg.train.global_batch_tokens:
        print(f"[{arm}] train.global_batch_tokens={cfg.train.global_batch_tokens}: "
              f"{cfg.train.global_batch_size} rows per optimizer step", flush=True)
    _check_resume(cfg, arm, folder)
    out = run_dir(cfg, arm)
    (out / PREEMPT_FILE).unlink(missing_ok=True)  # a notice the last launch already acted on
    own = tracking is None
    if own:
        tracking = open_run(cfg.tracking, cfg.output_dir, out, run_name(cfg, arm), "train",
                            tags={"raypack.arm": arm, "raypack.seed": cfg.train.seed})
    log_run_inputs(tracking, cfg, folder)
    try:
        with Progress(arm) as progress, every(1.0, progress.poll), _sigterm_checkpoints(out / PREEMPT_FILE):
            result = build_trainer(cfg, arm, folder, val_folder, tracking=tracking, progress=progress).fit()
    except BaseException:
        if tracking:
            tracking.end("FAILED")
        raise
    events = read_events(out)
    preempted = bool(events) and events[-1]["event"] == "preempted"
    if tracking:
        tracking.log_artifacts([out / METRICS_FILE, out / EVENTS_FILE], "logs")
        if own or preempted:
            tracking.end("KILLED" if preempted else "FINISHED")
    if preempted:
        raise Preempted(arm, events[-1]["step"])
    metrics = read_metrics(out)
    starts = [e for e in events if e["event"] in ("start", "resume")]
    return {"arm": arm, "run_dir": str(out), "num_steps": len(metrics),
            # the kernel the workers ran (auto resolves per arm and per machine): timings compare only alike
            "attn_implementation": starts[-1].get("attn_implementation") if starts else None,
            "global_batch_size": cfg.train.global_batch_size, "last": metrics[-1] if metrics else {},
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "model_dir": str(out / "model") if cfg.train.export else None}


def log_run_inputs(tracking: Run | None, cfg: Config, folder: str) -> None:
    """What a run trains with, as MLflow params (once, when the run is new: MLflow keeps a param's first value):
    the resolved config and its arm's manifest counts (manifest.*)."""
    if tracking and tracking.created:
        manifest = {k: v for k, v in read_manifest(folder).to_dict().items() if isinstance(v, (int, float, str))}
        tracking.log_params(flat_params({**to_dict(cfg), "manifest": manifest}))


def _run_storage(cfg: Config, arm: str) -> tuple[str, pafs.FileSystem, str]:
    """The run's folder in train.storage_path: as given (path or URI), its pyarrow filesystem and path there."""
    path = f"{storage_path(cfg).rstrip('/')}/{run_name(cfg, arm)}"
    fs, fs_path = pafs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
    return path, fs, fs_path


def latest_checkpoint(cfg: Config, arm: str):
    """The checkpoint a launch of this run would restore (Ray Train's latest registered one), or None."""
    path, fs, fs_path = _run_storage(cfg, arm)
    if fs.get_file_info(f"{fs_path}/checkpoint_manager_snapshot.json").type == pafs.FileType.NotFound:
        return None
    return Result.from_path(path).checkpoint


def _check_resume(cfg: Config, arm: str, folder: str) -> None:
    """Before a launch: refuse to restore a checkpoint whose step rows differ from this config's, or, with
    train.resume=false, move the old run aside (raypack.train.resume)."""
    checkpoint = latest_checkpoint(cfg, arm)
    if checkpoint is None:
        return
    if not cfg.train.resume:
        _set_aside(cfg, arm)
        return
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/position.json") as f:
        saved = json.loads(f.read())
    current = step_identity(cfg.train, arm, read_manifest(folder).config_hash)
    differing = resume_mismatch(saved, current)
    if differing:
        raise ConfigError(
            f"run {run_name(cfg, arm)} has a checkpoint at step {saved['step']} ({checkpoint.path}) taken with "
            f"other settings, so its remaining steps would hold other rows: {'; '.join(differing)}. Launch with "
            "the checkpoint's settings to resume, with another name or train.storage_path for a new run, or "
            "with train.resume=false to move the old run aside and start afresh")
    print(f"[{arm}] resuming from the checkpoint at step {saved['step']}: {checkpoint.path}", flush=True)


def _set_aside(cfg: Config, arm: str) -> None:
    """train.resume=false: rename the run's storage folder (checkpoints, Ray's state, and the logs when they are
    beside them) and its separate log folder if any, to <name>.replaced-<UTC time>; nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, fs, fs_path = _run_storage(cfg, arm)
    fs.move(fs_path, f"{fs_path}.replaced-{stamp}")
    print(f"[{arm}] train.resume=false: moved the old run to {path}.replaced-{stamp}", flush=True)
    logs = run_dir(cfg, arm)
    if "://" in path and logs.exists():
        logs.parent.rename(logs.parent.with_name(f"{logs.parent.name}.replaced-{stamp}"))


@contextmanager
def _sigterm_checkpoints(flag: Path):
    """While a run trains: SIGTERM writes `flag`, which the workers read at the next step boundary (checkpoint,
    then stop). Only the main thread can take signals; elsewhere (a Tune trial) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text(f"SIGTERM at {time.time()}\n")
        print("raypack: SIGTERM: checkpointing at the next step boundary, then stopping", flush=True)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: Config) -> list[dict]:
    """Prepare (cached) and train every arm of cfg.pack.arms, or only cfg.train.arm."""
    folders = prepare(cfg)
    arms = [cfg.train.arm] if cfg.train.arm else list(cfg.pack.arms)
    for arm in arms:  # every arm's plan first: one it cannot run (train.schedule_steps) is refused before any trains
        arm_config(cfg, folders[arm])
    return [train_arm(cfg, arm, folders[arm], folders.get("val")) for arm in arms]
