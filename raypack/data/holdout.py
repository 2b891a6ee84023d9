"""Which conversations are held out for validation: deterministic by key and seed (pure core).

A conversation is held out by a hash of its key (its place in the input) and the
seed, never by its position in a shard, so every arm, every worker count and
every rerun holds out exactly the same conversations.

    >>> keys = np.arange(1, 11, dtype=np.int64)
    >>> holdout_mask(keys, seed=0, count=3).sum()
    np.int64(3)
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each value (SplitMix64's finaliser)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def holdout_scores(keys: np.ndarray, seed: int) -> np.ndarray:
    """A score in [0, 1) per key; the lowest scores are held out."""
    salted = np.asarray(keys, dtype=np.int64).astype(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.int64))
    return (_splitmix64(salted) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def holdout_mask(keys: np.ndarray, seed: int, fraction: float = 0.0, count: int = 0) -> np.ndarray:
    """True for held-out keys: exactly `count` of them if count > 0, else about `fraction`."""
    keys = np.asarray(keys, dtype=np.int64)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("holdout keys must be unique, one per conversation")
    scores = holdout_scores(keys, seed)
    if count > 0:
        if count >= len(keys):
            raise ValueError(f"data.val_count={count} would hold out all {len(keys)} conversations; "
                             "lower it")
        mask = np.zeros(len(keys), dtype=bool)
        mask[np.argsort(scores, kind="stable")[:count]] = True
        return mask
    return scores < fraction
