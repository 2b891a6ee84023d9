"""`raypack report`: finished studies combined into the paper's grid (pure: no Ray; studies written by hand
in the format `raypack study` writes, checked against plain-Python arithmetic on their records).

    .venv/bin/pytest tests/test_grid.py -q
"""

import doctest
import json
import shutil
import statistics
from pathlib import Path

import pytest
import scipy.stats

from raypack.cli import main
from raypack.config import load_config, to_dict
from raypack.study.report import summarise

# The paper's Llama-3-8B on TULU deltas, random / greedy (PAPER.md, "Headline results"), copied here by hand.
PAPER_8B_TULU = (0.94, 1.59)


def write_study(folder: Path, config: dict, runs: dict) -> dict:
    """A finished study as raypack.study.run leaves it: config.json, runs/<arm>/seed<k>/result.json and
    report.json; runs: {arm: [(seed, steps, train_seconds, scores)]}. Returns {arm: {seed: record}}."""
    records = {}
    for arm, per_seed in runs.items():
        for seed, steps, seconds, scores in per_seed:
            record = {"arm": arm, "seed": seed, "steps": steps, "fit_seconds": seconds + 30.0,
                      "train_seconds": seconds, "samples": 100, "tokens": 1000, "row_tokens": 1200,
                      "final_train_loss": 1.0, "val_loss": 1.0, "scores": scores, "manifest": {},
                      "curve": [{"step": steps, "loss": 1.0, "time_s": seconds}]}
            path = folder / "runs" / arm / f"seed{seed}" / "result.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(record))
            records.setdefault(arm, {})[seed] = record
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "report.json").write_text(json.dumps(summarise([r for a in records.values() for r in a.values()])))
    return records


def config_of(job: str, name: str, arms: list[str], *overrides: str) -> dict:
    config = to_dict(load_config(job, [f"name={name}", *overrides]))
    config["pack"]["arms"] = arms  # the over-length suffixes of another branch's arms, as config.json holds them
    return config


def scores(a: float, b: float) -> dict:
    return {"mmlu/acc": a, "gsm8k/exact_match": b}


# A GPU study of the paper's job holding both sets of arms, 2 seeds; another of the same job, 1 seed.
BOTH = {
    "padding": [(0, 400, 7200.0, scores(0.50, 0.30)), (1, 400, 7300.0, scores(0.52, 0.30))],
    "random-cross": [(0, 100, 1800.0, scores(0.51, 0.31)), (1, 100, 1900.0, scores(0.50, 0.34))],
    "padfree": [(0, 400, 5000.0, scores(0.50, 0.28)), (1, 400, 5100.0, scores(0.53, 0.29))],
    "bfd-isolated": [(0, 90, 1700.0, scores(0.52, 0.33)), (1, 90, 1750.0, scores(0.54, 0.31))],
    "padding+truncate": [(0, 400, 7150.0, scores(0.49, 0.30)), (1, 400, 7250.0, scores(0.50, 0.29))],
    "random-cross+split": [(0, 110, 1850.0, scores(0.50, 0.32)), (1, 110, 1950.0, scores(0.51, 0.30))],
    "greedy-cross+drop": [(0, 95, 1700.0, scores(0.52, 0.33)), (1, 95, 1800.0, scores(0.51, 0.35))],
}
CORRECTED = {"padding": [(0, 400, 7000.0, scores(0.5, 0.3))], "random-cross": [(0, 100, 1700.0, scores(0.5, 0.4))]}
# Each arm's padding arm, decided here by hand from the rule (same over-length suffix, else a suffixed one).
BASELINE = {"padding": "padding", "random-cross": "padding", "padfree": "padding", "bfd-isolated": "padding",
            "padding+truncate": "padding+truncate", "random-cross+split": "padding+truncate",
            "greedy-cross+drop": "padding+truncate"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid-studies")
    paper = write_study(root / "both", config_of("jobs/paper-8b-tulu.yaml", "paper-8b-tulu", list(BOTH),
                                                 "study.seeds=2"), BOTH)
    fixed = write_study(root / "corrected", config_of("jobs/paper-8b-tulu.yaml", "corrected", list(CORRECTED),
                                                      "study.match=steps"), CORRECTED)
    # Negative control for the reference: the paper's model on synthetic data with TULU's length profile, on CPU.
    cpu = {"padding": [(0, 44, 36.0, scores(0.2, 0.0))], "random-cross": [(0, 21, 18.0, scores(0.25, 0.0))]}
    synthetic = write_study(root / "synthetic", config_of("jobs/quickstart.yaml", "synthetic-tulu", list(cpu),
                                                          "synth.preset=tulu-326k",
                                                          "model.name_or_path=meta-llama/Meta-Llama-3-8B"), cpu)
    return root, {"both": paper, "corrected": fixed, "synthetic": synthetic}


def points(record: dict) -> float:
    return 100 * statistics.fmean(record["scores"].values())


def test_grid_rows_figures_and_the_papers_reference_against_the_records(studies, tmp_path, capsys):
    root, records = studies
    out = tmp_path / "grid"
    order = [root / "both", root / "synthetic", root / "corrected"]
    assert main(["report", *map(str, order), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("read ")] == [
        f"read {f}" for f in order]
    grid = json.loads((out / "grid.json").read_text())
    # Rows of one model x dataset together, in the order first given.
    assert [r["study"] for r in grid["rows"]] == ["paper-8b-tulu", "corrected", "synthetic-tulu"]
    both, corrected, synthetic = grid["rows"]
    assert both["dataset"] == corrected["dataset"] == "hf:Super-shuhe/packing-tulu"
    for arm, row in both["arms"].items():
        runs = records["both"][arm]
        base = records["both"][BASELINE[arm]]
        assert row["baseline"] == BASELINE[arm]
        assert row["steps"] == statistics.fmean(r["steps"] for r in runs.values())
        hours = [r["train_seconds"] * 32 / 3600 for r in runs.values()]  # 32 GPUs, one per worker
        assert row["device_hours"] == pytest.approx(statistics.fmean(hours))
        assert row["device_hours_spread"] == pytest.approx(statistics.stdev(hours))
        assert row["average_points"] == pytest.approx(statistics.fmean(points(r) for r in runs.values()))
        deltas = [points(runs[s]) - points(base[s]) for s in (0, 1)]
        assert row["delta_points"] == pytest.approx(statistics.fmean(deltas), abs=1e-9)
        if arm != BASELINE[arm]:  # Welch's difference of the seed averages, as scipy computes it
            mine, theirs = [points(r) for r in runs.values()], [points(r) for r in base.values()]
            welch = scipy.stats.ttest_ind(mine, theirs, equal_var=False)
            assert row["delta_points_welch"]["ci"] == pytest.approx(list(welch.confidence_interval()), abs=1e-9)
            assert row["delta_points_welch"]["t"] == pytest.approx(welch.statistic)
    assert {a: r["paper_arm"] for a, r in both["arms"].items()} == {
        "padding": "padding", "random-cross": "random", "padfree": None, "bfd-isolated": None,
        "padding+truncate": "padding", "random-cross+split": "random", "greedy-cross+drop": "greedy"}
    assert both["arms"]["padfree"]["delta_points"] != 0  # padfree is an arm of its own, not padding
    assert both["paper_delta"] == corrected["paper_delta"] == dict(zip(("random", "greedy"), PAPER_8B_TULU))
    assert both["hours_unit"] == "GPU-hours" and corrected["arms"]["random-cross"]["delta_points"] == pytest.approx(5.0)
    assert corrected["arms"]["random-cross"]["delta_points_welch"]["ci"] is None  # one seed: no interval
    # The negative control: the paper's model on synthetic data is not the paper's job, and CPU time is not GPU time.
    assert synthetic["paper_job"] is None and synthetic["paper_delta"] is None
    assert synthetic["hours_unit"] == "CPU worker-hours"
    assert synthetic["arms"]["random-cross"]["device_hours"] == pytest.approx(18.0 * 2 / 3600)
    md = (out / "grid.md").read_text()
    assert "| meta-llama/Meta-Llama-3-8B | hf:Super-shuhe/packing-tulu | corrected | +5.00 (no interval: one seed) " \
           "| - | - | - | - | +0.94 / +1.59 |" in md
    cost = md[md.index("## Training cost (CPU worker-hours / GPU-hours)"):]
    assert "| synthetic-tulu | 0.02 | 0.01 | - | - | - | - | - | CPU worker-hours |" in cost
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_paper_job_gets_its_published_deltas_and_the_quickstart_none():
    from raypack.study.grid import PAPER_DELTAS, paper_job

    jobs = sorted(Path("jobs").glob("paper-*.yaml"))
    found = {}
    for job in jobs:
        cfg = load_config(job)
        found[job.stem] = paper_job(cfg.model.name_or_path, cfg.data.sources)
    assert len(jobs) == 8 and set(found.values()) == set(PAPER_DELTAS)
    assert found["paper-70b-wildchatgpt4"] == ("70B", "69K") and found["paper-8b-opensource1m"] == ("8B", "1.2M")
    cfg = load_config("jobs/quickstart.yaml")
    assert paper_job(cfg.model.name_or_path, cfg.data.sources) is None


def one_line(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_folder_that_is_not_a_finished_study_is_one_line_naming_it(studies, tmp_path, capsys):
    root, _ = studies
    unfinished = tmp_path / "unfinished"  # config.json and a run, no report.json yet: still training
    (unfinished / "runs" / "padding" / "seed0").mkdir(parents=True)
    (unfinished / "config.json").write_text((root / "corrected" / "config.json").read_text())
    torn = tmp_path / "torn"  # report.json lists seed 1 of padding, whose record is gone
    (torn / "runs").mkdir(parents=True)
    for name in ("config.json", "report.json"):
        (torn / name).write_text((root / "both" / name).read_text())
    modelless = tmp_path / "modelless"  # a config.json from something else
    shutil.copytree(root / "corrected", modelless)
    config = json.loads((modelless / "config.json").read_text())
    del config["model"]
    (modelless / "config.json").write_text(json.dumps(config))
    cases = [([str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such folder; give a folder `raypack study` wrote"),
             ([str(root / "both"), str(unfinished)], f"{unfinished}: not a finished study: no report.json"),
             ([str(tmp_path)], f"{tmp_path}: not a finished study: no config.json"),
             ([str(torn)], f"{torn}: not a finished study: no runs/padding/seed0/result.json"),
             ([str(root / "both"), str(root / "both") + "/"], "given twice"),
             ([str(modelless)], f"{modelless}: not a study `raypack study` wrote: config.json: model.name_or_path "
                                "missing")]
    for folders, says in cases:
        line = one_line(main(["report", *folders, "--out", str(tmp_path / "grid")]), capsys.readouterr().err)
        assert line.startswith("raypack report: error: ") and says in line, line
    assert not (tmp_path / "grid").exists()  # nothing written when a study cannot be read


def test_the_grid_goes_beside_the_first_study_by_default(studies, capsys):
    root, _ = studies
    assert main(["report", str(root / "corrected")]) == 0
    assert "| corrected |" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "grid").iterdir()) == ["grid.json", "grid.md", "grid.png"]


def test_a_study_that_skipped_humaneval_says_so_beside_the_papers_deltas(tmp_path):
    from raypack.study.grid import combine, markdown

    why = "skipped: allow_code_execution is off (runs model-written code)"
    skipping = {arm: [(0, 10, 60.0, scores(0.5, 0.3))] for arm in ("padding", "random-cross")}
    write_study(tmp_path / "skipping", config_of("jobs/paper-8b-tulu.yaml", "skipping", list(skipping)), skipping)
    report = json.loads((tmp_path / "skipping" / "report.json").read_text())
    (tmp_path / "skipping" / "report.json").write_text(json.dumps({**report, "skipped": {"humaneval_instruct": why}}))
    write_study(tmp_path / "scoring", config_of("jobs/paper-8b-tulu.yaml", "scoring", list(CORRECTED)), CORRECTED)
    md = markdown(combine([str(tmp_path / "skipping"), str(tmp_path / "scoring")]))
    assert f"| gsm8k/exact_match, mmlu/acc; humaneval_instruct {why} | {tmp_path / 'skipping'} |" in md
    assert "a study that skipped a benchmark (the benchmarks column says which and why) averages the others" in md
    # Negative control: the study that scored everything lists its benchmarks alone, and a grid of it alone has no note.
    assert f"| gsm8k/exact_match, mmlu/acc | {tmp_path / 'scoring'} |" in md
    alone = markdown(combine([str(tmp_path / "scoring")]))
    assert "humaneval" not in alone and "averages the others" not in alone


def test_examples_in_the_docstrings():
    """paper_arm and baseline on the arm names of both settings; mean_spread and describe_data."""
    from raypack.study import grid, report

    assert doctest.testmod(grid).failed == 0 and doctest.testmod(report).failed == 0


def test_delta_vs_padding_has_its_welch_interval_and_says_when_it_is_not_significant(tmp_path):
    """Three seeds: greedy-cross clearly above padding (significant, positive), random-cross within padding's
    noise (the negative control: 'not significant'); each average carries its interval over seeds."""
    from raypack.study.grid import combine, markdown

    runs = {"padding": [(k, 10, 60.0, scores(a, 0.3)) for k, a in enumerate((0.50, 0.52, 0.48))],
            "greedy-cross": [(k, 4, 30.0, scores(a, 0.3)) for k, a in enumerate((0.60, 0.61, 0.59))],
            "random-cross": [(k, 4, 30.0, scores(a, 0.3)) for k, a in enumerate((0.51, 0.49, 0.50))]}
    write_study(tmp_path / "seeded", config_of("jobs/quickstart.yaml", "seeded", list(runs), "study.seeds=3"), runs)
    row = combine([str(tmp_path / "seeded")])["rows"][0]
    pad = [100 * (a + 0.3) / 2 for a in (0.50, 0.52, 0.48)]
    greedy, rand = row["arms"]["greedy-cross"]["delta_points_welch"], row["arms"]["random-cross"]["delta_points_welch"]
    assert greedy["diff"] == pytest.approx(5.0) and greedy["significant"] and greedy["ci"][0] > 0
    assert rand["significant"] is False and rand["ci"][0] < 0 < rand["ci"][1]
    assert row["arms"]["padding"]["average_points_ci"] == pytest.approx(
        list(scipy.stats.t.interval(0.95, 2, loc=statistics.fmean(pad), scale=scipy.stats.sem(pad))))
    md = markdown(combine([str(tmp_path / "seeded")]))
    delta = md[md.index("## Δ vs padding"):md.index("## Benchmark average")]
    assert f"+5.00 [{greedy['ci'][0]:+.2f}, {greedy['ci'][1]:+.2f}], {greedy['t']:.1f} SE |" in delta
    assert delta.count("not significant") == 1 and "+0.00 [-2.08, +2.08], 0.0 SE, not significant" in delta
    assert "40.00 [" in md[md.index("## Benchmark average"):]


def test_a_proportions_average_in_points_keeps_its_interval_within_0_and_100(tmp_path):
    """Scores near 1 over 3 seeds: the t interval of padding's average passes 100 points, the grid's stops there
    (as the study report cuts it); Δ's interval stops at -100. Negative control: a perplexity in the tasks makes
    the average no proportion, and its interval is scipy's, uncut."""
    from raypack.study.grid import combine

    pad, low = (1.0, 0.85, 1.0), (0.0, 0.8, 0.43)
    runs = {"padding": [(k, 10, 60.0, {"a/exact_match": a, "b/acc": a}) for k, a in enumerate(pad)],
            "random-cross": [(k, 4, 30.0, {"a/exact_match": a, "b/acc": a}) for k, a in enumerate(low)]}
    write_study(tmp_path / "em", config_of("jobs/quickstart.yaml", "em", list(runs), "study.seeds=3"), runs)
    row = combine([str(tmp_path / "em")])["rows"][0]
    points = [100 * a for a in pad]
    t_ci = scipy.stats.t.interval(0.95, 2, loc=statistics.fmean(points), scale=scipy.stats.sem(points))
    assert t_ci[1] > 100 and row["arms"]["padding"]["average_points_ci"] == pytest.approx([t_ci[0], 100.0])
    welch = scipy.stats.ttest_ind([100 * a for a in low], points, equal_var=False)
    delta = row["arms"]["random-cross"]["delta_points_welch"]
    assert welch.confidence_interval()[0] < -100 and delta["ci"] == pytest.approx([-100.0, welch.confidence_interval()[1]])
    ppl = {arm: [(k, s, t, {**sc, "c/word_perplexity": 2.0}) for k, s, t, sc in r] for arm, r in runs.items()}
    write_study(tmp_path / "ppl", config_of("jobs/quickstart.yaml", "ppl", list(ppl), "study.seeds=3"), ppl)
    uncut = combine([str(tmp_path / "ppl")])["rows"][0]["arms"]["padding"]["average_points_ci"]
    mixed = [100 * (2 * a + 2.0) / 3 for a in pad]
    assert uncut[1] > 100 and uncut == pytest.approx(list(scipy.stats.t.interval(0.95, 2, loc=statistics.fmean(mixed),
                                                              scale=scipy.stats.sem(mixed))))
