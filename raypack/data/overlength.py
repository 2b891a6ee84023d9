"""Over-length policies applied to a tokenized cache, so arms that differ in them share one tokenization (pure core).

`raypack.data.tokenize.tokenize_pieces` (its `cut_pieces`) keeps every conversation in full: one that
fits in max_seq_len is one row (status `whole`), a longer one is ALL its consecutive
max_seq_len pieces (status `long`, piece 0, 1, ...; labels[0] of every piece
IGNORE_INDEX, so a cut loses the target of the new piece's first token), and one
with no supervised token at all is a `dropped_no_supervised` record. A policy is
then a choice of rows:

    truncate  piece 0 of each long conversation, if it holds a target  -> truncated
    split     every piece of a long conversation that holds a target   -> split
    drop      no piece of a long conversation                           -> dropped_too_long

A long conversation none of whose chosen pieces holds a target is
dropped_no_supervised, as when `tokenize_conversations` applies the policy while it
tokenizes (tests check that both give the same samples and counts for every policy).

Example: conversation A fits; B has 3 pieces, piece 1 without a target; C has 2, piece 0 without:

    status         [whole, long, long, long, long, long]
    piece          [0,     0,    1,    2,    0,    1]
    supervised     [5,     7,    0,    3,    0,    4]
    truncate kept  [1,     1,    0,    0,    0,    0]   A whole, B truncated, C dropped_no_supervised
    split kept     [1,     1,    0,    1,    0,    1]   A whole, B and C split
    drop kept      [1,     0,    0,    0,    0,    0]   A whole, B and C dropped_too_long
"""

from __future__ import annotations

import numpy as np

from raypack.config import OVERLENGTH_POLICIES
from raypack.data.tokenize import IGNORE_INDEX, TokenizeResult

WHOLE = "whole"
LONG = "long"
DROPPED_NO_SUPERVISED = "dropped_no_supervised"
# Counts of one policy over a cache; num_cut_targets_lost needs the labels and is left to tokenize.
POLICY_COUNT_KEYS = ("num_samples", "num_kept", "num_truncated", "num_split", "num_split_pieces",
                     "num_split_pieces_dropped", "num_dropped_too_long", "num_dropped_no_supervised",
                     "num_tokens", "num_supervised_tokens")


def check_policy(policy: str) -> str:
    if policy not in OVERLENGTH_POLICIES:
        raise ValueError(f"over-length policy {policy!r} is not one of {', '.join(OVERLENGTH_POLICIES)}")
    return policy


def kept_rows(status: np.ndarray, piece: np.ndarray, num_supervised: np.ndarray, policy: str) -> np.ndarray:
    """Which rows of a cache (its status, piece and supervised-token columns) are samples under the policy."""
    check_policy(policy)
    status = np.asarray(status, dtype=object)
    whole, long = status == WHOLE, status == LONG
    if policy == "drop":
        return whole
    usable = long & (np.asarray(num_supervised) > 0)
    return whole | (usable & (np.asarray(piece) == 0) if policy == "truncate" else usable)


def policy_counts(key: np.ndarray, status: np.ndarray, piece: np.ndarray, num_tokens: np.ndarray,
                  num_supervised: np.ndarray, policy: str) -> dict:
    """What the policy makes of the cache's conversations and samples (POLICY_COUNT_KEYS), as tokenize counts."""
    status = np.asarray(status, dtype=object)
    key, piece = np.asarray(key), np.asarray(piece)
    num_tokens, num_supervised = np.asarray(num_tokens), np.asarray(num_supervised)
    kept = kept_rows(status, piece, num_supervised, policy)
    long = status == LONG
    long_keys = np.unique(key[long])
    kept_long = np.unique(key[kept & long])
    counts = dict.fromkeys(POLICY_COUNT_KEYS, 0)
    counts.update(num_samples=int(kept.sum()), num_tokens=int(num_tokens[kept].sum()),
                  num_supervised_tokens=int(num_supervised[kept].sum()))
    counts["num_kept"] = int(((status == WHOLE) & (piece == 0)).sum()) + len(kept_long)
    counts["num_dropped_no_supervised"] = int((status == DROPPED_NO_SUPERVISED).sum())
    if policy == "drop":
        counts["num_dropped_too_long"] = len(long_keys)
        return counts
    counts["num_dropped_no_supervised"] += len(long_keys) - len(kept_long)
    if policy == "truncate":
        counts["num_truncated"] = len(kept_long)
    else:
        counts["num_split"] = len(kept_long)
        counts["num_split_pieces"] = int((kept & long).sum())
        counts["num_split_pieces_dropped"] = int((long & (num_supervised == 0)).sum())
    return counts


def cache_columns(tok: TokenizeResult) -> tuple[np.ndarray, ...]:
    """(key, status, piece, num_tokens, num_supervised) of a tokenize_pieces result as the tokenized cache holds
    them (key: the conversation's index), plus one record per conversation dropped for want of a target."""
    rows = [(s["conversation"], tok.outcomes[s["conversation"]], s["piece"], len(s["input_ids"]),
             int((s["labels"] != IGNORE_INDEX).sum())) for s in tok.samples]
    rows += [(c, o, 0, 0, 0) for c, o in enumerate(tok.outcomes) if o == DROPPED_NO_SUPERVISED]
    if not rows:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(5))
    key, status, piece, num_tokens, num_supervised = zip(*rows)
    return (np.array(key), np.array(status, dtype=object), np.array(piece), np.array(num_tokens),
            np.array(num_supervised))
