"""The memory estimate of `raypack plan` (raypack.train.memory) against measurements and hand counts.

    .venv/bin/python -m pytest -q tests/test_memory.py

Activations are measured, not recomputed from the formula: a small random-init
Llama runs one forward pass of a micro-batch built by raypack's own collate, and
`torch.autograd.graph.saved_tensors_hooks` records every tensor autograd keeps for
backward (deduplicated by storage, parameters left out), as the training loop runs
it (use_cache=False, the loss of raypack.train.loss). Checkpointing must measure
far below no checkpointing, so the comparison cannot pass vacuously.
"""

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from raypack.cli import main
from raypack.config import PlanConfig, TrainConfig, load_config
from raypack.data.collate import collate
from raypack.model import build_tiny_model, enable_checkpointing, tiny_llama_config
from raypack.train.loss import micro_batch_loss
from raypack.train.memory import (GIB, PUBLISHED_SHAPES, MicroBatch, activation_bytes, budget, estimate_arm,
                                  estimate_job, fits, micro_batch, model_shape, shape_from_config, state_bytes)

TOLERANCE = 0.10  # measured within 1% on transformers 5.24 / torch 2.13; 10% leaves room for library drift
SHAPE_KW = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2}


def llama(num_layers: int, attention: str) -> LlamaForCausalLM:
    config = tiny_llama_config(4096, num_hidden_layers=num_layers, **SHAPE_KW)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().train()


def rows(mode: str) -> list[dict]:
    """Two rows of 512 tokens: two samples each (packed arms) or one sample each, the second padded (padding)."""
    rng = np.random.default_rng(0)
    lens = [[512], [300]] if mode == "padding" else [[200, 312], [256, 256]]
    out = []
    for seq in lens:
        ids = rng.integers(10, 4096, sum(seq)).astype(np.int32)
        labels = ids.copy()
        labels[np.cumsum([0] + seq[:-1])] = -100
        out.append({"input_ids": ids, "labels": labels, "seq_lens": np.array(seq, np.int32),
                    "position_ids": np.concatenate([np.arange(n) for n in seq]).astype(np.int32)})
    return out


def saved_bytes(model: LlamaForCausalLM, batch: dict, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward + loss, parameters excluded."""
    if checkpointing:
        enable_checkpointing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(**inputs, use_cache=False).logits
        micro_batch_loss(logits, batch, "token", denominator=1.0, world_size=1)
    return sum(storages.values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mode, flatten", [("cross", False), ("isolated", False), ("isolated", True),
                                           ("padding", False)], ids=["cross", "isolated", "isolated-flat", "padding"])
def test_activation_estimate_matches_what_autograd_saves(mode, flatten, attention):
    # The loop gives sdpa/eager isolated [2, 512] rows; flat [1, 1024] rows are what flash_attention_2 gets
    # (measured here on sdpa/eager, which build a block mask for them as for the rows).
    batch = collate(rows(mode), mode, pad_token_id=5, flatten=flatten)
    shape = (len(batch["input_ids"]), batch["input_ids"].shape[1])
    assert shape == ((1, 1024) if flatten else (2, 512))
    expected = micro_batch(mode, micro_batch_size=2, max_seq_len=512, attention=attention)
    if flatten:
        assert micro_batch(mode, 2, 512, "flash_attention_2") == MicroBatch(1, 1024, masked=True)
        expected = MicroBatch(1, 1024, masked=True)
    assert (expected.rows, expected.row_len) == shape
    measured, models = {}, {layers: llama(layers, attention) for layers in (2, 1)}
    for (layers, model), ckpt in itertools.product(models.items(), (False, True)):  # checkpointing last
        measured[layers, ckpt] = saved_bytes(model, batch, ckpt)
    assert measured[2, True] < 0.4 * measured[2, False]  # negative control: checkpointing frees most of it
    for ckpt in (False, True):
        estimate = activation_bytes(shape_from_config(models[2].config), expected, 4, attention, ckpt)
        assert estimate.saved == pytest.approx(measured[2, ckpt], rel=TOLERANCE)
        # One layer, by difference, so the head (large here: 4,096 vocabulary, 256 hidden) cannot hide its error.
        per_layer = measured[2, ckpt] - measured[1, ckpt]
        kept = estimate.layer if not ckpt else expected.tokens * 256 * 4
        assert kept == pytest.approx(per_layer, rel=TOLERANCE)


def test_tiny_and_local_shapes_count_the_models_parameters(tmp_path):
    model = build_tiny_model(0)
    tiny = model_shape("tiny")
    assert tiny.num_params == sum(p.numel() for p in model.parameters())
    assert tiny.matmul_params == tiny.num_params - model.get_input_embeddings().weight.numel()
    big = llama(4, "sdpa")
    big.config.save_pretrained(tmp_path)
    assert model_shape(str(tmp_path)).num_params == sum(p.numel() for p in big.parameters())


def test_paper_models_have_their_published_sizes():
    assert model_shape("meta-llama/Meta-Llama-3-8B").num_params == 8_030_261_248
    assert model_shape("meta-llama/Meta-Llama-3-70B-Instruct").num_params == 70_553_706_496
    assert model_shape("meta-llama/Llama-3.1-70B") == PUBLISHED_SHAPES["meta-llama/Meta-Llama-3-70B"]


def test_unknown_hub_model_offline_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    with pytest.raises(ValueError, match="pass a local folder"):
        model_shape("no-such-org/no-such-model")


N, W = 1_000_000_000, 8


@pytest.mark.parametrize("precision, stage, offload, expected", [
    # (params, grads, optimizer, gathered, offloaded) in bytes, by hand: bf16 is 2 + 2 + 12 per parameter.
    ("bf16", 0, (), (2 * N, 2 * N, 12 * N, 0, 0)),
    ("bf16", 1, (), (2 * N, 2 * N, 12 * N // W, 0, 0)),
    ("bf16", 2, (), (2 * N, 2 * N // W, 12 * N // W, 0, 0)),
    ("bf16", 3, (), (2 * N // W, 2 * N // W, 12 * N // W, 2 * 1000, 0)),
    # Offload: optimizer + fp32 gradient partition to CPU; with params, the bf16 partition too.
    ("bf16", 2, ("optimizer",), (2 * N, 0, 0, 0, 12 * N // W + 4 * N // W)),
    ("bf16", 3, ("optimizer", "params"), (0, 0, 0, 2 * 1000, 12 * N // W + 4 * N // W + 2 * N // W)),
    # fp32: no master copy at stages 0 and 3, DeepSpeed's partition clone at 1 and 2.
    ("fp32", 0, (), (4 * N, 4 * N, 8 * N, 0, 0)),
    ("fp32", 2, (), (4 * N, 4 * N // W, 12 * N // W, 0, 0)),
    ("fp32", 3, (), (4 * N // W, 4 * N // W, 8 * N // W, 4 * 1000, 0)),
])
def test_model_states_per_zero_stage_by_hand(precision, stage, offload, expected):
    got = state_bytes(N, precision, stage, W, "optimizer" in offload, "params" in offload, gathered_params=1000)
    assert (got.params, got.grads, got.optimizer, got.gathered, got.offloaded) == expected


def test_isolated_micro_batches_are_one_flat_row_for_flash_and_padding_is_masked():
    assert micro_batch("isolated", 2, 4096, "flash_attention_2") == MicroBatch(1, 8192, masked=True)
    assert micro_batch("isolated", 2, 4096, "sdpa") == MicroBatch(2, 4096, masked=True)
    assert micro_batch("padding", 2, 4096) == MicroBatch(2, 4096, masked=True)
    assert micro_batch("padding", 1, 4096) == MicroBatch(1, 4096, masked=False)
    assert micro_batch("cross", 2, 4096) == MicroBatch(2, 4096, masked=False)


def test_logits_of_a_128k_vocabulary_take_gigabytes():
    shape = PUBLISHED_SHAPES["meta-llama/Meta-Llama-3-8B"]
    act = activation_bytes(shape, micro_batch("cross", 2, 4096), 2, "sdpa", checkpointing=True)
    # bf16 logits held by the loop + fp32 log-softmax + its two fp32 gradients: 14 bytes per logit.
    assert act.loss + act.head - shape.hidden_size * 8192 * 8 - 8192 * 4 == 8192 * 128_256 * 14
    assert act.loss / GIB > 9


def test_the_8b_jobs_loss_term_is_under_a_gib_fused_and_as_before_full():
    """raypack plan on jobs/paper-8b-tulu.yaml: the loss column (final norm + loss buffers) <= 1 GiB with the
    fused loss (the default), the 14-bytes-per-logit term with train.loss_impl=full (negative control: the
    same column, over 13 GiB)."""
    cfg = load_config("jobs/paper-8b-tulu.yaml")
    shape = PUBLISHED_SHAPES[cfg.model.name_or_path]
    assert cfg.train.loss_impl == "fused"
    for arm, memory in estimate_job(cfg, shape).items():
        act = memory.activations
        assert (act.head + act.loss) / GIB <= 1.0, arm
        full = estimate_job(load_config("jobs/paper-8b-tulu.yaml", ["train.loss_impl=full"]), shape)[arm]
        tokens = full.batch.tokens
        assert full.activations.loss + full.activations.head - shape.hidden_size * tokens * 8 - tokens * 4 == \
            tokens * shape.vocab_size * 14
        assert (full.activations.head + full.activations.loss) / GIB > 13


def test_a_job_over_its_gpu_does_not_fit():
    shape = PUBLISHED_SHAPES["meta-llama/Meta-Llama-3-70B"]
    train = TrainConfig(num_workers=32, use_gpu=True, micro_batch_size=1, global_batch_size=64, zero_stage=2)
    limits = budget(PlanConfig(), train)
    arm = estimate_arm(shape, "cross", train, 4096, "bf16", "sdpa")
    assert arm.states.params == 2 * shape.num_params and not fits(arm, limits, use_gpu=True)


def test_plan_prints_every_arm_without_ray(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    rc = main(["plan", "jobs/quickstart.yaml", f"prepare.output_dir={tmp_path / 'prepared'}", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0 and "fits: every arm fits" in out
    cfg = load_config("jobs/quickstart.yaml")
    for arm in cfg.pack.arms:
        assert f"{arm}: not prepared" in out
        assert arm in json.loads(out_json.read_text())["memory_gib"]
    assert "2x1024+mask" in out  # bfd-isolated on sdpa: [B, T] rows with the block mask of their positions


def test_plan_says_plainly_when_a_job_does_not_fit(capsys):
    rc = main(["plan", "jobs/paper-70b-tulu.yaml", "train.gradient_checkpointing=false"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT: padding needs" in out and "train.gradient_checkpointing=true" in out


def test_plan_counts_prepared_arms_as_training_does(tmp_path, capsys, ray_local):
    from raypack.data.pipeline import prepare, prepared_folders
    from raypack.data.prepared import read_manifest

    overrides = [f"prepare.output_dir={tmp_path}", "synth.num_samples=120",
                 "pack.arms=[padding, greedy-cross, bfd-isolated, bfd-cross+related]", "pack.num_clusters=2"]
    cfg = load_config("jobs/quickstart.yaml", overrides)
    assert not any((f / "manifest.json").exists() for f in prepared_folders(cfg).values())
    rc = main(["plan", "jobs/quickstart.yaml", *overrides, "--prepare", "--json", str(tmp_path / "plan.json")])
    assert rc == 0
    # The folders plan looks in are the ones prepare wrote (a grouped arm included).
    assert {k: str(v) for k, v in prepared_folders(cfg).items()} == prepare(cfg)
    counts = json.loads((tmp_path / "plan.json").read_text())["counts"]
    assert set(counts) == set(cfg.pack.arms)
    for arm, folder in prepared_folders(cfg).items():
        if arm == "val":
            continue
        manifest = read_manifest(folder)
        # Independent of the loop's helpers: whole global batches of rows, every epoch.
        per_epoch = manifest.num_rows // cfg.train.global_batch_size
        assert counts[arm]["steps"] == cfg.train.epochs * per_epoch
        assert counts[arm]["num_tokens"] == manifest.num_tokens and counts[arm]["pflop"] > 0
    assert "not prepared" not in capsys.readouterr().out


def test_the_bill_prices_each_arms_flops_and_a_study_prints_it(tmp_path, capsys, ray_local):
    """GPU-hours = the run's model FLOPs / (plan.mfu x plan.gpu_peak_tflops), from `raypack plan`'s own FLOP
    count; USD = GPU-hours x plan.gpu_hour_usd. A CPU plan prints no bill (negative control)."""
    import doctest

    from raypack.data.pipeline import prepare
    from raypack.study.run import arm_plan
    from raypack.train import flops
    from raypack.train.plan_report import study_bill

    assert doctest.testmod(flops).failed == 0
    overrides = [f"prepare.output_dir={tmp_path}", "synth.num_samples=120", "pack.arms=[padding, bfd-isolated]"]
    # A peak of 1 MFLOPS turns the tiny model's ~1e11 FLOPs into tens of GPU-hours: figures the test can miss.
    gpu = ["train.use_gpu=true", "plan.mfu=0.5", "plan.gpu_peak_tflops=0.000001", "plan.gpu_hour_usd=2.5"]
    assert main(["plan", "jobs/quickstart.yaml", *overrides, "--prepare", "--json", str(tmp_path / "cpu.json")]) == 0
    assert "GPU-h" not in capsys.readouterr().out
    assert main(["plan", "jobs/quickstart.yaml", *overrides, *gpu, "--json", str(tmp_path / "gpu.json")]) == 0
    out = capsys.readouterr().out
    counts = json.loads((tmp_path / "gpu.json").read_text())["counts"]
    for c in counts.values():
        hours = c["pflop"] * 1e15 / (0.5 * 1e6) / 3600
        assert hours > 10 and c["gpu_hours"] == pytest.approx(hours) and c["usd"] == pytest.approx(hours * 2.5)
    total = sum(c["gpu_hours"] for c in counts.values())
    assert f"training bill, 2 arms: {total:,.1f} GPU-hours" in out and f"${total * 2.5:,.1f} at $2.5" in out

    cfg = load_config("jobs/quickstart.yaml", overrides + gpu)
    folders = prepare(cfg)
    plans, _ = arm_plan(cfg, folders)
    line = study_bill(plans, folders, seeds=3)[0]
    assert f"2 arms x 3 seeds: {3 * total:,.1f} GPU-hours" in line

    # Evaluation: GSM8K's table entry (raypack/eval/cost.py) by hand; the offline tasks are not estimated.
    from raypack.eval import cost
    from raypack.eval.cost import TASK_COSTS

    assert doctest.testmod(cost).failed == 0  # the per-model figures docs/plan.md quotes
    from raypack.train.memory import model_shape

    n, g = model_shape("tiny").num_params, TASK_COSTS["gsm8k"]
    per_model = (2 * n * g.examples * g.tokens_read / (1e6 * 0.5)
                 + g.examples * g.tokens_generated / 8 * 2 * n / 3.35e12) / 3600
    assert main(["plan", "jobs/quickstart.yaml", *overrides, *gpu, "eval.tasks=[gsm8k:4]", "eval.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert f"evaluation bill, 2 models: {2 * per_model:,.1f} GPU-hours" in out and "not estimated: raypack_offline" in out
    assert f"whole bill with evaluation: {total + 2 * per_model:,.1f} GPU-hours" in out

    # plan.mfu_from: the median MFU of an earlier run's steps (its first step left out) replaces plan.mfu.
    run = tmp_path / "earlier" / "runs" / "padding"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "mfu": m}) + "\n"
                                               for i, m in enumerate([0.9, 0.2, 0.3, 0.25])))
    (tmp_path / "earlier" / "config.json").write_text(json.dumps({"model": {"name_or_path": "tiny"}}))
    measured = [*overrides, *gpu, f"plan.mfu_from={tmp_path / 'earlier'}"]
    assert main(["plan", "jobs/quickstart.yaml", *measured, "--json", str(tmp_path / "measured.json")]) == 0
    assert "25.0% MFU (median of 3 steps" in capsys.readouterr().out
    for arm, c in json.loads((tmp_path / "measured.json").read_text())["counts"].items():
        assert c["gpu_hours"] == pytest.approx(counts[arm]["gpu_hours"] * 0.5 / 0.25)
    # Negative control: an MFU measured on another model is refused.
    (tmp_path / "earlier" / "config.json").write_text(json.dumps({"model": {"name_or_path": "other/model"}}))
    assert main(["plan", "jobs/quickstart.yaml", *measured]) == 2
    assert "trained other/model" in capsys.readouterr().err
