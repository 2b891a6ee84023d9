"""`raypack study` on a local Ray cluster: arms matched as asked, report written, resume skips finished arms.

    .venv/bin/pytest tests/test_study.py -q
"""

import json
import math
from pathlib import Path

import pytest

from raypack.config import load_config

ARMS = ["padding", "bfd-isolated"]
HELDOUT_ROWS = [{"messages": [{"role": "user", "content": f"what about the {entity}?"},
                              {"role": "assistant", "content": "red stone"}]} for entity in ("lamp", "door", "ship")]


def study_config(tmp_path, *overrides):
    return load_config("jobs/quickstart.yaml", [
        f"study.out={tmp_path / 'study'}", f"prepare.output_dir={tmp_path / 'prepared'}", "synth.num_samples=120",
        f"output_dir={tmp_path / 'out'}",
        "data.max_seq_len=256", f"pack.arms={json.dumps(ARMS)}", "prepare.num_tokenizer_actors=1", *overrides])


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    from raypack.data.pipeline import prepare

    tmp = tmp_path_factory.mktemp("study-prep")
    cfg = study_config(tmp)
    return tmp, prepare(cfg)


def test_match_steps_gives_every_arm_the_fewest_steps_and_a_fitted_schedule(prepared):
    from raypack.study.run import arm_plan

    tmp, folders = prepared
    plans, notes = arm_plan(study_config(tmp, "study.match=steps", "train.epochs=2"), folders)
    epochs_plans, _ = arm_plan(study_config(tmp, "study.match=epochs", "train.epochs=2"), folders)
    assert {p.train.max_steps for p in epochs_plans.values()} == {0}
    fewest = plans["padding"].train.max_steps
    assert fewest == plans["bfd-isolated"].train.max_steps == plans["bfd-isolated"].train.schedule_steps > 0
    assert "match steps" in notes[0]


def test_match_tokens_gives_packed_arms_fewer_rows_per_step(prepared):
    from raypack.data.prepared import read_manifest
    from raypack.study.run import arm_plan

    tmp, folders = prepared
    plans, _ = arm_plan(study_config(tmp, "study.match=tokens", "train.global_batch_size=32"), folders)
    pad, bfd = (read_manifest(folders[a]) for a in ARMS)
    assert plans["padding"].train.global_batch_size == 32
    tokens_per_step = 32 * pad.num_tokens / pad.num_rows
    bfd_rows = plans["bfd-isolated"].train.global_batch_size
    assert bfd_rows < 32 and bfd_rows % 4 == 0
    # The packed step is the multiple of 4 rows (one pass) closest to padding's tokens per step.
    bfd_row_tokens = bfd.num_tokens / bfd.num_rows
    assert abs(bfd_rows * bfd_row_tokens - tokens_per_step) <= 2 * bfd_row_tokens + 1


@pytest.fixture(scope="module")
def finished_study(ray_local, tmp_path_factory, mlflow_server):
    """One study of both arms, 3 steps each, scored and probed, tracked on a real MLflow server: (its config, its
    folder). Its preset also holds a code task, as the paper's holds HumanEval: skipped (code execution is off).
    Its data also has held-out questions, as synthetic facts have (HELDOUT_ROWS stands in for
    raypack.data.synth.facts_heldout), scored through the chat template as one more benchmark."""
    from raypack.eval import qa_task
    from raypack.eval.tasks import PRESETS, TaskSpec
    from raypack.study.run import run_study

    tmp = tmp_path_factory.mktemp("study")
    # 512 tokens and 40% held out, so the probe finds held-out targets of at most half a row.
    cfg = study_config(tmp, "train.max_steps=3", "eval.limit=4", "data.max_seq_len=512", "data.val_fraction=0.4",
                       "eval.apply_chat_template=true",
                       "tracking.enabled=true", f"tracking.uri={mlflow_server}", "tracking.experiment=study-test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "offline", (*PRESETS["offline"], TaskSpec("humaneval", 0)))
        mp.setattr(qa_task, "heldout_rows", lambda cfg: HELDOUT_ROWS)
        return cfg, run_study(cfg)


def test_study_runs_reports_and_resumes_without_retraining(finished_study, capsys):
    from raypack.study.run import run_study

    cfg, out = finished_study
    report = json.loads((out / "report.json").read_text())
    assert list(report["arms"]) == ARMS
    assert report["tasks"], "offline lm-eval scores missing"
    for arm in ARMS:
        row = report["arms"][arm]
        assert row["steps"] == 3 and math.isfinite(row["val_loss"]) and math.isfinite(row["final_train_loss"])
        assert math.isfinite(row["average"])
        record = json.loads((out / "runs" / arm / "seed0" / "result.json").read_text())
        assert [c["step"] for c in record["curve"]] == [1, 2, 3]
        assert record["curve"][-1]["val_loss"] == pytest.approx(record["val_loss"])
        assert record["attn_implementation"] == row["attn_implementation"] == "sdpa"  # CPU: auto is sdpa
    assert report["arms"]["padding"]["average_delta_vs_reference"] == 0.0
    # The held-out questions: written once into the study, scored for every arm beside the preset's tasks.
    from raypack.eval.qa_task import HELDOUT_TASK

    lines = (out / "tasks" / f"{HELDOUT_TASK}.jsonl").read_text().splitlines()
    assert [json.loads(line)["answer"] for line in lines] == ["red stone"] * len(HELDOUT_ROWS)
    assert f"{HELDOUT_TASK}/exact_match" in report["tasks"] and len(report["tasks"]) > 1
    for arm in ARMS:
        record = json.loads((out / "runs" / arm / "seed0" / "result.json").read_text())
        assert record["scores"][f"{HELDOUT_TASK}/exact_match"] in (0.0, 1 / 3, 2 / 3, 1.0)
    # The preset's code task was skipped, not run: its column says so and the average is the scored tasks' mean.
    # (Under the chat template the preset's humaneval is its chat variant.)
    from raypack.eval.tasks import SKIPPED_CODE

    code = "humaneval_instruct"
    assert report["skipped"] == {code: SKIPPED_CODE} and not any("humaneval" in t for t in report["tasks"])
    for arm in ARMS:
        record = json.loads((out / "runs" / arm / "seed0" / "result.json").read_text())
        assert record["skipped"] == {code: SKIPPED_CODE}
        assert report["arms"][arm]["average"] == pytest.approx(sum(record["scores"].values()) / len(record["scores"]))
    md = (out / "report.md").read_text()
    assert f"| {' | '.join(report['tasks'])} | {code} | average |" in md and "| skipped |" in md
    assert f"{code}: {SKIPPED_CODE}; the average is over the {len(report['tasks'])} benchmarks scored." in md
    for name in ("report.md", "loss_vs_step.png", "loss_vs_time.png", "time_per_arm.png", "score_per_arm.png",
                 "probe.png"):
        assert (out / name).exists(), name
    # The context-reliance probe ran on every arm's model as a Ray task: the same numbers as in process.
    from raypack.eval.probe import probe_model

    record = json.loads((out / "runs" / "bfd-isolated" / "seed0" / "result.json").read_text())
    (val_folder,) = Path(cfg.prepare.output_dir).glob("tok-*/val-*")
    direct = probe_model(record["model_dir"], str(val_folder), cfg.probe, seed=cfg.seed)
    assert record["probe"]["num_samples"] > 0
    for key in ("loss_alone", "delta_unrelated", "delta_related", "related_minus_unrelated"):
        assert record["probe"][key] == pytest.approx(direct[key], rel=1e-6), key
    assert report["arms"]["bfd-isolated"]["probe_delta_related"] == pytest.approx(direct["delta_related"])
    assert "## Context reliance" in (out / "report.md").read_text()
    # Resume: both arms are done, so nothing is trained or evaluated again.
    capsys.readouterr()
    before = {arm: (out / "runs" / arm / "seed0" / "result.json").stat().st_mtime_ns for arm in ARMS}
    run_study(cfg)
    printed = capsys.readouterr().out
    assert printed.count("done before") == 2
    assert before == {arm: (out / "runs" / arm / "seed0" / "result.json").stat().st_mtime_ns for arm in ARMS}


def history(client, run_id: str, key: str) -> dict:
    """step -> value of a run's metric; a step logged twice (replayed after a restore) keeps its later value."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def test_study_is_tracked_in_mlflow(finished_study, mlflow_server, tmp_path):
    """Read back from the server with MlflowClient: the study is a parent run with one child per arm (seed 0);
    each child's per-step metrics equal the arm's metrics.jsonl, its final metrics its result.json, its params
    the resolved config and manifest; the study run holds report.json byte for byte."""
    from mlflow.tracking import MlflowClient

    cfg, out = finished_study
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("study-test")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`raypack.kind` = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.params["pack.arms"] == json.dumps(ARMS)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == [f"{cfg.name}-seed0-{arm}" for arm in sorted(ARMS)]
    report = json.loads((out / "report.json").read_text())
    jsonl = {}
    for child in children:
        arm = child.data.tags["raypack.arm"]
        record = json.loads((out / "runs" / arm / "seed0" / "result.json").read_text())
        metrics = [json.loads(line) for line in (Path(record["model_dir"]).parent / "metrics.jsonl").open()]
        jsonl[arm] = metrics
        assert child.info.status == "FINISHED" and child.data.tags["raypack.seed"] == "0"
        for key in ("loss", "lr", "tokens_per_sec", "padding_fraction", "val_loss", "grad_norm", "num_tokens"):
            assert history(client, child.info.run_id, key) == {m["step"]: m[key] for m in metrics if key in m}, key
        # On CPU MFU is None (no peak to divide by): nothing is logged rather than a made-up number.
        assert not client.get_metric_history(child.info.run_id, "mfu")
        finals = child.data.metrics
        assert finals["final/val_loss"] == record["val_loss"] == report["arms"][arm]["val_loss"]
        assert {k.replace(",", "_"): v for k, v in record["scores"].items()} == \
            {k[len("score/"):]: v for k, v in finals.items() if k.startswith("score/")}
        assert finals["probe/delta_related"] == record["probe"]["delta_related"]
        params = child.data.params
        assert params["train.max_steps"] == "3" and params["manifest.num_rows"] == str(record["manifest"]["num_rows"])
    # Negative control: the two arms' step logs differ, so the equalities above tell the children apart.
    assert jsonl["padding"] != jsonl["bfd-isolated"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.json", "config.json", "loss_vs_step.png", "probe.png"} <= names
    local = client.download_artifacts(parent.info.run_id, "report.json", str(tmp_path))
    assert Path(local).read_bytes() == (out / "report.json").read_bytes()


def test_report_puts_the_study_beside_another_in_one_grid(finished_study, finished_studies, tmp_path, capsys):
    """`raypack report` on this real study, the real study test_fault finished earlier in the session (when it
    ran) and a third one (the paper's 8B TULU job, written by hand as a study leaves it: tests/test_grid.py): each
    real row's figures recomputed from its runs' own logs."""
    from test_grid import CORRECTED, config_of, write_study

    from raypack.cli import main

    cfg, out = finished_study
    other = tmp_path / "paper-8b-tulu"
    write_study(other, config_of("jobs/paper-8b-tulu.yaml", "paper-8b-tulu", list(CORRECTED)), CORRECTED)
    real = [out] + ([finished_studies["fault"]] if "fault" in finished_studies else [])
    assert main(["report", *map(str, real), str(other), "--out", str(tmp_path / "grid")]) == 0
    grid = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert len(grid["rows"]) == len(real) + 1
    rows = {row["study"]: row for row in grid["rows"]}
    ours, paper = rows[cfg.name], rows["paper-8b-tulu"]
    assert (ours["model"], ours["dataset"]) == ("tiny", "synthetic chain text, opensource-1.2m x 120 (seed 0)")
    assert ours["paper_delta"] is None
    assert paper["paper_delta"] == {"random": 0.94, "greedy": 1.59} and ours["hours_unit"] == "CPU worker-hours"
    for folder in real:  # steps and worker-hours from each real study's own metrics.jsonl
        saved = json.loads((folder / "config.json").read_text())
        row = rows[saved["name"]]
        for arm in saved["pack"]["arms"]:
            record = json.loads((folder / "runs" / arm / "seed0" / "result.json").read_text())
            logged = [json.loads(x) for x in (Path(record["model_dir"]).parent / "metrics.jsonl").read_text().splitlines()]
            assert row["arms"][arm]["steps"] == len(logged) == record["steps"]
            seconds = sum(m["step_time_s"] for m in logged)
            assert row["arms"][arm]["device_hours"] == pytest.approx(seconds * saved["train"]["num_workers"] / 3600)
    report = json.loads((out / "report.json").read_text())
    average = {}
    for arm in ARMS:
        record = json.loads((out / "runs" / arm / "seed0" / "result.json").read_text())
        row = ours["arms"][arm]
        assert row["steps"] == 3
        average[arm] = 100 * sum(record["scores"][t] for t in report["tasks"]) / len(report["tasks"])
        assert row["average_points"] == pytest.approx(average[arm])
        assert row["average_points"] == pytest.approx(100 * report["arms"][arm]["average"])  # the study's own rule
    assert ours["arms"]["bfd-isolated"]["delta_points"] == pytest.approx(average["bfd-isolated"] - average["padding"])
    md = (tmp_path / "grid" / "grid.md").read_text()
    assert f"| {cfg.name} | tiny |" in md and "| paper-8b-tulu | meta-llama/Meta-Llama-3-8B |" in md


def test_eval_val_of_an_exported_arm_matches_its_training_time_validation_loss(ray_local, tmp_path):
    """`raypack eval CONFIG eval.model_dir=MODEL eval.val_dir=FOLDER` (one process, from the saved model) gives the number the training
    loop computed on the same split with the DeepSpeed engine at the last step."""
    from raypack.cli import main
    from raypack.train.launch import train

    cfg = study_config(tmp_path, "pack.arms=[bfd-isolated]", "train.max_steps=2")
    (summary,) = train(cfg)
    metrics = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    (val_folder,) = (tmp_path / "prepared").glob("tok-*/val-*")
    out = tmp_path / "eval.json"
    assert main(["eval", "jobs/quickstart.yaml", f"eval.model_dir={summary['model_dir']}", f"eval.val_dir={val_folder}",
                 "eval.preset=none", f"eval.out={out}"]) == 0
    assert json.loads(out.read_text())["val_loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-4)


def test_one_score_per_benchmark_group_aggregate_or_leaf_tasks():
    from raypack.eval.scores import benchmark_scores
    from raypack.eval.tasks import TaskSpec

    offline = {"results": [{"task": "raypack_arithmetic", "metric": "acc", "value": 0.2},
                           {"task": "raypack_arithmetic", "metric": "acc_norm", "value": 0.3},
                           {"task": "raypack_copy", "metric": "exact_match", "value": 0.0}],
               "group_subtasks": {"raypack_offline": ["raypack_arithmetic", "raypack_copy"]}}
    assert benchmark_scores(offline, [TaskSpec("raypack_offline")]) == {
        "raypack_arithmetic/acc": 0.2, "raypack_copy/exact_match": 0.0}
    paper = {"results": [{"task": "mmlu", "metric": "acc", "value": 0.6},
                         {"task": "mmlu_humanities", "metric": "acc", "value": 0.5},
                         {"task": "mmlu_law", "metric": "acc", "value": 0.4},
                         {"task": "gsm8k", "metric": "exact_match,strict-match", "value": 0.3},
                         {"task": "gsm8k", "metric": "exact_match,flexible-extract", "value": 0.35}],
             "group_subtasks": {"mmlu": ["mmlu_humanities"], "mmlu_humanities": ["mmlu_law"]}}
    assert benchmark_scores(paper, [TaskSpec("mmlu", 5), TaskSpec("gsm8k", 4)]) == {
        "mmlu/acc": 0.6, "gsm8k/exact_match,flexible-extract": 0.35}  # the declared headline, not the first
