"""ZeRO-3 builds the model already partitioned and trains exactly as ZeRO-2 does (2 CPU workers, Ray Train).

    .venv/bin/pytest tests/test_zero3.py -q

A random-init Llama of ~110M parameters (fp32, the tiny tokenizer's vocabulary)
is saved as a Hugging Face folder in several safetensors shards, and trained 3
steps by the training loop twice on the same prepared rows, with gradient
checkpointing and weight decay 0.1 as the paper jobs train: with ZeRO-2 (the
reference: every rank holds the whole model, loaded by from_pretrained) and with
ZeRO-3 (the model built inside deepspeed.zero.Init, each rank reading only its
slices of the checkpoint, raypack.train.engine.load_into_partitions). Checked:
- per-step losses and the validation loss agree within 1e-4 (the same model, the same rows, the same
  parameters decayed: their names are recorded per stage);
- the loaded model trains in training mode from step 1: every decoder layer runs twice per training
  micro-batch (checkpointing's recomputation), counted on every rank (negative control: the model as
  from_pretrained returns it runs each layer once);
- each ZeRO-3 rank holds about half the parameters (counted from the engine's
  partitions), a ZeRO-2 rank all of them (the negative control);
- a ZeRO-3 rank's peak RSS grows by less than one fp32 copy of the model while
  the model is built and loaded (measured from the point where its code is
  imported), reading from the checkpoint only its own slices, the two ranks
  between them all of it.
"""

import json
from pathlib import Path

import pytest
import torch

from raypack.config import load_config
from raypack.model import TINY, enable_checkpointing, load_tokenizer, tiny_llama_config

SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 9, "num_attention_heads": 8,
         "num_key_value_heads": 2, "max_position_embeddings": 512}
TOLERANCE = 1e-4
ARM = "bfd-isolated"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, int]:
    """A random-init ~110M-parameter Llama in 5 shards, with the tiny tokenizer, like a hub checkout."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-110m")
    tokenizer = load_tokenizer(TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **SHAPE))
    num_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="100MB", safe_serialization=True)
    tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) >= 4
    return folder, num_params


def counting_loop(config: dict) -> None:
    """The loop itself, with every decoder layer's MLP forward counted on this rank by (training mode, grad
    enabled): layer-calls-rank<r>.json beside the run's logs. Under gradient checkpointing a training micro-batch
    runs each layer twice (forward, then its recomputation in the backward pass); a model left in eval mode runs
    it once. (The MLP, inside the layer: transformers checkpoints a layer only when its class's own forward is
    the one it wrapped, so the layer's forward itself cannot be replaced.)"""
    import ray.train
    from transformers.models.llama import modeling_llama

    from raypack.train.loop import train_loop_per_worker

    calls = {"train_grad": 0, "train_nograd": 0, "eval_grad": 0, "eval_nograd": 0}
    original = modeling_llama.LlamaMLP.forward

    def forward(self, *args, **kwargs):
        calls[("train" if self.training else "eval") + ("_grad" if torch.is_grad_enabled() else "_nograd")] += 1
        return original(self, *args, **kwargs)

    modeling_llama.LlamaMLP.forward = forward
    try:
        train_loop_per_worker(config)
    finally:
        modeling_llama.LlamaMLP.forward = original
    rank = ray.train.get_context().get_world_rank()
    (Path(config["run_dir"]) / f"layer-calls-rank{rank}.json").write_text(json.dumps(calls))


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, model_dir):
    """The saved model trained 3 steps at ZeRO-2 and ZeRO-3, as a user's folder is: loaded with from_pretrained
    (ZeRO-2) or slice by slice (ZeRO-3), gradient checkpointing on, weight decay 0.1."""
    from raypack.data.pipeline import prepare
    from raypack.train.launch import arm_config, build_trainer, run_dir

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    tmp = tmp_path_factory.mktemp("zero3")
    folder, _ = model_dir
    out = {}
    for stage in (2, 3):
        cfg = load_config("jobs/compare.yaml", [
            f"prepare.output_dir={tmp / 'prepared'}", f"train.storage_path={tmp / f'runs{stage}'}",
            "synth.num_samples=120", "data.max_seq_len=64", "data.val_count=8", f"pack.arms=[{ARM}]",
            f"model.name_or_path={folder}", "train.num_workers=2", "train.micro_batch_size=1",
            "train.global_batch_size=2", "train.max_steps=3", "train.export=false", f"train.zero_stage={stage}",
            "train.gradient_checkpointing=true", "optim.weight_decay=0.1",
            "optim.lr=0.001", "optim.warmup_ratio=0.0", "prepare.num_tokenizer_actors=1"])
        folders = prepare(cfg)
        build_trainer(arm_config(cfg, folders[ARM]), ARM, folders[ARM], folders["val"], loop=counting_loop).fit()
        out[stage] = run_dir(cfg, ARM)
    return out


def test_zero3_losses_equal_zero2(runs):
    reference, partitioned = (read_jsonl(runs[s] / "metrics.jsonl") for s in (2, 3))
    groups = [json.loads((runs[s] / "init-rank0.json").read_text()) for s in (2, 3)]
    assert groups[0]["decay_parameters"] == groups[1]["decay_parameters"] and groups[0]["decay_parameters"]
    assert groups[0]["no_decay_parameters"] == groups[1]["no_decay_parameters"]
    assert [m["step"] for m in partitioned] == [1, 2, 3]
    for a, b in zip(reference, partitioned):
        assert abs(a["loss"] - b["loss"]) < TOLERANCE, (a["loss"], b["loss"])
    assert abs(reference[-1]["val_loss"] - partitioned[-1]["val_loss"]) < TOLERANCE
    assert reference[0]["loss"] != reference[-1]["loss"]  # the steps did train


def test_each_zero3_rank_holds_half_the_parameters(runs, model_dir):
    _, num_params = model_dir
    for stage, share in ((3, 0.5), (2, 1.0)):
        for rank in (0, 1):
            init = json.loads((runs[stage] / f"init-rank{rank}.json").read_text())
            assert init["param_elements_total"] == num_params
            assert init["param_elements_local"] == pytest.approx(share * num_params, rel=0.01), (stage, rank)


def test_zero3_rank_memory_stays_below_one_full_copy(runs, model_dir):
    _, num_params = model_dir
    full_fp32_mb = num_params * 4 / 2**20
    read = []
    for rank in (0, 1):
        init = json.loads((runs[3] / f"init-rank{rank}.json").read_text())
        grew = init["peak_rss_mb_after_model"] - init["rss_mb_before_model"]
        print(f"ZeRO-3 rank {rank}: peak RSS +{grew:.0f} MiB while the model was built and loaded "
              f"(one fp32 copy: {full_fp32_mb:.0f} MiB; its partitions: "
              f"{init['param_elements_local'] * 4 / 2**20:.0f} MiB); read {init['num_elements_read']:,} of "
              f"{num_params:,} elements")
        assert grew < 0.8 * full_fp32_mb, (rank, grew, full_fp32_mb)
        # Each rank read its own slices: its partition, plus at most the rows a slice boundary cuts.
        assert init["num_elements_read"] <= 1.05 * init["param_elements_local"]
        read.append(init["num_elements_read"])
    assert sum(read) >= num_params  # and between them the whole checkpoint (the control: nothing skipped)


def layer_calls(model, checkpointing: bool) -> dict:
    """One forward and backward of `model` as it is, its decoder layers' forwards counted (counting_loop's key)."""
    from transformers.models.llama import modeling_llama

    calls, original = {}, modeling_llama.LlamaMLP.forward

    def forward(self, *args, **kwargs):
        key = ("train" if self.training else "eval") + ("_grad" if torch.is_grad_enabled() else "_nograd")
        calls[key] = calls.get(key, 0) + 1
        return original(self, *args, **kwargs)

    if checkpointing:
        enable_checkpointing(model)
    modeling_llama.LlamaMLP.forward = forward
    try:
        model(input_ids=torch.arange(8).unsqueeze(0), labels=torch.arange(8).unsqueeze(0)).loss.backward()
    finally:
        modeling_llama.LlamaMLP.forward = original
    return calls


def test_a_saved_model_trains_in_training_mode_with_checkpointing_from_step_one(runs, model_dir):
    """from_pretrained (and the ZeRO-3 build) hand the model over in eval mode, where transformers' gradient
    checkpointing does nothing; the loop trains in training mode from the first step: each training micro-batch
    runs every layer twice (its recomputation), at both stages, and no layer runs in eval mode with gradients.
    Negative control: the same count on the saved model as from_pretrained returns it sees one call per layer."""
    folder, _ = model_dir
    layers = SHAPE["num_hidden_layers"]
    for stage in (2, 3):
        start = next(e for e in read_jsonl(runs[stage] / "events.jsonl") if e["event"] == "start")
        micro_batches = start["stop_step"] * start["grad_accum"]
        validations = len([m for m in read_jsonl(runs[stage] / "metrics.jsonl") if "val_loss" in m])
        for rank in (0, 1):
            calls = json.loads((runs[stage] / f"layer-calls-rank{rank}.json").read_text())
            assert calls["train_grad"] == 2 * layers * micro_batches, (stage, rank, calls)
            assert calls["eval_grad"] == calls["train_nograd"] == 0 and validations == 1
            assert calls["eval_nograd"] > 0 and calls["eval_nograd"] % layers == 0

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not model.training
    assert layer_calls(model, checkpointing=True) == {"eval_grad": layers}  # today's first steps: no recompute
    assert layer_calls(model.train(), checkpointing=True) == {"train_grad": 2 * layers}
