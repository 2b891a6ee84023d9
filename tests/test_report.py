"""The study report from recorded runs (pure: no Ray).

    .venv/bin/pytest tests/test_report.py -q
"""

import json

import pytest

from raypack.report import summarise, write_report


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
    assert bfd["average_delta_vs_padding"] == pytest.approx(-0.05)
    assert pad["average_delta_vs_padding"] == pytest.approx(0.0)
    assert pad["num_rows"] == 50 and bfd["steps"] == 2


def test_one_seed_has_no_spread_and_missing_values_stay_missing():
    summary = summarise([RECORDS[0], {**RECORDS[2], "val_loss": float("nan"), "scores": {}}])
    assert summary["arms"]["padding"]["val_loss_spread"] is None
    bfd = summary["arms"]["bfd-isolated"]
    assert bfd["val_loss"] != bfd["val_loss"]  # NaN: no value, not zero
    assert bfd["average"] != bfd["average"] and bfd["score:a/acc"] != bfd["score:a/acc"]


def test_write_report_gives_markdown_json_and_plots(tmp_path):
    summary = write_report(RECORDS, tmp_path, "test study", ["note one"])
    md = (tmp_path / "report.md").read_text()
    assert "| padding |" in md and "| bfd-isolated |" in md and "Δ vs padding" in md and "note one" in md
    assert "42.0 ± 2.8" in md  # padding's train time, mean ± spread
    data = json.loads((tmp_path / "report.json").read_text())  # strict JSON: NaN written as null
    assert data["arms"]["bfd-isolated"]["average_delta_vs_padding"] == pytest.approx(-0.05)
    assert sorted(summary["plots"]) == ["loss_vs_step.png", "loss_vs_time.png", "score_per_arm.png",
                                        "time_per_arm.png"]
    for name in summary["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report([{**r, "val_loss": float("nan")} for r in RECORDS[:1]], tmp_path / "nan", "t", [])
    assert json.loads((tmp_path / "nan" / "report.json").read_text())["arms"]["padding"]["val_loss"] is None
