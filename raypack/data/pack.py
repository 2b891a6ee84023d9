"""Packing engine: plan which sample pieces go in which row, then build the rows (pure core).

Packing happens in two steps so that the expensive decision can be made on
lengths alone (1.2M lengths plan in well under a second) and the tokens are only
touched once:

1. ``plan_pack(lengths, max_seq_len, strategy, window)`` returns a ``PackPlan``:
   pieces ``(sample, start, end)`` in row order, grouped into rows CSR-style by
   ``row_offsets``.
2. ``pack_rows(plan, samples, attention)`` gathers the tokens of those pieces
   into rows with ``input_ids``, ``labels``, ``position_ids`` and ``seq_lens``.

Strategies (``STRATEGIES``):

- ``padding``: one sample per row, in input order. Rows are padded to the
  longest row of the micro-batch later, by the collator, not here.
- ``random``: the paper's random packing. Concatenate the samples in input order
  and cut the stream into rows of exactly ``max_seq_len`` tokens (the last row
  of each window is shorter); samples are split across rows. Accepts samples of
  any length.
- ``greedy``: the paper's greedy packing. Sort by length, longest first (stable,
  so ties keep input order), and put each sample in the first row that still has
  room. Samples are never split.
- ``bfd``: best-fit decreasing. Same order as ``greedy``, but each sample goes to
  the row whose remaining room is the smallest that still fits it (ties: the row
  that reached that room first). Samples are never split.

``window > 0`` plans consecutive chunks of ``window`` samples independently (the
paper used 1000), so no row mixes samples of two windows; ``window=0`` plans the
whole input at once. ``padding``, ``greedy`` and ``bfd`` need every length
``<= max_seq_len``: apply the tokenizer's over-length policy first.

Attention (``ATTENTIONS``):

- ``isolated``: ``position_ids`` restart at 0 at every piece, so a varlen or
  position-derived mask keeps each piece to itself.
- ``cross``: the paper's contaminated packing; ``position_ids`` run 0..len-1
  over the whole row and attention crosses piece boundaries.

Labels are the same in both: the first token of every piece gets
``IGNORE_INDEX``, so no target is predicted from another sample. Whole samples
already have ``IGNORE_INDEX`` at position 0 (the tokenizer guarantees it and
``pack_rows`` checks it), so ``padding``, ``greedy`` and ``bfd`` keep exactly the
input's supervised-token count. ``random`` loses one target per cut, exactly::

    num_supervised(random rows) = num_supervised(input samples)
        - number of row starts that fall strictly inside a sample
          (piece start > 0) at a token whose label is supervised

because that token's predecessor sits at the end of the previous row, and a row
cannot predict its own first token.

Example, ``max_seq_len=8``, four samples whose tokens reveal their origin
(sample 1 is tokens 21..26; ``-100`` is ``IGNORE_INDEX``):

>>> import numpy as np
>>> def sample(first, labels):
...     ids = np.arange(first, first + len(labels), dtype=np.int32)
...     return {"input_ids": ids, "labels": np.array(labels, dtype=np.int32), "source": "demo"}
>>> samples = [sample(11, [-100, 12, 13]),
...            sample(21, [-100, -100, 23, 24, 25, 26]),
...            sample(31, [-100, 32]),
...            sample(41, [-100, -100, 43, 44])]
>>> lengths = np.array([len(s["input_ids"]) for s in samples])
>>> plan = plan_pack(lengths, max_seq_len=8, strategy="random")
>>> plan.piece_sample.tolist(), plan.piece_start.tolist(), plan.piece_end.tolist()
([0, 1, 1, 2, 3], [0, 0, 5, 0, 0], [3, 5, 6, 2, 4])
>>> plan.row_offsets.tolist()
[0, 2, 5]
>>> for row in pack_rows(plan, samples, "isolated"):
...     print({k: v.tolist() for k, v in row.items()})
{'input_ids': [11, 12, 13, 21, 22, 23, 24, 25], 'labels': [-100, 12, 13, -100, -100, 23, 24, 25], 'position_ids': [0, 1, 2, 0, 1, 2, 3, 4], 'seq_lens': [3, 5]}
{'input_ids': [26, 31, 32, 41, 42, 43, 44], 'labels': [-100, -100, 32, -100, -100, 43, 44], 'position_ids': [0, 0, 1, 0, 1, 2, 3], 'seq_lens': [1, 2, 4]}

Token 26 started the second row inside sample 1, so its target is lost
(supervised 10 -> 9). ``bfd`` sorts 6, 4, 3, 2 and never splits:

>>> plan = plan_pack(lengths, max_seq_len=8, strategy="bfd")
>>> for row in pack_rows(plan, samples, "cross"):
...     print({k: v.tolist() for k, v in row.items()})
{'input_ids': [21, 22, 23, 24, 25, 26, 31, 32], 'labels': [-100, -100, 23, 24, 25, 26, -100, 32], 'position_ids': [0, 1, 2, 3, 4, 5, 6, 7], 'seq_lens': [6, 2]}
{'input_ids': [41, 42, 43, 44, 11, 12, 13], 'labels': [-100, -100, 43, 44, -100, 12, 13], 'position_ids': [0, 1, 2, 3, 4, 5, 6], 'seq_lens': [4, 3]}
"""

import math
from dataclasses import dataclass

import numpy as np

from raypack.config import ATTENTIONS
from raypack.data.bins import (
    check_lengths,
    check_plan_inputs,
    check_positive_int,
    fit_rows,
)
from raypack.data.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class PackPlan:
    """Which piece of which sample goes in which row.

    Pieces are listed in row order; row ``r`` holds pieces
    ``row_offsets[r]:row_offsets[r + 1]``. Piece ``p`` is tokens
    ``piece_start[p]:piece_end[p]`` of sample ``piece_sample[p]``. All arrays are int64.
    """

    piece_sample: np.ndarray
    piece_start: np.ndarray
    piece_end: np.ndarray
    row_offsets: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row_lengths(self) -> np.ndarray:
        """Number of tokens in each row."""
        token_offsets = np.concatenate(([0], np.cumsum(self.piece_end - self.piece_start)))
        return np.diff(token_offsets[self.row_offsets])

    @classmethod
    def of_whole_samples(cls, piece_sample: np.ndarray, row_offsets: np.ndarray, lengths: np.ndarray) -> "PackPlan":
        """The plan of rows made of whole samples: ``piece_sample`` in row order, rows cut at ``row_offsets``
        (what ``raypack.data.bins.fit_rows`` returns), ``lengths`` per sample."""
        return cls(piece_sample, np.zeros(len(piece_sample), dtype=np.int64), lengths[piece_sample], row_offsets)


def concat_plans(plans: list[PackPlan], samples: list[np.ndarray]) -> PackPlan:
    """The rows of each plan in turn, as one plan; piece_sample of ``plans[i]`` is mapped through ``samples[i]``.

    >>> a = plan_pack(np.array([2, 3]), 8, "bfd")
    >>> b = plan_pack(np.array([4]), 8, "padding")
    >>> both = concat_plans([a, b], [np.array([5, 7]), np.array([6])])
    >>> both.piece_sample.tolist(), both.row_offsets.tolist()
    ([7, 5, 6], [0, 2, 3])
    """
    if not plans:
        empty = np.zeros(0, dtype=np.int64)
        return PackPlan(empty, empty.copy(), empty.copy(), np.zeros(1, dtype=np.int64))
    pieces_per_row = np.concatenate([np.diff(p.row_offsets) for p in plans])
    return PackPlan(
        piece_sample=np.concatenate([s[p.piece_sample] for p, s in zip(plans, samples, strict=True)]).astype(np.int64),
        piece_start=np.concatenate([p.piece_start for p in plans]),
        piece_end=np.concatenate([p.piece_end for p in plans]),
        row_offsets=np.concatenate(([0], np.cumsum(pieces_per_row))).astype(np.int64),
    )


# ---------------------------------------------------------------- planning


def plan_pack(lengths: np.ndarray, max_seq_len: int, strategy: str, window: int = 0) -> PackPlan:
    """Plan rows of at most ``max_seq_len`` tokens for samples of the given lengths.

    See the module docstring for the strategies and a worked example.
    """
    lengths, max_seq_len, window = check_plan_inputs(lengths, max_seq_len, strategy, window)
    if strategy == "padding":
        return _plan_padding(lengths)
    if strategy == "random":
        return _plan_random(lengths, max_seq_len, window if window > 0 else max(len(lengths), 1))
    return PackPlan.of_whole_samples(*fit_rows(lengths, max_seq_len, window, best_fit=strategy == "bfd"), lengths)


def _plan_padding(lengths: np.ndarray) -> PackPlan:
    n = len(lengths)
    return PackPlan(
        piece_sample=np.arange(n, dtype=np.int64),
        piece_start=np.zeros(n, dtype=np.int64),
        piece_end=lengths.copy(),
        row_offsets=np.arange(n + 1, dtype=np.int64),
    )


def _plan_random(lengths: np.ndarray, max_seq_len: int, window: int) -> PackPlan:
    """Cut each window's token stream every ``max_seq_len`` tokens, in stream coordinates."""
    sample_ends = np.cumsum(lengths)
    sample_starts = sample_ends - lengths
    total = int(sample_ends[-1]) if len(lengths) else 0
    window_starts = sample_starts[::window]
    window_lens = np.diff(np.append(window_starts, total))
    rows_per_window = -(-window_lens // max_seq_len)
    num_rows = int(rows_per_window.sum())
    # Row k of a window starts k * max_seq_len tokens after the window's start.
    first_row = np.repeat(np.cumsum(rows_per_window) - rows_per_window, rows_per_window)
    row_starts = np.repeat(window_starts, rows_per_window) + (np.arange(num_rows) - first_row) * max_seq_len
    # A piece starts wherever a sample or a row starts; it ends where the next piece starts.
    # (Merged by hand: np.union1d is ~20x slower than a sort on a million starts.)
    containing = np.searchsorted(sample_starts, row_starts, side="right") - 1
    cuts = row_starts[row_starts != sample_starts[containing]]
    piece_starts = np.sort(np.concatenate((sample_starts, cuts)))
    piece_sample = np.searchsorted(sample_ends, piece_starts, side="right").astype(np.int64)
    piece_stops = np.append(piece_starts[1:], total)
    return PackPlan(
        piece_sample=piece_sample,
        piece_start=piece_starts - sample_starts[piece_sample],
        piece_end=piece_stops - sample_starts[piece_sample],
        row_offsets=np.append(np.searchsorted(piece_starts, row_starts), len(piece_starts)).astype(np.int64),
    )



# ---------------------------------------------------------------- materialising rows


def pack_rows(plan: PackPlan, samples: list[dict], attention: str) -> list[dict]:
    """Gather the planned pieces into rows of int32 arrays.

    Each row is ``{"input_ids", "labels", "position_ids", "seq_lens"}``; see the
    module docstring for an example. Rows are built one at a time from slices of
    the samples (a loop per row and per piece, never per token): gathering a whole
    window through token-level index arrays costs several times more memory traffic.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; use one of {ATTENTIONS}")
    if plan.num_rows == 0:
        return []
    ids, labels = _check_samples(plan, samples)
    piece_sample, piece_start = plan.piece_sample.tolist(), plan.piece_start.tolist()
    piece_end, row_offsets = plan.piece_end.tolist(), plan.row_offsets.tolist()
    rows = []
    for r in range(plan.num_rows):
        pieces = range(row_offsets[r], row_offsets[r + 1])
        row_ids = np.concatenate([ids[piece_sample[p]][piece_start[p]:piece_end[p]] for p in pieces])
        row_labels = np.concatenate([labels[piece_sample[p]][piece_start[p]:piece_end[p]] for p in pieces])
        seq_lens = np.array([piece_end[p] - piece_start[p] for p in pieces], dtype=np.int32)
        starts = np.cumsum(seq_lens) - seq_lens
        row_labels = row_labels.astype(np.int32, copy=False)  # concatenate made a fresh copy
        # A piece's first token would be predicted from another sample (or the row before): never a target.
        row_labels[starts] = IGNORE_INDEX
        positions = np.arange(len(row_ids), dtype=np.int32)
        if attention == "isolated":
            positions -= np.repeat(starts, seq_lens)
        rows.append({"input_ids": row_ids.astype(np.int32, copy=False), "labels": row_labels,
                     "position_ids": positions, "seq_lens": seq_lens})
    return rows


def _check_samples(plan: PackPlan, samples: list[dict]) -> tuple[list, list]:
    """The samples' token and label arrays, checked against the plan and the first-token rule."""
    ids = [np.asarray(s["input_ids"]) for s in samples]
    labels = [np.asarray(s["labels"]) for s in samples]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    bad = np.flatnonzero(lengths != np.array([len(x) for x in labels], dtype=np.int64))
    if bad.size:
        raise ValueError(f"sample {int(bad[0])} has {lengths[bad[0]]} input_ids but "
                         f"{len(labels[bad[0]])} labels; they must have equal length")
    if len(plan.piece_sample) and (plan.piece_sample.max() >= len(samples)
                                   or np.any(plan.piece_end > lengths[plan.piece_sample])
                                   or np.any(plan.piece_start >= plan.piece_end)):
        raise ValueError(f"plan does not match these {len(samples)} samples; plan them with "
                         "plan_pack(lengths of these samples, ...)")
    first_labels = np.array([lab[0] for lab in labels if len(lab)], dtype=np.int64)
    targets_at_start = int(np.count_nonzero(first_labels != IGNORE_INDEX))
    if targets_at_start:
        raise ValueError(f"{targets_at_start} samples have a target at position 0; the tokenizer "
                         f"must set labels[0] = IGNORE_INDEX ({IGNORE_INDEX}) since a first token has "
                         "no predecessor")
    return ids, labels


# ---------------------------------------------------------------- statistics


def plan_stats(plan: PackPlan, lengths: np.ndarray, max_seq_len: int, micro_batch_size: int = 1) -> dict:
    """Length-only statistics of a plan (no tokens needed); supervised tokens are counted on the rows
    (``row_supervised_tokens``).

    ``num_batch_tokens`` counts the tokens computed when consecutive rows are
    collated ``micro_batch_size`` at a time, each micro-batch padded to its longest
    row; ``padding_fraction`` is the share of those that are padding.
    ``lower_bound_rows`` is the fewest rows the tokens fit in.

    Rows of 8, 7 and 5 tokens, collated two at a time, compute 2 * 8 + 5 = 21 tokens:

    >>> lengths = np.array([5, 5, 5, 2, 2, 1])
    >>> stats = plan_stats(plan_pack(lengths, 8, "bfd"), lengths, 8, micro_batch_size=2)
    >>> stats["num_rows"], stats["num_tokens"], stats["num_capacity_tokens"], stats["num_batch_tokens"]
    (3, 20, 24, 21)
    """
    lengths = check_lengths(lengths)
    max_seq_len = check_positive_int("max_seq_len", max_seq_len)
    micro_batch_size = check_positive_int("micro_batch_size", micro_batch_size)
    if len(plan.piece_sample) and plan.piece_sample.max() >= len(lengths):
        raise ValueError(f"plan refers to sample {int(plan.piece_sample.max())} but only "
                         f"{len(lengths)} lengths were given; pass the lengths the plan was made from")
    pieces_per_sample = np.bincount(plan.piece_sample, minlength=len(lengths))
    row_lens = plan.row_lengths()
    num_rows = len(row_lens)
    num_tokens = int(row_lens.sum())
    capacity = num_rows * max_seq_len
    batch_tokens = _batch_tokens(row_lens, micro_batch_size)
    lower_bound = math.ceil(num_tokens / max_seq_len)
    return {
        "num_samples": len(lengths),
        "num_rows": num_rows,
        "num_tokens": num_tokens,
        "num_capacity_tokens": capacity,
        "efficiency": num_tokens / capacity if capacity else 0.0,
        "num_batch_tokens": batch_tokens,
        "padding_fraction": 1.0 - num_tokens / batch_tokens if batch_tokens else 0.0,
        "lower_bound_rows": lower_bound,
        # 0 rows for 0 tokens meets the bound exactly.
        "rows_over_lower_bound": num_rows / lower_bound if lower_bound else 1.0,
        "num_split_samples": int((pieces_per_sample > 1).sum()),
        "max_row_len": int(row_lens.max()) if num_rows else 0,
    }


def row_supervised_tokens(rows: list[dict]) -> np.ndarray:
    """The number of targets (labels other than ``IGNORE_INDEX``) in each row, as int64."""
    return np.array([np.count_nonzero(r["labels"] != IGNORE_INDEX) for r in rows], dtype=np.int64)


def _batch_tokens(row_lens: np.ndarray, micro_batch_size: int) -> int:
    """Tokens computed when consecutive rows are collated, each micro-batch padded to its longest row."""
    if len(row_lens) == 0:
        return 0
    batch_starts = np.arange(0, len(row_lens), micro_batch_size)
    longest = np.maximum.reduceat(row_lens, batch_starts)
    rows_in_batch = np.diff(np.append(batch_starts, len(row_lens)))
    return int((longest * rows_in_batch).sum())
