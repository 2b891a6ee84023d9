"""`raypack plan`: will a job fit? Per arm, the run plan's counts (rows, steps, tokens, FLOPs) from the prepared
manifests, and the memory estimate per GPU and per node (raypack.train.memory), with a verdict and the
settings that would lower it.

    raypack plan jobs/paper-70b-tulu.yaml [key=value ...] [--prepare] [--json F]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raypack.config import Config, OptimConfig, PlanConfig, TrainConfig, to_dict
from raypack.data.hub import HubUnreachable
from raypack.data.prepared import read_manifest
from raypack.eval.cost import eval_gpu_hours
from raypack.eval.tasks import eval_tasks
from raypack.tables import format_table, write_json
from raypack.train import memory
from raypack.train.flops import gpu_hours, step_flops
from raypack.train.metrics import METRICS_FILE, read_jsonl
from raypack.train.plan import run_plan

PLAN_COUNT_COLUMNS = (
    ("rows", "num_rows"), ("rows/step", "rows_per_step"), ("steps/epoch", "steps_per_epoch"), ("steps", "steps"),
    ("tokens/epoch", "num_tokens"), ("supervised/epoch", "num_supervised_tokens"), ("PFLOP (run)", "pflop"),
)
PLAN_MEMORY_COLUMNS = (
    ("params", "params"), ("grads", "grads"), ("optimizer", "optimizer"), ("gathered", "gathered"),
    ("layers", "layers"), ("loss", "loss"), ("total", "total"),
)
NOT_PREPARED = "not prepared (run raypack prepare, or raypack plan --prepare)"


def arm_counts(train: TrainConfig, optim: OptimConfig, folder: str, shape: memory.ModelShape) -> dict:
    """A prepared arm's rows, optimizer steps, tokens and model FLOPs, computed as `raypack train` computes them."""
    manifest = read_manifest(folder)
    plan = run_plan(train, optim, manifest, train.num_workers)  # rows per step, steps: as training
    # Attention segments (raypack.train.flops): whole rows in cross arms, else samples.
    cross = manifest.attention == "cross"
    column = pq.read_table(sorted(str(f) for f in Path(folder).glob("*.parquet")),
                           columns=["num_tokens" if cross else "seq_lens"]).column(0).combine_chunks()
    segments = np.asarray(column if cross else column.flatten(), dtype=np.int64)
    epoch_flops = step_flops(shape.matmul_params, shape.num_hidden_layers, shape.hidden_size, manifest.num_tokens,
                             segments)
    # The run trains on steps x rows-per-step rows: epochs' worth, of average rows.
    run_epochs = plan.stop_step * plan.rows_per_step / manifest.num_rows
    return {"num_rows": manifest.num_rows, "rows_per_step": plan.rows_per_step,
            "steps_per_epoch": plan.steps_per_epoch, "steps": plan.stop_step, "num_tokens": manifest.num_tokens,
            "num_supervised_tokens": manifest.num_supervised_tokens, "pflop": epoch_flops * run_epochs / 1e15}


def price(counts: dict[str, dict], plan: PlanConfig) -> None:
    """Add each arm's GPU-hours (its run's model FLOPs at plan.mfu of plan.gpu_peak_tflops) and, with
    plan.gpu_hour_usd, its cost in USD to its counts."""
    if not 0 < plan.mfu <= 1:
        raise ValueError(f"plan.mfu: must be in (0, 1], got {plan.mfu}")
    if plan.gpu_peak_tflops <= 0 or plan.gpu_hour_usd < 0 or plan.gpu_hbm_tbps <= 0:
        raise ValueError(f"plan.gpu_peak_tflops and plan.gpu_hbm_tbps must be > 0 and plan.gpu_hour_usd >= 0, "
                         f"got {plan.gpu_peak_tflops}, {plan.gpu_hbm_tbps} and {plan.gpu_hour_usd}")
    for c in counts.values():
        c["gpu_hours"] = gpu_hours(c["pflop"] * 1e15, plan.gpu_peak_tflops, plan.mfu)
        if plan.gpu_hour_usd:
            c["usd"] = c["gpu_hours"] * plan.gpu_hour_usd


def measured_plan(cfg: Config) -> tuple[PlanConfig, str]:
    """cfg.plan with plan.mfu measured by the run(s) under plan.mfu_from, when set; and where the MFU comes from."""
    p = cfg.plan
    if not p.mfu_from:
        return p, f"{p.mfu:.0%} MFU (plan.mfu)"
    folder = Path(p.mfu_from)
    files = sorted(folder.rglob(METRICS_FILE)) if folder.is_dir() else []
    if not files:
        raise ValueError(f"plan.mfu_from: {folder} holds no {METRICS_FILE} (give a finished run's or study's folder)")
    model = _trained_model(folder)
    if model and model != cfg.model.name_or_path:
        raise ValueError(f"plan.mfu_from: {folder} trained {model}, this job trains {cfg.model.name_or_path}; an "
                         "MFU measured on another model does not carry over")
    values = [m["mfu"] for f in files for m in read_jsonl(f)[1:] if m.get("mfu")]  # step 1 warms up
    if not values:
        raise ValueError(f"plan.mfu_from: no measured MFU in {folder} (CPU runs, and GPUs of unknown peak "
                         "without train.peak_tflops, log none)")
    mfu = float(np.median(values))
    return dataclasses.replace(p, mfu=mfu), f"{mfu:.1%} MFU (median of {len(values):,} steps under {folder})"


def _trained_model(folder: Path) -> str | None:
    """model.name_or_path of the study or run config saved in `folder` or a folder above it, if any."""
    for parent in (folder, *folder.parents):
        path = parent / "config.json"
        if path.exists():
            return json.loads(path.read_text()).get("model", {}).get("name_or_path")
    return None


def eval_bill(cfg: Config, num_params: int, num_models: int) -> tuple[float, list[str]]:
    """GPU-hours of scoring num_models models on cfg.eval's benchmarks (raypack.eval.cost), and the bill line."""
    specs, skipped_tasks = eval_tasks(cfg.eval)
    if not specs:
        return 0.0, []
    per_model, unknown = eval_gpu_hours(specs, num_params, cfg.plan.gpu_peak_tflops, cfg.plan.mfu,
                                        cfg.plan.gpu_hbm_tbps, cfg.eval.batch_size)
    notes = f"; not estimated: {', '.join(unknown)}" if unknown else ""
    notes += "".join(f"; {task} {why}" for task, why in skipped_tasks.items())
    return per_model * num_models, [
        (f"evaluation bill, {num_models} model{'s' * (num_models > 1)}: {_figure(per_model * num_models)} GPU-hours "
        f"({_figure(per_model)} per model on {', '.join(s.name for s in specs)}: prompts at the MFU, generation "
        f"at {cfg.plan.gpu_hbm_tbps:g} TB/s, raypack/eval/cost.py{notes})")]


def bill_lines(counts: dict[str, dict], train: TrainConfig, plan: PlanConfig, seeds: int = 1,
               mfu_source: str = "", evaluation: tuple[float, list[str]] = (0.0, [])) -> list[str]:
    """The bill of the priced arms: training GPU-hours, wall-clock hours on train.num_workers GPUs, USD; then
    `evaluation` (eval_bill's hours and lines) and the whole with it."""
    eval_hours, eval_lines = evaluation
    hours = seeds * sum(c["gpu_hours"] for c in counts.values())
    runs = f"{len(counts)} arm{'s' * (len(counts) > 1)}" + (f" x {seeds} seeds" if seeds > 1 else "")
    lines = [(f"training bill, {runs}: {_figure(hours)} GPU-hours, about {_figure(hours / train.num_workers)} h "
             f"on {train.num_workers} GPUs{_cost(hours, plan)}; at {mfu_source or f'{plan.mfu:.0%} MFU'} of "
             f"{plan.gpu_peak_tflops:g} TFLOPS per GPU (plan.gpu_peak_tflops), model FLOPs only: start-up and "
             "checkpoints not counted"), *eval_lines]
    if eval_hours:
        lines.append(f"whole bill with evaluation: {_figure(hours + eval_hours)} GPU-hours"
                     f"{_cost(hours + eval_hours, plan)}")
    return lines


def _cost(hours: float, plan: PlanConfig) -> str:
    return f", ${_figure(hours * plan.gpu_hour_usd)} at ${plan.gpu_hour_usd:g} per GPU-hour" \
        if plan.gpu_hour_usd else " (plan.gpu_hour_usd prices it)"


def _figure(x: float) -> str:
    """12,345.6 / 3.2 / 0.00042: one decimal from 1 up, two significant digits below."""
    return f"{x:,.1f}" if x >= 1 else f"{x:.2g}"


def study_bill(plans: dict[str, Config], folders: dict, seeds: int) -> list[str]:
    """The bill `raypack study` prints before it trains: each arm under its own plan (study.match), then the
    evaluation of every arm's model per seed."""
    first = next(iter(plans.values()))
    shape = memory.model_shape(first.model.name_or_path, first.model.trust_remote_code)
    plan, source = measured_plan(first)
    counts = {arm: arm_counts(c.train, c.optim, str(folders[arm]), shape) for arm, c in plans.items()}
    price(counts, plan)
    evaluation = eval_bill(dataclasses.replace(first, plan=plan), shape.num_params, len(plans) * seeds)
    per_arm = ", ".join(f"{arm} {_figure(c['gpu_hours'])}" for arm, c in counts.items())
    return bill_lines(counts, first.train, plan, seeds, source, evaluation) + \
        [f"training GPU-hours per arm and seed: {per_arm}"]


def _plan_header(cfg, shape, precision: str, attention: str, limits) -> list[str]:
    t, p = cfg.train, cfg.plan
    offload = "+".join(n for n, on in (("optimizer", t.offload_optimizer), ("params", t.offload_params)) if on)
    nodes = -(-t.num_workers // limits.workers_per_node)
    where = (f"{t.num_workers} GPU workers ({nodes} node{'s' * (nodes > 1)} of {p.gpus_per_node} x "
             f"{p.gpu_memory_gib:g} GiB GPUs, {p.cpu_memory_gib:g} GiB host memory)"
             if t.use_gpu else f"{t.num_workers} CPU workers on one node ({p.cpu_memory_gib:g} GiB)")
    size = f"{shape.num_params / 1e9:.2f}B" if shape.num_params >= 1e9 else f"{shape.num_params / 1e6:.2f}M"
    model = (f"raypack plan {cfg.name}: {cfg.model.name_or_path}, {size} parameters ({shape.num_hidden_layers} "
             f"layers, hidden {shape.hidden_size}, vocab {shape.vocab_size:,})")
    run = (f"{where}; {precision}, ZeRO-{t.zero_stage}, offload {offload or 'none'}, gradient checkpointing "
           f"{'on' if t.gradient_checkpointing else 'off'}, attention {attention}, micro-batch "
           f"{t.micro_batch_size} x {cfg.data.max_seq_len}")
    gpu = f"{limits.device / memory.GIB:.1f} GiB per GPU, " if t.use_gpu else ""
    usable = f"usable after {p.headroom_fraction:.0%} headroom: {gpu}{limits.host / memory.GIB:.0f} GiB per node"
    return [model, run, usable]


def plan_command(cfg: Config, prepare_first: bool = False, json_path: str | None = None) -> int:
    """`raypack plan`: print the counts and memory table and the verdict; 0 when every arm fits, else 1."""
    from raypack.data.pipeline import prepare, prepared_folders

    shape = memory.model_shape(cfg.model.name_or_path, cfg.model.trust_remote_code)
    if prepare_first:
        prepare(cfg)
    try:
        folders, unresolved = prepared_folders(cfg), None
    except HubUnreachable as err:  # the memory estimate needs no data: say why there are no counts, go on
        folders, unresolved = {}, str(err)
    counts = {arm: arm_counts(cfg.train, cfg.optim, str(folders[arm]), shape) for arm in cfg.pack.arms
              if arm in folders and (folders[arm] / "manifest.json").exists()}
    arms = memory.estimate_job(cfg, shape, {arm: c["num_tokens"] for arm, c in counts.items()})
    precision, attention = memory.precision_and_attention(cfg)
    limits, use_gpu = memory.budget(cfg.plan, cfg.train), cfg.train.use_gpu
    lines = _plan_header(cfg, shape, precision, attention, limits)
    lines += ["", f"counts (prepared data in {cfg.prepared_root()}):"]
    columns = PLAN_COUNT_COLUMNS
    if counts and use_gpu:
        plan, mfu_source = measured_plan(cfg)
        price(counts, plan)
        columns += (("GPU-h", "gpu_hours"),) + ((("USD", "usd"),) if cfg.plan.gpu_hour_usd else ())
    if counts:
        lines.append(format_table(["arm"] + [c for c, _ in columns],
                                  [[arm] + [c[k] for _, k in columns] for arm, c in counts.items()]))
    if counts and use_gpu:
        evaluation = eval_bill(dataclasses.replace(cfg, plan=plan), shape.num_params, len(counts))
        lines += bill_lines(counts, cfg.train, plan, 1, mfu_source, evaluation)
    lines += [f"{arm}: {NOT_PREPARED}" for arm in cfg.pack.arms if arm not in counts]
    lines += [f"(prepared folders unknown: {unresolved})"] if unresolved else []
    figures = {arm: _plan_figures(a, use_gpu, limits) for arm, a in arms.items()}
    where = "per GPU" if use_gpu else "per CPU worker (all of it in host memory)"
    other = f"layers, ckpt {'off' if cfg.train.gradient_checkpointing else 'on'}"
    lines += ["", f"memory {where}, GiB, at each arm's largest micro-batch:", format_table(
        ["arm", "micro-batch"] + [c for c, _ in PLAN_MEMORY_COLUMNS] + [other, "host/node", "fits"],
        [[arm, str(arms[arm].batch)] + [f"{f[k]:.2f}" for _, k in PLAN_MEMORY_COLUMNS]
         + [f"{f['layers_other']:.2f}", f"{f['host_per_node']:.1f}", "yes" if f["fits"] else "NO"]
         for arm, f in figures.items()])]
    lines += ["", *PLAN_NOTES, *_plan_verdict(cfg.train, cfg.plan, figures)]
    print("\n".join(lines))
    if json_path:
        write_json({"config": to_dict(cfg), "shape": dataclasses.asdict(shape), "num_params": shape.num_params,
                    "precision": precision, "attention": attention, "counts": counts, "memory_gib": figures}, json_path)
    return 0 if all(f["fits"] for f in figures.values()) else 1


def _plan_figures(arm, use_gpu: bool, limits) -> dict:
    """One arm's estimate in GiB (2 decimals), the columns of `raypack plan`, and what is over budget."""
    s, a = arm.states, arm.activations
    raw = {"params": s.params, "grads": s.grads, "optimizer": s.optimizer, "gathered": s.gathered,
           "layers": a.layers, "loss": a.head + a.loss, "total": arm.device_total, "layers_other": arm.other.layers,
           "offloaded": s.offloaded, "rows": arm.rows,
           "host_per_node": memory.host_per_node(arm, use_gpu, limits.workers_per_node)}
    figures = {k: round(v / memory.GIB, 2) for k, v in raw.items()}
    over = memory.over_budget(arm, limits, use_gpu)
    figures["over"] = {k: [round(v / memory.GIB, 2) for v in pair] for k, pair in over.items()}
    figures["fits"] = not figures["over"]
    return figures


PLAN_NOTES = [
    "layers: what the decoder layers keep for backward (checkpointing: their inputs + one recomputed);",
    "loss: final norm, then train.loss_impl=fused: hidden states and chunks of logits; full: the logits, fp32",
    "log-softmax and their gradients; host/node: the workers' rows + offloaded states (or the model while it",
    "loads at ZeRO 0-2). Not counted: CUDA context, communication buffers,",
    "fragmentation (the headroom). Formulas and assumptions: raypack/train/memory.py.",
]


def _plan_verdict(t: TrainConfig, p: PlanConfig, figures: dict) -> list[str]:
    over = {arm: f["over"] for arm, f in figures.items() if f["over"]}
    if not over:
        device = f"one {p.gpu_memory_gib:g} GiB GPU and " if t.use_gpu else ""
        kept = f"{p.headroom_fraction:.0%} kept free"
        return [f"fits: every arm fits {device}{p.cpu_memory_gib:g} GiB of host memory per node, with {kept}."]
    where = {"GPU": "per GPU", "host": "of host memory per node"}
    lines = [f"DOES NOT FIT: {arm} needs " + " and ".join(f"{need:.1f} GiB {where[k]} (usable {usable:.1f})"
                                                          for k, (need, usable) in what.items())
             for arm, what in over.items()]
    tips = memory.hints(t)
    return lines + ([f"to lower it, try: {', '.join(tips)}"] if tips else [])

