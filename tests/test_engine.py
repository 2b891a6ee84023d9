"""DeepSpeed config, optimizer groups, and one real DeepSpeed engine on CPU (the LR schedule: test_plan.py).

    .venv/bin/pytest tests/test_engine.py -q

Everything but `test_deepspeed_zero2_step_matches_a_plain_torch_step`,
`engines_by_stage` and `test_a_rank_resumes_from_only_the_files_fetched_for_it` is
pure Python. The first starts a single-process DeepSpeed engine (ZeRO-2, fp32,
gloo) in a spawned process; the first run on a machine JIT-builds DeepSpeed's shm
comm op (about 40 s on 2 cores, cached under ~/.cache/torch_extensions/raypack-<key>),
later runs take ~15 s. The second trains a saved model at ZeRO-2 (full and fused loss) and ZeRO-3 (fused) and
builds bf16 engines at ZeRO 1-3 in one spawned process; the third spawns 2 ranks
that save and resume at ZeRO-2 and ZeRO-3 (~25 s).
"""

import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from raypack.config import ConfigError, OptimConfig, TrainConfig, load_config
from raypack.data.collate import collate
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import TINY_PAD_ID, build_model, build_tiny_model
from raypack.train.engine import (build_optimizer, decay_split, deepspeed_config, initialize, load_into_partitions,
                                  partitioned_construction, resolve_precision)
from raypack.train.loss import micro_batch_loss, step_denominator
from raypack.train.plan import gradient_accumulation_steps, lr_at


def test_engine_module_imports_deepspeed_only_when_initialising():
    code = ("import sys, raypack.train.engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'lm_eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------ batch arithmetic


@pytest.mark.parametrize("global_batch, micro, world, expected", [(128, 2, 32, 2), (128, 2, 1, 64), (4, 2, 2, 1)])
def test_deepspeed_config_accumulates_as_the_run_plan(global_batch, micro, world, expected):
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro)
    assert gradient_accumulation_steps(global_batch, micro, world) == expected
    config = deepspeed_config(train, world, "cpu")
    assert config["gradient_accumulation_steps"] == expected
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] * expected * world


def test_config_section_checks():
    assert load_config(None).train.global_batch_size == 128
    bad = {"train.global_batch_size=130": "multiple of", "train.offload_params=true": "zero_stage=3",
           "train.global_batch_tokens=-1": ">= 0", "train.peak_tflops=-1": ">= 0", "train.precision=bf16": "use_gpu",
           "train.zero_stage=4": "not one of", "optim.betas=[0.9]": "two floats", "optim.warmup_ratio=1.5": "[0, 1]",
           "optim.schedule=linear": "not one of", "train.offload_optimizer=true": None}
    for override, message in bad.items():
        if message is None:  # allowed: ZeRO-2 with optimizer offload
            load_config(None, [override])
            continue
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(None, [override])
    cfg = load_config(None, ["train.zero_stage=3", "train.offload_params=true", "train.use_gpu=true",
                             "train.precision=bf16", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.betas == [0.9, 0.95] and cfg.train.offload_params


# ------------------------------------------------------------- deepspeed config


def test_default_config_on_cpu_is_the_documented_one():
    assert deepspeed_config(TrainConfig(), 2, "cpu") == {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 32, "train_batch_size": 128,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


@pytest.mark.parametrize("precision, device, bf16", [("auto", "cpu", False), ("auto", "cuda", True),
                                                      ("fp32", "cuda", False), ("bf16", "cuda", True),
                                                      ("fp32", "cpu", False)])
def test_precision(precision, device, bf16):
    assert deepspeed_config(TrainConfig(precision=precision), 2, device)["bf16"] == {"enabled": bf16}
    assert resolve_precision(precision, device) == ("bf16" if bf16 else "fp32")


def test_bf16_on_cpu_and_unknown_devices_are_refused():
    with pytest.raises(ValueError, match="bf16 needs a GPU"):
        deepspeed_config(TrainConfig(precision="bf16"), 2, "cpu")
    with pytest.raises(ValueError, match="device"):
        deepspeed_config(TrainConfig(), 2, "tpu")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_stage3_offload(device):
    train = TrainConfig(zero_stage=3, offload_params=True, offload_optimizer=True)
    config = deepspeed_config(train, 2, device)
    offload = {"device": "cpu", "pin_memory": device == "cuda"}
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": offload, "offload_param": offload}
    assert config["zero_force_ds_cpu_optimizer"] is False  # lets ZeRO-Offload take torch's AdamW


def test_offload_needs_the_right_stage():
    with pytest.raises(ValueError, match="offload_params needs train.zero_stage=3"):
        deepspeed_config(TrainConfig(zero_stage=2, offload_params=True), 2, "cpu")
    with pytest.raises(ValueError, match="offload_optimizer needs"):
        deepspeed_config(TrainConfig(zero_stage=0, offload_optimizer=True), 2, "cpu")
    assert "offload_param" not in deepspeed_config(TrainConfig(zero_stage=3), 2, "cpu")["zero_optimization"]


def write_json(tmp_path, data) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_user_json_is_deep_merged(tmp_path):
    user = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 1000}, "gradient_clipping": 0.5,
            "train_batch_size": 128, "communication_data_type": "fp32"}
    config = deepspeed_config(TrainConfig(deepspeed_json=write_json(tmp_path, user)), 2, "cpu")
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert config["gradient_clipping"] == 0.5 and config["communication_data_type"] == "fp32"
    assert config["gradient_accumulation_steps"] == 32


@pytest.mark.parametrize("user, message", [
    ({"train_micro_batch_size_per_gpu": 4}, "disagrees with the train section"),
    ({"gradient_accumulation_steps": 8}, "disagrees with the train section"),
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' block"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' block"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "offload_param needs"),
    ({"bf16": {"enabled": True}}, "bf16 is enabled but training runs on CPU"),
    ([1, 2], "JSON object"),
])
def test_user_json_cannot_break_consistency(tmp_path, user, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_config(TrainConfig(deepspeed_json=write_json(tmp_path, user)), 2, "cpu")


def test_missing_user_json_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*nope.json"):
        deepspeed_config(TrainConfig(deepspeed_json=str(tmp_path / "nope.json")), 2, "cpu")


def test_optimizer_decays_matrices_only():
    model = build_tiny_model(seed=0)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-5, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-6))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert decayed["lr"] == 3e-5 and decayed["betas"] == (0.9, 0.95) and decayed["eps"] == 1e-6
    decay, no_decay = decay_split(model)
    assert decay == [n for n, p in model.named_parameters() if p.dim() == 2]
    assert no_decay == [n for n, p in model.named_parameters() if p.dim() == 1]
    assert all(n.endswith("norm.weight") for n in no_decay) and "lm_head.weight" in decay


# ------------------------------------------------------- a real DeepSpeed engine


def rows() -> list[dict]:
    """Four padded rows with 3, 9, 2 and 6 targets (sample i is made of tokens 100 * (i + 1) + k)."""
    out = []
    for i, (length, prompt) in enumerate([(5, 2), (12, 3), (4, 2), (9, 3)]):
        ids = (100 * (i + 1) + np.arange(length)).astype(np.int32)
        labels = ids.copy()
        labels[:prompt] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def step_gradients(forward, backward, micro_step, micro_batches, names):
    """One step's micro-batches with the `token` loss: (sum of micro-batch losses, grads by name).

    `micro_step` runs after every backward but the last; the grads are read after
    the last backward, and the caller then takes the final (boundary) step.
    """
    denominator = step_denominator(micro_batches, "token")
    total = 0.0
    for i, batch in enumerate(micro_batches):
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        out = micro_batch_loss(logits, batch, "token", denominator, world_size=1)
        backward(out.loss)
        total += out.loss.item()
        if i < len(micro_batches) - 1:
            micro_step()
    return total, names()


def _deepspeed_two_steps(rank: int, port: int, out_path: str) -> None:
    """In a fresh process: a ZeRO-2 engine and a plain torch twin take the same two steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    train = TrainConfig(num_workers=1, micro_batch_size=2, global_batch_size=4, zero_stage=2, gradient_clipping=1.0)
    optim = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_ratio=0.0)
    model = build_tiny_model(seed=0)
    twin = copy.deepcopy(model)
    engine, optimizer = initialize(model, train, optim, world_size=1, device="cpu")
    # imported after initialize, which picks DeepSpeed's accelerator
    from deepspeed.utils import safe_get_full_grad

    twin_optimizer = build_optimizer(twin, optim)
    data = rows()
    micro_batches = [collate(data[:2], "padding", TINY_PAD_ID), collate(data[2:], "padding", TINY_PAD_ID)]

    def engine_grads():
        return {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}

    def twin_grads():
        return {n: p.grad.clone() for n, p in twin.named_parameters()}

    results = {"accumulation": engine.gradient_accumulation_steps(), "optimizer": type(optimizer).__name__}
    for step, scale_wrt_gas in enumerate((False, True)):
        # step 1 uses DeepSpeed's default scale_wrt_gas=True: the negative control
        lr = lr_at(step, 2, optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # engine.step() after EVERY micro-batch: DeepSpeed counts micro-batches there
        def engine_backward(loss, scale_wrt_gas=scale_wrt_gas):
            engine.backward(loss, scale_wrt_gas=scale_wrt_gas)

        loss, grads = step_gradients(engine, engine_backward, engine.step, micro_batches, engine_grads)
        assert engine.is_gradient_accumulation_boundary()
        engine.step()
        twin.zero_grad(set_to_none=True)
        twin_loss, twin_step_grads = step_gradients(twin, lambda l: l.backward(), lambda: None, micro_batches,
                                                    twin_grads)
        # DeepSpeed sums squares in fp64; torch's fp32 clip_grad_norm_ is off by ~3e-5 here
        twin_norm = float(torch.stack([p.grad.double().norm() for p in twin.parameters()]).norm())
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        for group in twin_optimizer.param_groups:
            group["lr"] = lr
        twin_optimizer.step()
        results[step] = {"global_steps": engine.global_steps, "loss": loss, "twin_loss": twin_loss, "grads": grads, "twin_grads": twin_step_grads,
                         "norm": float(engine.get_global_grad_norm()), "twin_norm": twin_norm,
                         "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
                         "twin_params": {n: p.detach().clone() for n, p in twin.named_parameters()}}
    torch.save(results, out_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_zero2_step_matches_a_plain_torch_step(tmp_path):
    out_path = tmp_path / "steps.pt"
    mp.spawn(_deepspeed_two_steps, args=(free_port(), str(out_path)), nprocs=1, join=True)
    results = torch.load(out_path)
    assert results["accumulation"] == 2 and results["optimizer"] == "DeepSpeedZeroOptimizer"
    assert results[0]["global_steps"] == 1 and results[1]["global_steps"] == 2
    first, second = results[0], results[1]
    # step 0, scale_wrt_gas=False: DeepSpeed's gradient is exactly the token-mean gradient of the step
    assert np.isfinite(first["loss"]) and first["loss"] == pytest.approx(first["twin_loss"], rel=1e-6)
    for name, grad in first["grads"].items():
        torch.testing.assert_close(grad, first["twin_grads"][name], atol=1e-6, rtol=1e-5, msg=name)
    assert first["norm"] == pytest.approx(first["twin_norm"], rel=1e-5)
    for name, param in first["params"].items():  # clipping + AdamW + LR set on param_groups agree too
        torch.testing.assert_close(param, first["twin_params"][name], atol=1e-6, rtol=1e-5, msg=name)
    # the update helped, and the default scale_wrt_gas=True would halve the gradient (G = 2)
    assert second["loss"] < first["loss"] and second["loss"] == pytest.approx(second["twin_loss"], rel=1e-6)
    for name, grad in second["grads"].items():
        torch.testing.assert_close(grad, second["twin_grads"][name] / 2, atol=1e-6, rtol=1e-5, msg=name)
    assert second["norm"] == pytest.approx(second["twin_norm"] / 2, rel=1e-5)


def test_step_flops_and_mfu():
    from raypack.train.flops import mfu, peak_tflops, step_flops

    # 6 N T for the matmuls plus 12 L H sum(s^2) for attention: one 4-token and one 2-token segment.
    assert step_flops(1000, num_layers=2, hidden_size=8, real_tokens=6, segment_lengths=[4, 2]) == \
        6 * 1000 * 6 + 12 * 2 * 8 * (16 + 4)
    # The same tokens in one cross-attention segment cost more attention.
    assert step_flops(1000, 2, 8, 6, [6]) > step_flops(1000, 2, 8, 6, [4, 2])
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("cpu", "fp32") is None and peak_tflops("NVIDIA H100", "fp32") is None
    assert peak_tflops("cpu", "fp32", configured=2.5) == 2.5
    assert mfu(989e12 * 0.5 * 8, step_time_s=1.0, world_size=8, peak=989.0) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None


# ------------------------------------- ZeRO-3 weight decay and bf16 accumulation, real engines


def _engines_by_stage(rank: int, port: int, folder: str, out_path: str) -> None:
    """In a fresh process (one rank): the tiny model saved as a folder, trained 3 steps by the loop's
    optimizer_step at ZeRO-2 with weight decay 0.1 (the full loss and the fused one), at ZeRO-3 with weight decay
    0.1 (fused) and at ZeRO-2 without (full), as the loop builds them (ZeRO-3: built partitioned, each rank
    reading its slices); then bf16 engines at ZeRO 1-3 with raypack's config and without its data_types."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    data = rows()
    micro_batches = [collate(data[:2], "padding", TINY_PAD_ID), collate(data[2:], "padding", TINY_PAD_ID)]
    results = {}
    from raypack.train.loop import optimizer_step

    for stage, weight_decay, impl in ((2, 0.1, "full"), (3, 0.1, "fused"), (2, 0.0, "full"), (2, 0.1, "fused")):
        train = TrainConfig(num_workers=1, micro_batch_size=2, global_batch_size=4, zero_stage=stage)
        handle = partitioned_construction(train, 1, "cpu")
        model = build_model(folder, "sdpa", 0, load_weights=handle is None)
        if handle is not None:
            load_into_partitions(model, folder)
        model.train()
        engine, optimizer = initialize(model, train, OptimConfig(lr=1e-2, weight_decay=weight_decay,
                                                                 warmup_ratio=0.0), 1, "cpu")
        losses = []
        for _ in range(3):  # the loop's own optimizer step, with the full or the fused loss
            loss_sum, num_tokens = optimizer_step(engine, optimizer, micro_batches, step_denominator(micro_batches,
                                                  "token"), 1e-2, "token", 1, impl)
            losses.append(loss_sum / num_tokens)
        key = (stage, weight_decay) if impl == "full" or stage == 3 else (stage, weight_decay, impl)
        results[key] = {"groups": decay_split(engine.module), "losses": losses, "optimizer": type(optimizer).__name__,
                        "group_decay": [g["weight_decay"] for g in optimizer.param_groups]}
        if handle is not None:
            del handle
            unset_hf_deepspeed_config()
    import deepspeed

    for stage in (1, 2, 3):
        config = deepspeed_config(TrainConfig(num_workers=1, micro_batch_size=2, global_batch_size=4,
                                              zero_stage=stage, use_gpu=True), 1, "cuda")  # bf16; DeepSpeed on CPU
        for name, cfg in (("raypack", config), ("without data_types", {k: v for k, v in config.items()
                                                                        if k != "data_types"})):
            model = build_tiny_model(seed=0)
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=cfg)
            results[("bf16", stage, name)] = {"optimizer": type(optimizer).__name__,
                                              "dtypes": [str(d) for d in engine.get_data_types()],
                                              "accumulation": str(getattr(optimizer, "gradient_accumulation_dtype",
                                                                          None))}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def engines_by_stage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    build_tiny_model(seed=0).save_pretrained(tmp / "model", safe_serialization=True)
    mp.spawn(_engines_by_stage, args=(free_port(), str(tmp / "model"), str(tmp / "out.pt")), nprocs=1, join=True)
    return torch.load(tmp / "out.pt")


def test_zero3_decays_the_same_parameters_and_trains_as_zero2(engines_by_stage):
    """ZeRO-3 parameters are 1-element placeholders: the decay split reads their real shapes, so ZeRO-3 decays
    the same parameters as ZeRO-2 and its 3 steps with weight decay 0.1 give ZeRO-2's losses. Negative control:
    weight decay 0 and 0.1 give different losses (so a ZeRO-3 run decaying nothing could not pass)."""
    zero2, zero3, no_decay = (engines_by_stage[k] for k in ((2, 0.1), (3, 0.1), (2, 0.0)))  # ZeRO-3 fused
    assert zero3["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and zero2["optimizer"] == "DeepSpeedZeroOptimizer"
    assert zero3["groups"] == zero2["groups"] and len(zero3["groups"][0]) == 16 and len(zero3["groups"][1]) == 5
    assert zero3["group_decay"] == zero2["group_decay"] == [0.1, 0.0]
    assert np.max(np.abs(np.array(zero3["losses"]) - zero2["losses"])) < 1e-5
    assert np.max(np.abs(np.array(no_decay["losses"]) - zero2["losses"])) > 1e-4


def test_three_steps_with_the_fused_loss_equal_the_full_loss(engines_by_stage):
    """train.loss_impl: 3 optimizer steps of the loop's optimizer_step (ZeRO-2, AdamW, clipping) give the same
    losses with the fused loss as with the full logits (and ZeRO-3 fused as ZeRO-2 full, above). Negative control:
    the same steps without weight decay differ by far more than the tolerance."""
    full, fused, no_decay = (engines_by_stage[k] for k in ((2, 0.1), (2, 0.1, "fused"), (2, 0.0)))
    assert len(fused["losses"]) == 3 and fused["losses"][2] < fused["losses"][0]
    assert np.max(np.abs(np.array(fused["losses"]) - full["losses"])) < 1e-5
    assert np.max(np.abs(np.array(no_decay["losses"]) - full["losses"])) > 1e-4


def test_bf16_engines_accumulate_gradients_in_fp32(engines_by_stage):
    """raypack's bf16 config makes DeepSpeed sum micro-batch gradients in fp32 at ZeRO 1-3 (ZeRO-1: its
    BF16_Optimizer); negative control: the same config without data_types accumulates in bf16."""
    for stage in (1, 2, 3):
        ours = engines_by_stage[("bf16", stage, "raypack")]
        bare = engines_by_stage[("bf16", stage, "without data_types")]
        assert ours["dtypes"] == ["torch.bfloat16", "torch.float32"], stage
        assert bare["dtypes"] == ["torch.bfloat16", "torch.bfloat16"], stage
        if stage == 1:
            assert ours["optimizer"] == "BF16_Optimizer" and bare["optimizer"] == "DeepSpeedZeroOptimizer"
        else:
            assert ours["accumulation"] == "torch.float32" and bare["accumulation"] == "torch.bfloat16", stage


def test_bf16_at_zero0_is_refused():
    """DeepSpeed cannot accumulate in fp32 without ZeRO: refused in the config and in the engine config."""
    with pytest.raises(ConfigError, match="zero_stage=0.*bf16"):
        load_config(None, ["train.use_gpu=true", "train.zero_stage=0"])
    load_config(None, ["train.use_gpu=true", "train.zero_stage=0", "train.precision=fp32"])
    with pytest.raises(ValueError, match="zero_stage=0 with bf16"):
        deepspeed_config(TrainConfig(zero_stage=0, use_gpu=True), 2, "cuda")
    assert "data_types" not in deepspeed_config(TrainConfig(), 2, "cpu")
    assert deepspeed_config(TrainConfig(use_gpu=True), 2, "cuda")["data_types"] == {"grad_accum_dtype": "fp32"}


def _resume_from_fetched_files(rank: int, port: int, folder: str, stages: tuple[int, ...]) -> None:
    """In one of 2 fresh processes (gloo), at each ZeRO stage: an engine takes a step, saves a checkpoint and
    takes the next step (the reference); then a fresh engine loads the checkpoint from a folder holding only the
    files raypack.train.restore fetches for this rank alone on its node (its rank's files and the shared ones) and
    takes the same step; and one loads from the shared files alone (the negative control)."""
    import gc
    import shutil

    import pyarrow.fs as pafs
    import torch.distributed as dist

    from raypack.train.restore import checkpoint_files, files_to_fetch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    optim = OptimConfig(lr=1e-2, warmup_ratio=0.0)
    batch = collate(rows()[2 * rank: 2 * rank + 2], "padding", TINY_PAD_ID)

    def step(engine) -> tuple[float, torch.Tensor]:
        """The loss (the weights the step starts from) and this rank's parameters after it (AdamW's state too;
        under ZeRO-3 its partitions)."""
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        out = micro_batch_loss(logits, batch, "token", step_denominator([batch], "token"), world_size=2)
        engine.backward(out.loss, scale_wrt_gas=False)
        engine.step()
        params = [getattr(p, "ds_tensor", p).detach().reshape(-1).clone() for p in engine.module.parameters()]
        return out.loss.item(), torch.cat(params)

    def resume_from(train: TrainConfig, node: str) -> tuple[float, torch.Tensor] | str:
        """A fresh engine (other initial weights) loaded from `node`, its next step; or the error loading raised.
        One engine at a time in a process, as in the loop: ZeRO-3 engines side by side interfere."""
        engine, _ = initialize(build_tiny_model(seed=1), train, optim, world_size=2, device="cpu")
        try:
            engine.load_checkpoint(node, tag="ds")
            return step(engine)
        except Exception as err:  # noqa: BLE001 - what a missing file does is the negative control's result
            return repr(err)
        finally:
            del engine
            gc.collect()
            dist.barrier()

    results = {}
    for stage in stages:
        train = TrainConfig(num_workers=2, micro_batch_size=2, global_batch_size=4, zero_stage=stage)
        engine, _ = initialize(build_tiny_model(seed=0), train, optim, world_size=2, device="cpu")
        step(engine)
        saved = os.path.join(folder, f"stage{stage}")
        engine.save_checkpoint(saved, tag="ds")
        expected = step(engine)
        del engine
        gc.collect()
        dist.barrier()
        names = sorted(checkpoint_files(pafs.LocalFileSystem(), saved))
        fetched = files_to_fetch(names, rank, local_rank=0)
        shared = [name for name in names if "rank_" not in name.replace("mp_rank_", "")]
        for kind, picked in (("fetched", fetched), ("shared", shared)):
            for name in picked:
                os.makedirs(os.path.dirname(os.path.join(folder, f"{stage}-{kind}{rank}", name)), exist_ok=True)
                shutil.copyfile(os.path.join(saved, name), os.path.join(folder, f"{stage}-{kind}{rank}", name))
        results[stage] = {"names": names, "files": fetched, "expected": expected,
                          "resumed": resume_from(train, os.path.join(folder, f"{stage}-fetched{rank}")),
                          "shared_only": resume_from(train, os.path.join(folder, f"{stage}-shared{rank}"))}
    torch.save(results, os.path.join(folder, f"results{rank}.pt"))


def test_a_rank_resumes_from_only_the_files_fetched_for_it():
    """What raypack.train.restore fetches per node is what DeepSpeed's load_checkpoint reads, at ZeRO-2 and ZeRO-3
    (the stages the jobs use; stages 0 and 1 read as stage 2 does) on 2 ranks: each rank, alone on its node,
    restores from its own rank's files and the shared ones only, and takes the same next step as the engine that
    saved (its loss: the weights; the parameters after it: AdamW's state), the other rank's shards left behind.
    Negative control: from the shared files alone (no rank's shard), loading fails or the step differs."""
    import tempfile

    from raypack.train.restore import file_ranks

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_resume_from_fetched_files, args=(free_port(), folder, (2, 3)), nprocs=2, join=True)
        results = [torch.load(os.path.join(folder, f"results{rank}.pt")) for rank in (0, 1)]
    for rank, by_stage in enumerate(results):
        for stage, r in by_stage.items():
            (loss, params), (resumed_loss, resumed_params) = r["expected"], r["resumed"]
            assert resumed_loss == pytest.approx(loss, rel=1e-6, abs=1e-7), (rank, stage)
            torch.testing.assert_close(resumed_params, params, rtol=1e-6, atol=1e-7, msg=str((rank, stage)))
            left = set(r["names"]) - set(r["files"])
            assert left and all(file_ranks(name) == {1 - rank} for name in left), (rank, stage, left)
            broken = r["shared_only"]
            assert isinstance(broken, str) or broken[0] != pytest.approx(loss, rel=1e-6) \
                or not torch.allclose(broken[1], params), (rank, stage, broken)
