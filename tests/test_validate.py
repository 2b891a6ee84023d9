"""Validation loss on the shared held-out split: the same number whatever the ranks and micro-batches.

    .venv/bin/pytest tests/test_validate.py -q
"""

import numpy as np
import pytest
import torch

from raypack.data.prepared import RowStore, write_rows
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import TINY_PAD_ID, build_tiny_model
from raypack.train.loss import token_losses
from raypack.train.validate import validation_groups, validation_sums


def val_rows(folder, num: int = 7, seed: int = 0) -> RowStore:
    """A validation split of `num` one-sample rows of random lengths, as RowStore reads it."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num):
        n = int(rng.integers(5, 40))
        row = rng.integers(10, 4000, n).astype(np.int32)
        lab = row.copy()
        lab[: n // 2] = IGNORE_INDEX
        rows.append({"input_ids": row, "labels": lab, "seq_lens": [n]})
    return RowStore(write_rows(folder, rows, "isolated"))


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0).eval()


def forward_of(model):
    def forward(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return token_losses(logits, batch["labels"])
    return forward


def test_sums_equal_one_sample_at_a_time_and_any_rank_split(model, tmp_path):
    rows = val_rows(tmp_path)
    expected_sum, expected_n = 0.0, 0
    with torch.no_grad():
        for row in rows.take(range(rows.num_rows)):
            logits = model(input_ids=torch.tensor([row["input_ids"].tolist()]), use_cache=False).logits
            losses, mask = token_losses(logits, torch.tensor([row["labels"].tolist()]))
            expected_sum += float(losses[mask].sum())
            expected_n += int(mask.sum())
    for micro, world in [(1, 1), (3, 1), (2, 2), (2, 3), (4, 5)]:
        total_sum, total_n, forwards = 0.0, 0, set()
        for rank in range(world):
            groups, n = validation_groups(rows, micro, rank, world)
            calls = []

            def forward(batch, calls=calls):
                calls.append(1)
                return forward_of(model)(batch)

            s, k = validation_sums(forward, rows, groups, n, TINY_PAD_ID)
            total_sum, total_n = total_sum + s, total_n + k
            forwards.add(len(calls))
        assert total_n == expected_n, (micro, world)
        assert total_sum == pytest.approx(expected_sum, rel=1e-5), (micro, world)
        assert len(forwards) == 1, f"ranks ran different numbers of forwards: {forwards}"  # ZeRO-3 needs equal


def test_groups_are_longest_first_and_cover_every_row_once(tmp_path):
    rows = val_rows(tmp_path, 11)
    lengths = [len(r["input_ids"]) for r in rows.take(range(rows.num_rows))]
    seen = []
    for rank in range(3):
        groups, _ = validation_groups(rows, 2, rank, 3)
        seen += [int(i) for g in groups for i in g]
    assert sorted(seen) == list(range(11))
    groups, _ = validation_groups(rows, 2, 0, 1)
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths, reverse=True)
