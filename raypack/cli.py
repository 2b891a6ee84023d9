"""The `raypack` command line: a table of commands (COMMANDS) over the library.

Every command but `analyze` and `report` takes a YAML config and dotted `key=value` overrides, the
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
    raypack report out/study/quickstart out/study/other [--out DIR]   # finished studies in the paper's grid
    raypack eval jobs/quickstart.yaml [eval.preset=paper eval.tasks=[gsm8k:4] eval.limit=N eval.ray=true eval.out=F]
    raypack eval jobs/quickstart.yaml eval.model_dir=out/model eval.preset=none   # + eval.val_dir=FOLDER
    raypack probe jobs/quickstart.yaml train.arm=bfd-cross probe.num_samples=64 [probe.out=F.json]
    raypack synth jobs/compare.yaml synth.preset=tulu-326k synth.num_samples=1000 synth.out=data.jsonl
    raypack synth jobs/compare.yaml synth.task=facts synth.out=facts.jsonl   # + facts.heldout.jsonl
    raypack bench pack jobs/compare.yaml synth.num_samples=1200000 [--no-trl] --json out/bench_pack.json
    raypack bench grouping jobs/compare.yaml synth.preset=tulu-326k synth.num_samples=100000 [--clusters 16]
    raypack bench pipeline jobs/compare.yaml synth.num_samples=100000 pack.window=100000 --json out/bench_pipeline.json
    raypack bench pipeline jobs/compare.yaml synth.num_samples=20000 pack.window=2000 --skip-bare --pack-workers 1,2
    raypack bench train jobs/quickstart.yaml [key=value ...] [--arms A,B] [--no-replay] [--json F]   # one epoch
    raypack bench loss jobs/compare.yaml data.max_seq_len=2048 [--vocab 128256] [--json F]   # full vs fused loss
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
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from raypack.config import (Config, ConfigError, describe_fields, describe_keys, is_uri, load_config, setting_configs,
                            to_dict)
from raypack.tables import format_table, write_json

def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.data.local import compare

    for variant in setting_configs(cfg):
        compare(variant)
    return 0


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.data.pipeline import prepare
    from raypack.data.prepared import read_manifest
    from raypack.data.summary import prepared_summary

    start = time.perf_counter()
    folders = {}
    for variant in setting_configs(cfg):  # study.setting=both: the second reuses the first's tokenized cache
        folders.update(prepare(variant))
    print(prepared_summary({name: read_manifest(folder) for name, folder in folders.items()}, folders))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.train.launch import train

    start = time.perf_counter()
    summaries = [s for variant in setting_configs(cfg) if not cfg.train.arm or cfg.train.arm in variant.pack.arms
                 for s in train(variant)]
    rows = [[s["arm"], s["num_steps"], round(s["last"].get("loss", float("nan")), 4),
             round(s["last"].get("tokens_per_sec", 0.0)), round(s["last"].get("padding_fraction", 0.0), 4)]
            for s in summaries]
    print(format_table(["arm", "steps", "last loss", "tokens/s", "pad frac"], rows))
    for s in summaries:
        print(f"  {s['arm']}: logs {s['run_dir']}" + (f", model {s['model_dir']}" if s["model_dir"] else ""))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.train.plan_report import plan_command

    variants = setting_configs(cfg)
    for variant in variants:  # study.setting=both: F.json becomes F-corrected.json and F-paper.json
        json_path = args.json if len(variants) == 1 or not args.json else \
            str(Path(args.json).with_name(f"{Path(args.json).stem}-{variant.study.setting}.json"))
        status = plan_command(variant, prepare_first=args.prepare, json_path=json_path)
        if status:
            return status
    return 0


def cmd_study(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.study.run import run_study

    start = time.perf_counter()
    out = run_study(cfg)
    print((out / "report.md").read_text())
    print(f"study folder: {out} (report.md, report.json, *.png); done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_sweep(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.tune.sweep import run_sweep
    from raypack.tune.trials import load_trials

    if cfg.study.setting != "corrected":
        raise ConfigError(f"study.setting={cfg.study.setting}: a sweep tunes sweep.arms (or pack.arms) as "
                          "configured; list the paper's arms there instead, e.g. "
                          "'sweep.arms=[padding+truncate, greedy-cross+drop]' with them in pack.arms")
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
    from raypack.tracking import folder_run
    from raypack.tune.analyze import analyze
    from raypack.tune.trials import load_trials

    if not Path(args.sweep_dir).is_dir():
        raise ConfigError(f"{args.sweep_dir}: no such folder; give the folder `raypack sweep` wrote (it prints it; "
                          "sweep.out, default <output_dir>/sweep/<name>)")
    result = analyze(args.sweep_dir, load_trials(args.sweep_dir))
    print((Path(args.sweep_dir) / "analysis.md").read_text())
    for arm, a in result["alpha"].items():
        boot = f"; bootstrap 95% {a['bootstrap_95'][0]:.3f}..{a['bootstrap_95'][1]:.3f}" if a["bootstrap_95"] else ""
        boot += f"; not a measurement: {a['not_a_measurement']}" if a["not_a_measurement"] else ""
        print(f"alpha {arm}: {a['alpha']:.3f} (grid lr*: {a['alpha_grid']:.3f}; {a['num_batch_sizes']} batch "
              f"sizes{boot})" if a["num_batch_sizes"] > 1 else f"alpha {arm}: n/a (one batch size)")
    print(f"wrote trials.csv, trials.parquet, analysis.md, {', '.join(result['plots'])} in {args.sweep_dir}")
    sweep_run = folder_run(args.sweep_dir, "the sweep")
    if sweep_run:  # the sweep was tracked: its MLflow run gets the analysis too
        files = ["trials.csv", "analysis.md", *result["plots"]]
        sweep_run.log_artifacts([Path(args.sweep_dir) / name for name in files], "analysis")
        if not sweep_run.failed:
            print(f"logged {', '.join(files)} to the sweep's MLflow run {sweep_run.run_id} ({sweep_run.uri})")
    return 0


def cmd_report(cfg: Config | None, args: argparse.Namespace) -> int:
    from raypack.study.grid import default_out, write_grid

    out = Path(args.out) if args.out else default_out(args.study_dirs)
    write_grid(args.study_dirs, out)
    print((out / "grid.md").read_text())
    print(f"wrote grid.md, grid.json, grid.png in {out}")
    return 0


def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.eval.run import evaluate_checkpoints

    evaluate_checkpoints(cfg)
    return 0


def cmd_probe(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.eval.run import probe_checkpoints

    probe_checkpoints(cfg)
    return 0


def cmd_synth(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.data import synth

    s = cfg.synth
    out = Path(s.out or Path(cfg.output_dir) / "synth" / f"{synth.name(s)}-seed{s.seed}.jsonl")
    n = synth.write_jsonl(synth.synth_rows(s, cfg.data.tokenizer), out)
    line = f"wrote {n} conversations ({synth.describe(s)}, seed {s.seed}) to {out}"
    if s.task == "facts":
        heldout = out.with_name(out.name.removesuffix(".jsonl") + ".heldout.jsonl")
        num_heldout = synth.write_jsonl(iter(synth.facts_heldout(s, cfg.data.tokenizer)), heldout)
        line += f", and {num_heldout} held-out conversations (new phrasings of its entities) to {heldout}"
    print(line)
    return 0


def _report(text: str, result: dict, json_path: str | None) -> int:
    """Print a benchmark's table and, when asked, write its figures as JSON."""
    print(text)
    if json_path:
        write_json(result, json_path)
    return 0


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

    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    if not arms:
        raise ConfigError("--arms: give at least one arm, e.g. --arms padding,bfd-isolated")
    result = bench_train(args.config, args.overrides, _work_dir(cfg, args), arms=arms, replay=not args.no_replay)
    return _report(format_train_result(result), result, args.json)


def cmd_bench_loss(cfg: Config, args: argparse.Namespace) -> int:
    from raypack.bench.loss import bench_loss, format_loss_result

    result = bench_loss(vocab=args.vocab, rows=cfg.train.micro_batch_size, tokens=cfg.data.max_seq_len,
                        steps=args.steps)
    return _report(format_loss_result(result), result, args.json)


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
    Command("compare", cmd_compare, "tokenize once, hold out prepare's validation split and pack every arm; "
            "print their counts side by side",
            reads=("data.max_seq_len", "data.val_fraction", "data.val_count", "synth", "pack.arms", "pack.window")),
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
    Command("report", cmd_report, "finished studies in the paper's layout: one row per model x dataset; per arm "
            "steps, GPU-hours (CPU: worker-hours), benchmark average and delta vs padding, beside the paper's "
            "published deltas", config="none",
            flags=(flag("study_dirs", nargs="+", metavar="STUDY_DIR", help="a folder `raypack study` wrote "
                        "(study.out, default <output_dir>/study/<name>)"),
                   flag("--out", metavar="DIR", help="grid.md, grid.json and grid.png go here; default: grid "
                        "beside the first study"))),
    Command("eval", cmd_eval, "score checkpoints with lm-evaluation-harness and the validation loss; print the "
            "table", reads=("eval", "train.arm", "data.max_seq_len")),
    Command("probe", cmd_probe, "does the model use its context? a held-out sample's loss alone vs after an "
            "unrelated or a related sample in the same row",
            reads=("probe", "eval.model_dir", "eval.val_dir", "train.arm", "seed")),
    Command("synth", cmd_synth, "write synthetic conversations (JSONL): synth.task words or chain with a paper "
            "dataset's length profile, or facts (and its held-out rows to <out>.heldout.jsonl)",
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
    Command("bench train", cmd_bench_train, "one epoch of padding vs bfd-isolated (or --arms) on the same "
            "samples: tokens/s, MFU, peak memory, the attention and loss each arm ran, and the data handling's "
            "share against a replay of the same steps",
            flags=(work_dir("runs (a fresh name each time)"),
                   flag("--arms", default="padding,bfd-isolated", help="the arms benchmarked, comma separated"),
                   flag("--no-replay", action="store_true", help="skip the replay run per arm (the ratio)"),
                   JSON)),
    Command("bench loss", cmd_bench_loss, "one training step of a 2-layer model at a real vocabulary, "
            "train.loss_impl full vs fused, each in its own process: step time and peak RSS (a micro-batch of "
            "train.micro_batch_size rows of data.max_seq_len tokens)",
            reads=("train.micro_batch_size", "data.max_seq_len"),
            flags=(flag("--vocab", type=int, default=128_256, help="vocabulary size (Llama-3's by default)"),
                   flag("--steps", type=int, default=3, help="optimizer steps per impl; the fastest is shown"),
                   JSON)),
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


OUTPUT_FLAGS = ("json", "out", "work_dir")  # the flags naming where a command writes


def _refuse_uri_outputs(args: argparse.Namespace) -> None:
    """A URI in an output flag would become a local folder named 's3:': refused, as the config's output keys are."""
    for name in OUTPUT_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and is_uri(value):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is a URI; raypack writes it with file "
                              "operations and needs a filesystem path (copy it to object storage afterwards)")


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
        _refuse_uri_outputs(args)
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
