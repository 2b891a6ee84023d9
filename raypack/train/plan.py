"""The run plan of one arm: rows per step, accumulation, steps, the LR schedule and when to evaluate, computed once.

Pure (no ray, deepspeed or torch): the training loop, `raypack train`'s launcher,
a study's match modes, the sweep (ASHA's max_t included) and `raypack plan` all
read their step counts from `run_plan`, so they cannot disagree.

    rows_per_step    train.global_batch_size, or under train.global_batch_tokens the
                     arm's rows holding about that many real tokens (rows_for_token_batch)
    grad_accum       rows_per_step / (micro_batch_size x world_size)
    steps_per_epoch  whole steps in the arm's rows (the manifest's num_rows), never
                     "until the iterator runs out"
    total_steps      epochs x steps_per_epoch
    stop_step        total_steps, or train.max_steps when smaller
    schedule_steps   the LR schedule's length: train.schedule_steps, else total_steps; never
                     below stop_step (refused: the schedule defines no LR after its end)
    warmup_steps     ceil(optim.warmup_ratio x schedule_steps) (lr_at)
    eval_every_steps train.eval_every_steps; when 0 and eval_points is given (a study,
                     a sweep trial), about eval_points points: ceil(stop_step / eval_points)

    >>> from raypack.config import ConfigError, OptimConfig, TrainConfig
    >>> from types import SimpleNamespace
    >>> train = TrainConfig(num_workers=2, micro_batch_size=2, global_batch_size=8, epochs=2, max_steps=30)
    >>> plan = run_plan(train, OptimConfig(warmup_ratio=0.2), SimpleNamespace(num_rows=170, num_tokens=170_000),
    ...                 world_size=2, eval_points=EVAL_POINTS)
    >>> (plan.grad_accum, plan.steps_per_epoch, plan.total_steps, plan.stop_step, plan.warmup_steps)
    (2, 21, 42, 30, 9)
    >>> (plan.eval_every_steps, plan.evaluates_at(3), plan.evaluates_at(30), plan.checkpoints_at(21))
    (3, True, True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from raypack.config import ConfigError, OptimConfig, TrainConfig

EVAL_POINTS = 10  # validation points of a study arm or a sweep trial when train.eval_every_steps is 0


class ArmRows(Protocol):
    """What the plan reads from an arm's manifest (raypack.data.prepared.Manifest)."""

    num_rows: int
    num_tokens: int


@dataclass(frozen=True)
class RunPlan:
    """One arm's steps on `world_size` ranks (module docstring); steps are counted from 1 in `done`."""

    world_size: int
    micro_batch_size: int
    rows_per_step: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    stop_step: int
    schedule_steps: int
    warmup_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int

    def evaluates_at(self, done: int) -> bool:
        """Validation loss after `done` steps: every eval_every_steps and at the last step."""
        return bool(self.eval_every_steps and done % self.eval_every_steps == 0) or done == self.stop_step

    def checkpoints_at(self, done: int) -> bool:
        """A checkpoint after `done` steps: every checkpoint_every_steps, at each epoch end and at the last step."""
        return bool(self.checkpoint_every_steps and done % self.checkpoint_every_steps == 0) \
            or done % self.steps_per_epoch == 0 or done == self.stop_step


def run_plan(train: TrainConfig, optim: OptimConfig, manifest: ArmRows, world_size: int,
             eval_points: int = 0) -> RunPlan:
    """The plan of an arm whose rows `manifest` describes, trained under `train` on `world_size` ranks."""
    rows_per_step = train.global_batch_size
    if train.global_batch_tokens:
        rows_per_step = rows_for_token_batch(train.global_batch_tokens, manifest.num_tokens, manifest.num_rows,
                                             train.micro_batch_size * world_size)
    grad_accum = gradient_accumulation_steps(rows_per_step, train.micro_batch_size, world_size)
    per_epoch = steps_per_epoch(manifest.num_rows, world_size, train.micro_batch_size, grad_accum)
    total = train.epochs * per_epoch
    stop = min(total, train.max_steps) if train.max_steps else total
    schedule = train.schedule_steps or total
    if schedule < stop:
        taken = f"train.max_steps={stop}" if stop < total else f"{train.epochs} epochs of {per_epoch} steps"
        raise ConfigError(f"train.schedule_steps={schedule} is shorter than the {stop} optimizer steps this arm "
                          f"takes ({taken}), and the LR schedule defines no learning rate after its end: set "
                          f"train.schedule_steps to 0 (the arm's own step count) or >= {stop}, or "
                          f"train.max_steps={schedule} to stop where the schedule ends")
    every = train.eval_every_steps or (max(1, math.ceil(stop / eval_points)) if eval_points else 0)
    return RunPlan(world_size=world_size, micro_batch_size=train.micro_batch_size, rows_per_step=rows_per_step,
                   grad_accum=grad_accum, steps_per_epoch=per_epoch, total_steps=total, stop_step=stop,
                   schedule_steps=schedule, warmup_steps=warmup_steps(schedule, optim.warmup_ratio),
                   eval_every_steps=every, checkpoint_every_steps=train.checkpoint_every_steps)


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global_batch_size / (micro_batch_size * world_size), which must be a whole number >= 1."""
    rows_per_pass = micro_batch_size * world_size
    if world_size < 1 or micro_batch_size < 1 or global_batch_size % rows_per_pass \
            or global_batch_size < rows_per_pass:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size * workers = {micro_batch_size} * {world_size} = {rows_per_pass}; "
            "change train.global_batch_size, train.micro_batch_size or train.num_workers")
    return global_batch_size // rows_per_pass


def rows_for_token_batch(global_batch_tokens: int, num_tokens: int, num_rows: int, rows_per_pass: int) -> int:
    """The global batch in rows that holds about `global_batch_tokens` real tokens for an arm whose
    `num_rows` rows hold `num_tokens` tokens: a multiple of rows_per_pass (micro-batch x workers), >= 1 pass.

    A packed arm (rows near max_seq_len) gets few rows per step, padding many, so
    arms compared at equal tokens per step take the same optimizer steps per epoch.
    """
    if global_batch_tokens < 1 or num_rows < 1 or rows_per_pass < 1:
        raise ValueError(f"global_batch_tokens={global_batch_tokens}, num_rows={num_rows} and "
                         f"rows_per_pass={rows_per_pass} must all be >= 1")
    mean_tokens = num_tokens / num_rows
    passes = max(1, round(global_batch_tokens / (mean_tokens * rows_per_pass)))
    return passes * rows_per_pass


def steps_per_epoch(num_rows: int, world_size: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch, from the manifest's row count (never 'until the iterator runs out')."""
    rows_per_step = world_size * micro_batch_size * grad_accum
    steps = num_rows // rows_per_step
    if steps == 0:
        raise ValueError(f"{num_rows} rows cannot fill one optimizer step of {rows_per_step} rows "
                         f"({world_size} workers x {micro_batch_size} micro-batch x {grad_accum} accumulation); "
                         "lower the global batch size or add data")
    return steps


def warmup_steps(schedule_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warmup at the start of a schedule of `schedule_steps` steps."""
    return math.ceil(warmup_ratio * schedule_steps)


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) out of the arm's `total_steps` (its schedule_steps).

    As transformers' get_cosine_with_min_lr_schedule_with_warmup /
    get_constant_schedule_with_warmup (what the paper's LLaMA-Factory ran): with
    W = ceil(warmup_ratio * total_steps), the LR rises linearly as lr * step / W
    (so step 0 runs at 0 when W > 0), then decays by a half cosine from lr at step
    W to min_lr_ratio * lr at step total_steps (or stays at lr for constant).
    lr=1e-5, 10 steps, warmup 0.2: steps 0, 1, 2 -> 0, 5e-6, 1e-5; step 9 -> 3.8e-7.
    """
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"need 0 <= step <= total_steps and total_steps >= 1, got step={step}, "
                         f"total_steps={total_steps}")
    warmup = warmup_steps(total_steps, optim.warmup_ratio)
    if step < warmup:
        return optim.lr * step / warmup
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule != "cosine":
        raise ValueError(f"optim.schedule {optim.schedule!r} is not one of cosine, constant")
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)
