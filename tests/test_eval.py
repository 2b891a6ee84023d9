"""`raypack eval`: task resolution, lm-eval on raypack's offline tasks with the tiny model, Ray and the CLI.

Checkpoints are random-init tiny models saved as Hugging Face folders; nothing
touches the network. Scores are recomputed from lm-eval's logged samples, so a
harness that returned constants or dropped examples would fail.

    .venv/bin/python -m pytest -q tests/test_eval.py
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from raypack.cli import main
from raypack.config import EVAL_PRESETS
from raypack.eval.harness import evaluate, evaluate_on_ray, format_results, task_manager
from raypack.eval.tasks import (
    PRESETS,
    TaskSpec,
    needs_code_execution,
    refuse_code_execution,
    resolve_tasks,
)
from raypack.model import build_tiny_model, load_tokenizer

LIMIT = 12
OFFLINE_ROWS = {("raypack_arithmetic", "acc"), ("raypack_arithmetic", "acc_norm"), ("raypack_copy", "exact_match")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random-init checkpoints for seeds 0 and 1: model and tokenizer saved with save_pretrained."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = load_tokenizer("tiny")
    folders = {}
    for seed in (0, 1):
        folders[seed] = root / f"seed{seed}"
        build_tiny_model(seed=seed).save_pretrained(folders[seed])
        tokenizer.save_pretrained(folders[seed])
    return folders


@pytest.fixture(scope="module")
def offline(checkpoints, tmp_path_factory):
    """The offline preset on both checkpoints, run from a folder unrelated to the repo or the assets."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        return {seed: evaluate(str(folder), resolve_tasks("offline"), limit=LIMIT, log_samples=True)
                for seed, folder in checkpoints.items()}


def scores(result: dict) -> dict:
    return {(r["task"], r["metric"]): r["value"] for r in result["results"]}


def test_offline_preset_scores_every_task_and_metric(offline):
    for result in offline.values():
        assert {(r["task"], r["metric"]) for r in result["results"]} == OFFLINE_ROWS
        for row in result["results"]:
            assert 0.0 <= row["value"] <= 1.0 and math.isfinite(row["stderr"]) and row["num_fewshot"] == 0
        assert result["num_samples"] == {"raypack_arithmetic": LIMIT, "raypack_copy": LIMIT}
        json.dumps({k: v for k, v in result.items()})  # JSON-ready, samples included
    table = format_results(offline[0])
    assert all(task in table and metric in table for task, metric in OFFLINE_ROWS)


def test_scores_equal_what_the_logged_samples_give(offline):
    """acc, acc_norm and exact_match recomputed from each example's logged log-likelihoods and outputs."""
    choice_lls = {}
    for seed, result in offline.items():
        arithmetic, copy = result["samples"]["raypack_arithmetic"], result["samples"]["raypack_copy"]
        assert [s["doc_id"] for s in arithmetic] == list(range(LIMIT)) == [s["doc_id"] for s in copy]
        lls = np.array([[ll for ll, _ in s["filtered_resps"]] for s in arithmetic])
        gold = np.array([s["doc"]["answer"] for s in arithmetic])
        lengths = np.array([[len(c) for c in s["doc"]["choices"]] for s in arithmetic])
        got = scores(result)
        assert got["raypack_arithmetic", "acc"] == pytest.approx(np.mean(lls.argmax(1) == gold))
        assert got["raypack_arithmetic", "acc_norm"] == pytest.approx(np.mean((lls / lengths).argmax(1) == gold))
        matches = [s["filtered_resps"][0].strip() == s["doc"]["text"] for s in copy]
        assert got["raypack_copy", "exact_match"] == pytest.approx(np.mean(matches))
        choice_lls[seed] = lls
    # Scores come from the model: another seed gives other log-likelihoods for the same prompts.
    assert np.abs(choice_lls[0] - choice_lls[1]).max() > 1e-3


def test_exact_match_counts_outputs_equal_to_their_target(offline, checkpoints, tmp_path):
    """A copy-task variant (a task YAML path) whose targets are the model's own greedy outputs on even
    examples and a string it cannot produce on odd ones scores exactly one half."""
    outputs = [s["filtered_resps"][0] for s in offline[0]["samples"]["raypack_copy"]]
    docs = [s["doc"] for s in offline[0]["samples"]["raypack_copy"]]
    rows = [{"text": d["text"], "target": out if i % 2 == 0 else "\u2603 no model writes this"}
            for i, (d, out) in enumerate(zip(docs, outputs))]
    (tmp_path / "variant.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = yaml.safe_load((Path(__file__).parents[1] / "raypack/assets/eval_tasks/raypack_copy.yaml").read_text())
    task.update(task="raypack_copy_variant", doc_to_target="{{target}}",
                dataset_kwargs={"data_files": {"test": str(tmp_path / "variant.jsonl")}})
    (tmp_path / "variant.yaml").write_text(yaml.safe_dump(task))
    result = evaluate(str(checkpoints[0]), [TaskSpec(str(tmp_path / "variant.yaml"))], limit=LIMIT)
    assert scores(result) == {("raypack_copy_variant", "exact_match"): 0.5}


def test_few_shot_count_reaches_every_prompt(checkpoints):
    result = evaluate(str(checkpoints[0]), [TaskSpec("raypack_arithmetic", 2)], limit=4, log_samples=True)
    assert {r["num_fewshot"] for r in result["results"]} == {2}
    for sample in result["samples"]["raypack_arithmetic"]:
        context, _ = sample["arguments"][0]
        assert context.count("Question:") == 3 and context.endswith(f"Question: {sample['doc']['question']}\nAnswer:")


def test_unknown_task_missing_yaml_and_bad_checkpoint_are_value_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="raypack_arithmetc.*did you mean raypack_arithmetic"):
        evaluate(str(checkpoints[0]), [TaskSpec("raypack_offline"), TaskSpec("raypack_arithmetc")])
    with pytest.raises(ValueError, match="no_such_task.yaml"):
        evaluate(str(checkpoints[0]), [TaskSpec(str(tmp_path / "no_such_task.yaml"))])
    with pytest.raises(ValueError, match="no config.json"):
        evaluate(str(tmp_path), resolve_tasks("offline"))


def test_paper_preset_names_exist_in_the_installed_lm_eval():
    assert set(PRESETS) == set(EVAL_PRESETS)
    assert resolve_tasks("paper") == [TaskSpec("mmlu", 5), TaskSpec("gsm8k", 4), TaskSpec("minerva_math", 4),
                                      TaskSpec("bbh_cot_fewshot", 3), TaskSpec("ifeval", 0), TaskSpec("humaneval", 0)]
    index = task_manager(include_defaults=True).task_index
    missing = [s.name for s in resolve_tasks("paper") if s.name not in index]
    assert not missing, f"not in the installed lm-eval: {missing}"
    # bbh_cot_fewshot is lm-eval's `bbh`: the same 3-shot chain-of-thought tasks.
    assert index["bbh"].cfg["task"] == index["bbh_cot_fewshot"].cfg["task"]
    assert index["bbh_cot_fewshot"].cfg["task"][0] == "bbh_cot_fewshot_boolean_expressions"


def test_code_execution_is_refused_before_anything_loads(tmp_path):
    specs = resolve_tasks("paper")
    # The refusal comes first: the missing checkpoint is not even looked at.
    with pytest.raises(ValueError, match="humaneval.*allow_code_execution"):
        evaluate(str(tmp_path / "no_model"), specs)
    refuse_code_execution(specs, allow_code_execution=True)
    with pytest.raises(ValueError, match="mbpp"):
        refuse_code_execution(resolve_tasks("none", ["mbpp:3"]), allow_code_execution=False)
    with pytest.raises(ValueError, match="my_code_task"):
        refuse_code_execution([], False, unsafe_tasks=("my_code_task",))
    # Every task the installed lm-eval marks unsafe_code is caught by name.
    index = task_manager(include_defaults=True).task_index
    unsafe = [name for name, entry in index.items() if (entry.cfg or {}).get("unsafe_code")]
    assert "humaneval" in unsafe and all(needs_code_execution(name) for name in unsafe)


def test_task_specs_and_presets():
    assert TaskSpec.parse("gsm8k:4") == TaskSpec("gsm8k", 4)
    assert TaskSpec.parse("tasks/my_task.yaml") == TaskSpec("tasks/my_task.yaml")
    assert TaskSpec.parse("tasks/my_task.yaml:3").is_path
    with pytest.raises(ValueError, match="gsm8k:four"):
        TaskSpec.parse("gsm8k:four")
    assert resolve_tasks("offline") == [TaskSpec("raypack_offline")]
    assert resolve_tasks("none") == []
    paper = resolve_tasks("paper", ["gsm8k:8", "arc_easy"])
    assert paper[1] == TaskSpec("gsm8k", 8) and paper[-1] == TaskSpec("arc_easy") and len(paper) == 7
    with pytest.raises(ValueError, match="twice"):
        resolve_tasks("none", ["arc_easy", "arc_easy:5"])
    with pytest.raises(ValueError, match="valid presets: offline, paper, none"):
        resolve_tasks("papers")


def test_only_the_harness_imports_lm_eval():
    code = ("import sys, raypack.eval.tasks; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    package = Path(__file__).parents[1] / "raypack"
    importers = [p.relative_to(package).as_posix() for p in package.rglob("*.py")
                 if "import lm_eval" in p.read_text() or "from lm_eval" in p.read_text()]
    assert importers == ["eval/harness.py"]


def test_evaluate_on_ray_gives_the_same_scores(ray_local, checkpoints, offline):
    result = evaluate_on_ray(str(checkpoints[0]), resolve_tasks("offline"), limit=LIMIT, num_cpus=1)
    assert result["results"] == offline[0]["results"] and result["device"] == "cpu"
    assert result["model"] == str(checkpoints[0])


def test_cli_prints_the_table_and_writes_json(checkpoints, tmp_path, capsys):
    out = tmp_path / "scores" / "eval.json"
    settings = [f"eval.model_dir={checkpoints[1]}", f"prepare.output_dir={tmp_path}"]  # no validation split there
    assert main(["eval", "jobs/quickstart.yaml", *settings, "eval.limit=4", "eval.tasks=[raypack_arithmetic:1]",
                 "eval.preset=none", f"eval.out={out}"]) == 0
    written = json.loads(out.read_text())
    assert {(r["task"], r["metric"], r["num_fewshot"]) for r in written["results"]} == {
        ("raypack_arithmetic", "acc", 1), ("raypack_arithmetic", "acc_norm", 1)}
    assert written["num_samples"] == {"raypack_arithmetic": 4}
    assert "raypack_arithmetic" in capsys.readouterr().out
    assert main(["eval", "jobs/quickstart.yaml", *settings, "eval.preset=paper"]) == 2
    assert "humaneval" in capsys.readouterr().err
