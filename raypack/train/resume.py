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

Random streams: every rank seeds its generators distinctly once its model is built
(`seed_rank`: ranks draw different dropout masks), and every checkpoint holds each
rank's Python, NumPy and torch (CPU, GPU) generator states (`save_rng_state`,
RNG_FILE), restored with the DeepSpeed state (`load_rng_state`), so a model with
dropout resumes drawing the masks an uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

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


# ------------------------------------------------------------------ random streams

RNG_FILE = "rng-rank{rank}.pt"  # beside the DeepSpeed shards in every checkpoint: one file per rank


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random streams once its model is built: distinct per rank (dropout masks must
    not repeat across ranks), fixed by (train.seed, rank).

    >>> rank_seed(0, 0) != rank_seed(0, 1) and rank_seed(0, 1) == rank_seed(0, 1)
    True
    """
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_rank(seed: int, rank: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every GPU) generators with rank_seed(seed, rank)."""
    value = rank_seed(seed, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def rng_state() -> dict:
    """This process's random streams (Python, NumPy, torch CPU and the current GPU): what dropout draws from.

    Only tensors, numbers and tuples, so that `torch.load(weights_only=True)` reads it back: no pickle.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what rng_state returned (the GPU stream only when there is one)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng_state(folder: str | Path, rank: int) -> None:
    """Write this rank's random streams into a checkpoint folder (RNG_FILE)."""
    torch.save(rng_state(), Path(folder) / RNG_FILE.format(rank=rank))


def load_rng_state(folder: str | Path, rank: int) -> bool:
    """Restore this rank's random streams from a checkpoint folder; False when it holds none (written before
    raypack saved them: the run resumes, but a model with dropout then draws other masks than an uninterrupted
    run would)."""
    path = Path(folder) / RNG_FILE.format(rank=rank)
    if not path.exists():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True
