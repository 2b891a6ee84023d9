"""The driver's live progress line while a run trains, from what the training loop reports to Ray Train.

Its own small module because Ray Train's controller unpickles the callback below: the controller then imports
this module alone, not the launcher's (torch, Ray Data, the pipeline).
"""

from __future__ import annotations

from typing import Self

from ray.train import UserCallback
from ray.util.queue import Queue


class Progress:
    """The driver's live progress line, from what the training loop reports to Ray Train.

    One line every train.log_every steps and at the last: step / stop step, loss,
    lr, tokens/s, padding, validation loss when computed, ETA (from the steps'
    times). The loop's reports carry rank 0's lines (raypack.train.loop); `callback`
    runs in Ray Train's controller and forwards them, numbered (the queue actor may
    take them out of order), to a queue actor that `poll` drains here. So the driver
    reads no file of the run (the logs may be on another node or in object storage),
    and prints each line once (worker output reaches the driver through Ray's log
    streaming, which may repeat lines). After a restart from a checkpoint the
    workers redo steps already shown: it says so once and prints only the steps
    beyond.

        with Progress(arm) as progress, every(1.0, progress.poll):
            build_trainer(cfg, arm, folder, progress=progress).fit()
    """

    def __init__(self, arm: str):
        self.arm = arm
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.arrived: dict[int, list[dict]] = {}  # reports by number, until those before them have arrived
        self.shown_reports = self.last_step = self.previous_step = 0
        self.first: dict | None = None  # the line the rate counts from: the first since the (re)start

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.queue.shutdown(force=True)

    def callback(self) -> UserCallback:
        return _ForwardProgress(self.queue)

    def poll(self) -> None:
        """Print the lines reported since the last poll, report after report."""
        self.arrived.update(self.queue.get_nowait_batch(self.queue.size()))
        while self.shown_reports + 1 in self.arrived:
            self.shown_reports += 1
            for line in self.arrived.pop(self.shown_reports):
                self.show(line)

    def show(self, m: dict) -> None:
        """Print one reported line, unless its step was printed before a restart."""
        if m["step"] <= self.previous_step:
            print(f"[{self.arm}] workers restarted from a checkpoint: the steps up to {self.last_step} are trained "
                  "again, their lines not shown twice", flush=True)
            self.first = None
        self.previous_step = m["step"]
        if self.first is None:
            self.first = m
        if m["step"] <= self.last_step:
            return
        self.last_step = m["step"]
        # The rate of the steps since the first line (start-up excluded), else this step's own time.
        steps = m["step"] - self.first["step"]
        per_step = (m["time"] - self.first["time"]) / steps if steps else m["step_time_s"]
        val = f" val_loss {m['val_loss']:.4f}" if "val_loss" in m else ""
        print(f"[{self.arm}] step {m['step']}/{m['stop_step']} loss {m['loss']:.4f} lr {m['lr']:.2e} "
              f"tokens/s {m['tokens_per_sec']:.0f} (rows {m['row_tokens_per_sec']:.0f}) "
              f"pad {m['padding_fraction']:.1%}{val} ETA {per_step * (m['stop_step'] - m['step']):.0f} s", flush=True)


class _ForwardProgress(UserCallback):
    """Runs in Ray Train's controller: puts the progress lines of rank 0's report on the driver's queue, as
    (number of the report, its lines)."""

    def __init__(self, queue: Queue):
        self.queue, self.sent = queue, 0

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics and metrics[0].get("progress"):
            self.sent += 1
            # Without waiting: the controller runs an event loop, which a blocking ray.get would stall.
            self.queue.actor.put_nowait.remote((self.sent, metrics[0]["progress"]))
