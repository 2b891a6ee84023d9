"""Which conversations are held out for validation: deterministic by key and seed (pure core).

A conversation is held out by a hash of its key (its place in the input: `record_key`, the file's index among
the sources and the row's number in it) and the seed, never by its position in a shard, so every arm, every
worker count, every rerun, `raypack prepare` (raypack.data.pipeline) and `raypack compare` (raypack.data.local)
hold out exactly the same conversations (`held_out_keys`).

    >>> keys = np.arange(1, 11, dtype=np.int64)
    >>> holdout_mask(keys, seed=0, count=3).sum()
    np.int64(3)
"""

from __future__ import annotations

import numpy as np

from raypack.data.overlength import kept_rows

KEY_ROW_BITS = 40  # key = file index << 40 | row number: input order, unique per record
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


def record_key(file_index: int, row: int) -> int:
    """The key of row `row` (from 1) of the file at `file_index` among the sources; a synthetic row's is its row."""
    return (file_index << KEY_ROW_BITS) | row


def held_out_keys(key: np.ndarray, status: np.ndarray, piece: np.ndarray, num_supervised: np.ndarray,
                  overlength: str, seed: int, fraction: float = 0.0, count: int = 0) -> np.ndarray:
    """The held-out conversations' keys, sorted, from the tokenized cache's columns (one row per sample piece or
    dropped record: raypack.data.overlength): drawn from the conversations `overlength` keeps a sample of, so the
    same whatever the arms' own policies."""
    conv_keys = np.unique(np.asarray(key)[kept_rows(status, piece, num_supervised, overlength)])
    if len(conv_keys) == 0:
        return conv_keys
    return conv_keys[holdout_mask(conv_keys, seed, fraction=fraction, count=count)]
