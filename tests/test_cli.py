"""The `raypack` commands end to end on small inputs.

    .venv/bin/pytest tests/test_cli.py -q
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raypack import cli
from raypack.cli import COMMANDS, main

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
    arms, val = report["arms"], report["validation"]
    # Every arm packs the same samples, the input's but the validation split's (jobs/compare.yaml holds out 10%,
    # as prepare does); all but random keep every supervised token.
    assert 0 < val["num_val_conversations"] < 300 and val["num_val_samples"] > 0
    assert {a["num_tokens"] for a in arms.values()} == {tok["num_tokens"] - val["num_val_tokens"]}
    train_supervised = tok["num_supervised_tokens"] - val["num_val_supervised_tokens"]
    for name in ("padding", "greedy-cross", "bfd-isolated", "bfd-cross"):
        assert arms[name]["num_supervised_tokens"] == train_supervised
    assert arms["random-cross"]["num_supervised_tokens"] <= train_supervised
    assert arms["padding"]["num_rows"] == tok["num_samples"] - val["num_val_samples"]
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
    assert main(["synth", "jobs/compare.yaml", "synth.preset=tulu-326k", "synth.num_samples=25", "synth.seed=1",
                 f"synth.out={out}"]) == 0
    assert main(["synth", "jobs/compare.yaml", f"output_dir={tmp_path}", "synth.num_samples=3"]) == 0
    assert len((tmp_path / "synth" / "opensource-1.2m-3-seed0.jsonl").read_text().splitlines()) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    # facts: num_entities * per_entity rows, and the held-out rows beside them.
    capsys.readouterr()
    assert main(["synth", "jobs/compare.yaml", "synth.task=facts", "synth.num_entities=30", "synth.per_entity=2",
                 f"synth.out={tmp_path / 'f.jsonl'}"]) == 0
    assert "60 held-out conversations" in capsys.readouterr().out
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 60
    heldout = [json.loads(line) for line in (tmp_path / "f.heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 60 and {r["task"] for r in heldout} == {"facts"}


def test_bench_pack_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "pack", "jobs/compare.yaml", "synth.num_samples=2000", "data.max_seq_len=2048", "--no-trl",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["strategies"]) == {"padding", "random", "greedy", "bfd"}
    assert "bfd" in capsys.readouterr().out


def test_bench_loader_prints_and_writes_json_and_cleans_up(tmp_path, capsys):
    out, work = tmp_path / "b.json", tmp_path / "work"
    assert main(["bench", "loader", "jobs/compare.yaml", "data.max_seq_len=256", "train.num_workers=1", "--sizes",
                 "50,200", "--fetches", "20", "--old-fetches", "3", "--work-dir", str(work), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["num_rows"] for r in result["results"]] == [50, 200]
    assert all(r["fetch_ms_median"] > 0 and r["pss_mb"] > 0 and r["old_fetch_ms_median"] > 0
               for r in result["results"])
    assert "fetch_ratio" in result and "target <= 1.2" in capsys.readouterr().out
    assert list(work.iterdir()) == []  # the arms are removed without --keep


# ---------------------------------------------------------------- user errors: one line, exit 2; bugs: a traceback


def one_line_error(rc, err: str) -> str | None:
    """The line of a user error as the CLI must report it (exit code 2, one line on stderr, no traceback);
    None when the failure is not that, e.g. a bug's traceback."""
    lines = err.strip("\n").splitlines()
    return lines[0] if rc == 2 and len(lines) == 1 and "Traceback" not in err else None


def command_argv(command, *args: str) -> list[str]:
    """`raypack <command> <args>`; no command has a required flag, so only `args` can be wrong."""
    assert not any(options.get("required") for _, options in command.flags)
    return [*command.name.split(), *args]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_every_command_names_a_missing_config_or_folder_in_one_line(command, tmp_path, capsys):
    missing = str(tmp_path / ("no-sweep" if command.config == "none" else "missing.yaml"))
    line = one_line_error(main(command_argv(command, missing)), capsys.readouterr().err)
    assert line and line.startswith(f"raypack {command.name}: error: {missing}: no such"), line
    assert "give" in line  # what to do


BROKEN = {  # how a config goes wrong -> what the one line must name
    "bad yaml": ("data:\n  max_seq_len: [1024\n", [], "not valid YAML"),
    "not a mapping": ("- a\n- b\n", [], "top level must be a mapping"),
    "unknown key in the file": ("pack:\n  windw: 3\n", [], "pack.windw"),
    "unknown override key": ("name: x\n", ["probe.num_sample=3"], "probe.num_sample"),
    "bad override value": ("name: x\n", ["probe.num_samples=many"], "probe.num_samples: expected int"),
    "override not valid yaml": ("name: x\n", ["pack.arms=[padding"], "not valid YAML"),
    "not key=value": ("name: x\n", ["pack.window"], "is not key=value"),
    "a moved key": ("study:\n  probe_samples: 3\n", [], "study.probe_samples is now probe.num_samples"),
    "a URI where a path is written": ("name: x\n", ["sweep.out=s3://b/sweep"], "sweep.out 's3://b/sweep' is a URI"),
}


@pytest.mark.parametrize("case", BROKEN)
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.config != "none"], ids=lambda c: c.name)
def test_a_broken_config_is_one_line_for_every_command(command, case, tmp_path, capsys):
    text, overrides, says = BROKEN[case]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    line = one_line_error(main(command_argv(command, str(path), *overrides)), capsys.readouterr().err)
    assert line and says in line, line


def test_missing_checkpoints_and_splits_of_eval_and_probe_are_one_line(tmp_path, capsys):
    job = ["jobs/quickstart.yaml", f"train.storage_path={tmp_path / 'runs'}", f"prepare.output_dir={tmp_path}"]
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    cases = [
        (["eval", *job, f"eval.model_dir={tmp_path / 'nope'}"], f"{tmp_path / 'nope'}: no Hugging Face checkpoint"),
        (["probe", *job, f"eval.model_dir={tmp_path / 'nope'}"], "give eval.model_dir="),
        (["probe", *job, "train.arm=bfd-cross"], f"{tmp_path / 'runs'}/quickstart-bfd-cross/raypack/model: no "
                                                  "Hugging Face checkpoint there (no config.json); train it first"),
        (["eval", *job, f"eval.model_dir={checkpoint}", f"eval.val_dir={tmp_path / 'nope'}"],
         "eval.val_dir: " + str(tmp_path / "nope") + " holds no prepared split"),
        (["eval", *job, f"eval.model_dir={checkpoint}", "eval.preset=none"], "nothing to evaluate"),
        (["probe", *job, f"eval.model_dir={checkpoint}"], "the probe needs held-out samples"),
        (["probe", *job, f"eval.model_dir={checkpoint}", "probe.num_samples=0"], "nothing to probe"),
        (["analyze", str(tmp_path)], "no trials found"),
    ]
    for argv, says in cases:
        line = one_line_error(main(argv), capsys.readouterr().err)
        assert line and says in line, (argv, line)


def test_a_bad_flag_is_one_line_that_points_to_the_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["probe", "jobs/quickstart.yaml", "--num-samples", "3"])
    line = one_line_error(stop.value.code, capsys.readouterr().err)
    assert line == ("raypack probe: error: unrecognized arguments: --num-samples 3; settings are config keys "
                    "(KEY=VALUE), see raypack probe --help")
    with pytest.raises(SystemExit) as stop:
        main(["bench"])
    assert one_line_error(stop.value.code, capsys.readouterr().err) == (
        "raypack bench: error: the following arguments are required: BENCH; see raypack bench --help")
    # Overrides may also follow a flag.
    out = tmp_path / "plan.json"
    assert main(["plan", "jobs/quickstart.yaml", "--json", str(out), f"output_dir={tmp_path}", "name=late"]) == 0
    assert json.loads(out.read_text())["config"]["name"] == "late"


def test_help_documents_the_keys_a_command_reads_from_their_declarations(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "probe.num_samples (int, default 256): held-out targets to probe" in out
    assert "eval.model_dir (str, default '')" in out and "probe.out (str" in out and "--num-samples" not in out


def test_settings_are_config_keys_not_flags():
    """eval, probe and synth take every setting, their output file included, as config keys: no flags."""
    flags = {c.name: {names[0] for names, _ in c.flags} for c in COMMANDS}
    assert flags["eval"] == flags["probe"] == flags["synth"] == set()
    assert all(c.config == "required" for c in COMMANDS if c.name not in ("analyze", "report", "config"))


ROOT = Path(__file__).parents[1]
BUG = """import dataclasses, sys
from raypack import cli
def bug(cfg, args):
    raise RuntimeError("a bug, not a user error")
cli.COMMANDS = tuple(dataclasses.replace(c, run=bug) if c.name == "config" else c for c in cli.COMMANDS)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_the_real_entry_point_prints_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    """The same detector on the process a user runs; and its negative control: a command that raises a bug's
    exception is not swallowed into one line (the detector sees the traceback)."""
    run = lambda *argv: subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    user = run("-m", "raypack.cli", "study", "missing.yaml")
    assert one_line_error(user.returncode, user.stderr) == (
        "raypack study: error: missing.yaml: no such config file; give the path of a YAML config such as "
        "jobs/quickstart.yaml"), user.stderr
    bug = run("-c", BUG, "config", "jobs/quickstart.yaml")
    assert one_line_error(bug.returncode, bug.stderr) is None
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
    fine = run("-c", BUG, "config", "missing.yaml")  # the bug is in the command: a user error still comes first
    assert one_line_error(fine.returncode, fine.stderr)


def test_in_process_a_bug_propagates(monkeypatch):
    def bug(cfg, args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "COMMANDS", tuple(dataclasses.replace(c, run=bug) for c in COMMANDS))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["compare", "jobs/compare.yaml"])


def test_study_setting_reaches_eval_and_is_refused_by_sweep(tmp_path, capsys):
    """eval/probe look for the models of study.setting's arms; a sweep, which tunes its own arm list, refuses a
    setting rather than ignore it."""
    from raypack.config import ConfigError, load_config
    from raypack.eval.run import checkpoints

    cfg = load_config("jobs/quickstart.yaml", [f"output_dir={tmp_path}", "study.setting=paper"])
    with pytest.raises(ConfigError, match=r"train.arm=padding\+truncate"):
        checkpoints(cfg)  # the paper's first arm, not quickstart's padding: nothing trained yet
    assert main(["sweep", "jobs/sweep-quick.yaml", f"output_dir={tmp_path}", "study.setting=paper"]) == 2
    assert "a sweep tunes sweep.arms" in capsys.readouterr().err


@pytest.mark.parametrize("command", [c for c in COMMANDS if any(n in ("--json", "--out", "--work-dir")
                                                               for names, _ in c.flags for n in names)],
                         ids=lambda c: c.name)
def test_a_uri_in_an_output_flag_is_one_line(command, tmp_path, capsys):
    """--json / --out / --work-dir are written with file operations: a URI there is refused before anything runs,
    naming the flag. Negative control: a path in the same flag goes on to the next check (a missing config)."""
    (names, _), = [(names, o) for names, o in command.flags if names[0] in ("--json", "--out", "--work-dir")][:1]
    config = [] if command.config == "none" else [str(tmp_path / "missing.yaml")]
    argv = command_argv(command, *config, names[0], "s3://bucket/x")
    if command.config == "none":
        argv.insert(len(command.name.split()), str(tmp_path))
    line = one_line_error(main(argv), capsys.readouterr().err)
    assert line and f"{names[0]} 's3://bucket/x' is a URI" in line, line
    argv[argv.index("s3://bucket/x")] = str(tmp_path / "x")
    line = one_line_error(main(argv), capsys.readouterr().err)
    assert "is a URI" not in (line or "")
