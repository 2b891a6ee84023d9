"""Benchmark of `raypack train`: padding vs bfd-isolated (or --arms) on the same samples.

    raypack bench train jobs/quickstart.yaml synth.num_samples=2000 data.max_seq_len=1024
    raypack bench train jobs/gpu-1x.yaml --arms padding,padfree,bfd-isolated,bfd-cross --no-replay  # GPU

For each arm, on the same prepared samples and the same cores:

1. train one epoch on Ray Train (train.num_workers workers, DeepSpeed), a normal
   `raypack train` run, and read its metrics.jsonl back: steps, epoch time (sum
   of step times, without worker start-up), real tokens/s, row tokens/s, padding
   fraction, last loss, and the wall time of the whole `fit()` (start-up included);
2. the limit, in a run of its own (`limit_loop_per_worker`, launched like the
   training loop): the loop's set-up and steps (raypack.train.loop: set_up,
   Worker.step_batches, optimizer_step), each step taken as the loop takes it
   (its rows fetched and collated, the loss denominator all-reduced, the
   optimizer step) and right after run again from the same collated
   micro-batches: forward, backward and optimizer step on rows of exactly the
   same shapes, with no data loading or collation. Interleaved, so a change in
   the machine's load hits both alike. The row-token throughput of the steps as
   taken (step 1, the warm-up, left out of both) divided by the replay's is the
   share data handling leaves (target >= 0.9). The limit run's losses are not a
   normal run's (each step updates the model twice); the training run's are.
   --no-replay skips it (scripts/gpu_run.sh compares with scripts/gpu_check.py's bare loop instead).

Per arm also: the first step's time (kernels chosen, caches warmed) and, over the steps after it,
`warm_tokens_per_sec`, `warm_mfu` (null where the accelerator's peak is unknown, e.g. CPU), the largest
`peak_memory_mb` of any step (torch.cuda.max_memory_allocated on rank 0; on CPU its peak RSS), and what the
arm ran with: `attn_implementation` (auto resolves per arm), `loss_impl`, `zero_stage`.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from raypack.config import Config, from_dict, load_config
from raypack.data.pipeline import prepare
from raypack.data.synth import num_rows
from raypack.train.launch import arm_config, build_trainer, run_dir, train_arm
from raypack.train.loop import barrier, optimizer_step, set_up
from raypack.train.loss import all_reduce_sum, step_denominator
from raypack.train.metrics import read_metrics
from raypack.train.plan import lr_at

ARMS = ("padding", "bfd-isolated")
LIMIT_FILE = "limit.json"


def bench_train(config: str, overrides: list[str], work_dir: str, arms: tuple[str, ...] = ARMS,
                replay: bool = True) -> dict:
    run = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(config, [f"pack.arms={json.dumps(list(arms))}", "train.epochs=1", "train.export=false",
                               f"train.storage_path={Path(work_dir).resolve() / 'runs'}", f"name=bench-{run}",
                               *overrides])
    folders = prepare(cfg)
    out = {"config": {"num_workers": cfg.train.num_workers, "global_batch_size": cfg.train.global_batch_size,
                      "micro_batch_size": cfg.train.micro_batch_size, "max_seq_len": cfg.data.max_seq_len,
                      "num_samples": num_rows(cfg.synth) if not cfg.data.sources else None}, "arms": {}}
    for arm in arms:
        start = time.perf_counter()
        summary = train_arm(cfg, arm, folders[arm])
        fit_s = time.perf_counter() - start
        metrics = read_metrics(summary["run_dir"])
        epoch_s = sum(m["step_time_s"] for m in metrics)
        out["arms"][arm] = {
            "steps": len(metrics), "epoch_s": epoch_s, "fit_s": fit_s,
            "tokens_per_sec": sum(m["num_tokens"] for m in metrics) / epoch_s,
            "row_tokens_per_sec": sum(m["num_row_tokens"] for m in metrics) / epoch_s,
            "padding_fraction": 1 - sum(m["num_tokens"] for m in metrics) / sum(m["num_row_tokens"] for m in metrics),
            "last_loss": metrics[-1]["loss"],
            "model_tflops_per_sec": sum(m["model_tflops_per_sec"] * m["step_time_s"] for m in metrics) / epoch_s,
            **warm_figures(metrics), "attn_implementation": summary["attn_implementation"],
            "loss_impl": cfg.train.loss_impl, "zero_stage": cfg.train.zero_stage,
        }
        if replay:
            limit = limit_run(cfg, arm, folders[arm])
            timed_row_tps = limit["real_row_tokens_per_sec"]  # the steps as taken, right before their replays
            out["arms"][arm].update({"replay": limit, "timed_row_tokens_per_sec": timed_row_tps,
                                     "ratio_to_replay": timed_row_tps / limit["row_tokens_per_sec"]})
    return out


def warm_figures(metrics: list[dict]) -> dict:
    """The first step's time, and tokens/s and MFU over the steps after it (module docstring); the largest peak
    memory of any step. Over every step when there is only one.

    >>> m = [{"step_time_s": 5.0, "num_tokens": 100, "mfu": 0.1, "peak_memory_mb": 9.0},
    ...      {"step_time_s": 1.0, "num_tokens": 100, "mfu": 0.5, "peak_memory_mb": 8.0},
    ...      {"step_time_s": 3.0, "num_tokens": 300, "mfu": 0.3, "peak_memory_mb": 7.0}]
    >>> warm_figures(m)
    {'first_step_time_s': 5.0, 'warm_steps': 2, 'warm_tokens_per_sec': 100.0, 'warm_mfu': 0.35, 'peak_memory_mb': 9.0}
    """
    warm = metrics[1:] or metrics
    seconds = sum(m["step_time_s"] for m in warm)
    mfus = [m.get("mfu") for m in warm]
    peaks = [m["peak_memory_mb"] for m in metrics if m.get("peak_memory_mb") is not None]
    return {"first_step_time_s": metrics[0]["step_time_s"], "warm_steps": len(warm),
            "warm_tokens_per_sec": sum(m["num_tokens"] for m in warm) / seconds,
            "warm_mfu": None if None in mfus else sum(f * m["step_time_s"] for f, m in zip(mfus, warm)) / seconds,
            "peak_memory_mb": max(peaks) if peaks else None}


def limit_run(cfg: Config, arm: str, folder: str) -> dict:
    """The limit of one arm (module docstring, 2.) in a Ray Train run of its own, <name>-limit-<arm>; returns its
    limit.json: steps, seconds (the replays), real_seconds (the steps as taken), tokens, row_tokens and rates."""
    cfg = arm_config(cfg, folder)
    cfg = replace(cfg, name=f"{cfg.name}-limit")
    build_trainer(cfg, arm, folder, loop=limit_loop_per_worker).fit()
    return json.loads((run_dir(cfg, arm) / LIMIT_FILE).read_text())


def limit_loop_per_worker(config: dict) -> None:
    """Every rank: take the arm's steps as the training loop does, each followed by its replay (module docstring);
    rank 0 writes limit.json into config["run_dir"]. `config` is the training loop's (raypack.train.launch)."""
    cfg = from_dict(Config, config["config"])
    train = cfg.train
    w = set_up(config["folder"], train, cfg.optim, cfg.model, cfg.data.tokenizer)
    seconds = real_seconds = tokens = row_tokens = 0.0
    for step in range(w.plan.stop_step):
        barrier()
        start = time.perf_counter()
        _, picked, micro_batches = w.step_batches(step)
        denominator = all_reduce_sum(step_denominator(micro_batches, train.loss_reduction))
        lr = lr_at(step, w.plan.schedule_steps, cfg.optim)
        optimizer_step(w.engine, w.optimizer, micro_batches, denominator, lr, train.loss_reduction, w.world_size,
                       train.loss_impl)
        barrier()
        taken = time.perf_counter() - start
        start = time.perf_counter()
        optimizer_step(w.engine, w.optimizer, micro_batches, denominator, lr, train.loss_reduction, w.world_size,
                       train.loss_impl)
        barrier()
        replayed = time.perf_counter() - start
        step_tokens = all_reduce_sum(float(sum(r["num_tokens"] for mb in picked for r in mb)))
        step_row_tokens = all_reduce_sum(float(sum(b["input_ids"].numel() for b in micro_batches)))
        if step > 0:  # the first step warms up
            seconds, real_seconds = seconds + replayed, real_seconds + taken
            tokens, row_tokens = tokens + step_tokens, row_tokens + step_row_tokens
    if w.rank == 0:
        out = Path(config["run_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / LIMIT_FILE).write_text(json.dumps({
            "steps": w.plan.stop_step - 1, "seconds": seconds, "real_seconds": real_seconds, "tokens": int(tokens),
            "row_tokens": int(row_tokens), "tokens_per_sec": tokens / seconds,
            "row_tokens_per_sec": row_tokens / seconds, "real_row_tokens_per_sec": row_tokens / real_seconds},
            indent=2))


def format_train_result(r: dict) -> str:
    header = (f"{'arm':<14}{'steps':>6}{'epoch s':>9}{'fit s':>8}{'tok/s':>9}{'row tok/s':>11}{'pad':>7}"
              f"{'replay row tok/s':>18}{'ratio':>7}  attention")
    lines = [header]
    for arm, a in r["arms"].items():
        replay = (f"{a['replay']['row_tokens_per_sec']:>18.0f}{a['ratio_to_replay']:>7.3f}" if "replay" in a
                  else f"{'-':>18}{'-':>7}")
        lines.append(f"{arm:<14}{a['steps']:>6}{a['epoch_s']:>9.1f}{a['fit_s']:>8.1f}{a['tokens_per_sec']:>9.0f}"
                     f"{a['row_tokens_per_sec']:>11.0f}{a['padding_fraction']:>7.1%}{replay}  "
                     f"{a['attn_implementation']}")
    lines.append("ratio: row tokens/s of steps 2.. as taken (rows fetched and collated) over their replays with no "
                 "data loading, interleaved in a run of their own (target >= 0.9; - : --no-replay)")
    if {"padding", "bfd-isolated"} <= set(r["arms"]):
        p, b = r["arms"]["padding"], r["arms"]["bfd-isolated"]
        row_p = p["row_tokens_per_sec"] * p["epoch_s"]
        row_b = b["row_tokens_per_sec"] * b["epoch_s"]
        lines.append(f"padding / bfd-isolated: epoch time {p['epoch_s'] / b['epoch_s']:.2f}x for "
                     f"{row_p / row_b:.2f}x the row tokens (padding included); bfd real tokens/s "
                     f"{b['tokens_per_sec'] / p['tokens_per_sec']:.2f}x padding's")
    return "\n".join(lines)
