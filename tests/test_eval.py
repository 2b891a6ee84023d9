"""`raypack eval`: task resolution, lm-eval on raypack's offline tasks with the tiny model, Ray and the CLI.

Checkpoints are random-init tiny models saved as Hugging Face folders; nothing
touches the network. Scores are recomputed from lm-eval's logged samples, so a
harness that returned constants or dropped examples would fail.

    .venv/bin/python -m pytest -q tests/test_eval.py
"""

import doctest
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from raypack.cli import main
from raypack.config import EVAL_PRESETS, EvalConfig
from raypack.eval import tasks as tasks_module
from raypack.eval.credentials import scrubbed_env
from raypack.eval.harness import evaluate, evaluate_in_process, evaluate_on_ray, format_results, task_manager
from raypack.eval.tasks import (
    HEADLINE_METRICS,
    PRESETS,
    SKIPPED_CODE,
    TaskSpec,
    eval_tasks,
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
        return {seed: evaluate(str(folder), resolve_tasks("offline"), EvalConfig(limit=LIMIT), log_samples=True)
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
    result = evaluate(str(checkpoints[0]), [TaskSpec(str(tmp_path / "variant.yaml"))], EvalConfig(limit=LIMIT))
    assert scores(result) == {("raypack_copy_variant", "exact_match"): 0.5}


def test_few_shot_count_reaches_every_prompt(checkpoints):
    result = evaluate(str(checkpoints[0]), [TaskSpec("raypack_arithmetic", 2)], EvalConfig(limit=4), log_samples=True)
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


def declared_in_lm_eval(entry_cfg: dict, metric: str) -> bool:
    """Whether lm-eval's YAML for a task or group reports `metric` ("name" or "name,filter") as raypack's result rows
    name it: a group's aggregate_metric_list, a task's metric_list under one of its filters ("none" without any)."""
    name, _, filter_name = metric.partition(",")
    filter_name = filter_name or "none"
    if "aggregate_metric_list" in entry_cfg:
        return any(m["metric"] == name and m.get("filter_list", "none") in (filter_name, [filter_name])
                   for m in entry_cfg["aggregate_metric_list"])
    filters = [f["name"] for f in entry_cfg.get("filter_list", [])] or ["none"]
    names = set()
    for m in entry_cfg["metric_list"]:
        if str(m["metric"]).endswith("pass_at_k"):  # a function reporting pass@k for each k
            names |= {f"pass@{k}" for k in m["k"]}
        else:
            names.add(m["metric"])
    return name in names and filter_name in filters


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
    # Each benchmark's headline metric (raypack.eval.tasks.HEADLINE_METRICS) is one lm-eval reports for it, and
    # stands in the module docstring's table with its reason; the chat variants are registered too.
    paper = {s.name for s in resolve_tasks("paper")} | {s.name for s in resolve_tasks("paper", chat=True)}
    assert paper <= set(HEADLINE_METRICS) and set(HEADLINE_METRICS) <= set(index)
    for name, metric in HEADLINE_METRICS.items():
        assert declared_in_lm_eval(index[name].cfg, metric), f"{name}: lm-eval reports no {metric}"
        assert f"\n    {name.ljust(19)} {metric.ljust(29)} " in tasks_module.__doc__, f"{name} is not in the table"
    # Negative controls: a filter or metric lm-eval does not report for the task is caught.
    assert not declared_in_lm_eval(index["gsm8k"].cfg, "exact_match,get-answer")
    assert not declared_in_lm_eval(index["ifeval"].cfg, "acc")
    assert not declared_in_lm_eval(index["bbh_cot_fewshot"].cfg, "exact_match")
    assert not declared_in_lm_eval(index["humaneval"].cfg, "pass@10,create_test")


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
    result = evaluate_on_ray(str(checkpoints[0]), resolve_tasks("offline"), EvalConfig(limit=LIMIT, num_cpus=1))
    assert result["results"] == offline[0]["results"] and result["device"] == "cpu"
    assert result["model"] == str(checkpoints[0])


def test_cli_prints_the_table_and_writes_json(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "scores" / "eval.json"
    settings = [f"eval.model_dir={checkpoints[1]}", f"prepare.output_dir={tmp_path}"]  # no validation split there
    # A preset holding a code task, as the paper's holds HumanEval: skipped, and its row says why.
    monkeypatch.setitem(PRESETS, "offline", (TaskSpec("humaneval", 0),))
    assert main(["eval", "jobs/quickstart.yaml", *settings, "eval.limit=4", "eval.tasks=[raypack_arithmetic:1]",
                 "eval.preset=offline", f"eval.out={out}"]) == 0
    written = json.loads(out.read_text())
    assert {(r["task"], r["metric"], r["num_fewshot"]) for r in written["results"]} == {
        ("raypack_arithmetic", "acc", 1), ("raypack_arithmetic", "acc_norm", 1)}
    assert written["num_samples"] == {"raypack_arithmetic": 4}
    assert written["skipped"] == {"humaneval": SKIPPED_CODE}
    printed = capsys.readouterr().out
    assert "raypack_arithmetic" in printed
    row = f"{'humaneval'.ljust(len('raypack_arithmetic'))}  {SKIPPED_CODE}"  # under the table, in its task column
    assert row in printed.splitlines()
    # A code task named in eval.tasks with the flag off is a mistake: refused, saying what to set.
    assert main(["eval", "jobs/quickstart.yaml", *settings, "eval.preset=none", "eval.tasks=[humaneval]"]) == 2
    assert "humaneval would run code written by the model" in capsys.readouterr().err


# ---------------------------------------------------------------- SFT-aware evaluation: the training template

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "system", "content": " Be terse.\n"}, {"role": "user", "content": "Hi  \n\nthere"},
                  {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Count: 1, 2"},
                  {"role": "assistant", "content": "3\n4\n"}]},
    {"messages": [{"role": "user", "content": "Ünïcode → ok?"}, {"role": "assistant", "content": "Ja — klar."},
                  {"role": "user", "content": ""}, {"role": "assistant", "content": "(empty question)"}]},
]


def exported(tokenizer: str, eos_token_id: int):
    """What raypack's export prepares for a model trained with `tokenizer` (data.template auto): the tokenizer to
    save, and the model's generation config."""
    from transformers import GenerationConfig, LlamaConfig

    from raypack.model import prepare_export

    module = SimpleNamespace(config=LlamaConfig(eos_token_id=eos_token_id, pad_token_id=None),
                             generation_config=GenerationConfig(eos_token_id=eos_token_id))
    return prepare_export(module, tokenizer, "auto"), module.generation_config


def prompts_and_training_prefixes(conversation: dict, scorer, trainer, template: str) -> list[tuple[str, str]]:
    """For each assistant turn: the prompt `scorer` renders for the turns before it with the generation prompt (what
    lm-eval's apply_chat_template asks), and the text training rendered (`trainer`, data.template) before it."""
    from raypack.data.tokenize import render_conversation

    text, spans = render_conversation(conversation, trainer, template)
    turns = [i for i, m in enumerate(conversation["messages"]) if m["role"] == "assistant"]
    return [(scorer.apply_chat_template(conversation["messages"][:i], tokenize=False, add_generation_prompt=True),
             text[:start]) for i, (start, _) in zip(turns, spans, strict=True)]


def assert_prompts_as_trained(scorer, trainer, template: str) -> None:
    from raypack.data.tokenize import render_conversation

    for conversation in CONVERSATIONS:
        pairs = prompts_and_training_prefixes(conversation, scorer, trainer, template)
        for prompt, prefix in pairs:
            assert prompt == prefix and prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        text, _ = render_conversation(conversation, trainer, template)
        assert scorer.apply_chat_template(conversation["messages"], tokenize=False) == text
        # lm-eval's gen_prefix: the answer's start, continued in the assistant turn.
        started = [*conversation["messages"][:-1], {"role": "assistant", "content": "Sure,"}]
        assert scorer.apply_chat_template(started, tokenize=False, continue_final_message=True) == \
            pairs[-1][1] + "Sure,"


# Meta-Llama-3-8B-Instruct's own template: the built-in one but for `trim` of every content.
INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_the_exported_tokenizer_prompts_a_model_as_training_rendered_its_conversations(llama3_tokenizer_dir, tmp_path):
    """Llama-3's base tokenizer and the tiny one have no chat template, so training renders with the built-in
    Llama-3 template; the exported tokenizer carries it as Jinja (saved and read back as lm-eval's hf backend reads
    it), and its prompt for every assistant turn is exactly the training rendering before that turn's content (the
    oracle: raypack's own renderer); a tokenizer's own template is kept. Generation stops at the end-of-turn token
    training supervised. Negative controls: the tokenizer as loaded has no template to score with, and another
    template (Llama-3-Instruct's, which trims) gives other prompts."""
    from transformers import AutoTokenizer, GenerationConfig

    from raypack.data.tokenize import BUILTIN_CHAT_TEMPLATE
    from raypack.eval.harness import check_chat_template
    from raypack.model import load_tokenizer

    tiny, generation = exported("tiny", 4)
    tiny.save_pretrained(tmp_path / "tiny")
    generation.save_pretrained(tmp_path / "tiny")
    check_chat_template(str(tmp_path / "tiny"))
    scorer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert scorer.chat_template == BUILTIN_CHAT_TEMPLATE and not load_tokenizer("tiny").chat_template
    assert_prompts_as_trained(scorer, load_tokenizer("tiny"), "auto")
    assert GenerationConfig.from_pretrained(tmp_path / "tiny").eos_token_id == 4  # the tiny eos is <|eot_id|>

    llama3, generation = exported(str(llama3_tokenizer_dir), 128001)  # (its tokenizer loads in seconds: once)
    assert llama3.chat_template == BUILTIN_CHAT_TEMPLATE
    assert_prompts_as_trained(llama3, llama3, "builtin")  # what auto renders without an own template
    assert (llama3.pad_token_id, generation.pad_token_id) == (128001, 128001)  # the eos fallback
    assert generation.eos_token_id == [128001, llama3.convert_tokens_to_ids("<|eot_id|>")]

    own = load_tokenizer("tiny")
    own.chat_template = INSTRUCT_TEMPLATE
    own.save_pretrained(tmp_path / "own")
    kept, _ = exported(str(tmp_path / "own"), 4)
    assert kept.chat_template == INSTRUCT_TEMPLATE  # what training used
    # Negative controls: without the export's template there is nothing to score with; another template differs.
    load_tokenizer("tiny").save_pretrained(tmp_path / "as-loaded")
    with pytest.raises(ValueError, match="no chat template.*apply_chat_template=false"):
        check_chat_template(str(tmp_path / "as-loaded"))
    pairs = prompts_and_training_prefixes(CONVERSATIONS[1], kept, scorer, "auto")
    assert all(prompt != prefix for prompt, prefix in pairs)


def test_lm_eval_prompts_with_the_training_template_system_turn_and_multiturn_shots(checkpoints, tmp_path):
    """lm-eval itself, through raypack's harness, on a tiny model exported as training exports it: the 0-shot
    prompt it scores is exactly raypack's training rendering of [system, user] before the assistant's answer;
    2 shots become 2 user/assistant turns before the question. A checkpoint without a template is refused."""
    from raypack.data.tokenize import render_conversation
    from raypack.model import prepare_export

    model = build_tiny_model(seed=0)
    tokenizer = prepare_export(model, "tiny", "auto")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    ev = EvalConfig(limit=2, apply_chat_template=True, fewshot_as_multiturn=True, system_instruction="Be brief.")
    result = evaluate(str(tmp_path / "model"), [TaskSpec("raypack_arithmetic", 0), TaskSpec("raypack_copy", 2)], ev,
                      log_samples=True)
    assert result["backend"]["apply_chat_template"] and result["backend"]["system_instruction"] == "Be brief."
    for sample in result["samples"]["raypack_arithmetic"]:
        question = f"Question: {sample['doc']['question']}\nAnswer:"
        conversation = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                                     {"role": "assistant", "content": "x"}]}
        text, spans = render_conversation(conversation, load_tokenizer("tiny"), "auto")
        assert {context for context, _ in sample["arguments"]} == {text[:spans[0][0]]}
    for sample in result["samples"]["raypack_copy"]:
        context = sample["arguments"][0][0]
        assert context.count("<|begin_of_text|>") == 1 and context.startswith(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
        assert context.count("<|start_header_id|>user") == 3 and context.count("<|start_header_id|>assistant") == 3
        assert context.endswith(f"Repeat: {sample['doc']['text']}\nOutput:<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="no chat template"):  # the tiny tokenizer saved as it loads
        evaluate(str(checkpoints[0]), resolve_tasks("offline"), ev)


# ---------------------------------------------------------------- headline metric per benchmark


def test_benchmark_scores_picks_the_headline_metric_not_the_first():
    from raypack.eval.scores import benchmark_scores

    result = {"results": [{"task": "gsm8k", "metric": "exact_match,strict-match", "value": 0.1},
                          {"task": "gsm8k", "metric": "exact_match,flexible-extract", "value": 0.2},
                          {"task": "ifeval", "metric": "inst_level_loose_acc", "value": 0.9},
                          {"task": "ifeval", "metric": "prompt_level_strict_acc", "value": 0.3},
                          {"task": "minerva_math", "metric": "math_verify", "value": 0.8},
                          {"task": "minerva_math", "metric": "exact_match", "value": 0.4},
                          {"task": "minerva_math_algebra", "metric": "exact_match", "value": 0.5},
                          {"task": "arc_easy", "metric": "acc", "value": 0.6},
                          {"task": "arc_easy", "metric": "acc_norm", "value": 0.7}],
              "group_subtasks": {"minerva_math": ["minerva_math_algebra"]}}
    specs = [TaskSpec("gsm8k", 4), TaskSpec("ifeval", 0), TaskSpec("minerva_math", 4), TaskSpec("arc_easy")]
    assert benchmark_scores(result, specs) == {
        "gsm8k/exact_match,flexible-extract": 0.2, "ifeval/prompt_level_strict_acc": 0.3,
        "minerva_math/exact_match": 0.4, "arc_easy/acc": 0.6}  # undeclared: its first metric
    # Negative control: the first metric of each would have given other scores.
    first = {t: next(r for r in result["results"] if r["task"] == t) for t in ("gsm8k", "ifeval", "minerva_math")}
    assert all(f"{t}/{r['metric']}" not in benchmark_scores(result, specs) for t, r in first.items())
    # A declared metric lm-eval did not report falls back to the first, and the key says which it is.
    only_strict = {"results": result["results"][:1]}
    assert benchmark_scores(only_strict, [TaskSpec("gsm8k")]) == {"gsm8k/exact_match,strict-match": 0.1}


def test_chat_template_runs_the_paper_presets_chat_variants():
    assert [s.name for s in resolve_tasks("paper", chat=True)] == [
        "mmlu", "gsm8k", "minerva_math", "bbh_cot_fewshot", "ifeval", "humaneval_instruct"]
    assert resolve_tasks("paper", chat=True)[-1] == TaskSpec("humaneval_instruct", 0)
    assert resolve_tasks("none", ["humaneval"], chat=True) == [TaskSpec("humaneval")]  # a named task is as named
    with pytest.raises(ValueError, match="humaneval_instruct.*allow_code_execution"):
        refuse_code_execution(resolve_tasks("paper", chat=True), allow_code_execution=False)


def test_the_presets_code_tasks_are_skipped_unless_allowed_and_named_ones_are_refused():
    specs, skipped = eval_tasks(EvalConfig(preset="paper"))
    assert specs == resolve_tasks("paper")[:5] and skipped == {"humaneval": SKIPPED_CODE}
    specs, skipped = eval_tasks(EvalConfig(preset="paper", apply_chat_template=True))
    assert "humaneval_instruct" not in {s.name for s in specs} and skipped == {"humaneval_instruct": SKIPPED_CODE}
    # Negative control: allowed, nothing is skipped and HumanEval is scored.
    assert eval_tasks(EvalConfig(preset="paper", allow_code_execution=True)) == (resolve_tasks("paper"), {})
    for named in (EvalConfig(preset="paper", tasks=["humaneval:0"]), EvalConfig(preset="none", tasks=["mbpp"])):
        with pytest.raises(ValueError, match=r"(humaneval|mbpp) would run code .* eval.allow_code_execution=true"):
            eval_tasks(named)
    table = format_results({"model": "m", "seconds": 1.0, "results": [
        {"task": "gsm8k", "metric": "exact_match", "num_fewshot": 4, "value": 0.5, "stderr": 0.1}],
        "skipped": {"humaneval_instruct": SKIPPED_CODE}})
    assert table.splitlines()[-1] == f"humaneval_instruct  {SKIPPED_CODE}"


# Model-written code, as lm-eval's code_eval runs it: a process started by the evaluating one runs the doc's program,
# which records what it sees of the environment.
ENV_PROBE_UTILS = """
import subprocess, sys


def process_results(doc, results):
    subprocess.run([sys.executable, "-c", doc["code"]], check=True)
    return {"acc": 1.0}
"""
ENV_PROBE_TASK = """task: raypack_envprobe
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
process_results: !function envprobe_utils.process_results
metric_list:
- metric: acc
  aggregation: mean
  higher_is_better: true
unsafe_code: true
metadata:
  version: 1.0
"""
PLANTED = ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "MY_SERVICE_PASSWORD", "HTTPS_PROXY")


def env_probe_task(folder: Path) -> tuple[TaskSpec, Path]:
    """A task marked unsafe_code whose scoring runs each doc's program; the programs append what they see to
    the returned file: the planted variables, one that is no secret, and the home folder."""
    seen = folder / "seen.jsonl"
    keys = [*PLANTED, "RAYPACK_PROBE_KEPT"]
    code = (f"import json, os; open({str(seen)!r}, 'a').write(json.dumps("
            f"{{**{{k: os.environ.get(k) for k in {keys!r}}}, 'home': os.path.expanduser('~')}}) + '\\n')")
    docs = [{"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)], "answer": 0, "code": code}
            for i in range(2)]
    (folder / "envprobe.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "envprobe_utils.py").write_text(ENV_PROBE_UTILS)
    (folder / "envprobe.yaml").write_text(ENV_PROBE_TASK.format(data=folder / "envprobe.jsonl"))
    return TaskSpec(str(folder / "envprobe.yaml")), seen


def test_model_written_code_runs_only_when_allowed_and_then_without_credentials(checkpoints, tmp_path, monkeypatch,
                                                                                capsys):
    spec, seen = env_probe_task(tmp_path)
    for name in PLANTED:
        monkeypatch.setenv(name, "planted" if name != "HTTPS_PROXY" else "http://user:planted@proxy:3128")
    monkeypatch.setenv("RAYPACK_PROBE_KEPT", "kept")
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")  # load_tasks sets it in this process below; restored after
    with pytest.raises(ValueError, match="raypack_envprobe would run code .*allow_code_execution=true"):
        evaluate(str(checkpoints[0]), [spec], EvalConfig(limit=2))
    assert not seen.exists()  # refused before any code ran

    ev = EvalConfig(limit=2, allow_code_execution=True)
    result = evaluate(str(checkpoints[0]), [spec], ev)
    runs = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(runs) == 2 and all(run[name] is None for run in runs for name in PLANTED)
    assert all(run["RAYPACK_PROBE_KEPT"] == "kept" and run["home"] != str(Path.home()) for run in runs)
    said = capsys.readouterr().out
    assert "runs in a child process without credentials" in said and all(name in said for name in PLANTED)

    # Negative control: the same task run by lm-eval in this process, its environment as it is (what ran before),
    # and its code sees every planted credential and the real home.
    seen.unlink()
    assert evaluate_in_process(str(checkpoints[0]), [spec], ev)["results"] == result["results"]
    runs = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(runs) == 2 and all(run["AWS_SECRET_ACCESS_KEY"] == "planted" and run["home"] == str(Path.home())
                                  for run in runs)


def test_the_scrubbed_environment_keeps_what_evaluation_needs():
    """Exactly the credentials go (both ways: a secret kept or a needed variable dropped fails)."""
    env = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/data/hf", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": "/src", "LANG": "C.UTF-8", "HOME": "/root",
           "AWS_ACCESS_KEY_ID": "x", "AWS_REGION": "us-east-1", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
           "AZURE_CLIENT_SECRET": "x", "HUGGING_FACE_HUB_TOKEN": "x", "MLFLOW_TRACKING_URI": "http://u:p@ml:5000",
           "MLFLOW_TRACKING_PASSWORD": "x", "WANDB_API_KEY": "x", "GITHUB_TOKEN": "x", "OPENAI_API_KEY": "x",
           "DB_PASSWORD": "x", "SSH_AUTH_SOCK": "/tmp/agent", "DATABASE_URL": "postgresql://me:pw@db/x"}
    out, removed = scrubbed_env(env, home="/tmp/h", cache_home="/root/.cache", user_base="/root/.local")
    kept = ["PATH", "CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "PYTHONPATH",
            "LANG"]
    assert all(out[name] == env[name] for name in kept)
    assert removed == sorted(set(env) - set(kept) - {"HOME"})
    assert (out["HOME"], out["XDG_CACHE_HOME"], out["PYTHONUSERBASE"]) == ("/tmp/h", "/root/.cache", "/root/.local")
    assert out["AWS_EC2_METADATA_DISABLED"] == "true" and out["HF_TOKEN_PATH"].startswith("/tmp/h/")
    from raypack.eval import credentials

    assert doctest.testmod(credentials).failed == 0 and doctest.testmod(tasks_module).failed == 0


# ---------------------------------------------------------------- backends: models that do not fit one GPU


def test_each_setting_gives_its_lm_eval_model_arguments_and_ray_resources():
    """raypack.eval.backend.eval_launch, the one translation harness.py uses, against the arguments written out
    by hand from lm-eval's HFLM / VLLM signatures."""
    from raypack.config import ConfigError
    from raypack.eval.backend import eval_launch

    chat = {"apply_chat_template": False, "fewshot_as_multiturn": False, "system_instruction": None}
    one = eval_launch(EvalConfig(num_gpus=1, num_cpus=4), "/m", 4096, on_ray=True)
    assert (one.model, one.model_args, one.device, one.batch_size, one.num_gpus, one.num_cpus, one.chat) == (
        "hf", {"pretrained": "/m", "dtype": "auto"}, "cuda", 8, 1, 4, chat)
    cpu = eval_launch(EvalConfig(), "/m", 4096, on_ray=True)
    assert (cpu.device, cpu.num_gpus, cpu.num_cpus) == ("cpu", 0, 0.5)
    assert eval_launch(EvalConfig(device="cpu"), "/m", 4096, on_ray=False).device == "cpu"
    assert eval_launch(EvalConfig(), "/m", 4096, on_ray=False).device == "auto"  # resolved where torch runs

    spread = eval_launch(EvalConfig(model_parallel=True, num_gpus=8, num_cpus=8, dtype="bfloat16",
                                    apply_chat_template=True, fewshot_as_multiturn=True, system_instruction="Hi"),
                         "/m", 4096, on_ray=True)
    assert (spread.model, spread.model_args, spread.device, spread.num_gpus, spread.num_cpus) == (
        "hf", {"pretrained": "/m", "dtype": "bfloat16", "parallelize": True}, "cuda", 8, 8)
    assert spread.chat == {"apply_chat_template": True, "fewshot_as_multiturn": True, "system_instruction": "Hi"}

    tp = eval_launch(EvalConfig(backend="vllm", num_gpus=8, num_cpus=8), "/m", 2048, on_ray=True)
    assert (tp.model, tp.device, tp.batch_size, tp.num_gpus) == ("vllm", None, "auto", 8)
    assert tp.model_args == {"pretrained": "/m", "dtype": "auto", "tensor_parallel_size": 8, "max_model_len": 2048,
                             "distributed_executor_backend": "mp"}
    single = eval_launch(EvalConfig(backend="vllm", num_gpus=1), "/m", 4096, on_ray=False)
    assert single.model_args == {"pretrained": "/m", "dtype": "auto", "tensor_parallel_size": 1,
                                 "max_model_len": 4096}

    # What cannot run is refused with what to set, for sections built in code too.
    for bad, says in ((EvalConfig(model_parallel=True), "eval.num_gpus to a whole number >= 2"),
                      (EvalConfig(model_parallel=True, num_gpus=1), "eval.num_gpus to a whole number >= 2"),
                      (EvalConfig(backend="vllm"), "eval.num_gpus to a whole number >= 1"),
                      (EvalConfig(backend="vllm", num_gpus=0.5), "eval.num_gpus to a whole number >= 1"),
                      (EvalConfig(backend="vllm", num_gpus=8, model_parallel=True), "drop eval.model_parallel"),
                      (EvalConfig(model_parallel=True, num_gpus=2, device="cpu"), "eval.device=auto or cuda"),
                      (EvalConfig(fewshot_as_multiturn=True), "needs eval.apply_chat_template=true")):
        with pytest.raises(ConfigError, match=says):
            eval_launch(bad, "/m", 4096, on_ray=True)
