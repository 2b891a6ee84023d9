"""The study report: the arms side by side, as report.json, report.md and PNG plots (pure: no ray).

Input: one record per (arm, seed) run, as `raypack.study.run` writes them to
`<study>/runs/<arm>/seed<k>/result.json`:

    {"arm", "seed", "steps", "fit_seconds", "train_seconds", "samples", "tokens", "row_tokens",
     "final_train_loss", "val_loss", "attn_implementation", "scores": {"task/metric": value}, "skipped": {task: why},
     "manifest": {...}, "curve": [{"step", "loss", "val_loss"?, "time_s"}]}

Per arm the report gives the mean over seeds, with its 95% Student-t interval
when there are several (raypack.stats; report.json also keeps the sample
standard deviation, `_spread`), of: optimizer steps, training time, samples/s,
real tokens/s, padding fraction, rows, truncated/split/dropped counts, final
train loss, validation loss, the attention implementation its runs used (auto
picks per arm and per machine, so tokens/s compare only between alike kernels;
"?" for a record without it), every benchmark score and their average (a
benchmark the study skipped, such as HumanEval without
eval.allow_code_execution, has its column saying so and is not in the average);
what went into the packs (grouping, within- vs across-pack similarity,
single-turn-only counts) when an arm was composed; and the context-reliance
probe (record["probe"], raypack.eval.probe) when the study ran it: its gaps over
seeds, and each seed's bootstrap interval over the probed samples.

Differences from the reference arm (study.reference; '' is the padding arm of
the arm's setting, else the first arm): for the validation loss, the final train
loss, each benchmark score, their average and the probe's three gaps, Welch's
difference of the seed means with its 95% interval and t (how many standard
errors); "not significant" when the interval includes 0. With one seed there
are no intervals, and the report says they need study.seeds >= 2.

The plots: train and validation loss vs step and vs training time, one line per
arm; training time and average score per arm as bars with their intervals; the
probe's loss changes with their intervals; seeds.png, one dot per seed beside
the mean and its interval, for the validation loss, the average score and the
probe's related-minus-unrelated gap.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import fields
from pathlib import Path

from raypack.config import SynthConfig
from raypack.data.synth import describe
from raypack.stats import estimate, format_difference, welch, within

MANIFEST_COUNTS = ("num_rows", "num_supervised_tokens", "overlength", "num_truncated", "num_split",
                   "num_dropped_too_long", "num_dropped_no_supervised")
# What went into the packs (raypack.data.compose), from each arm's manifest.
COMPOSITION_KEYS = ("grouping", "only_single_turn", "num_clusters", "within_pack_cosine", "across_pack_cosine",
                    "num_shared_rows", "num_mixed_cluster_rows", "num_single_turn_samples", "num_multi_turn_samples",
                    "rows_over_lower_bound")
PROBE_KEYS = ("loss_alone", "delta_unrelated", "delta_related", "related_minus_unrelated")


def describe_data(config: dict) -> str:
    """What a study trained on, from its resolved config (config.json): its sources, or the synthetic preset.

    >>> describe_data({"data": {"sources": []}, "synth": {"preset": "tulu-326k", "num_samples": 1000, "seed": 0}})
    'synthetic tulu-326k x 1,000 (seed 0)'
    >>> describe_data({"data": {"sources": []}, "synth": {"task": "facts", "num_entities": 300, "per_entity": 4,
    ...                                                  "num_values": 32, "seed": 0}})
    'synthetic facts: 300 entities x 4 conversations, answers from 32 x 32 value pairs (seed 0)'
    """
    data, synth = config["data"], config["synth"]
    if data["sources"]:
        return ", ".join(data["sources"])
    # a config.json written before synth.task existed has no task fields: its data is words, SynthConfig's default
    known = {f.name for f in fields(SynthConfig)}
    return f"synthetic {describe(SynthConfig(**{k: v for k, v in synth.items() if k in known}))} (seed {synth['seed']})"


def average_score(scores: dict, tasks: list[str]) -> float | None:
    """One run's benchmark average: the mean of its scores over the study's tasks, None when one is missing."""
    return statistics.fmean(scores[t] for t in tasks) if tasks and all(t in scores for t in tasks) else None


# lm-eval metrics that are proportions. Their mean over seeds lies in [0, 1], and so is its interval reported: the
# Student-t interval intersected with [0, 1] (a difference's with [-1, 1]). The intersection keeps the interval's
# coverage, since the true mean lies in that range whatever the seeds gave; t and significance are unchanged.
PROPORTIONS = {"acc", "acc_norm", "exact_match", "pass@1", "mc1", "mc2", "f1"}


def is_proportion(key: str, tasks: list[str]) -> bool:
    """Whether a figure of _per_run is a proportion: a score of a PROPORTIONS metric ("task/metric" or
    "task/metric,filter"), or the average of such scores.

    >>> tasks = ["mmlu/acc", "gsm8k/exact_match,strict-match"]
    >>> [is_proportion(k, tasks) for k in ("score:mmlu/acc", "score:gsm8k/exact_match,strict-match", "average")]
    [True, True, True]
    >>> [is_proportion(k, ["wikitext/word_perplexity"]) for k in ("score:wikitext/word_perplexity", "average")]
    [False, False]
    >>> is_proportion("val_loss", tasks)
    False
    """
    if key == "average":
        return bool(tasks) and all(is_proportion(f"score:{t}", tasks) for t in tasks)
    return key.startswith("score:") and key.rpartition("/")[2].split(",")[0] in PROPORTIONS


def summarise(records: list[dict], reference: str = "") -> dict:
    """report.json's content: per arm the mean, sample sd (`_spread`) and 95% interval (`_ci`) over seeds of each
    figure, in the order arms first appear, and each arm's Welch differences from its reference arm
    (`differences`, raypack.stats.welch; `reference`: study.reference, '' for reference_arm's default)."""
    arms: dict[str, list[dict]] = {}
    for record in records:
        arms.setdefault(record["arm"], []).append(record)
    tasks = sorted({t for r in records for t in r.get("scores", {})})
    skipped = {task: why for r in records for task, why in r.get("skipped", {}).items()}
    out = {"arms": {}, "tasks": tasks, "skipped": skipped, "seeds": sorted({r["seed"] for r in records}),
           "reference": reference}
    values = {}  # per arm, the per-seed values of each figure: what the differences are computed from
    for arm, runs in arms.items():
        row: dict = {"seeds": [r["seed"] for r in runs]}
        per_run = values[arm] = _per_run(runs, tasks)
        for key, figures in per_run.items():
            e = estimate(figures)
            ci = within(e.ci, 0.0, 1.0) if is_proportion(key, tasks) else (list(e.ci) if e.ci else None)
            row[key], row[f"{key}_spread"], row[f"{key}_ci"] = e.mean, e.sd, ci
        for key in MANIFEST_COUNTS + COMPOSITION_KEYS:
            row[key] = runs[0]["manifest"].get(key)
        probed = [r for r in runs if r.get("probe")]
        if probed:
            row["probe_seeds"] = [r["seed"] for r in probed]
            for key in PROBE_KEYS[1:]:  # the probe's own bootstrap interval over its samples, per seed
                row[f"probe_{key}_per_seed"] = [r["probe"][key] for r in probed]
                row[f"probe_{key}_bootstrap_ci"] = [r["probe"][f"{key}_ci"] for r in probed]
            row["probe_num_samples"] = probed[0]["probe"]["num_samples"]
        row["setting"] = runs[0].get("setting", "corrected")
        # The attention kernel(s) the arm's runs used: tokens/s compare only between alike kernels.
        row["attn_implementation"] = "/".join(sorted({r.get("attn_implementation") or "?" for r in runs}))
        out["arms"][arm] = row
    for arm, row in out["arms"].items():
        ref = row["reference"] = reference_arm(out["arms"], row["setting"], reference)
        row["differences"] = {} if arm == ref else {
            key: _difference_of(values[arm][key], values[ref][key], is_proportion(key, tasks))
            for key in difference_keys(tasks) if key in values[arm] and key in values[ref]}
        delta = row["differences"].get("average", {}).get("diff", 0.0 if arm == ref else None)
        row["average_delta_vs_reference"] = delta if tasks and not math.isnan(out["arms"][ref]["average"]) else None
    return out


def _difference_of(a: list, b: list, proportion: bool) -> dict:
    """Welch's difference as report.json holds it; a difference of proportions has its interval within [-1, 1]."""
    d = welch(a, b).to_dict()
    if proportion and d["ci"]:
        d["ci"] = within(d["ci"], -1.0, 1.0)
    return d


def _per_run(runs: list[dict], tasks: list[str]) -> dict[str, list]:
    """Each figure of an arm, one value per seed (None where a run has none)."""
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
    if any(r.get("probe") for r in runs):
        for key in PROBE_KEYS:
            per_run[f"probe_{key}"] = [r["probe"][key] if r.get("probe") else None for r in runs]
    return per_run


def difference_keys(tasks: list[str]) -> list[str]:
    """The figures each arm is compared with its reference arm on, in the report's order."""
    return ["val_loss", "final_train_loss", *(f"score:{t}" for t in tasks), *(["average"] if tasks else []),
            *(f"probe_{key}" for key in PROBE_KEYS[1:])]


def padding_arm(arms: dict, setting: str) -> str | None:
    """The padding arm the other arms of a setting are compared with: `padding` or `padding+<policy>` (not
    padfree), of the same study.setting when a study holds two."""
    padding = [arm for arm, row in arms.items() if arm.split("+")[0] == "padding"]
    return next((arm for arm in padding if arms[arm].get("setting", "corrected") == setting), None) or \
        next(iter(padding), None)


def reference_arm(arms: dict, setting: str, reference: str = "") -> str:
    """The arm an arm of `setting` is compared with: study.reference when given, else the setting's padding arm
    (padding_arm), else the study's first arm.

    >>> arms = {"bfd-cross": {}, "padding": {}, "bfd-isolated": {}}
    >>> reference_arm(arms, "corrected"), reference_arm(arms, "corrected", "bfd-isolated")
    ('padding', 'bfd-isolated')
    >>> reference_arm({"bfd-cross": {}, "bfd-isolated": {}}, "corrected")
    'bfd-cross'
    """
    if reference and reference not in arms:
        raise ValueError(f"study.reference: {reference!r} is not an arm of this study: {list(arms)}; give one of "
                         "them, or '' for the padding arm")
    return reference or padding_arm(arms, setting) or next(iter(arms))


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def _fmt(value, ci=None, digits: int = 4) -> str:
    """A figure as the tables show it: the mean, then its 95% interval over seeds [lo, hi] when it has one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    text = _number(value, digits) if isinstance(value, float) else f"{value:,}"
    return text + (f" [{_number(ci[0], digits)}, {_number(ci[1], digits)}]" if ci else "")


# The figures of "Differences from the reference arm", as the report names them.
DIFFERENCE_LABELS = {"val_loss": "val loss", "final_train_loss": "final train loss", "average": "benchmark average",
                     "probe_delta_unrelated": "probe: Δ unrelated context",
                     "probe_delta_related": "probe: Δ related context",
                     "probe_related_minus_unrelated": "probe: related − unrelated"}


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
    lines[-2:] = [lines[-2] + " attention |", lines[-1] + "---|"]
    for arm, row in arms.items():
        cells = [_fmt(row[k], row.get(f"{k}_ci"), d) for k, _, d in cols] + [row.get("attn_implementation") or "?"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    tasks, skipped = summary["tasks"], summary.get("skipped", {})
    if tasks or skipped:
        lines += ["", "## Benchmarks (the paper's Table 1)", "",
                  "| arm | " + " | ".join([*tasks, *skipped]) + " | average | Δ vs reference |",
                  "|---" * (len(tasks) + len(skipped) + 3) + "|"]
        for arm, row in arms.items():
            cells = [_fmt(row[f"score:{t}"], row.get(f"score:{t}_ci")) for t in tasks] + ["skipped"] * len(skipped)
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_fmt(row.get('average'), row.get('average_ci'))}"
                         f" | {_fmt(row.get('average_delta_vs_reference'))} |")
        if skipped:
            lines += [""] + [f"{task}: {why}; the average is over the {len(tasks)} benchmarks scored."
                             for task, why in skipped.items()]
    lines += _difference_lines(summary) + _data_lines(arms) + _composition_lines(arms) + _probe_lines(summary)
    if len(summary["seeds"]) > 1:
        lines += ["", f"Each figure: mean over seeds {summary['seeds']} [95% Student-t interval, n - 1 degrees of "
                      "freedom for n seeds] (report.json also holds the sample standard deviation, `_spread`)."]
        if any(is_proportion(f"score:{t}", tasks) for t in tasks):
            lines += ["Scores that are proportions (accuracy, exact match) have their intervals cut at 0 and 1, "
                      "their differences' at -1 and +1: the true mean lies there, so the cut interval covers it "
                      "as often."]
    else:
        lines += ["", f"One seed ({', '.join(map(str, summary['seeds']))}): no intervals over seeds; intervals and "
                      "the significance of differences need study.seeds >= 2."]
    lines += ["", "Plots: " + ", ".join(summary.get("plots", [])) + ".", ""]
    return "\n".join(lines)


def _difference_lines(summary: dict) -> list[str]:
    """Each arm minus its reference arm, figure by figure: Welch's difference, its interval and t."""
    arms = summary["arms"]
    if not any(row.get("differences") for row in arms.values()):
        return []
    references = sorted({row["reference"] for row in arms.values()})
    how = f"study.reference = {summary['reference']}" if summary.get("reference") else \
        "study.reference is '': the padding arm of the arm's setting, else the first arm"
    lines = ["", "## Differences from the reference arm", "",
             f"Each arm's mean over seeds minus its reference arm's ({', '.join(references)}; {how}), with Welch's "
             "95% interval (Welch-Satterthwaite degrees of freedom, seeds taken as independent) and t, the "
             "difference in standard errors. A difference whose interval includes 0 is not significant. Losses: "
             "lower is better; scores: higher is better.", ""]
    if len(summary["seeds"]) < 2:
        lines += ["One seed per arm: intervals need study.seeds >= 2, so each difference below is the one seed's.",
                  ""]
    lines += ["| arm | reference | figure | difference [95% interval], t | df |", "|---|---|---|---|---|"]
    for arm, row in arms.items():
        for key, d in row["differences"].items():
            if d["diff"] is None or math.isnan(d["diff"]):
                continue
            label = DIFFERENCE_LABELS.get(key, key.removeprefix("score:"))
            lines.append(f"| {arm} | {row['reference']} | {label} | {format_difference(_difference(d))} | "
                         f"{_fmt(d['df'], digits=1)} |")
    return lines


def _difference(d: dict):
    """A difference from report.json's dict back to raypack.stats.Difference (for its formatting)."""
    from raypack.stats import Difference

    return Difference(**{**d, "ci": tuple(d["ci"]) if d["ci"] else None})


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


def _probe_lines(summary: dict) -> list[str]:
    arms = summary["arms"]
    if not any("probe_loss_alone" in row for row in arms.values()):
        return []
    several = any(len(row.get("probe_seeds", [])) > 1 for row in arms.values())
    lines = ["", "## Context reliance (the paper's third question)", "",
             "Loss on a held-out sample's assistant tokens when the same attention context first holds another "
             "held-out sample, minus its loss alone (`raypack probe`): about 0 means the model ignores its context; "
             "a drop with related context and a rise with unrelated context mean it leans on it. " +
             ("Mean over seeds [95% interval over seeds]; the probe's own bootstrap intervals (over its samples, "
              "within a seed) follow per seed." if several else
              "One seed: its 95% bootstrap interval over the probed samples (an interval over seeds needs "
              "study.seeds >= 2)."), "",
             "| arm | samples | loss alone | Δ unrelated context | Δ related context | related − unrelated |",
             "|---" * 6 + "|"]
    gaps = ("delta_unrelated", "delta_related", "related_minus_unrelated")
    for arm, row in arms.items():
        if "probe_loss_alone" not in row:
            continue
        cells = [_fmt(row["probe_num_samples"]), _fmt(row["probe_loss_alone"], row.get("probe_loss_alone_ci"))]
        for key in gaps:
            ci = row[f"probe_{key}_ci"] or next(iter(row[f"probe_{key}_bootstrap_ci"]))
            cells.append(_fmt(row[f"probe_{key}"], ci if ci and None not in ci else None))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if several:
        lines += ["", "Per seed, with the probe's 95% bootstrap interval over its samples:", "",
                  "| arm | seed | Δ unrelated context | Δ related context | related − unrelated |", "|---" * 5 + "|"]
        for arm, row in arms.items():
            for i, seed in enumerate(row.get("probe_seeds", [])):
                cells = [_bootstrap_cell(row, key, i) for key in gaps]
                lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    return lines


def _bootstrap_cell(row: dict, key: str, i: int) -> str:
    """One seed's probe gap [its bootstrap interval]: the gap is that seed's value of the per-seed figures."""
    ci = row[f"probe_{key}_bootstrap_ci"][i]
    value = row[f"probe_{key}_per_seed"][i]
    return _fmt(value, ci if ci and None not in ci else None)


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
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(arms, values, yerr=_yerr(values, [summary["arms"][a].get(f"{key}_ci") for a in arms]),
               color=[colours[a] for a in arms], capsize=4)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    written += _plot_probe(summary, colours, out, plt)
    written += _plot_seeds(records, summary, colours, out, plt)
    return written


def _yerr(values: list[float], cis: list) -> list[list[float]]:
    """Error bars from each value to its interval's ends (0 where there is no interval)."""
    return [[v - ci[0] if ci else 0.0 for v, ci in zip(values, cis)],
            [ci[1] - v if ci else 0.0 for v, ci in zip(values, cis)]]


SEED_PANELS = (("val_loss", "validation loss (per token)"), ("average", "average benchmark score"),
               ("probe_related_minus_unrelated", "probe: related − unrelated context (nats)"))


def _seed_value(record: dict, key: str, tasks: list[str]) -> float | None:
    if key == "average":
        return average_score(record.get("scores", {}), tasks)
    if key.startswith("probe_"):
        return (record.get("probe") or {}).get(key.removeprefix("probe_"))
    return record.get(key)


def _plot_seeds(records: list[dict], summary: dict, colours: dict, out: Path, plt) -> list[str]:
    """seeds.png: per arm one dot per seed, and the mean with its 95% interval over seeds beside them, for the
    validation loss, the benchmark average and the probe's related-minus-unrelated gap (those the study has)."""
    arms = list(summary["arms"])
    panels = [(key, label) for key, label in SEED_PANELS
              if any(not math.isnan(summary["arms"][a].get(key, math.nan)) for a in arms)]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for i, arm in enumerate(arms):
            points = [_seed_value(r, key, summary["tasks"]) for r in records if r["arm"] == arm]
            points = [p for p in points if p is not None and not math.isnan(p)]
            offsets = [(j - (len(points) - 1) / 2) * 0.06 for j in range(len(points))]
            ax.plot([i - 0.15 + o for o in offsets], points, "o", color=colours[arm], alpha=0.7, ms=5)
            row = summary["arms"][arm]
            if points:
                ci = row.get(f"{key}_ci")
                ax.errorbar([i + 0.15], [row[key]], yerr=_yerr([row[key]], [ci]), fmt="_", color="black",
                            ms=14, capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_title("dots: seeds; bar: mean and 95% interval over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "seeds.png", dpi=110)
    plt.close(fig)
    return ["seeds.png"]


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
            # The interval over seeds, else (one seed) the probe's bootstrap interval over its samples.
            value, ci = row[f"probe_{key}"], row[f"probe_{key}_ci"] or row[f"probe_{key}_bootstrap_ci"][0]
            if ci is None or None in ci or math.isnan(value):  # no probe pairs in a tiny split
                continue
            lo, hi = ci
            ax.bar(i + (j - 0.5) * width, value, width, yerr=[[value - lo], [hi - value]], capsize=3,
                   color=colours[arm], hatch=hatch, edgecolor="black", label=label if i == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("loss change vs no context (95% interval)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=110)
    plt.close(fig)
    return ["probe.png"]


def write_report(records: list[dict], out: Path, title: str, notes: list[str], reference: str = "") -> dict:
    """report.json, report.md and the plots into `out`; returns the summary. `reference`: study.reference."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(records, reference)
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
