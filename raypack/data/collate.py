"""Turn packed or unpacked rows into model-ready micro-batches (pure core).

Rows come from the packer: `{"input_ids", "labels", "position_ids", "seq_lens"}`,
int32 arrays (only `input_ids` and `labels` are read in `padding` mode).
`collate(rows, mode, pad_token_id)` returns int64 tensors, right-padded to the
longest row (rounded up to `pad_to_multiple_of` when given). Pads always carry
labels IGNORE_INDEX. Two rows, samples a=[11,12,13] (labels [-100,12,13]),
b=[21,22] (labels [-100,22]), c=[31,32,33,34] (labels [-100,-100,33,34]), pad id 0:

padding (one sample per row; rows [a], [b]):
    input_ids      [[11, 12, 13], [21, 22,  0]]
    labels         [[-100, 12, 13], [-100, 22, -100]]
    attention_mask [[1, 1, 1], [1, 1, 0]]
    No position_ids: with right padding the model's default arange is already
    each sample's 0..n-1, and pads come after every real token.

padfree (the `padfree` arm: padding's rows [a], [b] and micro-batches, collated as isolated
with flatten=True whatever the attention implementation; TRL's padding_free):
    input_ids      [[11, 12, 13, 21, 22]]
    labels         [[-100, 12, 13, -100, 22]]
    position_ids   [[0, 1, 2, 0, 1]]
    One row of exactly sum(sample lengths) tokens: no pad is computed, each sample
    attends only to itself (as in its padded row), so every per-token loss is
    padding's. `arm_collation("padfree", ...)` gives ("isolated", True).

isolated (packed, attention kept inside each sample; rows [a, b], [c]), as ONE flat row
(flatten=True, the default; what the loop gives flash_attention_2 and any other kernel):
    input_ids      [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    labels         [[-100, 12, 13, -100, 22, -100, -100, 33, 34]]
    position_ids   [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    The micro-batch's rows laid end to end (padding-free, [1, sum of row lengths])
    with positions restarting at every sample and no attention_mask.
    flash_attention_2 derives its varlen cu_seqlens from position_ids only when the
    batch holds ONE row (transformers 5: `_is_packed_sequence(position_ids,
    batch_size)` is False for batch_size != 1, so [2, T] isolated rows would run as
    plain causal rows, i.e. as `cross`); sdpa and eager isolate the flat row too
    (tests/test_isolation.py). labels[0] of every sample is IGNORE_INDEX, so no target crosses a
    sample boundary.
isolated with flatten=False ([B, T] rows; what the loop gives sdpa, eager and flex_attention):
    input_ids      [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    labels         [[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]]
    position_ids   [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    These three build the per-sample block-causal mask from position_ids at any
    batch size, and a [B, T] mask costs B x T^2 where the flat row's costs
    (B x T)^2 (sdpa and eager compute every masked block). Both layouts need
    attention_mask None and no KV cache: an all-ones mask would silently switch
    isolation off. The pad run gets positions 0, 1, 2, ... so all pads form ONE
    extra segment (zeros would make every pad its own phantom sequence).
`flatten_isolated(attn_implementation)` is that choice; `arm_collation` gives an arm's
mode and layout (padfree always flat: its rows would otherwise be padded).

Sample boundaries (boundaries=True; what flash_attention_2 and raypack_varlen take,
`takes_boundaries`): the cumulative lengths of the attention's segments over the
micro-batch's rows laid end to end, computed here on the host from the rows'
`seq_lens`, so no layer derives them from position_ids on the device (a sync per
layer) and no batch-size-1 rule applies (transformers' varlen-kwargs path lays
[B, T] rows end to end before its kernel, as raypack.attention does). Segments:
isolated rows: each sample, then the row's pad run as one segment; padding and
cross rows: the whole row, one causal segment (cross samples see earlier ones,
padding's pads come after every real token). The isolated flat row above gets
    cu_seq_lens_q = cu_seq_lens_k = [0, 3, 5, 9]  (int32)    max_length_q = max_length_k = 4
and its [B, T] layout [0, 3, 5, 9, 10] (the second row's one pad is a segment of its own),
what transformers' prepare_fa_kwargs_from_position_ids derives from position_ids in
both layouts (tests/test_varlen.py).

cross (the paper's contaminated packing; rows [a, b], [c]):
    input_ids      [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    labels         [[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]]
    position_ids   [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    Positions are generated as 0..L-1 for every row (the row's own position_ids
    are not read) and run on through the pads, so the model sees one causal
    sequence per row and samples attend to earlier samples. Pads sit after every
    real token, so causal attention alone keeps them out; no attention_mask.
"""

import numpy as np
import torch

from raypack.attention import BOUNDARY_KEYS, VARLEN
from raypack.data.tokenize import IGNORE_INDEX

COLLATE_MODES = ("padding", "isolated", "cross")
# Attention implementations that isolate [B, T] rows of packed samples from their restarting position_ids.
ISOLATING_ROWS = ("sdpa", "eager", "flex_attention")
# Attention implementations given the host-side sample boundaries (module docstring); raypack.attention's names.
TAKES_BOUNDARIES = ("flash_attention_2", VARLEN)
# What the model is given of a micro-batch (labels, segment_ids and the rest are the loss's).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids") + BOUNDARY_KEYS


def takes_boundaries(attn_implementation: str) -> bool:
    """Whether micro-batches for this attention carry the sample boundaries (collate(boundaries=True))."""
    return attn_implementation in TAKES_BOUNDARIES


def model_inputs(batch: dict, device) -> dict:
    """The model's keyword arguments of a collated micro-batch, tensors on `device` (the max lengths stay ints)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in MODEL_INPUTS}


def flatten_isolated(attn_implementation: str) -> bool:
    """Whether isolated micro-batches must be one flat row for this attention (module docstring): yes for
    flash_attention_2 and any implementation not known to isolate [B, T] rows."""
    return attn_implementation not in ISOLATING_ROWS


def arm_collation(strategy: str, attention: str | None, attn_implementation: str) -> tuple[str, bool]:
    """(mode, flatten) for the micro-batches of an arm packed with `strategy` and `attention` (a prepared
    manifest's): padding rows are padded; padfree rows are isolated and always ONE flat row (what removes their
    pads; flash_attention_2, sdpa, eager and flex_attention all isolate it); packed rows by their attention,
    isolated ones flat where `flatten_isolated` says.

    >>> arm_collation("padfree", "isolated", "sdpa"), arm_collation("bfd", "isolated", "sdpa")
    (('isolated', True), ('isolated', False))
    """
    if strategy == "padding":
        return "padding", False
    return attention, strategy == "padfree" or flatten_isolated(attn_implementation)


def collate(
    rows: list[dict],
    mode: str,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    flatten: bool = True,
    boundaries: bool = False,
) -> dict[str, torch.LongTensor]:
    """Stack rows into one micro-batch for `mode`; isolated rows are laid end to end unless not `flatten`, and
    with `boundaries` the batch carries BOUNDARY_KEYS (see the module docstring)."""
    _check_arguments(rows, mode, pad_to_multiple_of)
    if mode == "isolated" and flatten:
        rows = [_flatten(rows)]
    length = _padded_length([len(row["input_ids"]) for row in rows], pad_to_multiple_of)
    input_ids = _stack([row["input_ids"] for row in rows], length, pad_token_id)
    labels = _stack([row["labels"] for row in rows], length, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "labels": labels}
    if mode == "padding":
        batch["attention_mask"] = _stack([np.ones(len(row["input_ids"])) for row in rows], length, 0)
    elif mode == "isolated":
        batch["position_ids"] = _stack_isolated_positions(rows, length)
    else:
        batch["position_ids"] = torch.arange(length, dtype=torch.long).expand(len(rows), length).clone()
    if boundaries:
        for i, row in enumerate(rows):
            if mode == "isolated" and int(np.sum(row.get("seq_lens", -1))) != len(row["input_ids"]):
                raise ValueError(f"row {i}: boundaries=True needs the isolated row's seq_lens, adding up to its "
                                 f"{len(row['input_ids'])} tokens (got {row.get('seq_lens')})")
        segments = [row["seq_lens"] for row in rows] if mode == "isolated" else [[length]] * len(rows)
        batch.update(sample_boundaries(segments, length))
    return batch


def sample_boundaries(seq_lens: list, length: int) -> dict:
    """BOUNDARY_KEYS for rows of `length` tokens holding samples of `seq_lens` (per row), laid end to end; each
    row's tokens after its samples (pads) are one more segment.

    >>> b = sample_boundaries([[3, 2], [4]], 5)
    >>> b["cu_seq_lens_q"].tolist(), b["max_length_q"]
    ([0, 3, 5, 9, 10], 4)
    """
    lengths = []
    for i, row in enumerate(seq_lens):
        row = [int(n) for n in row]
        if min(row, default=1) < 1 or sum(row) > length:
            raise ValueError(f"row {i}: seq_lens {row} must be positive and add up to at most the row length {length}")
        lengths += row + ([length - sum(row)] if sum(row) < length else [])
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}


def _flatten(rows: list[dict]) -> dict:
    """The rows of an isolated micro-batch end to end: one row whose positions restart per sample."""
    flat = {key: np.concatenate([np.asarray(row[key]) for row in rows])
            for key in ("input_ids", "labels", "position_ids")}
    if all("seq_lens" in row for row in rows):
        flat["seq_lens"] = np.concatenate([np.asarray(row["seq_lens"]) for row in rows])
    return flat


def _check_arguments(rows: list[dict], mode: str, pad_to_multiple_of: int | None) -> None:
    if mode not in COLLATE_MODES:
        raise ValueError(f"mode={mode!r} is not one of {COLLATE_MODES}")
    if not rows:
        raise ValueError("collate got no rows; a micro-batch needs at least one row")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be a positive int or None")
    for i, row in enumerate(rows):
        if len(row["labels"]) != len(row["input_ids"]):
            raise ValueError(f"row {i}: labels ({len(row['labels'])}) and input_ids ({len(row['input_ids'])}) differ in length")
        if mode == "padding" and len(row.get("seq_lens", [0])) > 1:
            raise ValueError(
                f"row {i} holds {len(row['seq_lens'])} samples but mode='padding' needs one sample per row; "
                "collate packed rows with mode='isolated' or 'cross'"
            )
        if mode == "isolated" and len(row.get("position_ids", ())) != len(row["input_ids"]):
            raise ValueError(f"row {i}: mode='isolated' needs position_ids as long as input_ids (restarting at 0 per sample)")


def _padded_length(lengths: list[int], pad_to_multiple_of: int | None) -> int:
    longest = max(lengths)
    if pad_to_multiple_of:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _stack(arrays: list, length: int, fill: int) -> torch.Tensor:
    """Right-pad 1-D arrays to `length` with `fill` and stack as int64."""
    out = np.full((len(arrays), length), fill, dtype=np.int64)
    for i, array in enumerate(arrays):
        out[i, : len(array)] = array
    return torch.from_numpy(out)


def _stack_isolated_positions(rows: list[dict], length: int) -> torch.Tensor:
    out = np.empty((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row["position_ids"])
        out[i, :n] = row["position_ids"]
        out[i, n:] = np.arange(length - n)
    return torch.from_numpy(out)
