"""Isolated packing is isolated on every attention backend, at every micro-batch size the loop uses.

    .venv/bin/pytest tests/test_isolation.py -q

transformers 5 derives flash-attention's per-sample boundaries from position_ids
only when a batch holds ONE row (`_is_packed_sequence(position_ids, batch_size)`),
so the loop hands flash_attention_2 each isolated micro-batch as one padding-free
row, and sdpa, eager and flex_attention [B, T] rows (cheaper masks), as
`raypack.data.collate.flatten_isolated` decides. These tests take the micro-batches
the training loop itself builds (`raypack.train.loop.micro_batch`) for
micro_batch_size 1, 2 and 4 and check:
- flash_attention_2 (not installable on CPU) would see them as packed: transformers'
  own detection accepts them and its cu_seqlens are exactly the samples' boundaries;
  a [2, T] layout of the same rows is refused (the bug the flat layout fixes), and
  cross micro-batches are never read as packed (cross keeps its meaning);
- on sdpa, eager and flex_attention (compiled on CPU, so it runs on one shape) every
  sample's per-token losses inside the micro-batch, in both layouts, equal those of
  the sample run alone (1e-5), the alone reference being computed on eager;
- negative controls: the same rows as a cross micro-batch, and the isolated
  micro-batch given an all-ones attention_mask, differ clearly;
- the padding arm's micro-batches equal the samples alone on every backend, and the
  padfree arm's (the same rows as one flat row, whatever the backend) on
  flex_attention (sdpa and eager: tests/test_padfree.py);
- what training takes: an isolated micro-batch's gradient (both layouts, sdpa, train mode) is the sum of its
  samples' gradients alone, rows of 30-200 tokens with pads (control: the same rows cross differ by > 5%).
"""

import numpy as np
import pytest
import torch
from test_collate import packed_row as collate_packed_row
from test_collate import segment_gaps as gaps_in_flat_row
from test_collate import token_losses as per_token_losses
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from raypack.data.collate import arm_collation, collate, flatten_isolated
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import build_tiny_model
from raypack.train.loop import micro_batch

PAD = 5
TOLERANCE = 1e-5
CONTAMINATION = 1e-3
MICRO_BATCH_SIZES = (1, 2, 4)
BACKENDS = ("sdpa", "eager", "flex_attention")
FLEX_LENGTH = 96  # every flex row is padded to this length, so flex_attention compiles few shapes


def make_samples(num: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random samples of 5-24 tokens, a masked prompt, labels[0] ignored (as the tokenizer writes them)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        length = int(rng.integers(5, 25))
        ids = rng.integers(10, 4000, length).astype(np.int32)
        labels = ids.copy()
        labels[: int(rng.integers(1, length - 1))] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def packed_row(samples, cross: bool = False) -> dict:
    """A row as the packer writes it (tests/test_collate.py), with its num_tokens as the loop reads them."""
    row = collate_packed_row(samples, cross)
    return dict(row, num_tokens=int(row["seq_lens"].sum()))


def micro_batch_rows(micro_batch_size: int) -> list[list]:
    """micro_batch_size rows of 3 samples each (samples differ per row)."""
    samples = make_samples(3 * micro_batch_size, seed=micro_batch_size)
    return [samples[3 * r: 3 * r + 3] for r in range(micro_batch_size)]


@pytest.fixture(scope="module")
def models():
    return {attn: build_tiny_model(seed=0, attn_implementation=attn).eval() for attn in BACKENDS}


def alone(model, sample) -> torch.Tensor:
    return per_token_losses(model, collate([packed_row([sample])], "padding", PAD))[0]


# ---------------------------------------------------------------- what flash_attention_2 would see


def test_flash_attention_gets_flat_rows_and_the_row_isolating_kernels_rows():
    assert flatten_isolated("flash_attention_2") and flatten_isolated("some_kernel_we_do_not_know")
    assert not any(flatten_isolated(attn) for attn in BACKENDS)


@pytest.mark.parametrize("micro_batch_size", MICRO_BATCH_SIZES)
def test_loop_isolated_micro_batches_are_packed_for_flash_attention(micro_batch_size):
    rows = micro_batch_rows(micro_batch_size)
    flatten = flatten_isolated("flash_attention_2")
    batch = micro_batch([packed_row(r) for r in rows], "isolated", PAD, "token", flatten)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert _is_packed_sequence(batch["position_ids"], batch["input_ids"].shape[0])
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    lengths = [len(ids) for row in rows for ids, _ in row]
    assert cu_q.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert int(max_q) == max(lengths)


def test_a_two_row_isolated_layout_would_not_be_packed_for_flash_attention():
    # Negative control: the layout the loop used before (rows stacked [2, T]) runs as plain causal rows.
    rows = [packed_row(r) for r in micro_batch_rows(2)]
    length = max(len(r["input_ids"]) for r in rows)
    stacked = torch.stack([torch.as_tensor(np.pad(r["position_ids"], (0, length - len(r["position_ids"]))))
                           for r in rows])
    assert not _is_packed_sequence(stacked, 2)


@pytest.mark.parametrize("micro_batch_size", MICRO_BATCH_SIZES)
def test_cross_micro_batches_are_never_read_as_packed(micro_batch_size):
    rows = [packed_row(r, cross=True) for r in micro_batch_rows(micro_batch_size)]
    batch = micro_batch(rows, "cross", PAD, "token")
    assert not _is_packed_sequence(batch["position_ids"][:1], 1)  # each row alone: one causal sequence
    assert batch["input_ids"].shape[0] == micro_batch_size


# ---------------------------------------------------------------- losses on sdpa, eager, flex_attention


def isolated_and_controls(model, reference_model, micro_batch_size: int, flatten: bool, pad_to: int | None):
    """Per-sample gaps to the samples alone: (isolated, isolated with an all-ones mask, cross)."""
    rows = micro_batch_rows(micro_batch_size)
    reference = [[alone(reference_model, s) for s in row] for row in rows]
    batch = micro_batch([packed_row(r) for r in rows], "isolated", PAD, "token", flatten)
    if pad_to:
        batch = collate([packed_row(r) for r in rows], "isolated", PAD, pad_to_multiple_of=pad_to, flatten=flatten)

    def gaps(losses: torch.Tensor) -> list[float]:
        if flatten:
            return gaps_in_flat_row(losses[0], [s for row in rows for s in row], [x for ref in reference for x in ref])
        return [g for r, row in enumerate(rows) for g in gaps_in_flat_row(losses[r], row, reference[r])]

    isolated = gaps(per_token_losses(model, batch))
    masked_off = gaps(per_token_losses(model, dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))))
    cross_batch = collate([packed_row(r, cross=True) for r in rows], "cross", PAD, pad_to_multiple_of=pad_to)
    cross_losses = per_token_losses(model, cross_batch)
    cross = [g for r, row in enumerate(rows) for g in gaps_in_flat_row(cross_losses[r], row, reference[r])[1:]]
    return isolated, masked_off, cross


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "rows"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("micro_batch_size", MICRO_BATCH_SIZES)
def test_isolated_micro_batch_equals_samples_alone(models, attn, micro_batch_size, flatten):
    isolated, masked_off, cross = isolated_and_controls(models[attn], models["eager"], micro_batch_size, flatten, None)
    assert max(isolated) < TOLERANCE
    assert max(masked_off) > CONTAMINATION  # an all-ones mask switches isolation off
    assert min(cross) > CONTAMINATION  # cross attention reaches the earlier samples of its row


def test_isolated_micro_batch_equals_samples_alone_on_flex_attention(models):
    # flex_attention compiles on CPU (~1 min the first time), so one row length and the layout the loop gives
    # it ([B, T] rows); several compiled shapes also hit an inductor C++ codegen error of torch 2.13 on CPU.
    assert not flatten_isolated("flex_attention")
    for micro_batch_size in MICRO_BATCH_SIZES:
        isolated, masked_off, cross = isolated_and_controls(models["flex_attention"], models["eager"],
                                                            micro_batch_size, False, FLEX_LENGTH)
        assert max(isolated) < TOLERANCE, micro_batch_size
        assert max(masked_off) > CONTAMINATION, micro_batch_size
        assert min(cross) > CONTAMINATION, micro_batch_size


def test_padfree_micro_batch_equals_samples_alone_on_flex_attention(models):
    # The padfree arm hands every attention padding's rows as ONE flat row (arm_collation), flex_attention
    # included; padded to FLEX_LENGTH here, the [1, T] shape flex compiled above, so nothing new compiles.
    samples = make_samples(4, seed=7)
    mode, flatten = arm_collation("padfree", "isolated", "flex_attention")
    assert (mode, flatten) == ("isolated", True)
    batch = collate([packed_row([s]) for s in samples], mode, PAD, pad_to_multiple_of=FLEX_LENGTH, flatten=flatten)
    cross = collate([packed_row(samples, cross=True)], "cross", PAD, pad_to_multiple_of=FLEX_LENGTH)
    assert batch["input_ids"].shape == cross["input_ids"].shape == (1, FLEX_LENGTH)
    reference = [alone(models["eager"], s) for s in samples]
    assert max(gaps_in_flat_row(per_token_losses(models["flex_attention"], batch)[0], samples, reference)) < TOLERANCE
    contaminated = gaps_in_flat_row(per_token_losses(models["flex_attention"], cross)[0], samples, reference)
    assert min(contaminated[1:]) > CONTAMINATION  # negative control: the same samples as one cross row


@pytest.mark.parametrize("attn", BACKENDS)
def test_padding_micro_batch_equals_samples_alone(models, attn):
    samples = make_samples(4, seed=7)
    pad_to = FLEX_LENGTH if attn == "flex_attention" else None
    batch = collate([packed_row([s]) for s in samples], "padding", PAD, pad_to_multiple_of=pad_to)
    losses = per_token_losses(models[attn], batch)
    for i, s in enumerate(samples):
        n = len(s[0])
        assert (losses[i, : n - 1] - alone(models["eager"], s)).abs().max() < TOLERANCE


# ---------------------------------------------------------------- gradients, as training takes them


def summed_loss_gradient(model, batch: dict) -> torch.Tensor:
    """The gradient of the summed per-token loss (what token weighting scales), flattened over every parameter."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()
    torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                      ignore_index=IGNORE_INDEX, reduction="sum").backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "rows"])
def test_isolated_micro_batch_gradient_equals_the_samples_alone(flatten):
    # The claim training rests on: an isolated micro-batch's gradient is the sum of its samples' gradients alone
    # (rows of 30-200 tokens, pads at the ends). Negative control: the same rows as a cross micro-batch.
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(2):
        row = []
        for _ in range(int(rng.integers(2, 5))):
            ids = rng.integers(10, 4000, int(rng.integers(30, 200))).astype(np.int32)
            labels = ids.copy()
            labels[: max(1, len(ids) // 3)] = IGNORE_INDEX
            row.append((ids, labels))
        rows.append(row)
    model = build_tiny_model(seed=0, attn_implementation="sdpa").train()
    alone_sum = sum(summed_loss_gradient(model, collate([packed_row([s])], "padding", PAD)) for r in rows for s in r)
    isolated = summed_loss_gradient(model, micro_batch([packed_row(r) for r in rows], "isolated", PAD, "token",
                                                       flatten))
    cross = summed_loss_gradient(model, micro_batch([packed_row(r, cross=True) for r in rows], "cross", PAD, "token"))
    assert ((isolated - alone_sum).norm() / alone_sum.norm()).item() < TOLERANCE
    assert ((cross - alone_sum).norm() / alone_sum.norm()).item() > 0.05
