"""MLflow experiment tracking: the one module importing mlflow (imported only when tracking.enabled).

Runs, and who writes what:
- `raypack train`: one run per arm, named <name>-<arm>.
- `raypack study`: a parent run (the study), one child run per (arm, seed), named <name>-seed<k>-<arm>.
- `raypack sweep`: a parent run (the sweep), one child run per Tune trial, named by its trial id.
The driver (or a sweep trial's driver) creates each run and logs the resolved config as params, the arm's
manifest counts (params manifest.*), what the run ends with (a study arm's scores and probe as metrics) and the
outputs as artifacts (a study's report and plots, a sweep's analysis); rank 0 of the training loop logs the
per-step metrics of metrics.jsonl (loss, lr, tokens_per_sec, padding_fraction, val_loss, mfu, ...) under the
same names, at their step. No other rank logs.

A run's id is kept beside its outputs (`mlflow_run.json` in the run, study or sweep folder), so a relaunch
(a resumed study, a restarted worker group) logs to the same run. After a restore the loop replays the steps
after the checkpoint: MLflow then holds those steps twice, the later value being the model's history.

Tracking never fails training: the first failure (server down, database locked, ...) is reported once on
that process and its later calls do nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from raypack.config import TrackingConfig

RUN_FILE = "mlflow_run.json"
EMBEDDED = "mlflow"  # <output_dir>/mlflow: mlflow.db and artifacts/
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
FLUSH_SECONDS = 5.0  # rank 0 sends its per-step metrics at most this often (and at the end)


def tracking_uri(tracking: TrackingConfig, output_dir: str | Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under output_dir.

    >>> tracking_uri(TrackingConfig(enabled=True, uri="http://mlflow:5000"), "out")
    'http://mlflow:5000'
    """
    if tracking.uri:
        return tracking.uri
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(output_dir)


def embedded_uri(output_dir: str | Path) -> str:
    """The embedded store: an SQLite database under output_dir (`mlflow ui --backend-store-uri` takes it)."""
    return f"sqlite:///{(Path(output_dir) / EMBEDDED).resolve() / 'mlflow.db'}"


def flat_params(data: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (lists as JSON), cut to MLflow's limit.

    >>> flat_params({"optim": {"lr": 3e-05}, "pack": {"arms": ["padding", "bfd-isolated"]}})
    {'optim.lr': '3e-05', 'pack.arms': '["padding", "bfd-isolated"]'}
    """
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[f"{prefix}{key}"] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 1] + "…"
    return flat


def numeric(metrics: dict, prefix: str = "", skip: tuple = ("step",)) -> dict[str, float]:
    """The finite numbers of a metrics dict (what MLflow can plot), keys prefixed and in MLflow's alphabet.

    >>> numeric({"step": 3, "loss": 2.5, "gsm8k/exact_match,flexible-extract": 0.25, "x": float("nan")}, "score/")
    {'score/loss': 2.5, 'score/gsm8k/exact_match_flexible-extract': 0.25}
    """
    return {re.sub(r"[^\w\-. /]", "_", prefix + k): float(v) for k, v in metrics.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Run:
    """One MLflow run, logged to best effort: the first failure is reported once, later calls do nothing."""

    def __init__(self, uri: str, run_id: str | None, what: str):
        self.uri, self.run_id, self.what = uri, run_id, what
        self.client = None
        self.failed = False
        self.created = False  # by this process (a relaunch reuses the run: its params are already there)
        self.pending: list = []
        self.last_flush = time.monotonic()

    @classmethod
    def attach(cls, ref: dict | None, what: str) -> Run | None:
        """The run a driver created, from its reference ({"uri", "run_id"}) handed to another process."""
        return cls(ref["uri"], ref["run_id"], what) if ref else None

    def ref(self) -> dict | None:
        return None if self.failed or not self.run_id else {"uri": self.uri, "run_id": self.run_id}

    def _client(self):
        if self.client is None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server that is down: fail in seconds
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.uri)
        return self.client

    def _do(self, action) -> None:
        if self.failed:
            return
        try:
            action(self._client())
        except Exception as e:  # noqa: BLE001 — tracking must never fail training
            self.failed = True
            print(f"raypack: MLflow tracking of {self.what} failed ({type(e).__name__}: {str(e)[:300]}); "
                  "training goes on without it", flush=True)

    def log_params(self, params: dict[str, str]) -> None:
        def send(client) -> None:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                client.log_batch(self.run_id, params=items[i:i + 100])

        self._do(send)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Metrics of the whole run (a study arm's scores), sent now."""
        self._queue(values, step)
        self.flush()

    def log_step(self, values: dict[str, float], step: int) -> None:
        """One step's numbers (`numeric` of its metrics.jsonl line), sent with the others every FLUSH_SECONDS
        (rank 0)."""
        self._queue(values, int(step))
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def _queue(self, values: dict[str, float], step: int) -> None:
        if not self.failed:
            now = int(time.time() * 1000)
            self.pending += [(k, float(v), now, step) for k, v in values.items()]

    def flush(self) -> None:
        pending, self.pending, self.last_flush = self.pending, [], time.monotonic()

        def send(client) -> None:
            from mlflow.entities import Metric

            metrics = [Metric(*m) for m in pending]
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

        if pending:
            self._do(send)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._do(lambda c, k=key, v=value: c.set_tag(self.run_id, k, str(v)))

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_file():
                self._do(lambda c, p=path: c.log_artifact(self.run_id, str(p), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        """Send what is pending and close the run (FINISHED, FAILED or KILLED)."""
        self.flush()
        self._do(lambda c: c.set_terminated(self.run_id, status))


def folder_run(folder: str | Path, what: str) -> Run | None:
    """The MLflow run whose id a study, sweep or run folder keeps (mlflow_run.json), e.g. to add outputs made
    later (`raypack analyze`); None when the folder has none."""
    state = Path(folder) / RUN_FILE
    return Run.attach(json.loads(state.read_text()), what) if state.exists() else None


def end_unfinished(root: str | Path, status: str = "KILLED") -> None:
    """Close the runs under `root` still marked running (a sweep's trials that Tune stopped early: their
    process ends without closing them)."""
    for state in sorted(Path(root).rglob(RUN_FILE)):
        run = folder_run(state.parent, f"trial {state.parent.parent.name}")
        run._do(lambda c, r=run: c.get_run(r.run_id).info.status == "RUNNING" and c.set_terminated(r.run_id, status))


def open_run(tracking: TrackingConfig, output_dir: str | Path, folder: str | Path, name: str, kind: str,
             parent: Run | None = None, tags: dict | None = None, params: dict | None = None) -> Run | None:
    """The run of the outputs in `folder`: reused when folder/mlflow_run.json names one in the same store (a
    relaunch), else created, with `params` (flattened) and tags raypack.kind=kind (+ `tags`), as a child of
    `parent` when given. None when tracking is off; a Run that does nothing when the store cannot be reached."""
    if not tracking.enabled:
        return None
    uri = tracking_uri(tracking, output_dir)
    run = Run(uri, None, f"{kind} {name}")
    state = Path(folder) / RUN_FILE
    saved = json.loads(state.read_text()) if state.exists() else {}

    def create(client) -> None:
        if saved.get("uri") == uri:
            try:
                client.update_run(saved["run_id"], status="RUNNING")
                run.run_id = saved["run_id"]
                return
            except Exception:  # noqa: BLE001 — the run was deleted from the store: make a new one
                pass
        all_tags = {"raypack.kind": kind, "raypack.folder": str(Path(folder).resolve()), **(tags or {})}
        if parent and parent.run_id:
            all_tags["mlflow.parentRunId"] = parent.run_id
        created = client.create_run(_experiment_id(client, tracking.experiment, uri, output_dir),
                                    run_name=name, tags={k: str(v) for k, v in all_tags.items()})
        run.run_id, run.created = created.info.run_id, True
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"uri": uri, "run_id": run.run_id}))
        if params:
            run.log_params(flat_params(params))

    run._do(create)
    return run


def _experiment_id(client, name: str, uri: str, output_dir: str | Path) -> str:
    """The experiment's id, created when missing; in the embedded store its artifacts go beside the database
    (MLflow's default would be ./mlruns in the working directory)."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None
    if uri == embedded_uri(output_dir):
        location = ((Path(output_dir) / EMBEDDED).resolve() / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)
