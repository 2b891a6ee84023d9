"""ZeRO-3 builds the model already partitioned and trains exactly as ZeRO-2 does (2 CPU workers, Ray Train).

    .venv/bin/pytest tests/test_zero3.py -q

A random-init Llama of ~110M parameters (fp32, the tiny tokenizer's vocabulary)
is saved as a Hugging Face folder in several safetensors shards, and trained 3
steps by `raypack train` twice on the same prepared rows: with ZeRO-2 (the
reference: every rank holds the whole model) and with ZeRO-3 (the model built
inside deepspeed.zero.Init, each rank reading only its slices of the checkpoint,
raypack.train.engine.load_into_partitions). Checked:
- per-step losses and the validation loss agree within 1e-4 (the same model, the same rows);
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
from raypack.model import TINY, load_tokenizer, tiny_llama_config

SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 9, "num_attention_heads": 8,
         "num_key_value_heads": 2, "max_position_embeddings": 512}
TOLERANCE = 1e-4


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


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, model_dir):
    from raypack.train.launch import run_dir, train

    tmp = tmp_path_factory.mktemp("zero3")
    folder, _ = model_dir
    out = {}
    for stage in (2, 3):
        cfg = load_config("jobs/compare.yaml", [
            f"prepare.output_dir={tmp / 'prepared'}", f"train.storage_path={tmp / f'runs{stage}'}",
            "synth.num_samples=120", "data.max_seq_len=64", "data.val_count=8", "pack.arms=[bfd-isolated]",
            f"model.name_or_path={folder}", "train.num_workers=2", "train.micro_batch_size=1",
            "train.global_batch_size=2", "train.max_steps=3", "train.export=false", f"train.zero_stage={stage}",
            "optim.lr=0.001", "optim.warmup_ratio=0.0", "prepare.num_tokenizer_actors=1"])
        train(cfg)
        out[stage] = run_dir(cfg, "bfd-isolated")
    return out


def test_zero3_losses_equal_zero2(runs):
    reference, partitioned = (read_jsonl(runs[s] / "metrics.jsonl") for s in (2, 3))
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
