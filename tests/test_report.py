"""The study report from recorded runs (pure: no Ray).

    .venv/bin/pytest tests/test_report.py -q
"""

import json

import pytest
import scipy.stats

from raypack.study.report import markdown, summarise, write_report


def record(arm, seed, steps, seconds, tokens, row_tokens, val_loss, scores):
    curve = [{"step": s + 1, "loss": 8.0 - s * 0.1, "time_s": (s + 1) * seconds / steps,
              **({"val_loss": val_loss + 0.1 * (steps - s - 1)} if (s + 1) % 2 == 0 else {})} for s in range(steps)]
    return {"arm": arm, "seed": seed, "steps": steps, "fit_seconds": seconds + 5, "train_seconds": seconds,
            "samples": 100, "tokens": tokens, "row_tokens": row_tokens, "final_train_loss": curve[-1]["loss"],
            "val_loss": val_loss, "scores": scores, "curve": curve,
            "manifest": {"num_rows": 50 if arm == "padding" else 10, "num_truncated": 1, "num_split": 0,
                         "num_dropped_too_long": 0, "num_dropped_no_supervised": 0}}


RECORDS = [
    record("padding", 0, 8, 40.0, 1000, 1500, 2.0, {"a/acc": 0.5, "b/exact_match": 0.1}),
    record("padding", 1, 8, 44.0, 1000, 1500, 2.2, {"a/acc": 0.7, "b/exact_match": 0.3}),
    record("bfd-isolated", 0, 2, 20.0, 1000, 1010, 2.5, {"a/acc": 0.4, "b/exact_match": 0.2}),
    record("bfd-isolated", 1, 2, 22.0, 1000, 1010, 2.7, {"a/acc": 0.6, "b/exact_match": 0.2}),
]


def test_summary_means_spreads_and_delta_vs_padding():
    summary = summarise(RECORDS)
    assert list(summary["arms"]) == ["padding", "bfd-isolated"] and summary["seeds"] == [0, 1]
    pad, bfd = summary["arms"]["padding"], summary["arms"]["bfd-isolated"]
    assert pad["train_seconds"] == pytest.approx(42.0) and pad["train_seconds_spread"] == pytest.approx(2.8284, 1e-3)
    assert pad["tokens_per_sec"] == pytest.approx((1000 / 40 + 1000 / 44) / 2)
    assert pad["padding_fraction"] == pytest.approx(1 / 3)
    assert pad["average"] == pytest.approx((0.3 + 0.5) / 2)  # seed means of (a + b) / 2
    assert bfd["average"] == pytest.approx((0.3 + 0.4) / 2)
    assert bfd["average_delta_vs_reference"] == pytest.approx(-0.05)
    assert pad["average_delta_vs_reference"] == pytest.approx(0.0)
    assert pad["num_rows"] == 50 and bfd["steps"] == 2


def test_one_seed_has_no_spread_and_missing_values_stay_missing():
    summary = summarise([RECORDS[0], {**RECORDS[2], "val_loss": float("nan"), "scores": {}}])
    assert summary["arms"]["padding"]["val_loss_spread"] is None
    bfd = summary["arms"]["bfd-isolated"]
    assert bfd["val_loss"] != bfd["val_loss"]  # NaN: no value, not zero
    assert bfd["average"] != bfd["average"] and bfd["score:a/acc"] != bfd["score:a/acc"]


def test_both_settings_compare_with_their_own_padding_and_data_differences_are_stated():
    """study.setting=both: each arm's delta is against the padding arm of its setting; arms whose supervised
    tokens differ (over-length policies) get a section saying by how much. Negative control: equal data, none."""
    def arm(name, setting, score, supervised, policy):
        r = record(name, 0, 4, 10.0, 1000, 1200, 2.0, {"a/acc": score})
        r["manifest"].update(num_supervised_tokens=supervised, overlength=policy)
        return {**r, "setting": setting}

    records = [arm("padding", "corrected", 0.50, 1000, "truncate"), arm("greedy-cross", "corrected", 0.55, 1000,
                                                                         "truncate"),
               arm("padding+truncate", "paper", 0.40, 1000, "truncate"),
               arm("greedy-cross+drop", "paper", 0.46, 900, "drop")]
    summary = summarise(records)
    arms = summary["arms"]
    assert arms["greedy-cross"]["average_delta_vs_reference"] == pytest.approx(0.05)
    assert arms["greedy-cross+drop"]["average_delta_vs_reference"] == pytest.approx(0.06)  # vs padding+truncate
    md = markdown(summary, "t", [])
    assert "## The arms saw different data" in md and "greedy-cross+drop 900 (-10.00%)" in md and "padding 1,000 (as greedy-cross, padding+truncate)" in md
    assert "| drop |" in md  # the over-length column
    assert "saw different data" not in markdown(summarise(records[:3]), "t", [])


def test_a_skipped_benchmark_has_its_column_saying_why_and_stays_out_of_the_average():
    why = "skipped: allow_code_execution is off (runs model-written code)"
    summary = summarise([{**r, "skipped": {"humaneval_instruct": why}} for r in RECORDS])
    assert summary["skipped"] == {"humaneval_instruct": why} and summary["tasks"] == ["a/acc", "b/exact_match"]
    assert summary["arms"]["padding"]["average"] == pytest.approx((0.3 + 0.5) / 2)  # the scored tasks' mean
    md = markdown(summary, "t", [])
    assert "| arm | a/acc | b/exact_match | humaneval_instruct | average | Δ vs reference |" in md
    assert md.count("| skipped |") == 2  # one cell per arm
    assert f"humaneval_instruct: {why}; the average is over the 2 benchmarks scored." in md
    # Negative control: records without a skipped task give no such column or line.
    plain = markdown(summarise(RECORDS), "t", [])
    assert "humaneval" not in plain and "skipped" not in plain


def test_write_report_gives_markdown_json_and_plots(tmp_path):
    summary = write_report(RECORDS, tmp_path, "test study", ["note one"])
    md = (tmp_path / "report.md").read_text()
    assert "| padding |" in md and "| bfd-isolated |" in md and "Δ vs reference" in md and "note one" in md
    assert "42.0 [16.6, 67.4]" in md  # padding's train time 40, 44: mean 42 ± t(0.975; 1) 12.706 x se 2
    data = json.loads((tmp_path / "report.json").read_text())  # strict JSON: NaN written as null
    assert data["arms"]["bfd-isolated"]["average_delta_vs_reference"] == pytest.approx(-0.05)
    assert sorted(summary["plots"]) == ["loss_vs_step.png", "loss_vs_time.png", "score_per_arm.png", "seeds.png",
                                        "time_per_arm.png"]
    for name in summary["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report([{**r, "val_loss": float("nan")} for r in RECORDS[:1]], tmp_path / "nan", "t", [])
    assert json.loads((tmp_path / "nan" / "report.json").read_text())["arms"]["padding"]["val_loss"] is None


def probe(delta_related, num_samples=32):
    ci = [delta_related - 0.1, delta_related + 0.1] if num_samples else [None, None]
    value = delta_related if num_samples else None
    return {"num_samples": num_samples, "loss_alone": 3.0 if num_samples else None,
            "delta_unrelated": 0.05 if num_samples else None, "delta_unrelated_ci": [0.0, 0.1] if num_samples else ci,
            "delta_related": value, "delta_related_ci": ci, "related_minus_unrelated": value,
            "related_minus_unrelated_ci": ci}


def test_composition_and_probe_sections(tmp_path):
    """Grouped arms get the 'what goes into a pack' table; every probed arm a row and a bar; an arm whose
    probe found no pairs (a tiny split) is shown without numbers rather than breaking the report."""
    related = record("bfd-cross+related", 0, 2, 20.0, 1000, 1010, 2.5, {})
    related["manifest"].update(grouping="related", only_single_turn=False, num_clusters=10, within_pack_cosine=0.2,
                               across_pack_cosine=0.05, num_shared_rows=9, num_mixed_cluster_rows=1,
                               rows_over_lower_bound=1.006)
    related["probe"] = probe(-0.3)
    plain = {**record("bfd-cross", 0, 2, 20.0, 1000, 1010, 2.6, {}), "probe": probe(-0.01)}
    empty = {**record("padding", 0, 8, 40.0, 1000, 1500, 2.0, {}), "probe": probe(0.0, num_samples=0)}
    # Grouped by topic: no vectors, so its manifest has no cosines, and the table shows '-' for them.
    topic = record("greedy-cross+related", 0, 2, 20.0, 1000, 1010, 2.5, {})
    topic["manifest"].update(grouping="related", only_single_turn=False, num_clusters=60, group_backend="topic",
                             num_shared_rows=9, num_mixed_cluster_rows=0, rows_over_lower_bound=1.3)
    summary = write_report([empty, plain, related, topic], tmp_path, "composition", [])
    md = (tmp_path / "report.md").read_text()
    assert "## What goes into a pack" in md and "| bfd-cross+related | related | no | 10 | 0.2000 | 0.0500 | 1 / 9" in md
    assert "| greedy-cross+related | related | no | 60 | - | - | 0 / 9 |" in md
    assert "## Context reliance" in md and "-0.3000 [-0.4000, -0.2000]" in md
    assert summary["arms"]["bfd-cross+related"]["probe_delta_related"] == pytest.approx(-0.3)
    assert "probe.png" in summary["plots"] and (tmp_path / "probe.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["arms"]["padding"]["probe_delta_related"] is None
    # Without grouping or probes, neither section appears.
    md = (write_report(RECORDS, tmp_path / "plain", "plain", []) and (tmp_path / "plain" / "report.md").read_text())
    assert "What goes into a pack" not in md and "Context reliance" not in md


# Three seeds per arm. bfd-cross: validation loss clearly below padding's, score clearly above, probe gap far more
# negative (the separated arm); bfd-isolated: within padding's seed-to-seed noise (the negative control).
VAL = {"padding": [2.00, 2.10, 1.95], "bfd-cross": [1.50, 1.55, 1.45], "bfd-isolated": [2.05, 1.98, 2.08]}
SCORE = {"padding": [0.30, 0.35, 0.32], "bfd-cross": [0.60, 0.62, 0.58], "bfd-isolated": [0.31, 0.36, 0.30]}
GAP = {"padding": [-0.10, 0.05, -0.02], "bfd-cross": [-2.7, -2.4, -3.0], "bfd-isolated": [0.02, -0.08, -0.04]}


def seeded_records(arms=("padding", "bfd-cross", "bfd-isolated"), seeds=(0, 1, 2)):
    records = []
    for arm in arms:
        for k in seeds:
            r = record(arm, k, 4, 10.0 + k, 1000, 1100, VAL[arm][k], {"a/acc": SCORE[arm][k]})
            r["probe"] = {**probe(GAP[arm][k]), "related_minus_unrelated": GAP[arm][k],
                          "related_minus_unrelated_ci": [GAP[arm][k] - 0.2, GAP[arm][k] + 0.2]}
            records.append(r)
    return records


def test_differences_from_the_reference_are_welchs_against_scipy(tmp_path):
    """Each figure's interval over seeds is scipy's t.interval, each difference from padding scipy's Welch test;
    the separated arm is significant with the right sign, the overlapping arm is said to be not significant."""
    summary = write_report(seeded_records(), tmp_path, "seeds", [])
    arms = summary["arms"]
    assert summary["reference"] == "" and {row["reference"] for row in arms.values()} == {"padding"}
    assert arms["padding"]["differences"] == {}
    for arm in ("bfd-cross", "bfd-isolated"):
        ci = scipy.stats.t.interval(0.95, 2, loc=sum(VAL[arm]) / 3, scale=scipy.stats.sem(VAL[arm]))
        assert arms[arm]["val_loss_ci"] == pytest.approx(list(ci), rel=1e-9)
        for key, values in (("val_loss", VAL), ("average", SCORE), ("probe_related_minus_unrelated", GAP)):
            d, ref = arms[arm]["differences"][key], scipy.stats.ttest_ind(values[arm], values["padding"],
                                                                          equal_var=False)
            assert d["t"] == pytest.approx(ref.statistic) and d["df"] == pytest.approx(ref.df), (arm, key)
            assert d["ci"] == pytest.approx(tuple(ref.confidence_interval()), rel=1e-9), (arm, key)
    cross, isolated = arms["bfd-cross"]["differences"], arms["bfd-isolated"]["differences"]
    assert cross["val_loss"]["significant"] and cross["val_loss"]["ci"][1] < 0  # lower loss than padding
    assert cross["average"]["significant"] and cross["average"]["ci"][0] > 0  # higher score
    assert cross["probe_related_minus_unrelated"]["significant"] and cross["probe_related_minus_unrelated"]["t"] < -5
    # The negative control: within padding's noise, every interval includes 0.
    assert not any(d["significant"] for d in isolated.values() if d["significant"] is not None)
    md = (tmp_path / "report.md").read_text()
    assert "## Differences from the reference arm" in md
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in md.splitlines()
            if line.startswith("| bfd-")}
    assert rows[("bfd-cross", "padding", "val loss")].endswith(" SE | " + f"{cross['val_loss']['df']:.1f} |")
    assert "not significant" not in rows[("bfd-cross", "padding", "val loss")]
    assert "-0.5167 [" in rows[("bfd-cross", "padding", "val loss")]
    for figure in ("val loss", "a/acc", "benchmark average", "probe: related − unrelated"):
        assert "not significant" in rows[("bfd-isolated", "padding", figure)], figure
    # Per-seed points and the probe's per-seed bootstrap intervals are kept.
    assert "seeds.png" in summary["plots"] and (tmp_path / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert arms["bfd-cross"]["probe_related_minus_unrelated_bootstrap_ci"][1] == pytest.approx([-2.6, -2.2])
    assert "| bfd-cross | 1 | 0.0500 [0.0000, 0.1000] | -2.4000 [-2.5000, -2.3000] | -2.4000 [-2.6000, -2.2000] |" in md
    assert "Each figure: mean over seeds [0, 1, 2] [95% Student-t interval" in md


def test_the_reference_arm_is_study_reference_else_padding_else_the_first_arm():
    records = seeded_records()
    chosen = summarise(records, reference="bfd-isolated")["arms"]
    assert {row["reference"] for row in chosen.values()} == {"bfd-isolated"}
    assert chosen["bfd-isolated"]["differences"] == {} and chosen["padding"]["differences"]["val_loss"]["diff"] \
        == pytest.approx(sum(VAL["padding"]) / 3 - sum(VAL["bfd-isolated"]) / 3)
    assert "study.reference = bfd-isolated" in markdown(summarise(records, "bfd-isolated"), "t", [])
    no_padding = summarise([r for r in records if r["arm"] != "padding"])["arms"]
    assert {row["reference"] for row in no_padding.values()} == {"bfd-cross"}
    with pytest.raises(ValueError, match="study.reference: 'greedy-cross' is not an arm of this study"):
        summarise(records, reference="greedy-cross")
    # The config refuses it before any training; an arm of the paper's setting is one under study.setting=both.
    from raypack.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="study.reference: 'greedy-cross' is not an arm of this study"):
        load_config("jobs/quickstart.yaml", ["pack.arms=[padding, bfd-cross]", "study.reference=greedy-cross"])
    assert load_config("jobs/quickstart.yaml", ["pack.arms=[padding, bfd-cross]", "study.setting=both",
                                                "study.reference=padding+truncate"]).study.reference == "padding+truncate"


def test_one_seed_says_intervals_need_two():
    summary = summarise(seeded_records(seeds=(0,)))
    d = summary["arms"]["bfd-cross"]["differences"]["val_loss"]
    assert d["diff"] == pytest.approx(-0.5) and d["ci"] is None and d["significant"] is None
    assert summary["arms"]["bfd-cross"]["val_loss_ci"] is None
    md = markdown(summary, "t", [])
    assert "One seed per arm: intervals need study.seeds >= 2" in md and "intervals and the significance of " \
        "differences need study.seeds >= 2" in md
    assert "| bfd-cross | padding | val loss | -0.5000 (no interval: one seed) |" in md
    assert not any("significant" in line for line in md.splitlines() if line.startswith("| "))  # no verdict
    # One seed's probe row shows that seed's bootstrap interval; there is no per-seed table.
    assert "| bfd-cross | 32 | 3.0000 | 0.0500 [0.0000, 0.1000] | -2.7000 [-2.8000, -2.6000] |" in md
    assert "Per seed, with the probe's" not in md


def test_the_arm_table_names_each_arms_attention_implementation():
    """auto picks the kernel per arm and machine: the table says which one each arm's runs used, and an arm
    whose seeds ran on different kernels shows both (negative control: they are not merged into one name)."""
    records = [{**RECORDS[0], "attn_implementation": "sdpa"}, {**RECORDS[1], "attn_implementation": "sdpa"},
               {**RECORDS[2], "attn_implementation": "raypack_varlen"},
               {**RECORDS[3], "attn_implementation": "flash_attention_2"}]
    summary = summarise(records)
    assert summary["arms"]["padding"]["attn_implementation"] == "sdpa"
    assert summary["arms"]["bfd-isolated"]["attn_implementation"] == "flash_attention_2/raypack_varlen"
    md = markdown(summary, "t", [])
    assert "| val loss | attention |" in md
    assert md.count("| sdpa |") == 1 and "| flash_attention_2/raypack_varlen |" in md
    assert summarise(RECORDS)["arms"]["padding"]["attn_implementation"] == "?"  # older records: unknown, said so


def test_intervals_of_proportions_stay_within_their_range_and_other_figures_are_not_cut():
    """Exact match near 1 over 3 seeds: the t-interval (scipy's) passes 1, the report's stops at 1 with the same
    mean; a difference of proportions stops at -1 with t and significance unchanged. Negative controls: a
    validation loss's interval below 0 and a perplexity's are left as they are."""
    em = {"padding": [0.85, 1.0, 1.0], "bfd-isolated+related": [0.0, 0.8, 0.43]}
    val = {"padding": [0.05, 0.6, 0.3], "bfd-isolated+related": [1.0, 1.5, 1.2]}
    records = [record(arm, k, 4, 10.0, 1000, 1100, val[arm][k],
                      {"facts/exact_match": em[arm][k], "wiki/word_perplexity": 3.0 * em[arm][k]})
               for arm in em for k in range(3)]
    summary = summarise(records)
    padding, related = summary["arms"]["padding"], summary["arms"]["bfd-isolated+related"]
    t_ci = scipy.stats.t.interval(0.95, 2, loc=sum(em["padding"]) / 3, scale=scipy.stats.sem(em["padding"]))
    assert t_ci[1] > 1 and padding["score:facts/exact_match_ci"] == pytest.approx([t_ci[0], 1.0])
    assert padding["score:facts/exact_match"] == pytest.approx(sum(em["padding"]) / 3)
    d = related["differences"]["score:facts/exact_match"]
    ref = scipy.stats.ttest_ind(em["bfd-isolated+related"], em["padding"], equal_var=False)
    assert ref.confidence_interval()[0] < -1 and d["ci"] == pytest.approx([-1.0, ref.confidence_interval()[1]])
    assert d["t"] == pytest.approx(ref.statistic) and d["significant"] is False
    assert padding["val_loss_ci"][0] < 0  # a loss is not a proportion: not cut
    ppl = 3.0 * sum(em["padding"]) / 3
    assert padding["score:wiki/word_perplexity_ci"][1] > ppl + 0.5  # nor a perplexity (not cut at 1)
    assert padding["average_ci"] == pytest.approx(  # the average mixes in a perplexity: not a proportion
        list(scipy.stats.t.interval(0.95, 2, loc=sum(2.0 * v for v in em["padding"]) / 3,
                                    scale=scipy.stats.sem([2.0 * v for v in em["padding"]]))))
    md = markdown(summary, "cut", [])
    assert "have their intervals cut at 0 and 1" in md and "0.9500 [" in md and ", 1.0000]" in md
