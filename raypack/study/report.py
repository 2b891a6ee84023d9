"""The study report: the arms side by side, as report.json, report.md and PNG plots (pure: no ray).

Input: one record per (arm, seed) run, as `raypack.study.run` writes them to
`<study>/runs/<arm>/seed<k>/result.json`:

    {"arm", "seed", "steps", "fit_seconds", "train_seconds", "samples", "tokens", "row_tokens",
     "final_train_loss", "val_loss", "scores": {"task/metric": value}, "skipped": {task: why},
     "manifest": {...}, "curve": [{"step", "loss", "val_loss"?, "time_s"}]}

Per arm the report gives the mean over seeds (and the spread, sample standard
deviation, when there are several) of: optimizer steps, training time,
samples/s, real tokens/s, padding fraction, rows, truncated/split/dropped
counts, final train loss, validation loss, every benchmark score, their average
and the delta of that average vs padding (a benchmark the study skipped, such as
HumanEval without eval.allow_code_execution, has its column saying so and is not
in the average); what went into the packs (grouping,
within- vs across-pack similarity, single-turn-only counts) when an arm was
composed; and the context-reliance probe (record["probe"], raypack.eval.probe)
when the study ran it. The plots: train and validation loss vs step and vs
training time, one line per arm; training time and average score per arm as
bars; the probe's loss changes with their intervals.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

MANIFEST_COUNTS = ("num_rows", "num_supervised_tokens", "overlength", "num_truncated", "num_split",
                   "num_dropped_too_long", "num_dropped_no_supervised")
# What went into the packs (raypack.data.compose), from each arm's manifest.
COMPOSITION_KEYS = ("grouping", "only_single_turn", "num_clusters", "within_pack_cosine", "across_pack_cosine",
                    "num_shared_rows", "num_mixed_cluster_rows", "num_single_turn_samples", "num_multi_turn_samples",
                    "rows_over_lower_bound")
PROBE_KEYS = ("loss_alone", "delta_unrelated", "delta_related", "related_minus_unrelated")


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation of the values given (None and NaN left out); (NaN, None) when there
    are none, spread None when there is one. The rule for every figure over seeds (this report, raypack report).

    >>> mean_spread([1.0, 3.0, None])
    (2.0, 1.4142135623730951)
    """
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def describe_data(config: dict) -> str:
    """What a study trained on, from its resolved config (config.json): its sources, or the synthetic preset.

    >>> describe_data({"data": {"sources": []}, "synth": {"preset": "tulu-326k", "num_samples": 1000, "seed": 0}})
    'synthetic tulu-326k x 1,000 (seed 0)'
    """
    data, synth = config["data"], config["synth"]
    if data["sources"]:
        return ", ".join(data["sources"])
    return f"synthetic {synth['preset']} x {synth['num_samples']:,} (seed {synth['seed']})"


def average_score(scores: dict, tasks: list[str]) -> float | None:
    """One run's benchmark average: the mean of its scores over the study's tasks, None when one is missing."""
    return statistics.fmean(scores[t] for t in tasks) if tasks and all(t in scores for t in tasks) else None


def summarise(records: list[dict]) -> dict:
    """report.json's content: per arm means and spreads over seeds, in the order arms first appear."""
    arms: dict[str, list[dict]] = {}
    for record in records:
        arms.setdefault(record["arm"], []).append(record)
    tasks = sorted({t for r in records for t in r.get("scores", {})})
    skipped = {task: why for r in records for task, why in r.get("skipped", {}).items()}
    out = {"arms": {}, "tasks": tasks, "skipped": skipped, "seeds": sorted({r["seed"] for r in records})}
    for arm, runs in arms.items():
        row: dict = {"seeds": [r["seed"] for r in runs]}
        per_run = {
            "steps": [r["steps"] for r in runs],
            "train_seconds": [r["train_seconds"] for r in runs],
            "fit_seconds": [r["fit_seconds"] for r in runs],
            "samples_per_sec": [r["samples"] / r["train_seconds"] for r in runs],
            "tokens_per_sec": [r["tokens"] / r["train_seconds"] for r in runs],
            "padding_fraction": [1 - r["tokens"] / r["row_tokens"] for r in runs],
            "final_train_loss": [r["final_train_loss"] for r in runs],
            "val_loss": [r["val_loss"] for r in runs],
        }
        for task in tasks:
            per_run[f"score:{task}"] = [r.get("scores", {}).get(task) for r in runs]
        if tasks:
            per_run["average"] = [average_score(r.get("scores", {}), tasks) for r in runs]
        for key, values in per_run.items():
            row[key], row[f"{key}_spread"] = mean_spread(values)
        for key in MANIFEST_COUNTS + COMPOSITION_KEYS:
            row[key] = runs[0]["manifest"].get(key)
        probes = [r["probe"] for r in runs if r.get("probe")]
        if probes:
            for key in PROBE_KEYS:
                row[f"probe_{key}"], row[f"probe_{key}_spread"] = mean_spread([p[key] for p in probes])
            for key in ("delta_unrelated_ci", "delta_related_ci", "related_minus_unrelated_ci"):  # first seed's
                row[f"probe_{key}"] = probes[0][key]
            row["probe_num_samples"] = probes[0]["num_samples"]
        row["setting"] = runs[0].get("setting", "corrected")
        out["arms"][arm] = row
    for arm, row in out["arms"].items():
        base = out["arms"].get(padding_arm(out["arms"], row["setting"]))
        row["average_delta_vs_padding"] = (row["average"] - base["average"]
                                           if base and tasks and not math.isnan(base["average"]) else None)
    return out


def padding_arm(arms: dict, setting: str) -> str | None:
    """The padding arm the other arms of a setting are compared with: `padding` or `padding+<policy>` (not
    padfree), of the same study.setting when a study holds two."""
    padding = [arm for arm, row in arms.items() if arm.split("+")[0] == "padding"]
    return next((arm for arm in padding if arms[arm].get("setting", "corrected") == setting), None) or \
        next(iter(padding), None)


def _fmt(value, spread=None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        text = f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return text + (f" ± {spread:.{digits}f}" if spread is not None else "")


def markdown(summary: dict, title: str, notes: list[str]) -> str:
    arms = summary["arms"]
    cols = [("steps", "optimizer steps", 0), ("train_seconds", "train time (s)", 1),
            ("samples_per_sec", "samples/s", 1), ("tokens_per_sec", "real tokens/s", 0),
            ("padding_fraction", "padding", 3), ("num_rows", "rows", 0), ("overlength", "over-length", 0),
            ("num_truncated", "truncated", 0),
            ("num_split", "split", 0), ("num_dropped_too_long", "dropped (long)", 0),
            ("final_train_loss", "final train loss", 4), ("val_loss", "val loss", 4)]
    lines = [f"# {title}", "", *notes, "", "## Cost and loss (the paper's Table 3)", "",
             "| arm | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arm, row in arms.items():
        cells = [_fmt(row[k], row.get(f"{k}_spread"), d) for k, _, d in cols]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    tasks, skipped = summary["tasks"], summary.get("skipped", {})
    if tasks or skipped:
        lines += ["", "## Benchmarks (the paper's Table 1)", "",
                  "| arm | " + " | ".join([*tasks, *skipped]) + " | average | Δ vs padding |",
                  "|---" * (len(tasks) + len(skipped) + 3) + "|"]
        for arm, row in arms.items():
            cells = [_fmt(row[f"score:{t}"], row.get(f"score:{t}_spread")) for t in tasks] + ["skipped"] * len(skipped)
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_fmt(row.get('average'), row.get('average_spread'))}"
                         f" | {_fmt(row.get('average_delta_vs_padding'))} |")
        if skipped:
            lines += [""] + [f"{task}: {why}; the average is over the {len(tasks)} benchmarks scored."
                             for task, why in skipped.items()]
    lines += _data_lines(arms) + _composition_lines(arms) + _probe_lines(arms)
    if len(summary["seeds"]) > 1:
        lines += ["", f"Mean ± sample standard deviation over seeds {summary['seeds']}."]
    lines += ["", "Plots: " + ", ".join(summary.get("plots", [])) + ".", ""]
    return "\n".join(lines)


def _data_lines(arms: dict) -> list[str]:
    """When the arms trained on different data (over-length policies, single-turn-only packing): by how much."""
    tokens = {arm: row.get("num_supervised_tokens") for arm, row in arms.items()}
    if None in tokens.values() or len(set(tokens.values())) < 2:
        return []
    first, ref = next(iter(tokens.items()))
    same = [arm for arm, n in tokens.items() if n == ref and arm != first]
    cells = [f"{first} {ref:,}" + (f" (as {', '.join(same)})" if same else "")] + \
        [f"{arm} {n:,} ({(n - ref) / ref:+.2%})" for arm, n in tokens.items() if n != ref]
    return ["", "## The arms saw different data", "",
            "Supervised tokens per epoch (train split, from each arm's manifest): " + "; ".join(cells) + ". "
            "An arm's over-length policy (truncate, split or drop), random packing's cuts (the target at each cut "
            "is lost) and packing only single-turn conversations change what an arm trains on, so part of a "
            "difference in scores is a difference in data."]


def _composition_lines(arms: dict) -> list[str]:
    """What went into the packs, when any arm was grouped or packed single-turn conversations only."""
    if not any(row.get("grouping") not in (None, "none") or row.get("only_single_turn") for row in arms.values()):
        return []
    lines = ["", "## What goes into a pack", "",
             "Within/across: mean cosine similarity of the content vectors of two samples in the same pack, "
             "and of two samples in different packs.", "",
             "| arm | grouping | single-turn only | clusters | within-pack cosine | across-pack cosine | "
             "packs mixing clusters | multi-turn samples (own row) | rows / lower bound |", "|---" * 9 + "|"]
    for arm, row in arms.items():
        mixed = (f"{row['num_mixed_cluster_rows']:,} / {row['num_shared_rows']:,}"
                 if row.get("num_shared_rows") is not None else "-")
        lines.append(f"| {arm} | {row.get('grouping') or '-'} | {'yes' if row.get('only_single_turn') else 'no'} | "
                     f"{_fmt(row.get('num_clusters'))} | {_fmt(row.get('within_pack_cosine'))} | "
                     f"{_fmt(row.get('across_pack_cosine'))} | {mixed} | {_fmt(row.get('num_multi_turn_samples'))} | "
                     f"{_fmt(row.get('rows_over_lower_bound'))} |")
    return lines


def _probe_lines(arms: dict) -> list[str]:
    if not any("probe_loss_alone" in row for row in arms.values()):
        return []
    lines = ["", "## Context reliance (the paper's third question)", "",
             "Loss on a held-out sample's assistant tokens when the same attention context first holds another "
             "held-out sample, minus its loss alone (`raypack probe`): about 0 means the model ignores its context; "
             "a drop with related context and a rise with unrelated context mean it leans on it. "
             "95% bootstrap intervals.", "",
             "| arm | samples | loss alone | Δ unrelated context | Δ related context | related − unrelated |",
             "|---" * 6 + "|"]
    for arm, row in arms.items():
        if "probe_loss_alone" not in row:
            continue
        cells = [_fmt(row["probe_num_samples"]), _fmt(row["probe_loss_alone"], row.get("probe_loss_alone_spread"))]
        for key in ("delta_unrelated", "delta_related", "related_minus_unrelated"):
            ci = row[f"probe_{key}_ci"]
            interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and None not in ci else ""
            cells.append(f"{_fmt(row[f'probe_{key}'], row.get(f'probe_{key}_spread'))}{interval}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def plot(records: list[dict], summary: dict, out: Path) -> list[str]:
    """The report's PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    arms = list(summary["arms"])
    colours = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(arms)}
    for x_key, name, label in (("step", "loss_vs_step.png", "optimizer step"),
                               ("time_s", "loss_vs_time.png", "training time (s)")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for record in records:
            curve, colour = record["curve"], colours[record["arm"]]
            tag = f"{record['arm']} (seed {record['seed']})" if len(summary["seeds"]) > 1 else record["arm"]
            axes[0].plot([c[x_key] for c in curve], [c["loss"] for c in curve], color=colour, lw=1, label=tag)
            val = [c for c in curve if c.get("val_loss") is not None]
            axes[1].plot([c[x_key] for c in val], [c["val_loss"] for c in val], "o-", color=colour, label=tag)
        for ax, what in zip(axes, ("train loss (per token)", "validation loss (per token)")):
            ax.set_xlabel(label)
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    for key, name, label in (("train_seconds", "time_per_arm.png", "training time (s)"),
                             ("average", "score_per_arm.png", "average benchmark score")):
        values = [summary["arms"][a].get(key) for a in arms]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            continue
        spreads = [summary["arms"][a].get(f"{key}_spread") or 0.0 for a in arms]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(arms, values, yerr=spreads, color=[colours[a] for a in arms], capsize=4)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    written += _plot_probe(summary, colours, out, plt)
    return written


def _plot_probe(summary: dict, colours: dict, out: Path, plt) -> list[str]:
    arms = [a for a, row in summary["arms"].items() if "probe_loss_alone" in row]
    if not arms:
        return []
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for j, (key, label, hatch) in enumerate((("delta_unrelated", "unrelated context", "//"),
                                             ("delta_related", "related context", ""))):
        for i, arm in enumerate(arms):
            row = summary["arms"][arm]
            value, ci = row[f"probe_{key}"], row[f"probe_{key}_ci"]
            if ci is None or None in ci or math.isnan(value):  # no probe pairs in a tiny split
                continue
            lo, hi = ci
            ax.bar(i + (j - 0.5) * width, value, width, yerr=[[value - lo], [hi - value]], capsize=3,
                   color=colours[arm], hatch=hatch, edgecolor="black", label=label if i == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("loss change vs no context (95% CI)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=110)
    plt.close(fig)
    return ["probe.png"]


def write_report(records: list[dict], out: Path, title: str, notes: list[str]) -> dict:
    """report.json, report.md and the plots into `out`; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(records)
    summary["title"], summary["notes"] = title, notes
    summary["plots"] = plot(records, summary, out)
    (out / "report.json").write_text(json.dumps(_no_nan(summary), indent=2))
    (out / "report.md").write_text(markdown(summary, title, notes))
    return summary


def _no_nan(value):
    """NaN (a metric with no value) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
