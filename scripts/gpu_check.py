"""GPU check: padding vs bfd-isolated tokens/s on a ~1B random-init Llama at 4096 tokens (bf16, ZeRO-2).

NOT RUN on the CPU development machine (it needs CUDA); it imports there, and
`--dry-run` prints the plan without a GPU. On a GPU node with raypack installed:

    python scripts/gpu_check.py                      # 1 GPU, 2000 synthetic samples, 6 steps per arm
    python scripts/gpu_check.py --num-gpus 8 --steps 10 --num-samples 20000

It prepares synthetic conversations with the paper's 1.2M length profile (tiny
tokenizer, 4096 max length), then trains each arm for --steps optimizer steps
with `raypack train` on a random-init Llama of ~1B parameters (hidden 2048, 16
layers, 32 heads, 8 KV heads, the tiny tokenizer's 4096-token vocabulary),
flash_attention_2 when flash_attn imports, else sdpa. It prints real tokens/s
per arm (steps after the first, which includes compilation and warm-up) and
the bfd-isolated / padding ratio. The model is written as a local HF folder so
that `model.name_or_path` can point at it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ARMS = ("padding", "bfd-isolated")


def write_model(folder: Path) -> None:
    """A random-init ~1B Llama sized for the tiny tokenizer, saved as an HF folder."""
    import torch

    from raypack.model import TINY, load_tokenizer, tiny_llama_config

    tokenizer = load_tokenizer(TINY)
    config = tiny_llama_config(len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def overrides(args: argparse.Namespace, model_dir: Path, storage: Path) -> list[str]:
    per_step = args.micro_batch_size * args.num_gpus * args.grad_accum
    return [f"synth.num_samples={args.num_samples}", "data.max_seq_len=4096", f"pack.arms={json.dumps(list(ARMS))}",
            f"model.name_or_path={model_dir}", "model.attn_implementation=auto", "train.use_gpu=true",
            "train.precision=bf16", "train.zero_stage=2", f"train.num_workers={args.num_gpus}",
            f"train.micro_batch_size={args.micro_batch_size}", f"train.global_batch_size={per_step}",
            f"train.max_steps={args.steps}", "train.epochs=1", "train.export=false",
            f"train.storage_path={storage}", f"prepare.output_dir={storage / 'prepared'}", "name=gpu-check"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--dry-run", action="store_true", help="print the overrides and exit (no GPU needed)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raypack-gpu-check-")).resolve()
    model_dir = work / "llama-1b-random"
    if args.dry_run:
        print("\n".join(overrides(args, model_dir, work)))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; this script is for GPU nodes (use --dry-run here)", file=sys.stderr)
        return 2
    from raypack.config import load_config
    from raypack.train.launch import train

    if not (model_dir / "config.json").exists():
        write_model(model_dir)
    cfg = load_config(None, overrides(args, model_dir, work))
    rates = {}
    for summary in train(cfg):
        lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(x) for x in lines if x][1:] or [json.loads(lines[-1])]
        seconds = sum(m["step_time_s"] for m in metrics)
        rates[summary["arm"]] = sum(m["num_tokens"] for m in metrics) / seconds
        pad = 1 - sum(m["num_tokens"] for m in metrics) / sum(m["num_row_tokens"] for m in metrics)
        print(f"{summary['arm']:<14} real tokens/s {rates[summary['arm']]:>10.0f}   padding {pad:.1%}   "
              f"peak memory {max(m['peak_memory_mb'] for m in metrics):.0f} MiB", flush=True)
    print(f"bfd-isolated / padding tokens/s: {rates['bfd-isolated'] / rates['padding']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
