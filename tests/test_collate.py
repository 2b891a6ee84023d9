"""Collation per mode, and the packed-vs-alone loss equivalence on the tiny Llama.

    .venv/bin/pytest tests/test_collate.py

The equivalence tests run a random-init 2-layer Llama (sdpa, float32, eval,
use_cache=False) on CPU: each sample's per-token losses inside an isolated packed
row must equal those of the sample run alone, and two negative controls (the
same row collated as `cross`, and the isolated row given an all-ones
attention_mask) must differ clearly, so the test cannot pass vacuously.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import find_packed_sequence_indices

from raypack.data.collate import collate
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import build_tiny_model

PAD = 0
TOLERANCE = 1e-5
CONTAMINATION = 1e-3


def sample(ids, labels) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def packed_row(samples, cross: bool = False) -> dict:
    """A row as the packer writes it: positions restart per sample (isolated) or run on (cross)."""
    lengths = [len(ids) for ids, _ in samples]
    positions = np.arange(sum(lengths)) if cross else np.concatenate([np.arange(n) for n in lengths])
    return {
        "input_ids": np.concatenate([ids for ids, _ in samples]),
        "labels": np.concatenate([labels for _, labels in samples]),
        "position_ids": positions.astype(np.int32),
        "seq_lens": np.asarray(lengths, dtype=np.int32),
    }


# The module docstring's example: sample i is made of tokens 10*i + k.
A = sample([11, 12, 13], [-100, 12, 13])
B = sample([21, 22], [-100, 22])
C = sample([31, 32, 33, 34], [-100, -100, 33, 34])


# ---------------------------------------------------------------- layout per mode


def test_padding_layout():
    batch = collate([packed_row([A]), packed_row([B])], "padding", PAD)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[11, 12, 13], [21, 22, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13], [-100, 22, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_isolated_layout_is_one_flat_row():
    batch = collate([packed_row([A, B]), packed_row([C])], "isolated", PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, 33, 34]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_cross_layout():
    batch = collate([packed_row([A, B], cross=True), packed_row([C], cross=True)], "cross", PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, 33, 34, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_isolated_pad_run_is_one_segment():
    batch = collate([packed_row([A, B, C]), packed_row([B])], "isolated", PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 16)  # 9 + 2 tokens end to end, then 5 pads
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1] + list(range(5))
    segments = find_packed_sequence_indices(batch["position_ids"])
    # A, B, C, B, then one pad segment.
    assert segments[0].tolist() == [0] * 3 + [1] * 2 + [2] * 4 + [3] * 2 + [4] * 5


def test_pad_to_multiple_of():
    for mode in ("padding", "isolated", "cross"):
        batch = collate([packed_row([A])], mode, PAD, pad_to_multiple_of=4)
        assert all(t.shape == (1, 4) for t in batch.values())
        assert batch["labels"][0, 3] == IGNORE_INDEX and batch["input_ids"][0, 3] == PAD


def test_bad_input_raises():
    with pytest.raises(ValueError, match="mode"):
        collate([packed_row([A])], "packed", PAD)
    with pytest.raises(ValueError, match="one sample per row"):
        collate([packed_row([A, B])], "padding", PAD)
    with pytest.raises(ValueError, match="no rows"):
        collate([], "isolated", PAD)
    with pytest.raises(ValueError, match="position_ids"):
        collate([{"input_ids": A[0], "labels": A[1]}], "isolated", PAD)


# ---------------------------------------------------------------- equivalence on the tiny Llama


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def samples(model):
    """Five random samples of different lengths, prompt tokens masked, labels[0] ignored."""
    rng = np.random.default_rng(0)
    out = []
    for length, prompt in [(7, 3), (12, 4), (5, 1), (9, 2), (6, 6)]:
        ids = rng.integers(10, model.config.vocab_size, length)
        labels = ids.copy()
        labels[:prompt] = IGNORE_INDEX
        labels[0] = IGNORE_INDEX
        out.append(sample(ids, labels))
    return out


def token_losses(model, batch) -> torch.Tensor:
    """Per-token cross-entropy with shifted labels; position t scores token t+1 (0 where ignored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


def alone_losses(model, samples) -> list[torch.Tensor]:
    return [token_losses(model, collate([packed_row([s])], "padding", PAD))[0] for s in samples]


def segment_gaps(row_losses: torch.Tensor, row_samples, reference: list[torch.Tensor]) -> list[float]:
    """Max |loss in row - loss alone| for each sample segment of one row."""
    gaps, start = [], 0
    for (ids, _), alone in zip(row_samples, reference):
        n = len(ids)
        gaps.append((row_losses[start : start + n - 1] - alone).abs().max().item())
        start += n
    return gaps


def test_isolated_row_matches_samples_alone(model, samples):
    row_samples = samples[:3]
    reference = alone_losses(model, row_samples)
    batch = collate([packed_row(row_samples)], "isolated", PAD)
    assert "attention_mask" not in batch
    assert max(segment_gaps(token_losses(model, batch)[0], row_samples, reference)) < TOLERANCE


def test_isolated_micro_batch_of_two_rows_matches_samples_alone(model, samples):
    rows = [samples[:3], samples[3:]]  # 24 tokens and 15 tokens, laid end to end
    batch = collate([packed_row(r) for r in rows], "isolated", PAD)
    assert batch["input_ids"].shape == (1, 39)
    losses = token_losses(model, batch)[0]
    gaps = segment_gaps(losses, samples, alone_losses(model, samples))
    assert max(gaps) < TOLERANCE


def test_padding_micro_batch_matches_samples_alone(model, samples):
    batch = collate([packed_row([s]) for s in samples], "padding", PAD)
    losses = token_losses(model, batch)
    for i, alone in enumerate(alone_losses(model, samples)):
        n = len(samples[i][0])
        assert (losses[i, : n - 1] - alone).abs().max() < TOLERANCE


def test_cross_row_differs_from_samples_alone(model, samples):
    row_samples = samples[:3]
    reference = alone_losses(model, row_samples)
    batch = collate([packed_row(row_samples, cross=True)], "cross", PAD)
    assert "attention_mask" not in batch
    gaps = segment_gaps(token_losses(model, batch)[0], row_samples, reference)
    # The first sample sees nothing before it; every later one sees its predecessors.
    assert gaps[0] < TOLERANCE
    assert min(gaps[1:]) > CONTAMINATION


def test_all_ones_attention_mask_turns_isolation_off(model, samples):
    row_samples = samples[:3]
    reference = alone_losses(model, row_samples)
    batch = collate([packed_row(row_samples)], "isolated", PAD)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    gaps = segment_gaps(token_losses(model, batch)[0], row_samples, reference)
    assert min(gaps[1:]) > CONTAMINATION
