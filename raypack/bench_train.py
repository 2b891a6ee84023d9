"""Benchmark of `raypack train`: padding vs bfd-isolated on the same samples, tiny model.

In one run, on the same prepared samples and the same cores:

1. train one epoch of each arm on Ray Train (train.num_workers workers, DeepSpeed)
   and read the loop's metrics.jsonl back: steps, epoch time (sum of step times,
   without worker start-up), real tokens/s, row tokens/s, padding fraction, and
   the wall time of the whole `fit()` (start-up included);
2. dense: forward + backward of the same collated micro-batches (rank 0's share
   of the first steps) in this process on a plain model, no data loading, no
   DeepSpeed and no communication, to show what the shapes alone cost.

    raypack bench train jobs/quickstart.yaml synth.num_samples=2000 data.max_seq_len=1024
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raypack.config import Config, load_config
from raypack.data.collate import collate
from raypack.data.order import epoch_order, step_rows
from raypack.data.pipeline import prepare, read_manifest, read_rows, steps_per_epoch
from raypack.model import build_model, load_tokenizer, resolve_attn_implementation
from raypack.train.engine import gradient_accumulation_steps
from raypack.train.launch import train_arm

ARMS = ("padding", "bfd-isolated")


def dense_throughput(cfg: Config, folder: str, num_steps: int) -> dict:
    """Forward + backward tokens/s of rank 0's micro-batches of the first `num_steps` steps (in-process)."""
    train = cfg.train
    manifest = read_manifest(folder)
    mode = "padding" if manifest["strategy"] == "padding" else manifest["attention"]
    grad_accum = gradient_accumulation_steps(train, train.num_workers)
    steps = min(num_steps, steps_per_epoch(manifest["num_rows"], train.num_workers, train.micro_batch_size,
                                           grad_accum))
    rows, order = read_rows(folder), epoch_order(manifest["num_rows"], train.seed, 0)
    pad_id = load_tokenizer(cfg.data.tokenizer).pad_token_id
    picked = [rows.take(idx).to_pylist() for s in range(steps)
              for idx in step_rows(order, s, 0, train.num_workers, train.micro_batch_size, grad_accum)]
    batches = [collate(mb, mode, pad_id) for mb in picked]
    tokens = sum(r["num_tokens"] for mb in picked for r in mb)
    row_tokens = sum(b["input_ids"].numel() for b in batches)
    model = build_model(cfg.model.name_or_path, resolve_attn_implementation(cfg.model.attn_implementation, "cpu"),
                        train.seed)
    start = time.perf_counter()
    for b in batches:
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids") if k in b}
        model(**inputs, use_cache=False).logits.float().mean().backward()
    seconds = time.perf_counter() - start
    return {"micro_batches": len(batches), "seconds": seconds, "tokens_per_sec": tokens / seconds,
            "row_tokens_per_sec": row_tokens / seconds}


def bench_train(config: str, overrides: list[str], work_dir: str, dense_steps: int = 4) -> dict:
    run = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(config, [f"pack.arms={json.dumps(list(ARMS))}", "train.epochs=1", "train.export=false",
                               f"train.storage_path={Path(work_dir).resolve() / 'runs'}", f"name=bench-{run}",
                               *overrides])
    folders = prepare(cfg)
    out = {"config": {"num_workers": cfg.train.num_workers, "global_batch_size": cfg.train.global_batch_size,
                      "micro_batch_size": cfg.train.micro_batch_size, "max_seq_len": cfg.data.max_seq_len,
                      "num_samples": cfg.synth.num_samples if not cfg.data.sources else None}, "arms": {}}
    for arm in ARMS:
        start = time.perf_counter()
        summary = train_arm(cfg, arm, folders[arm])
        fit_s = time.perf_counter() - start
        metrics = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x]
        epoch_s = sum(m["step_time_s"] for m in metrics)
        out["arms"][arm] = {
            "steps": len(metrics), "epoch_s": epoch_s, "fit_s": fit_s,
            "tokens_per_sec": sum(m["num_tokens"] for m in metrics) / epoch_s,
            "row_tokens_per_sec": sum(m["num_row_tokens"] for m in metrics) / epoch_s,
            "padding_fraction": 1 - sum(m["num_tokens"] for m in metrics) / sum(m["num_row_tokens"] for m in metrics),
            "last_loss": metrics[-1]["loss"],
            "dense": dense_throughput(cfg, folders[arm], dense_steps),
        }
    return out


def format_train_result(r: dict) -> str:
    header = (f"{'arm':<14}{'steps':>6}{'epoch s':>9}{'fit s':>8}{'tok/s':>9}{'row tok/s':>11}{'pad':>7}"
              f"{'dense tok/s':>13}{'dense row tok/s':>17}")
    lines = [header]
    for arm, a in r["arms"].items():
        d = a["dense"]
        lines.append(f"{arm:<14}{a['steps']:>6}{a['epoch_s']:>9.1f}{a['fit_s']:>8.1f}{a['tokens_per_sec']:>9.0f}"
                     f"{a['row_tokens_per_sec']:>11.0f}{a['padding_fraction']:>7.1%}{d['tokens_per_sec']:>13.0f}"
                     f"{d['row_tokens_per_sec']:>17.0f}")
    if set(ARMS) <= set(r["arms"]):
        p, b = r["arms"]["padding"], r["arms"]["bfd-isolated"]
        lines.append(f"bfd-isolated / padding: epoch time {b['epoch_s'] / p['epoch_s']:.2f}x, "
                     f"real tokens/s {b['tokens_per_sec'] / p['tokens_per_sec']:.2f}x")
    return "\n".join(lines)
