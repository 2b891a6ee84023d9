"""The `raypack` command line: a thin shell over the library.

    raypack compare jobs/quickstart.yaml [key=value ...]   # every arm's packing counts side by side
    raypack prepare jobs/quickstart.yaml [key=value ...]   # the same on Ray Data, into Parquet shards
    raypack plan jobs/paper-70b-tulu.yaml [key=value ...] [--prepare] [--json F]   # will it fit? counts + memory
    raypack train jobs/quickstart.yaml [key=value ...]     # prepare (cached), then train every arm
    raypack train jobs/quickstart.yaml train.arm=bfd-isolated   # one arm only
    raypack study jobs/quickstart.yaml [key=value ...]     # every arm prepared, trained, evaluated, compared
    raypack sweep jobs/sweep-quick.yaml [key=value ...] [--resume DIR]   # Ray Tune: lr x batch size per arm
    raypack analyze out/sweep/sweep-quick                  # the sweep's table, plots and lr* ∝ batch^alpha
    raypack eval out/model [--preset offline|paper|none] [--tasks gsm8k:4 ...] [--limit N] [--ray] [--out F.json]
    raypack synth --preset tulu-326k --num-samples 1000 --out data.jsonl
    raypack bench pack --preset opensource-1.2m --num-samples 1200000 --json out/bench_pack.json
    raypack bench grouping --preset tulu-326k --num-samples 100000 [--window 1000] [--clusters 16]
    raypack bench pipeline --preset opensource-1.2m --num-samples 100000 --json out/bench_pipeline.json
    raypack bench pipeline --num-samples 20000 --window 2000 --skip-bare --pack-workers 1,2   # + the packing stage per pack_workers
    raypack bench train [--json F] jobs/quickstart.yaml [key=value ...]   # padding vs bfd-isolated, one epoch, tiny model
    raypack bench loader --sizes 2000,20000,190000 --json out/bench_loader.json   # fetch cost and memory vs split size
    raypack config jobs/quickstart.yaml [key=value ...]    # the resolved config
    raypack config --fields                                 # every config key, documented
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

from raypack.config import EVAL_PRESETS, SYNTH_PRESETS, ConfigError, EvalConfig, describe_fields, load_config, to_dict

COMPARE_COLUMNS = (
    ("rows", "num_rows"), ("lower bound", "lower_bound_rows"), ("rows/LB", "rows_over_lower_bound"),
    ("tokens", "num_tokens"), ("supervised", "num_supervised_tokens"), ("efficiency", "efficiency"),
    ("pad frac", "padding_fraction"), ("split", "num_split_samples"), ("seconds", "seconds"),
)


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain aligned text table; floats get 4 significant digits."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    from raypack.data.local import prepare_local

    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    source = ", ".join(cfg.data.sources) or f"synthetic {cfg.synth.preset} x {cfg.synth.num_samples}"
    print(f"raypack compare: {source}, max_seq_len {cfg.data.max_seq_len}, window {cfg.pack.window}", flush=True)
    start = time.perf_counter()
    prep = prepare_local(cfg)
    load = prep.load
    rejected = {k: v for k, v in load.rejected_reasons.items() if v}
    print(f"input rows {load.num_input_rows}: {len(load.conversations)} conversations, "
          f"{len(load.rejected)} rejected {rejected or ''}")
    print("tokenized: " + ", ".join(f"{k} {v}" for k, v in prep.token_counts.items()))
    table = [[a.arm] + [a.stats[key] for _, key in COMPARE_COLUMNS] for a in prep.arms]
    print(format_table(["arm"] + [c for c, _ in COMPARE_COLUMNS], table))
    _print_composition({a.arm: a.stats for a in prep.arms})
    report = {"config": to_dict(cfg), "num_input_rows": load.num_input_rows,
              "num_rejected_rows": len(load.rejected), "rejected_reasons": load.rejected_reasons,
              "tokenize": prep.token_counts, "arms": {a.arm: a.stats for a in prep.arms}}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    if load.rejected:
        with (out / "rejected.jsonl").open("w") as f:
            for r in load.rejected:
                f.write(json.dumps(r) + "\n")
    print(f"done in {time.perf_counter() - start:.1f} s; report: {out / 'compare.json'}")
    return 0


PREPARE_COLUMNS = (
    ("samples", "num_samples"), ("rows", "num_rows"), ("LB rows", "lower_bound_rows"),
    ("tokens", "num_tokens"), ("supervised", "num_supervised_tokens"), ("efficiency", "efficiency"),
    ("pad frac", "padding_fraction"), ("split", "num_split_samples"), ("seconds", "seconds"),
)


COMPOSITION_COLUMNS = (
    ("grouping", "grouping"), ("clusters", "num_clusters"), ("within cos", "within_pack_cosine"),
    ("across cos", "across_pack_cosine"), ("mixed packs", "num_mixed_cluster_rows"), ("shared packs", "num_shared_rows"),
    ("single-turn", "num_single_turn_samples"), ("multi-turn", "num_multi_turn_samples"),
    ("rows/LB", "rows_over_lower_bound"),
)


def _print_composition(arms: dict) -> None:
    """The grouping / single-turn-only columns, when some arm was composed (raypack.data.compose)."""
    composed = {name: m for name, m in arms.items() if "num_clusters" in m or m.get("only_single_turn")}
    if composed:
        print("what goes into a pack:")
        table = [[name] + [m.get(key, "-") for _, key in COMPOSITION_COLUMNS] for name, m in composed.items()]
        print(format_table(["arm"] + [c for c, _ in COMPOSITION_COLUMNS], table))


def cmd_prepare(args: argparse.Namespace) -> int:
    from raypack.data.pipeline import prepare
    from raypack.data.prepared import read_manifest

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    folders = prepare(cfg)
    manifests = {name: read_manifest(folder) for name, folder in folders.items()}
    first = next(iter(manifests.values()))
    rejected = {k: v for k, v in first.rejected_reasons.items() if v}
    print(f"input rows {first.num_input_rows}: {first.num_rejected_rows} rejected {rejected or ''}; "
          f"truncated {first.num_truncated}, split {first.num_split}, dropped too long "
          f"{first.num_dropped_too_long}, dropped with no target {first.num_dropped_no_supervised}; "
          f"{first.num_val_conversations} conversations held out for validation")
    table = [[name] + [getattr(m, key) for _, key in PREPARE_COLUMNS] for name, m in manifests.items()]
    print(format_table(["split/arm"] + [c for c, _ in PREPARE_COLUMNS], table))
    _print_composition({name: m.to_dict() for name, m in manifests.items()})
    for name, folder in folders.items():
        print(f"  {name}: {folder}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raypack.train.launch import train

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    summaries = train(cfg)
    rows = [[s["arm"], s["num_steps"], round(s["last"].get("loss", float("nan")), 4),
             round(s["last"].get("tokens_per_sec", 0.0)), round(s["last"].get("padding_fraction", 0.0), 4)]
            for s in summaries]
    print(format_table(["arm", "steps", "last loss", "tokens/s", "pad frac"], rows))
    for s in summaries:
        print(f"  {s['arm']}: logs {s['run_dir']}" + (f", model {s['model_dir']}" if s["model_dir"] else ""))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


PLAN_COUNT_COLUMNS = (
    ("rows", "num_rows"), ("rows/step", "rows_per_step"), ("steps/epoch", "steps_per_epoch"), ("steps", "steps"),
    ("tokens/epoch", "num_tokens"), ("supervised/epoch", "num_supervised_tokens"), ("PFLOP (run)", "pflop"),
)
PLAN_MEMORY_COLUMNS = (
    ("params", "params"), ("grads", "grads"), ("optimizer", "optimizer"), ("gathered", "gathered"),
    ("layers", "layers"), ("loss", "loss"), ("total", "total"),
)
NOT_PREPARED = "not prepared (run raypack prepare, or raypack plan --prepare)"


def _plan_counts(cfg, folder: str, shape) -> dict:
    """A prepared arm's rows, optimizer steps, tokens and model FLOPs, computed as `raypack train` computes them."""
    import numpy as np
    import pyarrow.parquet as pq

    from raypack.data.prepared import read_manifest
    from raypack.train.flops import step_flops
    from raypack.train.plan import run_plan

    manifest = read_manifest(folder)
    plan = run_plan(cfg.train, cfg.optim, manifest, cfg.train.num_workers)  # rows per step, steps: as training
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


def _plan_header(cfg, shape, precision: str, attention: str, limits) -> list[str]:
    from raypack.train.memory import GIB

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
    gpu = f"{limits.device / GIB:.1f} GiB per GPU, " if t.use_gpu else ""
    return [model, run, f"usable after {p.headroom_fraction:.0%} headroom: {gpu}{limits.host / GIB:.0f} GiB per node"]


def cmd_plan(args: argparse.Namespace) -> int:
    from raypack.data.pipeline import prepare, prepared_folders
    from raypack.train import memory

    cfg = load_config(args.config, args.overrides)
    shape = memory.model_shape(cfg.model.name_or_path, cfg.model.trust_remote_code)
    if args.prepare:
        prepare(cfg)
    folders = prepared_folders(cfg)
    counts = {arm: _plan_counts(cfg, str(folders[arm]), shape) for arm in cfg.pack.arms
              if (folders[arm] / "manifest.json").exists()}
    arms = memory.estimate_job(cfg, shape, {arm: c["num_tokens"] for arm, c in counts.items()})
    precision, attention = memory.precision_and_attention(cfg)
    limits, use_gpu = memory.budget(cfg.plan, cfg.train), cfg.train.use_gpu
    lines = _plan_header(cfg, shape, precision, attention, limits)
    lines += ["", f"counts (prepare.output_dir {Path(cfg.prepare.output_dir).resolve()}):"]
    if counts:
        lines.append(format_table(["arm"] + [c for c, _ in PLAN_COUNT_COLUMNS],
                                  [[arm] + [c[k] for _, k in PLAN_COUNT_COLUMNS] for arm, c in counts.items()]))
    lines += [f"{arm}: {NOT_PREPARED}" for arm in cfg.pack.arms if arm not in counts]
    figures = {arm: _plan_figures(a, use_gpu, limits) for arm, a in arms.items()}
    where = "per GPU" if use_gpu else "per CPU worker (all of it in host memory)"
    other = f"layers, ckpt {'off' if cfg.train.gradient_checkpointing else 'on'}"
    lines += ["", f"memory {where}, GiB, at each arm's largest micro-batch:", format_table(
        ["arm", "micro-batch"] + [c for c, _ in PLAN_MEMORY_COLUMNS] + [other, "host/node", "fits"],
        [[arm, str(arms[arm].batch)] + [f"{f[k]:.2f}" for _, k in PLAN_MEMORY_COLUMNS]
         + [f"{f['layers_other']:.2f}", f"{f['host_per_node']:.1f}", "yes" if f["fits"] else "NO"]
         for arm, f in figures.items()])]
    lines += ["", *PLAN_NOTES, *_plan_verdict(cfg, figures)]
    print("\n".join(lines))
    if args.json:
        _report("", {"config": to_dict(cfg), "shape": dataclasses.asdict(shape), "num_params": shape.num_params,
                     "precision": precision, "attention": attention, "counts": counts, "memory_gib": figures}, args.json)
    return 0 if all(f["fits"] for f in figures.values()) else 1


def _plan_figures(arm, use_gpu: bool, limits) -> dict:
    """One arm's estimate in GiB (2 decimals), the columns of `raypack plan`, and what is over budget."""
    from raypack.train.memory import GIB, host_per_node, over_budget

    s, a = arm.states, arm.activations
    raw = {"params": s.params, "grads": s.grads, "optimizer": s.optimizer, "gathered": s.gathered,
           "layers": a.layers, "loss": a.head + a.loss, "total": arm.device_total, "layers_other": arm.other.layers,
           "offloaded": s.offloaded, "rows": arm.rows,
           "host_per_node": host_per_node(arm, use_gpu, limits.workers_per_node)}
    figures = {k: round(v / GIB, 2) for k, v in raw.items()}
    figures["over"] = {k: [round(v / GIB, 2) for v in pair] for k, pair in over_budget(arm, limits, use_gpu).items()}
    figures["fits"] = not figures["over"]
    return figures


PLAN_NOTES = [
    "layers: what the decoder layers keep for backward (checkpointing: their inputs + one recomputed);",
    "loss: final norm, logits, fp32 log-softmax and its gradients; host/node: the workers' rows + offloaded",
    "states (or the model while it loads at ZeRO 0-2). Not counted: CUDA context, communication buffers,",
    "fragmentation (the headroom). Formulas and assumptions: raypack/train/memory.py.",
]


def _plan_verdict(cfg, figures: dict) -> list[str]:
    from raypack.train.memory import hints

    t, p = cfg.train, cfg.plan
    over = {arm: f["over"] for arm, f in figures.items() if f["over"]}
    if not over:
        device = f"one {p.gpu_memory_gib:g} GiB GPU and " if t.use_gpu else ""
        kept = f"{p.headroom_fraction:.0%} kept free"
        return [f"fits: every arm fits {device}{p.cpu_memory_gib:g} GiB of host memory per node, with {kept}."]
    where = {"GPU": "per GPU", "host": "of host memory per node"}
    lines = [f"DOES NOT FIT: {arm} needs " + " and ".join(f"{need:.1f} GiB {where[k]} (usable {usable:.1f})"
                                                          for k, (need, usable) in what.items())
             for arm, what in over.items()]
    tips = hints(t)
    return lines + ([f"to lower it, try: {', '.join(tips)}"] if tips else [])


def cmd_study(args: argparse.Namespace) -> int:
    from raypack.study.run import run_study

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    out = run_study(cfg)
    print((out / "report.md").read_text())
    print(f"study folder: {out} (report.md, report.json, *.png); done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from raypack.tune.analyze import load_trials
    from raypack.tune.sweep import run_sweep

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    out = run_sweep(cfg, resume=args.resume)
    statuses = [t["status"] for t in load_trials(out)]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    print(f"sweep folder: {out} ({counts}); done in {time.perf_counter() - start:.1f} s; "
          f"next: raypack analyze {out}")
    if "error" in statuses or "incomplete" in statuses:
        print(f"raypack sweep: some trials did not finish; run them with --resume {out}", file=sys.stderr)
        return 1
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from raypack.tune.analyze import analyze

    result = analyze(args.sweep_dir)
    print((Path(args.sweep_dir) / "analysis.md").read_text())
    for arm, a in result["alpha"].items():
        boot = f"; bootstrap 95% {a['bootstrap_95'][0]:.3f}..{a['bootstrap_95'][1]:.3f}" if a["bootstrap_95"] else ""
        print(f"alpha {arm}: {a['alpha']:.3f} (grid lr*: {a['alpha_grid']:.3f}; {a['num_batch_sizes']} batch "
              f"sizes{boot})" if a["num_batch_sizes"] > 1 else f"alpha {arm}: n/a (one batch size)")
    print(f"wrote trials.csv, trials.parquet, analysis.md, {', '.join(result['plots'])} in {args.sweep_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raypack.eval.tasks import refuse_code_execution, resolve_tasks

    specs = resolve_tasks(args.preset, args.tasks)
    if not specs and not args.val:
        raise ValueError("nothing to evaluate: --preset none, no --tasks and no --val")
    refuse_code_execution(specs, args.allow_code_execution)  # before Ray or lm-eval start
    from raypack.eval.harness import evaluate, evaluate_on_ray, format_results

    result: dict = {"model": args.model_dir, "results": []}
    if args.val:  # the held-out loss every arm is compared on (raypack.train.validate)
        from raypack.train.validate import validation_loss_of_model

        import torch

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        val = validation_loss_of_model(args.model_dir, args.val, device=device)
        print(f"validation loss {val['val_loss']:.4f} over {val['val_tokens']:,} supervised tokens "
              f"({val['val_rows']:,} held-out samples in {args.val})")
        if not specs:
            return _report("", {**result, **val}, args.out)
    options = {"limit": args.limit, "batch_size": args.batch_size, "allow_code_execution": args.allow_code_execution}
    if args.ray:
        from raypack.ray_start import ensure_ray

        ensure_ray()
        result = evaluate_on_ray(args.model_dir, specs, num_gpus=args.num_gpus, num_cpus=args.num_cpus, **options)
    else:
        result = evaluate(args.model_dir, specs, device=args.device, **options)
    if args.val:
        result.update(val)
    return _report(format_results(result), result, args.out)


def cmd_probe(args: argparse.Namespace) -> int:
    import torch

    from raypack.eval.probe import format_probe, probe_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    result = probe_model(args.model_dir, args.val, num_samples=args.num_samples, num_clusters=args.num_clusters,
                         seed=args.seed, max_seq_len=args.max_seq_len, device=device,
                         micro_batch_size=args.micro_batch_size, log=lambda line: print(line, flush=True))
    result["seconds"] = round(time.perf_counter() - start, 1)
    return _report(format_probe(result), result, args.out)


def cmd_synth(args: argparse.Namespace) -> int:
    from raypack.data.synth import synth_conversations, write_jsonl

    n = write_jsonl(synth_conversations(args.preset, args.num_samples, args.seed), args.out)
    print(f"wrote {n} conversations ({args.preset}, seed {args.seed}) to {args.out}")
    return 0


def _report(text: str, result: dict, json_path: str | None) -> int:
    """Print a benchmark's table and, when asked, write its figures as JSON."""
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {json_path}")
    return 0


def cmd_bench_pack(args: argparse.Namespace) -> int:
    from raypack.bench.pack import bench_pack, format_pack_table
    from raypack.data.synth import sample_lengths

    lengths = sample_lengths(args.preset, args.num_samples, args.seed)
    print(f"bench pack: {args.preset}, {len(lengths)} samples, mean {lengths.mean():.0f} tokens, "
          f"{int((lengths > args.max_seq_len).sum())} over {args.max_seq_len}", flush=True)
    result = bench_pack(lengths, args.max_seq_len, window=args.window, trl=not args.no_trl)
    result["preset"], result["seed"] = args.preset, args.seed
    return _report(format_pack_table(result), result, args.json)


def cmd_bench_grouping(args: argparse.Namespace) -> int:
    from raypack.bench.pack import bench_grouping, format_grouping_table
    from raypack.data.synth import sample_lengths

    lengths = sample_lengths(args.preset, args.num_samples, args.seed)
    result = bench_grouping(lengths, args.max_seq_len, window=args.window, k=args.clusters, seed=args.seed)
    result["preset"] = args.preset
    return _report(format_grouping_table(result), result, args.json)


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from raypack.bench.pipeline import bench_pipeline, format_pipeline_result

    try:
        pack_workers = [int(w) for w in args.pack_workers.split(",")] if args.pack_workers else []
    except ValueError:
        raise ValueError(f"--pack-workers {args.pack_workers!r}: give task counts separated by commas, e.g. 1,2")
    result = bench_pipeline(args.preset, args.num_samples, args.seed, args.work_dir, arm=args.arm,
                            window=args.window, max_seq_len=args.max_seq_len, overrides=args.overrides,
                            bare=not args.skip_bare, pack_workers=pack_workers)
    return _report(format_pipeline_result(result), result, args.json)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from raypack.bench.train import bench_train, format_train_result

    result = bench_train(args.config, args.overrides, args.work_dir)
    return _report(format_train_result(result), result, args.json)


def cmd_bench_loader(args: argparse.Namespace) -> int:
    from raypack.bench.loader import bench_loader, format_loader_result

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise ValueError(f"--sizes {args.sizes!r}: give row counts separated by commas, e.g. 2000,20000,190000")
    result = bench_loader(sizes, args.work_dir, max_seq_len=args.max_seq_len, workers=args.workers,
                          fetches=args.fetches, micro_batch=args.micro_batch, old_fetches=args.old_fetches,
                          cold=args.cold, keep=args.keep, seed=args.seed)
    return _report(format_loader_result(result), result, args.json)


def cmd_config(args: argparse.Namespace) -> int:
    if args.fields:
        print("\n".join(describe_fields()))
        return 0
    if not args.config:
        raise ConfigError("give a config file (for example jobs/quickstart.yaml) or --fields")
    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypack", description="Padding or packing? SFT at scale on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "dotted key=value overrides, e.g. pack.window=1000 (see `raypack config --fields`)"

    p = sub.add_parser("compare", help="tokenize once and pack every arm; print their counts side by side")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("prepare", help="tokenize and pack every arm on Ray Data into Parquet shards")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="prepare (cached) and train every arm, or train.arm=<arm>, on Ray Train")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="will it fit? per arm: rows, steps, tokens, FLOPs and the per-GPU memory "
                       "estimate; exit 1 when an arm does not fit plan.* (GPU and node memory)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--prepare", action="store_true", help="run raypack prepare first (starts Ray) so that every "
                   "arm has counts")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("study", help="prepare, train, evaluate and compare every arm; writes the study report")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("sweep", help="Ray Tune over learning rate x global batch size (x seed) for each arm")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--resume", metavar="DIR", help="finish the sweep in DIR (its folder, sweep.out): finished "
                   "trials are kept, unfinished and errored ones run again")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze", help="a sweep's trials as trials.csv, analysis.md and plots (lr* per batch size)")
    p.add_argument("sweep_dir", help="the sweep folder (sweep.out, default <output_dir>/sweep/<name>)")
    p.set_defaults(func=cmd_analyze)

    ev, ev_help = EvalConfig(), {f.name: f.metadata["help"] for f in dataclasses.fields(EvalConfig)}
    p = sub.add_parser("eval", help="score a saved checkpoint with lm-evaluation-harness; print the table")
    p.add_argument("model_dir", help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--preset", default=ev.preset, choices=EVAL_PRESETS, help=ev_help["preset"])
    p.add_argument("--tasks", nargs="+", action="extend", default=[], metavar="TASK[:N]", help=ev_help["tasks"])
    p.add_argument("--limit", type=int, default=ev.limit, help=ev_help["limit"])
    p.add_argument("--batch-size", type=int, default=ev.batch_size, help=ev_help["batch_size"])
    p.add_argument("--allow-code-execution", action="store_true", help=ev_help["allow_code_execution"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="without --ray: auto is cuda "
                   "when a GPU is visible")
    p.add_argument("--ray", action="store_true", help="run as a Ray task (joins RAY_ADDRESS or starts Ray locally)")
    p.add_argument("--num-gpus", type=float, default=ev.num_gpus, help=ev_help["num_gpus"])
    p.add_argument("--num-cpus", type=float, default=ev.num_cpus, help=ev_help["num_cpus"])
    p.add_argument("--val", metavar="FOLDER", help="also the per-token loss on a prepared validation split "
                   "(the val-<hash> folder `raypack prepare` writes), computed as for every study arm")
    p.add_argument("--out", help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("probe", help="does the model use its context? a held-out sample's loss alone vs after "
                       "an unrelated or a related sample in the same row")
    p.add_argument("model_dir", help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--val", metavar="FOLDER", required=True, help="a prepared validation split (the val-<hash> "
                   "folder `raypack prepare` writes), one sample per row")
    p.add_argument("--num-samples", type=int, default=256, help="held-out targets to probe (fewer if fewer qualify)")
    p.add_argument("--num-clusters", type=int, default=0, help="k-means clusters that define related samples; "
                   "0 picks k from the number of samples")
    p.add_argument("--seed", type=int, default=0, help="seeds the clustering, the pairs and the bootstrap")
    p.add_argument("--max-seq-len", type=int, help="row length (context + target); targets are at most half of "
                   "it. Default: the longest validation row, capped at the model's max positions")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="auto is cuda when a GPU is "
                   "visible")
    p.add_argument("--out", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("synth", help="write synthetic conversations with a paper dataset's length profile")
    p.add_argument("--preset", required=True, choices=SYNTH_PRESETS)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_synth)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(dest="what", required=True)
    p = bench.add_parser("pack", help="plan every packing strategy on the same lengths (and TRL's bfd)")
    p.add_argument("--preset", default="opensource-1.2m", choices=SYNTH_PRESETS)
    p.add_argument("--num-samples", type=int, default=1_200_000)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-trl", action="store_true", help="skip TRL's pack_dataset reference run")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_pack)

    p = bench.add_parser("grouping", help="bfd with pack.grouping none/related/unrelated: rows vs the lower "
                         "bound, planning time, packs mixing or repeating clusters (random cluster labels)")
    p.add_argument("--preset", default="tulu-326k", choices=SYNTH_PRESETS)
    p.add_argument("--num-samples", type=int, default=100_000)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_grouping)

    p = bench.add_parser("pipeline", help="raypack prepare end to end vs the bare tokenizer, rows, memory")
    p.add_argument("--preset", default="opensource-1.2m", choices=SYNTH_PRESETS)
    p.add_argument("--num-samples", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arm", default="bfd-isolated")
    p.add_argument("--window", type=int, default=100_000)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--work-dir", default="out/bench_pipeline", help="synthetic shards and prepared output go here")
    p.add_argument("--skip-bare", action="store_true", help="skip the bare-tokenizer reference (long runs)")
    p.add_argument("--pack-workers", default="", help="e.g. 1,2: then time the packing stage alone again on the "
                   "same tokenized cache with each number of packing tasks per split (prepare.pack_workers)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. prepare.num_tokenizer_actors=2")
    p.set_defaults(func=cmd_bench_pipeline)

    p = bench.add_parser("train", help="one epoch of padding vs bfd-isolated on the same samples (tiny model)")
    p.add_argument("config")
    p.add_argument("--work-dir", default="out/bench_train", help="runs go here (a fresh name each time)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. synth.num_samples=2000")
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser("loader", help="what the training loop's row fetch costs (time per micro-batch, worker "
                         "PSS/RSS) as the split grows, on synthetic packed rows")
    p.add_argument("--sizes", default="2000,20000,190000", help="rows per arm, comma separated")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2, help="processes reading at once")
    p.add_argument("--fetches", type=int, default=500, help="micro-batches each worker fetches")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--old-fetches", type=int, default=20,
                   help="micro-batches read the old way (chunked Arrow table take); 0 skips it")
    p.add_argument("--cold", action="store_true", help="evict each arm from the page cache before reading it")
    p.add_argument("--work-dir", default="out/bench_loader", help="the synthetic arms go here (~8 bytes a token)")
    p.add_argument("--keep", action="store_true", help="keep the arms (reused by the next run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_loader)

    p = sub.add_parser("config", help="print the resolved config, or document every key")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--fields", action="store_true", help="list every config key with its type and help")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raypack.train.resume import PREEMPTED_EXIT_CODE, Preempted

    try:
        return args.func(args)
    except (ConfigError, ValueError) as err:
        print(f"raypack {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"raypack {args.command}: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
