"""Stopping and resuming a run without changing what it trains (pure core: no Ray, no DeepSpeed).

A step's rows follow from its number and a handful of settings (raypack.data.order):
the arm and its prepared data, the number of workers, the batch sizes and the seed.
Every checkpoint's position.json records them (`step_identity`), and a relaunch
that would restore that checkpoint with other values is refused before Ray Train
starts (`resume_mismatch` names each differing key), because it would silently map
the remaining steps to other rows. `train.resume=false` starts the run afresh
instead (raypack.train.launch moves the old run aside).

    >>> saved = {"arm": "bfd-isolated", "train.global_batch_size": 8, "train.seed": 0}
    >>> resume_mismatch(saved, {**saved, "train.global_batch_size": 16})
    ['train.global_batch_size: 8 in the checkpoint, 16 now']

Preemption: the driver turns a SIGTERM (a spot instance's notice, `ray job stop`)
into the file PREEMPT_FILE in the run's log folder; the loop reads it at every
step boundary (rank 0, agreed by all ranks in the step's all-reduce), checkpoints
that step, logs a "preempted" event and returns, and the driver exits with
PREEMPTED_EXIT_CODE. Launching the same command again resumes exactly.
"""

from __future__ import annotations

PREEMPT_FILE = "preempt"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process ended by SIGTERM

# What decides the rows of every step (raypack.data.order), as recorded in a checkpoint's position.json.
STEP_KEYS = ("arm", "data_hash", "train.num_workers", "train.global_batch_size", "train.micro_batch_size",
             "train.seed", "train.balance_tokens")


class Preempted(RuntimeError):
    """A run stopped on SIGTERM after checkpointing its last step: running the same command again resumes it."""

    def __init__(self, arm: str, step: int):
        super().__init__(f"arm {arm!r} stopped on SIGTERM after checkpointing step {step}; "
                         "run the same command again to resume from it")
        self.arm, self.step = arm, step


def step_identity(train, arm: str, data_hash: str) -> dict:
    """The settings that fix a step's rows (STEP_KEYS), from a TrainConfig with its arm's batch size resolved."""
    return {"arm": arm, "data_hash": data_hash, "train.num_workers": train.num_workers,
            "train.global_batch_size": train.global_batch_size, "train.micro_batch_size": train.micro_batch_size,
            "train.seed": train.seed, "train.balance_tokens": train.balance_tokens}


def resume_mismatch(saved: dict, current: dict) -> list[str]:
    """Each STEP_KEYS key whose value differs between a checkpoint and the run about to restore it.

    A key missing from the checkpoint (written before it was recorded) is not compared.
    """
    return [f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} now" if isinstance(saved[key], str)
            else f"{key}: {saved[key]} in the checkpoint, {current[key]} now"
            for key in STEP_KEYS if key in saved and key in current and saved[key] != current[key]]
