"""Loss normalisation over an optimizer step: shifting, samples, and the arrangement test.

    .venv/bin/pytest tests/test_loss.py -q

The arrangement test runs one optimizer step of the tiny Llama (fp32, CPU) on the
same 4 rows arranged three ways: 1 worker x 1 micro-batch of 4 rows, 1 worker x
2 micro-batches of 2 rows, and 2 workers x 1 micro-batch of 2 rows (real
torch.distributed, gloo: the pytest process is rank 0, a spawned process rank 1;
gradients averaged as DDP/DeepSpeed do). With `token` and `sample` the step loss
and every gradient agree; with `paper` (mean of micro-batch means) the 4-row
micro-batch differs clearly from the two 2-row ones, because the rows hold
different numbers of targets.
"""

import datetime
import itertools
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypack.config import TrainConfig
from raypack.data.collate import collate
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import TINY_PAD_ID, build_tiny_model
from raypack.train.loss import (
    LOSS_REDUCTIONS,
    all_reduce_sum,
    micro_batch_loss,
    segment_ids,
    segment_ids_from_seq_lens,
    step_denominator,
    token_losses,
)

ATOL, RTOL = 1e-6, 1e-5
MODES = ("padding", "isolated", "cross")


def sample(i: int, length: int, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample i is made of tokens 100 * (i + 1) + k; its first `prompt` tokens are unsupervised."""
    ids = (100 * (i + 1) + np.arange(length)).astype(np.int32)
    labels = ids.copy()
    labels[:prompt] = IGNORE_INDEX
    return ids, labels


def row(samples) -> dict:
    """A row as the packer writes it (isolated positions; collate makes cross positions itself)."""
    return {
        "input_ids": np.concatenate([ids for ids, _ in samples]),
        "labels": np.concatenate([labels for _, labels in samples]),
        "position_ids": np.concatenate([np.arange(len(ids)) for ids, _ in samples]).astype(np.int32),
        "seq_lens": np.array([len(ids) for ids, _ in samples], dtype=np.int32),
    }


# One sample per row, 3 / 9 / 3 / 13 targets.
PADDED_ROWS = [row([sample(0, 5, 2)]), row([sample(1, 12, 3)]), row([sample(2, 7, 4)]), row([sample(3, 16, 3)])]
# Packed rows: 2, 1, 3 and 2 samples.
PACKED_ROWS = [row([sample(0, 5, 2), sample(1, 3, 1)]), row([sample(2, 12, 3)]),
               row([sample(3, 4, 2), sample(4, 6, 3), sample(5, 2, 1)]), row([sample(6, 9, 2), sample(7, 4, 1)])]


def micro_batch(rows: list[dict], mode: str) -> dict:
    batch = collate(rows, mode, TINY_PAD_ID)
    if mode == "cross":  # cross positions run on through the row; samples come from seq_lens
        batch["segment_ids"] = segment_ids_from_seq_lens([r["seq_lens"] for r in rows], batch["labels"].shape[1])
    return batch


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def run_step(model, micro_batches: list[dict], reduction: str, world_size: int) -> dict:
    """One optimizer step's loss and gradients, as the training loop computes them."""
    model.zero_grad(set_to_none=True)
    denominator = all_reduce_sum(step_denominator(micro_batches, reduction))
    loss_sum = token_loss_sum = num_tokens = 0.0
    for batch in micro_batches:
        logits = model(**model_inputs(batch), use_cache=False).logits
        out = micro_batch_loss(logits, batch, reduction, denominator, world_size)
        out.loss.backward()
        loss_sum += out.loss.item()
        token_loss_sum += out.token_loss_sum
        num_tokens += out.num_tokens
    grads = {}
    for name, param in model.named_parameters():
        if dist.is_initialized():  # what DDP / DeepSpeed do: average over ranks
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world_size
        grads[name] = param.grad.detach().clone()
    return {"loss": all_reduce_sum(loss_sum) / world_size, "grads": grads,
            "mean_token_loss": all_reduce_sum(token_loss_sum) / all_reduce_sum(num_tokens)}


def rows_for(mode: str) -> list[dict]:
    return PADDED_ROWS if mode == "padding" else PACKED_ROWS


def tiny_model():
    """The tiny Llama with a 10x wider init, so token losses spread and weighting shows in the loss."""
    return build_tiny_model(seed=0, initializer_range=0.2).eval()


def two_worker_step(rank: int, port: int) -> dict:
    """Rank r of the 2 x 1 arrangement runs rows 2r, 2r+1 as its one micro-batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        model = tiny_model()
        results = {}
        for mode in MODES:
            rows = rows_for(mode)[2 * rank: 2 * rank + 2]
            for reduction in LOSS_REDUCTIONS:
                results[mode, reduction] = run_step(model, [micro_batch(rows, mode)], reduction, world_size=2)
    finally:
        dist.destroy_process_group()
    return results


def _second_worker(index: int, port: int) -> None:
    torch.set_num_threads(1)
    two_worker_step(1, port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def arrangements():
    """{(mode, reduction): {arrangement: step result}} for the three arrangements."""
    # this process is rank 0, a spawned one rank 1 (one interpreter start instead of two)
    port = free_port()
    second = mp.spawn(_second_worker, args=(port,), nprocs=1, join=False)
    two_workers = two_worker_step(0, port)
    second.join()
    model = tiny_model()
    results = {}
    for mode in MODES:
        rows = rows_for(mode)
        for reduction in LOSS_REDUCTIONS:
            results[mode, reduction] = {
                "1x1": run_step(model, [micro_batch(rows, mode)], reduction, world_size=1),
                "1x2": run_step(model, [micro_batch(rows[:2], mode), micro_batch(rows[2:], mode)], reduction, 1),
                "2x1": two_workers[mode, reduction],
            }
    return results


def max_grad_difference(a: dict, b: dict) -> float:
    return max(float((a["grads"][n] - b["grads"][n]).abs().max()) for n in a["grads"])


def assert_same_step(a: dict, b: dict) -> None:
    assert a["loss"] == pytest.approx(b["loss"], rel=RTOL, abs=ATOL)
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], atol=ATOL, rtol=RTOL, msg=name)


# ------------------------------------------------------------- arrangement test


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_step_is_the_same_however_rows_are_split(arrangements, mode, reduction):
    steps = arrangements[mode, reduction]
    assert_same_step(steps["1x2"], steps["1x1"])
    assert_same_step(steps["2x1"], steps["1x1"])


@pytest.mark.parametrize("mode", MODES)
def test_paper_reduction_depends_on_micro_batch_size(arrangements, mode):
    """Negative control: the mean of micro-batch means changes when the rows are regrouped."""
    steps = arrangements[mode, "paper"]
    assert_same_step(steps["2x1"], steps["1x2"])  # accumulation and ranks are averaged alike
    assert abs(steps["1x2"]["loss"] - steps["1x1"]["loss"]) > 1e-3
    assert max_grad_difference(steps["1x2"], steps["1x1"]) > 1e3 * ATOL


@pytest.mark.parametrize("mode", MODES)
def test_mean_token_loss_metric_is_the_same_for_every_reduction_and_arrangement(arrangements, mode):
    values = [step["mean_token_loss"] for r in LOSS_REDUCTIONS for step in arrangements[mode, r].values()]
    assert values == pytest.approx([values[0]] * len(values), rel=RTOL)
    assert arrangements[mode, "token"]["1x1"]["loss"] == pytest.approx(values[0], rel=RTOL)


def test_token_step_loss_equals_transformers_loss_over_all_rows(arrangements):
    batch = micro_batch(PADDED_ROWS, "padding")
    with torch.no_grad():
        expected = tiny_model()(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
    assert arrangements["padding", "token"]["2x1"]["loss"] == pytest.approx(float(expected), rel=RTOL)


@pytest.mark.parametrize("mode", ["padding", "isolated"])
def test_sample_step_loss_is_the_mean_of_each_sample_alone(arrangements, mode):
    model = tiny_model()
    alone = []
    with torch.no_grad():
        for r in rows_for(mode):
            starts = np.concatenate([[0], np.cumsum(r["seq_lens"])])
            for start, end in itertools.pairwise(starts):
                ids = torch.tensor(r["input_ids"][start:end], dtype=torch.long)[None]
                labels = torch.tensor(r["labels"][start:end], dtype=torch.long)[None]
                alone.append(float(model(input_ids=ids, labels=labels, use_cache=False).loss))
    assert arrangements[mode, "sample"]["2x1"]["loss"] == pytest.approx(np.mean(alone), rel=1e-5)


# ----------------------------------------------------------------- unit tests


def test_token_losses_shift_targets_by_one():
    vocab = 4
    logits = torch.zeros(1, 4, vocab)
    logits[0, 0, 2] = 10.0  # predicts labels[1] = 2: near-zero loss
    logits[0, 3, 0] = 10.0  # the last position has no target: must be ignored
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1]])
    losses, mask = token_losses(logits, labels)
    assert mask.tolist() == [[True, False, True]]
    expected = [np.log1p(3 * np.exp(-10.0)), 0.0, np.log(vocab)]
    assert losses[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert losses.dtype == torch.float32 and losses.shape == (1, 3)


def test_token_losses_upcast_half_logits_and_reject_bad_shapes():
    losses, _ = token_losses(torch.zeros(1, 3, 5, dtype=torch.bfloat16), torch.tensor([[0, 1, 2]]))
    assert losses.dtype == torch.float32
    with pytest.raises(ValueError, match="logits"):
        token_losses(torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))


def docstring_rows():
    # collate's docstring rows: a=[11,12,13], b=[21,22], c=[31,32,33,34]
    a = (np.array([11, 12, 13]), np.array([-100, 12, 13]))
    b = (np.array([21, 22]), np.array([-100, 22]))
    c = (np.array([31, 32, 33, 34]), np.array([-100, -100, 33, 34]))
    return a, b, c


def test_segments_of_isolated_batches_come_from_position_ids():
    a, b, c = docstring_rows()
    rows = [row([a, b]), row([c])]
    batch = collate(rows, "isolated", 0)  # the rows laid end to end in one row
    assert segment_ids(batch).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert torch.equal(segment_ids(batch), segment_ids_from_seq_lens([[3, 2, 4]], 9))
    assert step_denominator([batch], "sample") == 3  # a, b, c
    padded = collate(rows, "isolated", 0, pad_to_multiple_of=8)
    assert segment_ids(padded).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2] + [3] * 7]  # pad run: own segment
    assert step_denominator([padded], "sample") == 3  # the pad segment has no target


def test_segments_of_cross_batches_need_segment_ids():
    """Cross positions run 0..T-1, so without segment_ids a row counts as one sample."""
    a, b, c = docstring_rows()
    rows = [row([a, b]), row([c])]
    batch = collate(rows, "cross", 0)
    assert segment_ids(batch).tolist() == [[0] * 5, [0] * 5]
    assert step_denominator([batch], "sample") == 2
    batch["segment_ids"] = segment_ids_from_seq_lens([r["seq_lens"] for r in rows], 5)
    assert segment_ids(batch).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    assert step_denominator([batch], "sample") == 3


def test_segments_of_padded_batches_are_rows():
    a, b, _ = docstring_rows()
    batch = collate([row([a]), row([b])], "padding", 0)
    assert segment_ids(batch).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert [step_denominator([batch], r) for r in LOSS_REDUCTIONS] == [3, 2, 1]


def test_samples_without_targets_do_not_count():
    prompt_only = (np.array([41, 42]), np.array([-100, -100]))
    a, b, _ = docstring_rows()
    batch = collate([row([a, prompt_only, b])], "isolated", 0)
    assert step_denominator([batch], "sample") == 2


def test_segment_ids_from_seq_lens_checks_lengths_and_ids_are_checked():
    with pytest.raises(ValueError, match="seq_lens"):
        segment_ids_from_seq_lens([[3, 4]], 5)
    batch = {"labels": torch.zeros(1, 3, dtype=torch.long), "segment_ids": torch.tensor([[0, -1, 0]])}
    with pytest.raises(ValueError, match="segment_ids"):
        segment_ids(batch)


def test_module_docstring_example():
    """labels [[-100, 12, 13, -100, 22]], isolated: the three numerators and denominators."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 30)
    batch = {"labels": torch.tensor([[-100, 12, 13, -100, 22]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    losses, _ = token_losses(logits, batch["labels"])
    l12, l13, l22 = losses[0, 0], losses[0, 1], losses[0, 3]
    expected = {"token": (l12 + l13 + l22) / 3, "sample": ((l12 + l13) / 2 + l22) / 2,
                "paper": (l12 + l13 + l22) / 3}
    for reduction in LOSS_REDUCTIONS:
        denominator = step_denominator([batch], reduction)
        out = micro_batch_loss(logits, batch, reduction, denominator, world_size=1)
        assert float(out.loss) == pytest.approx(float(expected[reduction]), rel=1e-6)
        assert out.num_tokens == 3 and out.token_loss_sum == pytest.approx(float(l12 + l13 + l22), rel=1e-6)
    # world_size multiplies (it undoes the averaging of gradients over ranks)
    out = micro_batch_loss(logits, batch, "token", 3.0, world_size=4)
    assert float(out.loss) == pytest.approx(4 * float(expected["token"]), rel=1e-6)


def test_step_without_targets_gives_zero_loss_and_zero_gradients():
    logits = torch.randn(1, 3, 7, requires_grad=True)
    batch = {"labels": torch.full((1, 3), IGNORE_INDEX)}
    for reduction in LOSS_REDUCTIONS:
        denominator = step_denominator([batch], reduction)
        out = micro_batch_loss(logits, batch, reduction, denominator, world_size=1)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and out.num_tokens == 0
        assert torch.count_nonzero(logits.grad) == 0


def test_bad_arguments_are_refused():
    batch = {"labels": torch.tensor([[-100, 1]])}
    with pytest.raises(ValueError, match="token, sample, paper"):
        step_denominator([batch], "mean")
    with pytest.raises(ValueError, match="world_size"):
        micro_batch_loss(torch.zeros(1, 2, 3), batch, "token", 1.0, world_size=0)


def test_all_reduce_sum_is_identity_without_torch_distributed():
    assert not dist.is_initialized()
    assert all_reduce_sum(3) == 3.0


def test_config_choices_are_the_loss_reductions():
    import dataclasses

    (field,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "loss_reduction"]
    assert field.metadata["choices"] == LOSS_REDUCTIONS and TrainConfig().loss_reduction == "token"


def test_loss_module_imports_neither_ray_nor_deepspeed():
    code = ("import sys, raypack.train.loss; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'lm_eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("reduction", LOSS_REDUCTIONS)
@pytest.mark.parametrize("mode", ["padding", "isolated", "cross"])
def test_the_loss_reads_nothing_back_from_the_device(reduction, mode):
    """A micro-batch's loss never waits on the device: logits on the meta device hold no values, so any read of a
    device value on the host (float(), .item(), a count, boolean indexing) raises there. Every reduction's loss
    and token-loss sum stay device tensors, the counts come from the host-side labels and equal the CPU ones.
    Negative control: each of those reads raises on the meta device."""
    batch = micro_batch(rows_for(mode), mode)
    cpu_logits = torch.randn(*batch["labels"].shape, 1000)
    expected = micro_batch_loss(cpu_logits, batch, reduction, 7.0, world_size=2)
    meta = micro_batch_loss(cpu_logits.to("meta").requires_grad_(), batch, reduction, 7.0, world_size=2)
    assert meta.loss.device.type == meta.token_loss_sum.device.type == "meta" and meta.loss.requires_grad
    assert meta.num_tokens == expected.num_tokens > 0
    probe = torch.ones(3, device="meta")
    for read in (lambda: float(probe.sum()), lambda: probe.sum().item(), lambda: int((probe > 0).sum()),
                 lambda: probe[probe > 0]):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()
