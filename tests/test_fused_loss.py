"""The fused loss (train.loss_impl=fused) against the full-logits reference: losses and every gradient.

    .venv/bin/pytest tests/test_fused_loss.py -q

The reference is the plain model's logits and raypack.train.loss.micro_batch_loss
(fp32, CPU). The fused loss runs through raypack.train.head.model_token_losses on both
kernels (torch's F.linear_cross_entropy and raypack's ChunkedLinearCrossEntropy), with
5-token chunks so every micro-batch spans several chunks and a short last one, for the
token, sample and paper reductions, on an untied and a tied tiny Llama. In-process
first; then one spawned process (world size 1, gloo) runs the same through DeepSpeed
engines at ZeRO 0, 2 and 3 (~30 s), where the output weight under ZeRO-3 is a
partition that only the output layer's forward gathers. Negative control: chunk
boundaries off by one (every chunk but the last loses its last row) fail the same
comparison. The 3-step losses of whole optimizer steps, full vs fused: tests/test_engine.py
(engines_by_stage).
"""

import contextlib
import os
import socket
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

from raypack.model import build_tiny_model
from raypack.train import loss as loss_module
from raypack.train.head import check_fused_head, model_token_losses
from raypack.train.loss import LOSS_REDUCTIONS, micro_batch_loss, reduce_token_losses, step_denominator
from test_loss import PACKED_ROWS, micro_batch, model_inputs

TOLERANCE = 1e-5
CHUNK_ROWS = 5
VARIANTS = ("torch", "chunked")  # the fused loss on each kernel


def tiny_model(tied: bool):
    """The tiny Llama with a wider init (token losses spread, as in test_loss), untied or tied."""
    return build_tiny_model(seed=0, initializer_range=0.2, tie_word_embeddings=tied)


def batch():
    return micro_batch(PACKED_ROWS, "isolated")


@contextlib.contextmanager
def kernel(name: str, chunks=None):
    """Force the fused loss's kernel and CHUNK_ROWS-token chunks (and, for the negative control, its chunks)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(loss_module, "default_linear_kernel", lambda: name))
        stack.enter_context(mock.patch.object(loss_module, "chunk_rows", lambda vocab: CHUNK_ROWS))
        if chunks is not None:
            stack.enter_context(mock.patch.object(loss_module, "chunks", chunks))
        yield


def off_by_one_chunks(num_rows: int, rows: int) -> list[tuple[int, int]]:
    """Every chunk but the last ends one row early: that row is never computed."""
    return [(start, min(start + rows, num_rows) - (start + rows < num_rows)) for start in range(0, num_rows, rows)]


def loss_and_grads(call, model, b: dict, reduction: str, impl: str, grad_of=None) -> tuple[float, dict]:
    """One micro-batch's loss (denominator: its own) and every parameter's gradient, by name."""
    denominator = step_denominator([b], reduction)
    if impl == "reference":
        out = micro_batch_loss(call(**model_inputs(b), use_cache=False).logits, b, reduction, denominator, 1)
    else:
        losses, _ = model_token_losses(call, model, model_inputs(b), b["labels"], impl)
        out = reduce_token_losses(losses, b, reduction, denominator, 1)
    if grad_of is None:
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    call.backward(out.loss, scale_wrt_gas=False)
    return out.loss.item(), grad_of()


def max_difference(a: tuple[float, dict], b: tuple[float, dict]) -> float:
    assert a[1].keys() == b[1].keys()
    return max([abs(a[0] - b[0])] + [float((a[1][n] - b[1][n]).abs().max()) for n in a[1]])


@pytest.fixture(scope="module")
def references():
    """{(tied, reduction): (loss, grads)} from the full logits of the plain model."""
    out = {}
    for tied in (False, True):
        model = tiny_model(tied)
        for reduction in LOSS_REDUCTIONS:
            out[tied, reduction] = loss_and_grads(model, model, batch(), reduction, "reference")
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_loss_and_every_gradient_equal_the_full_logits(references, tied, variant):
    model = tiny_model(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for reduction in LOSS_REDUCTIONS:
        with kernel(variant):
            fused = loss_and_grads(model, model, batch(), reduction, "fused")
        assert max_difference(fused, references[tied, reduction]) <= TOLERANCE, (reduction, variant, tied)
        assert "forward" not in vars(model.lm_head)  # the output layer is itself again after the call


def test_an_off_by_one_chunk_boundary_is_caught(references):
    """Negative control: the same comparison fails when the chunks skip a row at each boundary."""
    model = tiny_model(False)
    with kernel("chunked", chunks=off_by_one_chunks):
        broken = loss_and_grads(model, model, batch(), "token", "fused")
    assert not max_difference(broken, references[False, "token"]) <= TOLERANCE  # NaN counts as caught


def test_chunks_cover_every_row_once():
    for num_rows in range(23):
        for rows in (1, 4, 5, 64):
            covered = [i for start, end in loss_module.chunks(num_rows, rows) for i in range(start, end)]
            assert covered == list(range(num_rows))
    assert loss_module.chunk_rows(128_256) == 128 and loss_module.chunk_rows(512) >= 64
    with pytest.raises(ValueError, match="chunk rows"):
        loss_module.chunks(3, 0)


def test_fused_losses_read_nothing_back_from_the_device():
    """The supervised positions come from the labels on the host: hidden states on the meta device work."""
    b = batch()
    hidden = torch.zeros(*b["labels"].shape, 8, device="meta", requires_grad=True)
    weight = torch.zeros(50, 8, device="meta", requires_grad=True)
    labels = b["labels"].clamp(max=49).masked_fill(b["labels"] < 0, -100)
    losses = loss_module.fused_token_losses(hidden, weight, labels, kernel="chunked")
    assert losses.shape == (b["labels"].shape[0], b["labels"].shape[1] - 1) and losses.device.type == "meta"


def test_what_the_fused_loss_refuses():
    model = tiny_model(False)
    with pytest.raises(ValueError, match="loss_impl"):
        model_token_losses(model, model, {}, torch.zeros(1, 2, dtype=torch.long), "logits")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping.*train.loss_impl=full"):
        check_fused_head(model)
    model.config.final_logit_softcapping = None
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(ValueError, match="without bias"):
        check_fused_head(model)
    with pytest.raises(ValueError, match=r"\[B, T, H\]"):
        loss_module.fused_token_losses(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="linear kernel"):
        loss_module.linear_token_losses(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long),
                                        kernel="triton")


def test_the_default_kernel_is_torchs_where_torch_has_it(monkeypatch):
    has_op = hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    assert loss_module.default_linear_kernel() == ("torch" if has_op else "chunked")
    if has_op:
        monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")  # as torch 2.11 (the GPU host) is
        assert loss_module.default_linear_kernel() == "chunked"


def test_the_fused_loss_imports_neither_ray_nor_deepspeed():
    """Pure core: the loss and the output-layer hook need no DeepSpeed, at any ZeRO stage."""
    import subprocess
    import sys

    code = ("import sys, raypack.train.loss, raypack.train.head, raypack.train.validate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'lm_eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------- DeepSpeed engines at ZeRO 0, 2 and 3


def _engines(rank: int, port: int, folder: str, out_path: str) -> None:
    """In a fresh process (one rank, gloo): per ZeRO stage and tied/untied, one engine built as the loop builds
    it from the saved tiny model (ZeRO-3: partitioned at construction, each rank reading its slices) runs
    every reduction with the full loss and the fused one on both
    kernels; gradients read with safe_get_full_grad, then a step at LR 0 clears them and leaves the weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from raypack.config import OptimConfig, TrainConfig
    from raypack.model import build_model
    from raypack.train.engine import initialize, load_into_partitions, partitioned_construction

    results = {}
    for stage in (0, 2, 3):
        for tied in (False, True):
            train = TrainConfig(num_workers=1, micro_batch_size=4, global_batch_size=4, zero_stage=stage)
            handle = partitioned_construction(train, 1, "cpu")
            saved = os.path.join(folder, f"tied{int(tied)}")
            model = build_model(saved, "sdpa", 0, load_weights=handle is None)
            if handle is not None:
                load_into_partitions(model, saved)
            model.train()
            engine, optimizer = initialize(model, train, OptimConfig(lr=0.0, warmup_ratio=0.0), 1, "cpu")
            from deepspeed.utils import safe_get_full_grad

            for group in optimizer.param_groups:
                group["lr"] = 0.0

            def grads(engine=engine):
                return {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}

            for reduction in LOSS_REDUCTIONS:
                for variant in ("full",) + VARIANTS:
                    with kernel(variant):
                        results[stage, tied, reduction, variant] = loss_and_grads(
                            engine, engine.module, batch(), reduction, "full" if variant == "full" else "fused",
                            grad_of=grads)
                    engine.step()
            # the known failure the fused loss avoids: outside its module's forward the weight is a partition
            results[stage, tied, "weight elements outside forward"] = engine.module.lm_head.weight.numel()
            del engine, optimizer
            if handle is not None:
                del handle
                unset_hf_deepspeed_config()
    torch.save(results, out_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused")
    for tied in (False, True):
        tiny_model(tied).save_pretrained(folder / f"tied{int(tied)}", safe_serialization=True)
    out = folder / "engines.pt"
    mp.spawn(_engines, args=(free_port(), str(folder), str(out)), nprocs=1, join=True)
    return torch.load(out)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fused_gradients_reach_every_parameter_at_each_zero_stage(engines, references, stage):
    """Through DeepSpeed, the fused loss on both kernels gives the full-logits reference's loss and every
    parameter's gradient (the output weight's included, tied or not), as does the engine's own full loss."""
    for tied in (False, True):
        for reduction in LOSS_REDUCTIONS:
            for variant in ("full",) + VARIANTS:
                got = engines[stage, tied, reduction, variant]
                assert max_difference(got, references[tied, reduction]) <= TOLERANCE, (stage, tied, reduction,
                                                                                        variant)
                head = "model.embed_tokens.weight" if tied else "lm_head.weight"
                assert float(got[1][head].abs().max()) > 1e-3  # not an empty or zero gradient
    weight_outside = engines[stage, False, "weight elements outside forward"]
    assert (weight_outside == 0) if stage == 3 else weight_outside > 0
