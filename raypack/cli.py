"""The `raypack` command line: a table of commands (COMMANDS) over the library.

Every command but `analyze` takes a YAML config and dotted `key=value` overrides, the
one override mechanism of raypack.config (a Ray Tune trial is one too); the only flags
are plan's and the benchmarks' own (outputs, sizes), none a copy of a config field. `raypack COMMAND --help` lists the config keys
the command reads, with the help text they are declared with.

    raypack compare jobs/quickstart.yaml [key=value ...]   # every arm's packing counts side by side
    raypack prepare jobs/quickstart.yaml [key=value ...]   # the same on Ray Data, into Parquet shards
    raypack plan jobs/paper-70b-tulu.yaml [key=value ...] [--prepare] [--json F]   # will it fit? counts + memory
    raypack train jobs/quickstart.yaml [key=value ...]     # prepare (cached), then train every arm
    raypack train jobs/quickstart.yaml train.arm=bfd-isolated   # one arm only
    raypack study jobs/quickstart.yaml [key=value ...]     # every arm prepared, trained, evaluated, compared
    raypack sweep jobs/sweep-quick.yaml [key=value ...] [--resume DIR]   # Ray Tune: lr x batch size per arm
    raypack analyze out/sweep/sweep-quick                  # the sweep's table, plots and lr* ∝ batch^alpha
    raypack eval jobs/quickstart.yaml [eval.preset=paper eval.tasks=[gsm8k:4] eval.limit=N eval.ray=true eval.out=F]
    raypack eval jobs/quickstart.yaml eval.model_dir=out/model eval.preset=none   # + eval.val_dir=FOLDER
    raypack probe jobs/quickstart.yaml train.arm=bfd-cross probe.num_samples=64 [probe.out=F.json]
    raypack synth jobs/compare.yaml synth.preset=tulu-326k synth.num_samples=1000 synth.out=data.jsonl
    raypack bench pack jobs/compare.yaml synth.num_samples=1200000 [--no-trl] --json out/bench_pack.json
    raypack bench grouping jobs/compare.yaml synth.preset=tulu-326k synth.num_samples=100000 [--clusters 16]
    raypack bench pipeline jobs/compare.yaml synth.num_samples=100000 pack.window=100000 --json out/bench_pipeline.json
    raypack bench pipeline jobs/compare.yaml synth.num_samples=20000 pack.window=2000 --skip-bare --pack-workers 1,2
    raypack bench train jobs/quickstart.yaml [key=value ...] [--json F]   # padding vs bfd-isolated, one epoch
    raypack bench loader jobs/compare.yaml --sizes 2000,20000,190000 --json out/bench_loader.json
    raypack config jobs/quickstart.yaml [key=value ...]    # the resolved config
    raypack config --fields                                 # every config key, documented

`eval` and `probe` score eval.model_dir, or by default the model `raypack train` exported
for train.arm (every arm of pack.arms when it is ''), on eval.val_dir or by default the
config's own validation split. A user error (a config file, key or value that cannot be
used, a missing checkpoint or folder, a bad flag) is one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from raypack.config import Config, ConfigError, describe_fields, describe_keys, load_config, to_dict

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


def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.data.local import prepare_local

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


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.data.pipeline import prepare
    from raypack.data.prepared import read_manifest

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


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.train.launch import train

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


def cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.data.pipeline import prepare, prepared_folders
    from raypack.train import memory

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
    lines += ["", f"counts (prepared data in {cfg.prepared_root()}):"]
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


def cmd_study(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.study.run import run_study

    start = time.perf_counter()
    out = run_study(cfg)
    print((out / "report.md").read_text())
    print(f"study folder: {out} (report.md, report.json, *.png); done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_sweep(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.tune.analyze import load_trials
    from raypack.tune.sweep import run_sweep

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


def cmd_analyze(cfg: Config | None, args: argparse.Namespace) -> int:
    from raypack.tune.analyze import analyze

    if not Path(args.sweep_dir).is_dir():
        raise ConfigError(f"{args.sweep_dir}: no such folder; give the folder `raypack sweep` wrote (it prints it; "
                          "sweep.out, default <output_dir>/sweep/<name>)")
    result = analyze(args.sweep_dir)
    print((Path(args.sweep_dir) / "analysis.md").read_text())
    for arm, a in result["alpha"].items():
        boot = f"; bootstrap 95% {a['bootstrap_95'][0]:.3f}..{a['bootstrap_95'][1]:.3f}" if a["bootstrap_95"] else ""
        print(f"alpha {arm}: {a['alpha']:.3f} (grid lr*: {a['alpha_grid']:.3f}; {a['num_batch_sizes']} batch "
              f"sizes{boot})" if a["num_batch_sizes"] > 1 else f"alpha {arm}: n/a (one batch size)")
    print(f"wrote trials.csv, trials.parquet, analysis.md, {', '.join(result['plots'])} in {args.sweep_dir}")
    return 0


def _checkpoints(cfg: Config) -> dict[str, str]:
    """What `eval` and `probe` score, by name: eval.model_dir, else the model `raypack train` exported for
    train.arm or each arm of pack.arms. Each must be a Hugging Face folder."""
    if cfg.eval.model_dir:
        models = {cfg.eval.model_dir: cfg.eval.model_dir}
    else:
        from raypack.train.launch import run_dir

        arms = [cfg.train.arm] if cfg.train.arm else cfg.pack.arms
        models = {arm: str(run_dir(cfg, arm) / "model") for arm in arms}
    for name, folder in models.items():
        if not (Path(folder) / "config.json").is_file():
            todo = ("give eval.model_dir=<the folder a trained model was saved to>" if cfg.eval.model_dir else
                    f"train it first (raypack train with this config, train.arm={name}), or give "
                    "eval.model_dir=<a checkpoint folder>")
            raise ConfigError(f"{folder}: no Hugging Face checkpoint there (no config.json); {todo}")
    return models


def _val_split(cfg: Config) -> str | None:
    """eval.val_dir, which must hold a prepared split; else this config's validation split, None until prepared."""
    if cfg.eval.val_dir:
        folder = Path(cfg.eval.val_dir)
        if not folder.is_dir() or not (any(folder.glob("*.parquet")) or (folder / "flat").is_dir()):
            raise ConfigError(f"eval.val_dir: {folder} holds no prepared split; give the val-<hash> folder "
                              "`raypack prepare` wrote (under prepare.output_dir/tok-<hash>/)")
        return str(folder)
    from raypack.data.pipeline import prepared_folders

    folder = prepared_folders(cfg)["val"]
    return str(folder) if (folder / "manifest.json").is_file() else None


NO_VAL_SPLIT = ("this config's validation split is not prepared: run raypack prepare with the same config and "
                "overrides, or give eval.val_dir=<a val-<hash> folder>")


def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.eval.tasks import refuse_code_execution, resolve_tasks

    ev = cfg.eval
    specs = resolve_tasks(ev.preset, ev.tasks)
    refuse_code_execution(specs, ev.allow_code_execution)  # before Ray or lm-eval start
    models = _checkpoints(cfg)
    val = _val_split(cfg)
    if not specs and not val:
        raise ConfigError(f"nothing to evaluate: eval.preset=none and no eval.tasks, and {NO_VAL_SPLIT}")
    if specs and ev.ray:
        from raypack.ray_start import ensure_ray

        ensure_ray()
    results = {}
    for name, model_dir in models.items():
        if len(models) > 1:
            print(f"[{name}] {model_dir}", flush=True)
        results[name] = _eval_model(ev, model_dir, specs, val)
    return _write_json(results, ev.out)


def _eval_model(ev, model_dir: str, specs: list, val: str | None) -> dict:
    """One checkpoint's lm-eval scores and validation loss, printed; returns them as JSON-ready data."""
    loss = {}
    if val:  # the held-out loss every arm is compared on (raypack.train.validate)
        import torch

        from raypack.train.validate import validation_loss_of_model

        device = ev.device if ev.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        loss = validation_loss_of_model(model_dir, val, device=device)
        print(f"validation loss {loss['val_loss']:.4f} over {loss['val_tokens']:,} supervised tokens "
              f"({loss['val_rows']:,} held-out samples in {val})")
    if not specs:
        return {"model": model_dir, "results": [], **loss}
    from raypack.eval.harness import evaluate, evaluate_on_ray, format_results

    options = {"limit": ev.limit, "batch_size": ev.batch_size, "allow_code_execution": ev.allow_code_execution}
    if ev.ray:
        result = evaluate_on_ray(model_dir, specs, num_gpus=ev.num_gpus, num_cpus=ev.num_cpus, **options)
    else:
        result = evaluate(model_dir, specs, device=ev.device, **options)
    print(format_results(result))
    return {**result, **loss}


def cmd_probe(cfg: Config, args: argparse.Namespace) -> int:
    if not cfg.probe.num_samples:
        raise ConfigError("probe.num_samples=0: nothing to probe; give the number of held-out targets, e.g. 256")
    models = _checkpoints(cfg)
    val = _val_split(cfg)
    if not val:
        raise ConfigError(f"the probe needs held-out samples: {NO_VAL_SPLIT}")
    from raypack.eval.probe import format_probe, probe_model

    results = {}
    for name, model_dir in models.items():
        if len(models) > 1:
            print(f"[{name}] {model_dir}", flush=True)
        start = time.perf_counter()
        result = probe_model(model_dir, val, cfg.probe, seed=cfg.seed, log=lambda line: print(line, flush=True))
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(format_probe(result))
        results[name] = result
    return _write_json(results, cfg.probe.out)


def cmd_synth(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.data.synth import synth_conversations, write_jsonl

    s = cfg.synth
    out = s.out or Path(cfg.output_dir) / "synth" / f"{s.preset}-{s.num_samples}-seed{s.seed}.jsonl"
    n = write_jsonl(synth_conversations(s.preset, s.num_samples, s.seed), out)
    print(f"wrote {n} conversations ({s.preset}, seed {s.seed}) to {out}")
    return 0


def _write_json(results: dict, json_path: str | None) -> int:
    """Write one result as it is, several as {name: result} (eval and probe of several checkpoints)."""
    if json_path:
        result = next(iter(results.values())) if len(results) == 1 else results
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {json_path}")
    return 0


def _report(text: str, result: dict, json_path: str | None) -> int:
    """Print a benchmark's table and, when asked, write its figures as JSON."""
    print(text)
    return _write_json({"": result}, json_path)


def _comma_ints(text: str, flag: str, example: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")] if text else []
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. {example}") from None


def cmd_bench_pack(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.bench.pack import bench_pack, format_pack_table
    from raypack.data.synth import sample_lengths

    s, max_seq_len = cfg.synth, cfg.data.max_seq_len
    lengths = sample_lengths(s.preset, s.num_samples, s.seed)
    print(f"bench pack: {s.preset}, {len(lengths)} samples, mean {lengths.mean():.0f} tokens, "
          f"{int((lengths > max_seq_len).sum())} over {max_seq_len}", flush=True)
    result = bench_pack(lengths, max_seq_len, window=cfg.pack.window, trl=not args.no_trl)
    result["preset"], result["seed"] = s.preset, s.seed
    return _report(format_pack_table(result), result, args.json)


def cmd_bench_grouping(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.bench.pack import bench_grouping, format_grouping_table
    from raypack.data.synth import sample_lengths

    s = cfg.synth
    lengths = sample_lengths(s.preset, s.num_samples, s.seed)
    result = bench_grouping(lengths, cfg.data.max_seq_len, window=cfg.pack.window, k=args.clusters, seed=s.seed)
    result["preset"] = s.preset
    return _report(format_grouping_table(result), result, args.json)


def cmd_bench_pipeline(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.bench.pipeline import bench_pipeline, format_pipeline_result

    pack_workers = _comma_ints(args.pack_workers, "--pack-workers", "1,2")
    result = bench_pipeline(cfg, _work_dir(cfg, args), arm=args.arm, bare=not args.skip_bare,
                            pack_workers=pack_workers)
    return _report(format_pipeline_result(result), result, args.json)


def cmd_bench_train(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.bench.train import bench_train, format_train_result

    result = bench_train(args.config, args.overrides, _work_dir(cfg, args))
    return _report(format_train_result(result), result, args.json)


def cmd_bench_loader(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.bench.loader import bench_loader, format_loader_result

    sizes = _comma_ints(args.sizes, "--sizes", "2000,20000,190000")
    result = bench_loader(sizes, _work_dir(cfg, args), max_seq_len=cfg.data.max_seq_len, workers=cfg.train.num_workers,
                          fetches=args.fetches, micro_batch=cfg.train.micro_batch_size, old_fetches=args.old_fetches,
                          cold=args.cold, keep=args.keep, seed=cfg.seed)
    return _report(format_loader_result(result), result, args.json)


def cmd_config(cfg: Config | None, args: argparse.Namespace) -> int:
    if args.fields:
        print("\n".join(describe_fields()))
        return 0
    if cfg is None:
        raise ConfigError("give a config file (for example jobs/quickstart.yaml) or --fields")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


# ---------------------------------------------------------------- the table


def flag(*names: str, **options) -> tuple:
    """One of a command's own arguments, as argparse's add_argument takes it."""
    return names, options


def work_dir(what: str) -> tuple:
    return flag("--work-dir", help=f"{what} go here; default <output_dir>/bench_<benchmark>, e.g. out/bench_train")


def _work_dir(cfg: Config, args: argparse.Namespace) -> str:
    return args.work_dir or str(Path(cfg.output_dir) / args.entry.name.replace(" ", "_"))


JSON = flag("--json", metavar="F", help="also write the figures to this JSON file")


@dataclasses.dataclass(frozen=True)
class Command:
    """A `raypack` command: `name` ("bench pack" is pack under bench), what runs it, its help.

    config: "required" takes CONFIG [key=value ...] (the command gets the loaded Config),
    "optional" the same with CONFIG optional, "none" no config. `reads` are the config
    keys or sections --help documents, from their declarations; `flags` the command's own
    arguments: outputs and benchmark sizes, never a copy of a config field.
    """

    name: str
    run: Callable[[Config | None, argparse.Namespace], int]
    help: str
    reads: tuple[str, ...] = ()
    flags: tuple = ()
    config: str = "required"


GROUPS = {"bench": "benchmarks that print figures"}
COMMANDS = (
    Command("compare", cmd_compare, "tokenize once and pack every arm; print their counts side by side",
            reads=("data.max_seq_len", "synth", "pack.arms", "pack.window")),
    Command("prepare", cmd_prepare, "tokenize and pack every arm on Ray Data into Parquet shards",
            reads=("prepare",)),
    Command("train", cmd_train, "prepare (cached) and train every arm, or train.arm=<arm>, on Ray Train",
            reads=("train.arm",)),
    Command("plan", cmd_plan, "will it fit? per arm: rows, steps, tokens, FLOPs and the per-GPU memory estimate; "
            "exit 1 when an arm does not fit plan.* (GPU and node memory)", reads=("plan",),
            flags=(flag("--prepare", action="store_true", help="run raypack prepare first (starts Ray) so that "
                        "every arm has counts"), JSON)),
    Command("study", cmd_study, "prepare, train, evaluate and compare every arm; writes the study report",
            reads=("study", "probe.num_samples")),
    Command("sweep", cmd_sweep, "Ray Tune over learning rate x global batch size (x seed) for each arm",
            reads=("sweep",), flags=(flag("--resume", metavar="DIR", help="finish the sweep in DIR (its folder, "
                                          "sweep.out): finished trials are kept, unfinished and errored ones run "
                                          "again"),)),
    Command("analyze", cmd_analyze, "a sweep's trials as trials.csv, analysis.md and plots (lr* per batch size)",
            config="none", flags=(flag("sweep_dir", help="the sweep folder (sweep.out, default "
                                       "<output_dir>/sweep/<name>)"),)),
    Command("eval", cmd_eval, "score checkpoints with lm-evaluation-harness and the validation loss; print the "
            "table", reads=("eval", "train.arm")),
    Command("probe", cmd_probe, "does the model use its context? a held-out sample's loss alone vs after an "
            "unrelated or a related sample in the same row",
            reads=("probe", "eval.model_dir", "eval.val_dir", "train.arm", "seed")),
    Command("synth", cmd_synth, "write synthetic conversations with a paper dataset's length profile (JSONL)",
            reads=("synth",)),
    Command("bench pack", cmd_bench_pack, "plan every packing strategy on the same synthetic lengths (synth.*) "
            "and TRL's bfd", reads=("synth", "data.max_seq_len", "pack.window"),
            flags=(flag("--no-trl", action="store_true", help="skip TRL's pack_dataset reference run"), JSON)),
    Command("bench grouping", cmd_bench_grouping, "bfd with pack.grouping none/related/unrelated: rows vs the "
            "lower bound, planning time, packs mixing or repeating clusters (random cluster labels)",
            reads=("synth", "data.max_seq_len", "pack.window"),
            flags=(flag("--clusters", type=int, default=16, help="random cluster labels drawn"), JSON)),
    Command("bench pipeline", cmd_bench_pipeline, "raypack prepare end to end on synth.* shards vs the bare "
            "tokenizer, rows, memory", reads=("synth", "data.max_seq_len", "pack.window", "prepare"),
            flags=(flag("--arm", default="bfd-isolated", help="the one arm prepared"),
                   work_dir("synthetic shards and prepared output"),
                   flag("--skip-bare", action="store_true", help="skip the bare-tokenizer reference (long runs)"),
                   flag("--pack-workers", default="", help="e.g. 1,2: then time the packing stage alone again on "
                        "the same tokenized cache with each number of packing tasks per split "
                        "(prepare.pack_workers)"), JSON)),
    Command("bench train", cmd_bench_train, "one epoch of padding vs bfd-isolated on the same samples (tiny "
            "model)", flags=(work_dir("runs (a fresh name each time)"), JSON)),
    Command("bench loader", cmd_bench_loader, "what the training loop's row fetch costs (time per micro-batch, "
            "worker PSS/RSS) as the split grows, on synthetic packed rows: train.num_workers processes read "
            "micro-batches of train.micro_batch_size rows at once",
            reads=("data.max_seq_len", "train.num_workers", "train.micro_batch_size", "seed"),
            flags=(flag("--sizes", default="2000,20000,190000", help="rows per arm, comma separated"),
                   flag("--fetches", type=int, default=500, help="micro-batches each worker fetches"),
                   flag("--old-fetches", type=int, default=20, help="micro-batches read the old way (chunked "
                        "Arrow table take); 0 skips it"),
                   flag("--cold", action="store_true", help="evict each arm from the page cache before reading it"),
                   work_dir("the synthetic arms (~8 bytes a token)"),
                   flag("--keep", action="store_true", help="keep the arms (reused by the next run)"), JSON)),
    Command("config", cmd_config, "print the resolved config, or document every key", config="optional",
            flags=(flag("--fields", action="store_true", help="list every config key with its type and help"),)),
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="raypack", description="Padding or packing? SFT at scale on Ray.")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subs = {"": top}
    for command in COMMANDS:
        group, _, leaf = command.name.rpartition(" ")
        if group not in subs:
            subs[group] = top.add_parser(group, help=GROUPS[group]).add_subparsers(dest=group, required=True,
                                                                                   metavar=group.upper())
        reads = [textwrap.fill(line.strip(), 110, initial_indent="  ", subsequent_indent="      ")
                 for line in describe_keys(command.reads)]
        p = subs[group].add_parser(leaf, help=command.help, description=command.help,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="config keys that steer it (in CONFIG or as KEY=VALUE; every key: "
                                   "raypack config --fields):\n" + "\n".join(reads)
                                   if reads else None)
        if command.config != "none":
            p.add_argument("config", metavar="CONFIG", nargs="?" if command.config == "optional" else None,
                           help="a YAML config, e.g. jobs/quickstart.yaml")
            p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. "
                           "pack.window=1000 (every key: raypack config --fields)")
        for names, options in command.flags:
            p.add_argument(*names, **options)
        p.set_defaults(entry=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command: Command = args.entry
    if command.config != "none":  # overrides after a flag (argparse stops at the first flag)
        args.overrides += [arg for arg in unknown if "=" in arg and not arg.startswith("-")]
        unknown = [arg for arg in unknown if arg not in args.overrides]
    if unknown:  # said by the command, which lists what it takes: its flags and the config keys it reads
        parser.exit(2, f"raypack {command.name}: error: unrecognized arguments: {' '.join(unknown)}; settings are "
                       f"config keys (KEY=VALUE), see raypack {command.name} --help\n")
    from raypack.train.resume import PREEMPTED_EXIT_CODE, Preempted

    try:
        cfg = load_config(args.config, args.overrides) if getattr(args, "config", None) else None
        return command.run(cfg, args)
    except ValueError as err:  # user input and config (ConfigError is one): what to change, in one line
        print(f"raypack {command.name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"raypack {command.name}: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
