"""The padfree arm: padding's rows and micro-batches with the pad tokens removed, one flat isolated row each.

    .venv/bin/pytest tests/test_padfree.py -q

- the arm: parsed, refused and configured as documented, planned as padding (the
  same rows) but counted with no pad computed, prepared under a hash of its own;
- its micro-batches as the loop collates them (raypack.train.loop.micro_batch with
  raypack.data.collate.arm_collation) under every attention implementation: ONE row
  of exactly the samples' tokens, positions restarting at each sample, equal to what
  transformers' DataCollatorWithFlattening (TRL's padding_free) makes of the same
  samples (a property test); padding's layout of the same rows computes pads
  (negative control);
- on the tiny model (random init, fp32, CPU; sdpa and eager) every sample's per-token
  losses equal padding's within 1e-5, and so does the micro-batch loss under every
  loss reduction; the same samples laid end to end as `cross` differ (negative
  control).
The prepared arm (padding's rows, run plan and step-0 loss and gradients through the
loop's own step functions) is tested in tests/test_pipeline.py, flex_attention in
tests/test_isolation.py.
"""

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DataCollatorWithFlattening

from raypack.config import ConfigError, PackConfig, arm_spec, load_config, parse_arm
from raypack.data import collate as collate_module
from raypack.data.arm import plan_arm
from raypack.data.collate import arm_collation, collate
from raypack.data.pack import pack_rows, plan_pack
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import build_tiny_model
from raypack.train.loss import LOSS_REDUCTIONS, micro_batch_loss, step_denominator, token_losses
from raypack.train.loop import micro_batch
from raypack.train.memory import MicroBatch, arm_mode
from raypack.train.memory import micro_batch as memory_micro_batch

PAD = 0
TOLERANCE = 1e-5
CONTAMINATION = 1e-3
ATTENTIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def make_samples(lengths, seed: int = 0, vocab: int = 4000) -> list[dict]:
    """Samples of the given lengths: random tokens, a masked prompt, labels[0] ignored (as the tokenizer writes)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(10, vocab, n).astype(np.int32)
        labels = ids.copy()
        labels[: int(rng.integers(1, n))] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def padding_rows(samples: list[dict]) -> list[dict]:
    """The padding arm's rows of these samples, as the packer writes them (one sample each)."""
    lengths = np.array([len(s["input_ids"]) for s in samples])
    return pack_rows(plan_pack(lengths, int(lengths.max()), "padding"), samples, "isolated")


def arm_batch(rows: list[dict], strategy: str, attn: str = "sdpa", reduction: str = "token") -> dict:
    """The micro-batch the loop builds for an arm of `strategy` (set_up's arm_collation, then micro_batch)."""
    mode, flatten = arm_collation(strategy, arm_spec(strategy, PackConfig()).attention, attn)
    return micro_batch(rows, mode, PAD, reduction, flatten)


# ---------------------------------------------------------------- the arm


def test_padfree_is_an_arm_of_one_sample_per_row_with_no_suffix():
    assert parse_arm("padfree") == ("padfree", "isolated")
    spec = arm_spec("padfree", PackConfig(grouping="related", only_single_turn=True))
    assert (spec.strategy, spec.attention, spec.packer, spec.grouping, spec.only_single_turn) == \
        ("padfree", "isolated", "padding", "none", False)
    for bad, says in (("padfree-isolated", "unknown arm"), ("padfree-cross", "unknown arm"),
                      ("padfree+related", "one sample per row"), ("padfree+single-turn", "one sample per row")):
        with pytest.raises(ConfigError, match=says):
            parse_arm(bad)
    assert "padfree" in load_config("jobs/quickstart.yaml").pack.arms
    assert doctest.testmod(collate_module).failed == 0


def test_padfree_is_prepared_under_a_hash_of_its_own():
    from raypack.data.pipeline import prepared_folders  # computes the folders from the config alone

    folders = prepared_folders(load_config("jobs/quickstart.yaml", ["prepare.output_dir=/nonexistent"]))
    padding, padfree = folders["padding"].name, folders["padfree"].name
    assert padding.startswith("padding-") and padfree.startswith("padfree-")
    assert padding.removeprefix("padding-") != padfree.removeprefix("padfree-")


def test_padfree_plans_paddings_rows_and_counts_no_pad():
    lengths = np.random.default_rng(3).integers(2, 200, 301)
    plans = {arm: plan_arm(lengths, arm_spec(arm, PackConfig()), max_seq_len=256, window=64, group_buffer=0,
                           micro_batch_size=2, seed=0) for arm in ("padding", "padfree")}
    padding, padfree = plans["padding"], plans["padfree"]
    for a, b in zip(padding.plans + [padding.plan], padfree.plans + [padfree.plan], strict=True):
        for key in ("piece_sample", "piece_start", "piece_end", "row_offsets"):
            assert np.array_equal(getattr(a, key), getattr(b, key)), key
    differ = {k for k in padding.stats if padding.stats[k] != padfree.stats[k]}
    assert differ == {"num_batch_tokens", "padding_fraction"}  # padding computes pads (negative control)
    assert padding.stats["padding_fraction"] > 0.1
    # Independent of plan_stats: a padfree micro-batch computes exactly its samples' tokens.
    assert padfree.stats["num_batch_tokens"] == padfree.stats["num_tokens"] == int(lengths.sum())
    assert padfree.stats["padding_fraction"] == 0.0


def test_memory_estimate_flattens_padfree_on_every_attention():
    assert arm_mode("padfree", PackConfig()) == "padfree" and arm_mode("padding", PackConfig()) == "padding"
    for attn in ATTENTIONS:
        assert memory_micro_batch("padfree", 2, 4096, attn) == MicroBatch(1, 8192, masked=True)
    assert memory_micro_batch("padding", 2, 4096, "sdpa") == MicroBatch(2, 4096, masked=True)


# ---------------------------------------------------------------- no pad computed


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(2, 40), min_size=1, max_size=6), attn=st.sampled_from(ATTENTIONS),
       seed=st.integers(0, 2**16))
def test_padfree_micro_batch_is_the_samples_end_to_end(lengths, attn, seed):
    samples = make_samples(lengths, seed)
    rows = padding_rows(samples)
    batch = arm_batch(rows, "padfree", attn)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: isolation from positions
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    # The oracle: transformers' flattening collator, as TRL's padding_free uses it.
    oracle = DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": s["input_ids"].tolist(), "labels": s["labels"].tolist()} for s in samples])
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(batch[key], oracle[key]), key
    # Negative control: padding's micro-batch of the same rows computes pads when the lengths differ.
    padded = arm_batch(rows, "padding", attn)
    assert padded["input_ids"].numel() == len(lengths) * max(lengths)
    assert (padded["input_ids"].numel() > sum(lengths)) == (len(set(lengths)) > 1)


# ---------------------------------------------------------------- the same losses as padding


@pytest.fixture(scope="module")
def models():
    return {attn: build_tiny_model(seed=0, attn_implementation=attn).eval() for attn in ("sdpa", "eager")}


def forward(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch},
                     use_cache=False).logits


def per_sample_losses(losses: torch.Tensor, lengths: list[int], flat: bool) -> list[torch.Tensor]:
    """Each sample's n-1 shifted token losses: row i of a padded batch, or its stretch of the flat row."""
    if not flat:
        return [losses[i, : n - 1] for i, n in enumerate(lengths)]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [losses[0, s: s + n - 1] for s, n in zip(starts, lengths)]


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padfree_losses_equal_paddings_per_sample(models, attn, micro_batch_size):
    lengths = [23, 7, 31, 12][:micro_batch_size]
    samples = make_samples(lengths, seed=micro_batch_size)
    rows = padding_rows(samples)
    padding, padfree = arm_batch(rows, "padding", attn), arm_batch(rows, "padfree", attn)
    # The same rows as one cross row: the samples end to end, positions running on (the contaminated layout).
    cross = collate([{"input_ids": padfree["input_ids"][0].numpy(), "labels": padfree["labels"][0].numpy()}],
                    "cross", PAD)
    model = models[attn]
    got = {}
    for name, batch, flat in (("padding", padding, False), ("padfree", padfree, True), ("cross", cross, True)):
        losses, mask = token_losses(forward(model, batch), batch["labels"])
        got[name] = per_sample_losses(losses, lengths, flat)
        assert sum(int(m.sum()) for m in per_sample_losses(mask, lengths, flat)) == int(mask.sum())
    for i in range(micro_batch_size):
        assert (got["padfree"][i] - got["padding"][i]).abs().max() < TOLERANCE, i
        if i > 0:  # every later sample sees the ones before it in the cross row
            assert (got["cross"][i] - got["padding"][i]).abs().max() > CONTAMINATION, i


@pytest.mark.parametrize("reduction", LOSS_REDUCTIONS)
def test_padfree_micro_batch_loss_equals_paddings(models, reduction):
    samples = make_samples([19, 5, 28, 11], seed=11)
    rows = padding_rows(samples)
    out = {}
    for arm in ("padding", "padfree"):
        batch = arm_batch(rows, arm, "sdpa", reduction)  # the loop's micro-batch: sample weighting included
        denominator = step_denominator([batch], reduction)
        out[arm] = denominator, micro_batch_loss(forward(models["sdpa"], batch), batch, reduction, denominator, 1)
    (d_pad, pad), (d_free, free) = out["padding"], out["padfree"]
    assert d_pad == d_free > 0 and pad.num_tokens == free.num_tokens
    assert abs(pad.loss.item() - free.loss.item()) < TOLERANCE
    assert abs(pad.token_loss_sum - free.token_loss_sum) < TOLERANCE * max(1.0, abs(pad.token_loss_sum))
