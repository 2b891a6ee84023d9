"""The `raypack` commands end to end on small inputs.

    .venv/bin/pytest tests/test_cli.py -q
"""

import json
import shutil
from pathlib import Path

from raypack.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def test_compare_on_synthetic_data_reconciles(tmp_path, capsys):
    rc = main(["compare", "jobs/compare.yaml", f"output_dir={tmp_path}", "synth.num_samples=300",
               "data.max_seq_len=1024"])
    assert rc == 0
    out = capsys.readouterr().out
    for arm in ("padding", "random-cross", "greedy-cross", "bfd-isolated", "bfd-cross"):
        assert arm in out
    report = json.loads((tmp_path / "compare" / "compare.json").read_text())
    tok = report["tokenize"]
    assert report["num_input_rows"] == 300 == tok["num_conversations"]
    arms = report["arms"]
    # Every arm packs the same samples; all but random keep every supervised token.
    assert {a["num_tokens"] for a in arms.values()} == {tok["num_tokens"]}
    for name in ("padding", "greedy-cross", "bfd-isolated", "bfd-cross"):
        assert arms[name]["num_supervised_tokens"] == tok["num_supervised_tokens"]
    assert arms["random-cross"]["num_supervised_tokens"] <= tok["num_supervised_tokens"]
    assert arms["padding"]["num_rows"] == tok["num_samples"]
    assert arms["bfd-isolated"]["num_rows"] <= 1.01 * arms["bfd-isolated"]["lower_bound_rows"]
    assert (tmp_path / "compare" / "config.yaml").exists()


def test_compare_on_real_formats_with_bad_rows(tmp_path, capsys):
    for name in ("alpaca_small.json", "sharegpt_small.json", "glaive_toolcall_small.json", "bad_rows.jsonl"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    rc = main(["compare", "jobs/compare.yaml", f"output_dir={tmp_path}", f"data.sources=[{tmp_path}]",
               "data.max_seq_len=512", "pack.arms=[padding, bfd-isolated]"])
    assert rc == 0
    report = json.loads((tmp_path / "compare" / "compare.json").read_text())
    rejected = [json.loads(line) for line in (tmp_path / "compare" / "rejected.jsonl").read_text().splitlines()]
    assert report["num_rejected_rows"] == len(rejected) > 0
    assert report["num_input_rows"] == report["tokenize"]["num_conversations"] + len(rejected)
    assert {r["reason"] for r in rejected} >= {"unparseable_json", "unknown_role", "empty_content"}


def test_strict_mode_fails_with_file_and_row(tmp_path, capsys):
    shutil.copy(FIXTURES / "bad_rows.jsonl", tmp_path / "bad_rows.jsonl")
    rc = main(["compare", "jobs/compare.yaml", f"output_dir={tmp_path}",
               f"data.sources=[{tmp_path / 'bad_rows.jsonl'}]", "data.strict=true"])
    assert rc == 2
    assert "bad_rows.jsonl:3" in capsys.readouterr().err


def test_config_errors_exit_2_and_name_the_key(capsys):
    assert main(["compare", "jobs/compare.yaml", "pack.windw=3"]) == 2
    assert "pack.windw" in capsys.readouterr().err


def test_synth_writes_messages_jsonl(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["synth", "--preset", "tulu-326k", "--num-samples", "25", "--seed", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25 and all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_bench_pack_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "pack", "--num-samples", "2000", "--max-seq-len", "2048", "--no-trl",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["strategies"]) == {"padding", "random", "greedy", "bfd"}
    assert "bfd" in capsys.readouterr().out


def test_bench_loader_prints_and_writes_json_and_cleans_up(tmp_path, capsys):
    out, work = tmp_path / "b.json", tmp_path / "work"
    assert main(["bench", "loader", "--sizes", "50,200", "--max-seq-len", "256", "--fetches", "20",
                 "--old-fetches", "3", "--workers", "1", "--work-dir", str(work), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["num_rows"] for r in result["results"]] == [50, 200]
    assert all(r["fetch_ms_median"] > 0 and r["pss_mb"] > 0 and r["old_fetch_ms_median"] > 0
               for r in result["results"])
    assert "fetch_ratio" in result and "target <= 1.2" in capsys.readouterr().out
    assert list(work.iterdir()) == []  # the arms are removed without --keep
