"""Benchmark of `raypack train`: padding vs bfd-isolated on the same samples, tiny model.

In one run, on the same prepared samples and the same cores:

1. train one epoch of each arm on Ray Train (train.num_workers workers, DeepSpeed)
   and read the loop's metrics.jsonl back: steps, epoch time (sum of step times,
   without worker start-up), real tokens/s, row tokens/s, padding fraction, and
   the wall time of the whole `fit()` (start-up included);
2. the limit (`train.bench_replay`): right after each step, the same workers and
   DeepSpeed engine run that step again from its collated micro-batches:
   forward, backward and optimizer step on rows of exactly the same shapes, with
   no data loading, collation, metric all-reduce or logging. Interleaved, so a
   change in the machine's load hits both alike. The arm's row-token throughput
   over the same steps (step 1, the warm-up, left out of both) divided by the
   replay's is the share data handling leaves (target >= 0.9). The replayed
   updates change the model, so a bench run's losses are not a normal run's.

    raypack bench train jobs/quickstart.yaml synth.num_samples=2000 data.max_seq_len=1024
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raypack.config import Config, load_config
from raypack.data.pipeline import prepare
from raypack.train.launch import train_arm
from raypack.train.metrics import read_metrics

ARMS = ("padding", "bfd-isolated")


def bench_train(config: str, overrides: list[str], work_dir: str) -> dict:
    run = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(config, [f"pack.arms={json.dumps(list(ARMS))}", "train.epochs=1", "train.export=false",
                               "train.bench_replay=true",
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
        metrics = read_metrics(summary["run_dir"])
        epoch_s = sum(m["step_time_s"] for m in metrics)
        replay = json.loads((Path(summary["run_dir"]) / "replay.json").read_text())
        timed_row_tps = replay["real_row_tokens_per_sec"]  # the replayed steps as they ran: all but the first
        out["arms"][arm] = {
            "steps": len(metrics), "epoch_s": epoch_s, "fit_s": fit_s,
            "tokens_per_sec": sum(m["num_tokens"] for m in metrics) / epoch_s,
            "row_tokens_per_sec": sum(m["num_row_tokens"] for m in metrics) / epoch_s,
            "padding_fraction": 1 - sum(m["num_tokens"] for m in metrics) / sum(m["num_row_tokens"] for m in metrics),
            "last_loss": metrics[-1]["loss"],
            "model_tflops_per_sec": sum(m["model_tflops_per_sec"] * m["step_time_s"] for m in metrics) / epoch_s,
            "replay": replay, "timed_row_tokens_per_sec": timed_row_tps,
            "ratio_to_replay": timed_row_tps / replay["row_tokens_per_sec"],
        }
    return out


def format_train_result(r: dict) -> str:
    header = (f"{'arm':<14}{'steps':>6}{'epoch s':>9}{'fit s':>8}{'tok/s':>9}{'row tok/s':>11}{'pad':>7}"
              f"{'replay row tok/s':>18}{'ratio':>7}")
    lines = [header]
    for arm, a in r["arms"].items():
        lines.append(f"{arm:<14}{a['steps']:>6}{a['epoch_s']:>9.1f}{a['fit_s']:>8.1f}{a['tokens_per_sec']:>9.0f}"
                     f"{a['row_tokens_per_sec']:>11.0f}{a['padding_fraction']:>7.1%}"
                     f"{a['replay']['row_tokens_per_sec']:>18.0f}{a['ratio_to_replay']:>7.3f}")
    lines.append("ratio: row tokens/s of steps 2.. over the replay of the same steps with no data loading "
                 "(target >= 0.9)")
    if set(ARMS) <= set(r["arms"]):
        p, b = r["arms"]["padding"], r["arms"]["bfd-isolated"]
        row_p = p["row_tokens_per_sec"] * p["epoch_s"]
        row_b = b["row_tokens_per_sec"] * b["epoch_s"]
        lines.append(f"padding / bfd-isolated: epoch time {p['epoch_s'] / b['epoch_s']:.2f}x for "
                     f"{row_p / row_b:.2f}x the row tokens (padding included); bfd real tokens/s "
                     f"{b['tokens_per_sec'] / p['tokens_per_sec']:.2f}x padding's")
    return "\n".join(lines)
