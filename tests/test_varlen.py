"""raypack_varlen, host-side sample boundaries and the attention selection table, on CPU (pure: no ray).

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_varlen.py -q

torch's varlen_attn runs on CUDA only, so the attention function is run here with
an INJECTED kernel (raypack.attention.use_varlen_kernel): the reference, one causal
sdpa per sample. What is checked:
- the boundaries collate computes on the host from the rows' seq_lens are the rows'
  samples (property test) and what transformers derives from position_ids
  (prepare_fa_kwargs_from_position_ids), in the flat and the [B, T] layout; cross
  and padding rows are one segment each (negative control: not the samples);
- the selection table of model.attn_implementation=auto, every case;
- both varlen_attn signatures (torch 2.10's is_causal, 2.11+'s window_size and
  enable_gqa) adapt to the same outputs as the reference, grouped-query included;
- through a tiny Llama forward, every layer gets the boundaries and every sample's
  per-token losses in a packed micro-batch equal the sample run alone on sdpa (1e-5,
  fp32); negative controls: boundaries off by one differ, missing ones are refused.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from raypack.attention import (VARLEN, adapt_varlen_attn, reference_varlen_attn, torch_varlen_attn,
                               use_varlen_kernel, varlen_attention_forward)
from raypack.data.collate import collate, model_inputs, sample_boundaries
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import build_tiny_model, select_attn_implementation
from raypack.train.loss import token_losses

PAD = 5
TOLERANCE = 1e-5


def make_row(lengths: list[int], rng: np.random.Generator) -> dict:
    """A packed isolated row as the packer writes it: samples end to end, positions restarting, labels[0] ignored."""
    ids = rng.integers(10, 4000, sum(lengths)).astype(np.int32)
    labels = ids.copy()
    starts = np.cumsum([0] + lengths[:-1])
    labels[starts] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": np.concatenate([np.arange(n) for n in lengths]),
            "seq_lens": np.array(lengths, dtype=np.int32)}


def segments(batch: dict) -> list[int]:
    return np.diff(batch["cu_seq_lens_q"].numpy()).tolist()


# ---------------------------------------------------------------- host-side boundaries


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=6), min_size=1, max_size=4),
       flatten=st.booleans(), multiple=st.sampled_from([None, 8]), seed=st.integers(0, 2**16))
def test_boundaries_are_the_rows_samples_and_what_transformers_derives(rows, flatten, multiple, seed):
    rng = np.random.default_rng(seed)
    batch = collate([make_row(r, rng) for r in rows], "isolated", PAD, multiple, flatten=flatten, boundaries=True)
    length = batch["input_ids"].shape[1]
    expected = []  # the samples, and each output row's tokens after them (pads) as one segment
    for out_row in ([sum(rows, [])] if flatten else rows):
        expected += out_row + ([length - sum(out_row)] if sum(out_row) < length else [])
    assert segments(batch) == expected
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_q"] is batch["cu_seq_lens_k"]
    assert batch["max_length_q"] == batch["max_length_k"] == max(expected)
    assert int(batch["cu_seq_lens_q"][-1]) == batch["input_ids"].numel()
    # transformers' own derivation from the position_ids (what flash_attention_2 did per layer, on the device)
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.tolist() == batch["cu_seq_lens_q"].tolist() == cu_k.tolist()
    assert int(max_q) == batch["max_length_q"]


def test_cross_and_padding_rows_are_one_segment_each():
    rng = np.random.default_rng(0)
    rows = [make_row([4, 3, 5], rng), make_row([6, 2], rng)]
    cross = collate(rows, "cross", PAD, boundaries=True)
    assert segments(cross) == [12, 12]  # whole rows: cross samples see the earlier ones
    assert segments(collate(rows, "isolated", PAD, boundaries=True)) == [4, 3, 5, 6, 2]  # control: the samples
    padding = collate([make_row([4], rng), make_row([7], rng)], "padding", PAD, boundaries=True)
    assert segments(padding) == [7, 7] and "attention_mask" in padding
    assert "cu_seq_lens_q" not in collate(rows, "isolated", PAD)  # only when asked


def test_boundaries_refuse_seq_lens_that_do_not_cover_the_row():
    row = make_row([4, 3], np.random.default_rng(0))
    with pytest.raises(ValueError, match="seq_lens"):
        collate([dict(row, seq_lens=np.array([4, 2]))], "isolated", PAD, boundaries=True)
    with pytest.raises(ValueError, match="add up to at most"):
        sample_boundaries([[4, 3]], 6)


# ---------------------------------------------------------------- the selection table


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("varlen", [True, False])
def test_auto_selection_table(device, precision, flash, varlen):
    for attention in ("isolated", "cross", None):  # isolated and padfree arms; cross; padding
        got = select_attn_implementation("auto", attention, device, precision, flash, varlen)
        if device == "cpu" or attention != "isolated":
            want = "sdpa"
        elif precision == "bf16" and flash:
            want = "flash_attention_2"
        elif precision == "bf16" and varlen:
            want = VARLEN
        else:
            want = "flex_attention"
        assert got == want, (attention, device, precision, flash, varlen)
        for name in ("sdpa", "eager", "flex_attention", "flash_attention_2", VARLEN):  # explicit names are kept
            assert select_attn_implementation(name, attention, device, precision, flash, varlen) == name


def test_the_loop_resolves_auto_per_arm_and_the_plan_records_it():
    from raypack.config import load_config
    from raypack.train import memory

    cfg = load_config(None, ["train.use_gpu=true", "pack.arms=[padding,padfree,bfd-isolated,bfd-cross]"])
    attentions = memory.arm_attentions(cfg, "bf16")
    assert attentions["padding"] == attentions["bfd-cross"] == "sdpa"
    assert attentions["padfree"] == attentions["bfd-isolated"] != "sdpa"
    assert f"sdpa for padding, bfd-cross; {attentions['padfree']} for padfree, bfd-isolated" == \
        memory.precision_and_attention(cfg)[1]
    assert memory.precision_and_attention(load_config(None, []))[1] == "sdpa"  # CPU: as before


def test_raypack_varlen_needs_a_gpu_in_bf16():
    from raypack.config import ConfigError, load_config

    for overrides in ([], ["train.use_gpu=true", "train.precision=fp32"]):
        with pytest.raises(ConfigError, match="raypack_varlen needs"):
            load_config(None, [f"model.attn_implementation={VARLEN}", *overrides])
    assert load_config(None, [f"model.attn_implementation={VARLEN}", "train.use_gpu=true"]).model.attn_implementation \
        == VARLEN


def test_varlen_needs_no_mask_memory():
    from raypack.train.memory import ModelShape, activation_bytes, micro_batch

    shape = ModelShape(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    flat = micro_batch("isolated", 2, 4096, VARLEN)
    assert flat.rows == 1  # one flat row, as flash_attention_2
    assert activation_bytes(shape, flat, 2, VARLEN, True) == activation_bytes(shape, flat, 2, "flash_attention_2", True)
    assert activation_bytes(shape, flat, 2, VARLEN, False).layer < activation_bytes(shape, flat, 2, "sdpa", False).layer


# ---------------------------------------------------------------- the kernel's two signatures


def qkv(heads: int = 4, kv_heads: int = 2, lengths=(5, 3, 7), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, 8, generator=g) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    return q, k, v, cu, max(lengths)


def torch_2_10_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert key.shape[1] == query.shape[1], "2.10 has no grouped-query attention"
    return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def torch_2_13_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa or key.shape[1] == query.shape[1], "grouped-query attention needs enable_gqa"
    assert window_size in ((-1, -1), (-1, 0))
    return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                 causal=window_size == (-1, 0))


def test_both_varlen_attn_signatures_give_the_reference():
    q, k, v, cu, longest = qkv()
    want = reference_varlen_attn(q, k, v, cu, cu, longest, longest)
    for fake in (torch_2_10_varlen_attn, torch_2_13_varlen_attn):
        got = adapt_varlen_attn(fake)(q, k, v, cu, cu, longest, longest, scale=8 ** -0.5, causal=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the reference itself: sample 2's first token attends only to itself (its output is its value)
    torch.testing.assert_close(want[5], v[5].repeat_interleave(2, dim=0))
    # negative control: non-causal attention differs
    assert (adapt_varlen_attn(torch_2_13_varlen_attn)(q, k, v, cu, cu, longest, longest, causal=False)
            - want).abs().max() > 1e-2


def test_this_torchs_varlen_attn_is_recognised_and_odd_signatures_refused():
    real = torch_varlen_attn()
    if real is not None:
        adapt_varlen_attn(real)  # torch 2.13 here: the window_size form
    with pytest.raises(ValueError, match="window_size"):
        adapt_varlen_attn(lambda q, k, v, cu_q, cu_k, max_q, max_k: q)
    q, k, v, cu, longest = qkv()
    with pytest.raises(ValueError, match="no scale"):  # 2.10 cannot scale other than 1/sqrt(head_dim)
        adapt_varlen_attn(torch_2_10_varlen_attn)(q, k, v, cu, cu, longest, longest, scale=0.5)


# ---------------------------------------------------------------- through the model


@pytest.fixture(scope="module")
def models():
    return {attn: build_tiny_model(seed=0, attn_implementation=attn).eval() for attn in ("sdpa", VARLEN)}


def losses_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**model_inputs(batch, "cpu"), use_cache=False).logits
    return token_losses(logits, batch["labels"])[0]


def alone_losses(model, rows: list[dict]) -> list[torch.Tensor]:
    out = []
    for row in rows:
        start = 0
        for n in row["seq_lens"]:
            one = {k: row[k][start: start + n] for k in ("input_ids", "labels")}
            out.append(losses_of(model, collate([one], "padding", PAD))[0])
            start += int(n)
    return out


def packed_diffs(losses: torch.Tensor, rows: list[dict], alone: list[torch.Tensor], flat: bool) -> float:
    """Max |loss in the micro-batch - loss alone| over each sample's targets after its first token."""
    diffs, i, offset = [], 0, 0
    for r, row in enumerate(rows):
        start = 0
        for n in row["seq_lens"]:
            n = int(n)
            at = offset + start if flat else start
            diffs.append((losses[0 if flat else r, at: at + n - 1] - alone[i]).abs().max())
            start, i = start + n, i + 1
        offset += start
    return float(torch.stack(diffs).max())


class CountingKernel:
    """The reference kernel, counting its calls (one per layer per forward)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return reference_varlen_attn(*args, **kwargs)


@pytest.mark.parametrize("flatten", [True, False])
def test_packed_isolated_samples_equal_each_sample_alone(models, flatten):
    rng = np.random.default_rng(1)
    rows = [make_row([9, 14, 6], rng), make_row([11, 5, 13, 4], rng)]
    alone = alone_losses(models["sdpa"], rows)  # the independent reference: another backend, one sample at a time
    batch = collate(rows, "isolated", PAD, flatten=flatten, boundaries=True)
    kernel = CountingKernel()
    with use_varlen_kernel(kernel):
        losses = losses_of(models[VARLEN], batch)
    assert kernel.calls == models[VARLEN].config.num_hidden_layers  # every layer got the boundaries
    assert packed_diffs(losses, rows, alone, flatten) < TOLERANCE

    # Negative control: one interior boundary off by one (the third sample starts a token late) is caught.
    wrong = dict(batch, cu_seq_lens_q=batch["cu_seq_lens_q"].clone())
    wrong["cu_seq_lens_q"][2] += 1
    wrong["cu_seq_lens_k"] = wrong["cu_seq_lens_q"]
    with use_varlen_kernel(reference_varlen_attn):
        assert packed_diffs(losses_of(models[VARLEN], wrong), rows, alone, flatten) > 1e-3
        # ... and so is the same micro-batch as cross rows (one segment per row: samples see earlier ones).
        cross = collate(rows, "cross", PAD, boundaries=True)
        assert packed_diffs(losses_of(models[VARLEN], cross), rows, alone, False) > 1e-3


def test_padded_validation_batches_equal_sdpa(models):
    rng = np.random.default_rng(2)
    rows = [make_row([n], rng) for n in (7, 12, 3)]
    batch = collate(rows, "padding", PAD, boundaries=True)
    with use_varlen_kernel(reference_varlen_attn):
        got = losses_of(models[VARLEN], batch)
    want = losses_of(models["sdpa"], batch)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    assert (got - want)[mask].abs().max() < TOLERANCE


def test_missing_boundaries_are_refused(models):
    batch = collate([make_row([5, 6], np.random.default_rng(3))], "isolated", PAD)
    with use_varlen_kernel(reference_varlen_attn), pytest.raises(ValueError, match="cu_seq_lens_q"):
        losses_of(models[VARLEN], batch)
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="attention dropout"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1, cu_seq_lens_q=1, cu_seq_lens_k=1,
                                 max_length_q=3, max_length_k=3)
