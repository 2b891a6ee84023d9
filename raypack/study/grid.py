"""`raypack report STUDY_DIR ...`: finished studies side by side in the paper's layout (pure: no ray).

    raypack report out/study/quickstart out/study/quickstart-steps [--out DIR]

Reads what `raypack study` leaves in each folder (raypack.study.run): config.json
(the resolved config: model, data, workers, GPUs), report.json (written once every
arm is done: its arms, seeds and benchmarks) and runs/<arm>/seed<k>/result.json
(one record per arm and seed). Writes grid.md, grid.json and grid.png into --out
(default: `grid` beside the first study).

One row per study, rows of the same model x dataset together (the paper's setting
and the corrected one of the same pair are two rows, labelled by study name and
setting), and per arm, the mean over seeds with its 95% Student-t interval when a
study has several (raypack.stats; grid.json also keeps the sample sd, `_spread`):
  optimizer steps;
  device-hours: the arm's training time (the sum of its step times, the study
    report's "train time") x the devices it held: GPU-hours when the study trained
    on GPUs (train.use_gpu, one GPU per worker), CPU worker-hours otherwise;
  benchmark average, in points (scores x 100, averaged over the study's
    benchmarks as its report does: raypack.study.report.average_score);
  delta vs padding, in points: Welch's difference of the arm's and its padding
    arm's seed averages, with its 95% interval and t (how many standard errors),
    "not significant" when the interval includes 0 (grid.json: delta_points and
    delta_points_welch).

Arms are matched by their base, the name before any +suffix. The paper's arms
(PAPER_ARMS): padding, random-cross (random packing) and greedy-cross (greedy
packing), with or without an over-length suffix (+truncate/+split/+drop); an arm
with another suffix (+related, +single-turn, ...) or another base (padfree,
bfd-isolated, ...) is none of them. An arm's padding arm (`baseline`): the padding
arm of the same over-length suffix, else one with a suffix if the arm has one
(the paper's setting: padding+truncate against random-cross+split), else plain
padding.

Where a study is one of the paper's jobs (Llama-3-8B or 70B on one of its four
datasets, as jobs/paper-*.yaml), its row carries the paper's published deltas
(PAPER_DELTAS) beside the arms in its random and greedy columns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from raypack.config import OVERLENGTH_POLICIES
from raypack.stats import Difference, estimate, format_difference, welch, within
from raypack.study.report import average_score, describe_data, is_proportion

# The paper's published deltas vs padding of its 6-benchmark average (MMLU, GSM8K, MATH, BBH, IFEval, HumanEval),
# in points, (random packing, greedy packing) per (model, dataset).
PAPER_SOURCE = ("Wang et al., Packing Analysis: Packing Is More Appropriate for Large Models or Datasets in SFT, "
                "arXiv 2410.08081 (ACL Findings 2025), headline results: average of 6 benchmarks, delta vs padding")
PAPER_DELTAS = {
    ("8B", "69K"): (-0.12, 1.02), ("70B", "69K"): (4.47, 4.42),
    ("8B", "326K"): (0.94, 1.59), ("70B", "326K"): (-0.19, 2.06),
    ("8B", "652K"): (0.04, 1.88), ("70B", "652K"): (0.81, 0.91),
    ("8B", "1.2M"): (0.65, 0.75), ("70B", "1.2M"): (1.14, 1.42),
}
# Its models (the folder or hub name, lower case) and datasets (data.sources: [hf:<id>]).
PAPER_MODELS = {"meta-llama-3-8b": "8B", "llama-3-8b": "8B", "meta-llama-3-70b": "70B", "llama-3-70b": "70B"}
PAPER_DATASETS = {"Super-shuhe/packing-wildchat-gpt-4": "69K", "Super-shuhe/packing-tulu": "326K",
                  "Super-shuhe/packing-wildchat": "652K", "Super-shuhe/open-source-1M": "1.2M"}
PAPER_ARMS = {"padding": "padding", "random-cross": "random", "greedy-cross": "greedy"}
STUDY_HINT = "give a folder `raypack study` wrote (it prints it: study.out, default <output_dir>/study/<name>)"


def paper_arm(arm: str) -> str | None:
    """Which of the paper's arms this one is: 'padding', 'random', 'greedy' or None.

    >>> [paper_arm(a) for a in ("padding+truncate", "random-cross+split", "greedy-cross", "padfree",
    ...                         "random-isolated", "greedy-cross+related")]
    ['padding', 'random', 'greedy', None, None, None]
    """
    base, *suffixes = arm.split("+")
    return PAPER_ARMS.get(base) if all(s in OVERLENGTH_POLICIES for s in suffixes) else None


def overlength(arm: str) -> str | None:
    return next((s for s in arm.split("+")[1:] if s in OVERLENGTH_POLICIES), None)


def baseline(arm: str, arms: list[str]) -> str | None:
    """The padding arm `arm` is compared with, among the study's `arms`.

    >>> arms = ["padding", "random-cross", "padding+truncate", "random-cross+split", "greedy-cross+drop"]
    >>> [baseline(a, arms) for a in ("random-cross", "greedy-cross+drop", "padding+truncate")]
    ['padding', 'padding+truncate', 'padding+truncate']
    """
    paddings = [a for a in arms if paper_arm(a) == "padding"]
    policy = overlength(arm)
    same = [p for p in paddings if overlength(p) == policy]
    kind = [p for p in paddings if (overlength(p) is None) == (policy is None)]
    return (same or kind or paddings or [None])[0]


def paper_job(model: str, sources: list[str]) -> tuple[str, str] | None:
    """(model, dataset) of the paper's grid when the study is one of its jobs, else None.

    >>> paper_job("meta-llama/Meta-Llama-3-8B", ["hf:Super-shuhe/packing-tulu@0123abc"])
    ('8B', '326K')
    >>> paper_job("meta-llama/Meta-Llama-3-8B", ["data/packing-tulu.jsonl"]) is None
    True
    """
    size = PAPER_MODELS.get(Path(model.rstrip("/")).name.lower())
    # hf:ORG/NAME[/CONFIG][@REVISION] (raypack.data.hub): the paper's datasets are named by ORG/NAME.
    repo = "/".join(sources[0].removeprefix("hf:").split("@")[0].split("/")[:2]) if len(sources) == 1 else None
    dataset = PAPER_DATASETS.get(repo) if repo else None
    return (size, dataset) if size and dataset and sources[0].startswith("hf:") else None


def _read_json(path: Path, folder: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{folder}: not a finished study: no {path.relative_to(folder)} ({STUDY_HINT}; "
                         "report.json is written once every arm is done)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {STUDY_HINT}") from None


def read_study(folder: str) -> dict:
    """A finished study's config, report and run records ({arm: [record per seed]})."""
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: no such folder; {STUDY_HINT}")
    config = _read_json(Path(folder) / "config.json", folder)
    report = _read_json(Path(folder) / "report.json", folder)
    if not isinstance(report.get("arms"), dict) or not report["arms"]:
        raise ValueError(f"{folder}: report.json lists no arms; {STUDY_HINT}")
    records = {arm: [_read_json(Path(folder) / "runs" / arm / f"seed{seed}" / "result.json", folder)
                     for seed in row.get("seeds", [])] for arm, row in report["arms"].items()}
    missing = [f"config.json: {'.'.join(key)}" for key in CONFIG_KEYS if _get(config, key) is None]
    missing += [f"runs/{arm}/seed{r.get('seed')}/result.json: {key}" for arm, runs in records.items()
                for r in runs for key in RECORD_KEYS if key not in r]
    if missing or not all(records.values()):
        raise ValueError(f"{folder}: not a study `raypack study` wrote: {', '.join(missing) or 'no seeds'} missing; "
                         f"{STUDY_HINT}")
    return {"folder": str(folder), "config": config, "report": report, "records": records}


# What the grid reads of a study's config.json and of each result.json.
CONFIG_KEYS = (("name",), ("model", "name_or_path"), ("data", "sources"), ("train", "num_workers"))
RECORD_KEYS = ("seed", "steps", "train_seconds", "fit_seconds")


def _get(data: dict, key: tuple[str, ...]):
    for part in key:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _figure(values: list) -> tuple[float | None, float | None, list[float] | None]:
    """Mean (None without values), sample sd and 95% interval over seeds (raypack.stats.estimate)."""
    e = estimate(values)
    return (None if math.isnan(e.mean) else e.mean), e.sd, list(e.ci) if e.ci else None


def _delta(points: list, base: list, same: bool) -> dict:
    """An arm's Δ vs its padding arm: Welch's difference of their seed averages (points), as grid.json keeps it;
    the padding arm itself has Δ 0 and no interval."""
    if same:
        return {"diff": 0.0 if any(p is not None for p in points) else None, "se": None, "df": None, "ci": None,
                "t": None, "significant": None, "note": "the padding arm itself"}
    d = welch(points, base).to_dict()
    return {**d, "diff": None if math.isnan(d["diff"]) else d["diff"], "ci": list(d["ci"]) if d["ci"] else None}


def study_row(study: dict) -> dict:
    """One row of the grid: the study's model, dataset, setting, devices and, per arm, the figures over seeds."""
    config, tasks, records = study["config"], study["report"].get("tasks", []), study["records"]
    train, study_cfg = config["train"], config.get("study", {})
    devices = train["num_workers"]
    job = paper_job(config["model"]["name_or_path"], config["data"]["sources"])
    setting = [f"setting {study_cfg['setting']}"] if study_cfg.get("setting") else []
    setting += [f"match {study_cfg.get('match')}", f"loss {train.get('loss_reduction')}",
                f"over-length {config['data'].get('overlength')}"]
    points = {arm: {r["seed"]: _points(average_score(r.get("scores", {}), tasks)) for r in runs}
              for arm, runs in records.items()}
    arms = {}
    for arm, runs in records.items():
        base = baseline(arm, list(records))
        figures = {"steps": [r["steps"] for r in runs],
                   "device_hours": [r["train_seconds"] * devices / 3600 for r in runs],
                   "held_device_hours": [r["fit_seconds"] * devices / 3600 for r in runs],
                   "average_points": list(points[arm].values())}
        arms[arm] = {"paper_arm": paper_arm(arm), "baseline": base, "seeds": [r["seed"] for r in runs]}
        for key, values in figures.items():
            arms[arm][key], arms[arm][f"{key}_spread"], arms[arm][f"{key}_ci"] = _figure(values)
        delta = _delta(list(points[arm].values()), list(points[base].values()) if base else [], arm == base)
        if is_proportion("average", tasks):  # points of proportions: the report's cut, at 0 and 100 (Δ: ±100)
            arms[arm]["average_points_ci"] = within(arms[arm]["average_points_ci"], 0.0, 100.0)
            delta["ci"] = within(delta["ci"], -100.0, 100.0)
        arms[arm]["delta_points"], arms[arm]["delta_points_welch"] = delta["diff"], delta
    gpu = bool(train.get("use_gpu"))
    return {"study": config["name"], "folder": study["folder"], "model": config["model"]["name_or_path"],
            "dataset": describe_data(config), "setting": "; ".join(setting),
            "seeds": study["report"].get("seeds", []), "device": "GPU" if gpu else "CPU", "num_devices": devices,
            "hours_unit": "GPU-hours" if gpu else "CPU worker-hours", "tasks": tasks,
            "skipped": study["report"].get("skipped", {}),
            "paper_job": {"model": job[0], "dataset": job[1]} if job else None,
            "paper_delta": dict(zip(("random", "greedy"), PAPER_DELTAS[job])) if job else None, "arms": arms}


def _points(score: float | None) -> float | None:
    return None if score is None else 100 * score


def combine(folders: list[str]) -> dict:
    """grid.json's content: one row per study, rows of one model x dataset together, in the order given."""
    seen = [str(Path(f).resolve()) for f in folders]
    twice = next((f for f, s in zip(folders, seen) if seen.count(s) > 1), None)
    if twice:
        raise ValueError(f"{twice}: given twice; give each study folder once")
    rows = []
    for folder in folders:
        row = study_row(read_study(folder))
        print(f"read {folder}: study {row['study']}, {row['model']} x {row['dataset']}, {len(row['arms'])} arms "
              f"x {len(row['seeds'])} seed(s), {row['num_devices']} {row['device']} workers", flush=True)
        rows.append(row)
    names = [r["study"] for r in rows]
    for row in rows:
        row["label"] = row["study"] if names.count(row["study"]) == 1 else f"{row['study']} ({row['folder']})"
    pairs = list(dict.fromkeys((r["model"], r["dataset"]) for r in rows))
    rows.sort(key=lambda r: pairs.index((r["model"], r["dataset"])))
    arms = list(dict.fromkeys(arm for r in rows for arm in r["arms"]))
    return {"rows": rows, "arms": arms, "paper_source": PAPER_SOURCE}


def _hours(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.2g}"


FORMATS = {"delta_points": lambda v: f"{v:+.2f}", "average_points": lambda v: f"{v:.2f}",
           "steps": lambda v: f"{v:,.1f}".removesuffix(".0"), "device_hours": _hours}


def _number(arm: dict, key: str) -> str:
    """A figure as the tables show it (FORMATS: points to 2 decimals, hours to 2-3 digits) with its 95% interval
    over seeds; Δ vs padding as Welch's difference, its interval, t and "not significant" (raypack.stats)."""
    value = arm[key]
    if value is None:
        return "-"
    if key == "delta_points":
        d = arm["delta_points_welch"]
        if d["note"] == "the padding arm itself":
            return FORMATS[key](value)
        return format_difference(Difference(**{**d, "ci": tuple(d["ci"]) if d["ci"] else None}), 2)
    ci = arm.get(f"{key}_ci")
    return FORMATS[key](value) + (f" [{FORMATS[key](ci[0])}, {FORMATS[key](ci[1])}]" if ci else "")


def _table(grid: dict, arms: list[str], key: str, extra=None) -> list[str]:
    """Rows: model | dataset | study | one column per arm (`key` [interval]) | the extra columns."""
    head, extra = ["model", "dataset", "study", *arms], extra or []
    lines = ["| " + " | ".join(head + [name for name, _ in extra]) + " |", "|---" * (len(head) + len(extra)) + "|"]
    for row in grid["rows"]:
        cells = [_number(row["arms"][a], key) if a in row["arms"] else "-" for a in arms]
        lines.append("| " + " | ".join([row["model"], row["dataset"], row["label"], *cells,
                                         *(cell(row) for _, cell in extra)]) + " |")
    return lines


def _benchmarks(row: dict) -> str:
    """The studies table's benchmarks cell: those scored, then those skipped and why."""
    cell = ", ".join(row["tasks"]) or "none"
    for task, why in row.get("skipped", {}).items():
        cell += f"; {task} {why}"
    return cell


def _paper_cell(row: dict) -> str:
    ref = row["paper_delta"]
    return f"{ref['random']:+.2f} / {ref['greedy']:+.2f}" if ref else "-"


def markdown(grid: dict) -> str:
    rows, arms = grid["rows"], grid["arms"]
    compared = [a for a in arms if paper_arm(a) != "padding"]
    roles = {role: ", ".join(a for a in arms if paper_arm(a) == role) or "none" for role in ("random", "greedy")}
    units = sorted({r["hours_unit"] for r in rows})
    skipped = any(r.get("skipped") for r in rows)
    lines = [f"# The grid: {len(rows)} studies", "",
             "Benchmark averages and deltas are in points (scores x 100, over each study's own benchmarks); "
             "Δ vs padding is an arm's average minus its padding arm's (`baseline` in grid.json: the padding arm "
             "of the same over-length suffix, else a suffixed one for a suffixed arm, else plain padding). padfree "
             "is not padding. Where a study has several seeds: each figure is the mean over seeds [its 95% "
             "Student-t interval], and Δ is Welch's difference of the two arms' seed means [its 95% interval "
             "(Welch-Satterthwaite df, seeds taken as independent)], with t, the difference in standard errors; "
             "a Δ whose interval includes 0 is not significant. A study with one seed has no intervals (they need "
             "study.seeds >= 2).",
             "", f"paper: the paper's published Δ (random / greedy) where a study is one of its jobs "
             f"({PAPER_SOURCE}); its random column is our {roles['random']}, its greedy column our "
             f"{roles['greedy']}." + (" The paper's average includes HumanEval; a study that skipped a benchmark "
             "(the benchmarks column says which and why) averages the others." if skipped else ""), "",
             "## Studies", "", "| study | model | dataset | setting | seeds | trained on | benchmarks | folder |",
             "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['model']} | {r['dataset']} | {r['setting']} | "
                     f"{', '.join(map(str, r['seeds']))} | {r['num_devices']} {r['device']} workers | "
                     f"{_benchmarks(r)} | {r['folder']} |")
    lines += ["", "## Δ vs padding (points)", "", *_table(grid, compared, "delta_points",
                                                          extra=[("paper: random / greedy", _paper_cell)])]
    lines += ["", "## Benchmark average (points)", "", *_table(grid, arms, "average_points")]
    lines += ["", "## Optimizer steps", "", *_table(grid, arms, "steps")]
    lines += ["", f"## Training cost ({' / '.join(units)})", "",
              "The arm's training time (the sum of its step times) x the devices it held: GPU-hours on GPU (one "
              "per worker), CPU worker-hours on CPU; start-up, validation, checkpoints and export are left out "
              "(held_device_hours in grid.json counts the whole fit).", "",
              *_table(grid, arms, "device_hours", extra=[("unit", lambda r: r["hours_unit"])])]
    return "\n".join(lines + ["", "Plot: grid.png.", ""])


def plot(grid: dict, out: Path) -> str:
    """grid.png: per study row, each non-padding arm's Δ vs padding (the paper's value marked over the arms of
    its random and greedy columns) and its device-hours over its padding arm's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = grid["rows"]
    arms = [a for a in grid["arms"] if paper_arm(a) != "padding"]
    colours = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(arms)}
    width = 0.8 / max(len(arms), 1)
    fig, (delta_ax, cost_ax) = plt.subplots(1, 2, figsize=(max(10, 2.5 * len(rows) + 4), 5))
    labelled = set()
    for i, row in enumerate(rows):
        for j, arm in enumerate(arms):
            a = row["arms"].get(arm)
            if a is None:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            if a["delta_points"] is not None:
                ci = a["delta_points_welch"]["ci"]
                yerr = [[a["delta_points"] - ci[0]], [ci[1] - a["delta_points"]]] if ci else None
                delta_ax.bar(x, a["delta_points"], width, yerr=yerr, capsize=3,
                             color=colours[arm], label=None if arm in labelled else arm)
                labelled.add(arm)
            ref = (row["paper_delta"] or {}).get(a["paper_arm"])
            if ref is not None:
                delta_ax.plot([x - width / 2, x + width / 2], [ref, ref], color="black", lw=2.5,
                              label=None if "paper" in labelled else "the paper's Δ")
                labelled.add("paper")
            base = row["arms"].get(a["baseline"] or "")
            if base and base["device_hours"]:
                cost_ax.bar(x, a["device_hours"] / base["device_hours"], width, color=colours[arm])
    ticks = [f"{Path(r['model'].rstrip('/')).name}\n{r['dataset']}\n{r['label']}" for r in rows]
    for ax, what in ((delta_ax, "Δ vs padding, benchmark average (points, 95% interval)"),
                     (cost_ax, "training device-hours / padding's")):
        ax.axhline(0 if ax is delta_ax else 1, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), ticks, fontsize=7)
        ax.set_ylabel(what)
        ax.grid(axis="y", alpha=0.3)
    if not any(a["delta_points"] is not None for r in rows for a in r["arms"].values()):
        delta_ax.text(0.5, 0.5, "no benchmark scores", transform=delta_ax.transAxes, ha="center")
    if labelled:
        delta_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=110)
    plt.close(fig)
    return "grid.png"


def default_out(folders: list[str]) -> Path:
    """`grid` beside the first study (out/study/grid for out/study/<name>)."""
    out = Path(folders[0]).resolve().parent / "grid"
    if (out / "report.json").exists():
        raise ValueError(f"{out} is a study folder; give --out DIR for the grid")
    return out


def write_grid(folders: list[str], out: str | Path | None = None) -> dict:
    """Read the studies, write grid.json, grid.md and grid.png into `out` (default_out); returns the grid."""
    grid = combine(folders)
    out = Path(out) if out else default_out(folders)
    out.mkdir(parents=True, exist_ok=True)
    grid["plot"] = plot(grid, out)
    (out / "grid.json").write_text(json.dumps(grid, indent=2))
    (out / "grid.md").write_text(markdown(grid))
    return grid
