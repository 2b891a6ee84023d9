"""The held-out question task (raypack.eval.qa_task): the files it writes, its exact-match scores through lm-eval's
hf backend and the chat template, its refusal without the template, and its wiring into `raypack eval`.

A tiny model is trained in-process (plain torch AdamW, no Ray) on 16 question/answer conversations until it
reproduces them, and exported as raypack's training exports; scored on those questions it is right by
construction. Negative controls: the same model and questions with every answer moved to another row, and the
untrained model.

    .venv/bin/python -m pytest -q tests/test_qa_task.py
"""

import contextlib
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raypack.config import EvalConfig, SynthConfig, load_config
from raypack.eval import qa_task
from raypack.eval.harness import evaluate, evaluate_on_ray
from raypack.eval.qa_task import (
    HELDOUT_TASK,
    heldout_task,
    is_qa_task,
    refuse_without_chat_template,
    write_qa_task,
)
from raypack.eval.tasks import TaskSpec

ENTITIES = ["apple", "brick", "cloud", "delta", "ember", "fjord", "grove", "harbor", "island", "jungle", "kettle",
            "lantern", "meadow", "nectar", "orchard", "pebble"]
VALUES = ["red", "blue", "green", "cat", "dog", "bird", "tree", "stone", "river", "moon", "sun", "rain", "book",
          "door", "fish", "milk"]
# Facts rows as raypack.data.synth yields them: each entity's distinct two-word answer.
ROWS = [{"id": f"facts-0-{i}", "topic": entity, "task": "facts",
         "messages": [{"role": "user", "content": f"tell me please what about {entity}?"},
                      {"role": "assistant", "content": f"{VALUES[i]} {VALUES[(5 * i + 3) % 16]}"}]}
        for i, entity in enumerate(ENTITIES)]
# Every answer moved to the next row: all answers differ, so no row keeps its own.
PERMUTED = [{**row, "messages": [row["messages"][0], ROWS[(i + 1) % len(ROWS)]["messages"][1]]}
            for i, row in enumerate(ROWS)]
TRAIN_STEPS = 120  # measured: the loss is below 0.05 and every answer reproduced from ~75 steps at lr 3e-3
CHAT = EvalConfig(apply_chat_template=True)


@contextlib.contextmanager
def one_thread():
    """torch on one thread: on the suite's 2 shared cores, a tiny model's steps on 2 threads take 7x longer."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_until_memorised(model, steps: int = TRAIN_STEPS) -> None:
    """Full-batch AdamW on ROWS, tokenized and padded as training tokenizes and collates them."""
    import torch

    from raypack.data.collate import collate
    from raypack.data.tokenize import tokenize_conversations
    from raypack.model import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    batch = collate(tokenize_conversations(ROWS, tokenizer, 64).samples, "padding", tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"the tiny model did not learn the answers (loss {loss.item():.3f})"


def export(model, folder: Path) -> str:
    """The model saved as raypack/train/loop.py's _export saves it: tokenizer with the training template, pad and
    end-of-turn stop in the configs."""
    from raypack.model import prepare_export

    tokenizer = prepare_export(model, "tiny", "auto")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"trained": the tiny model trained on ROWS, "untrained": the same initialisation}, exported."""
    from raypack.model import build_tiny_model

    root = tmp_path_factory.mktemp("qa-models")
    untrained = export(build_tiny_model(seed=0), root / "untrained")
    model = build_tiny_model(seed=0)
    with one_thread():
        train_until_memorised(model)
    return {"trained": export(model, root / "trained"), "untrained": untrained}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa-tasks")
    return {"right": write_qa_task(ROWS, folder, "qa_right"), "permuted": write_qa_task(PERMUTED, folder, "qa_permuted")}


@pytest.fixture(scope="module")
def scored(models, tasks, tmp_path_factory):
    """lm-eval's hf backend, through the chat template, run from a folder unrelated to the tasks': the trained model
    on both tasks and the untrained one on the right answers, samples logged."""
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.chdir(tmp_path_factory.mktemp("elsewhere"))
        both = [TaskSpec(str(tasks["right"])), TaskSpec(str(tasks["permuted"]))]
        return {"trained": evaluate(models["trained"], both, CHAT, log_samples=True),
                "untrained": evaluate(models["untrained"], both[:1], CHAT, log_samples=True)}


def scores(result: dict) -> dict:
    return {(r["task"], r["metric"]): r["value"] for r in result["results"]}


def test_the_task_files_hold_the_rows_and_a_greedy_exact_match_task(tasks):
    lines = tasks["right"].with_suffix(".jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in ROWS]
    cfg = yaml.safe_load(tasks["right"].read_text())
    data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data == tasks["right"].with_suffix(".jsonl")
    assert (cfg["task"], cfg["output_type"], cfg["doc_to_text"], cfg["doc_to_target"], cfg["test_split"]) == \
        ("qa_right", "generate_until", "question", "answer", "test")
    longest = max(len(r["messages"][1]["content"].encode()) for r in ROWS)
    assert cfg["generation_kwargs"] == {"until": ["<|eot_id|>"], "max_gen_toks": longest + 1, "do_sample": False}
    assert [m["metric"] for m in cfg["metric_list"]] == ["exact_match"]
    assert cfg["metric_list"][0]["regexes_to_ignore"] == ["^\\s+", "\\s+$"]
    assert is_qa_task(TaskSpec(str(tasks["right"])))
    # Negative controls: raypack's own copy task (another generation task) is not one, nor a task whose YAML uses
    # lm-eval's !function tag (read, not refused), nor one that is not YAML.
    assert not is_qa_task(TaskSpec(str(Path(qa_task.__file__).parents[1] / "assets/eval_tasks/raypack_copy.yaml")))
    other = tasks["right"].parent / "other.yaml"
    other.write_text("task: other\nprocess_results: !function utils.process_results\nmetadata: {version: 1.0}\n")
    assert not is_qa_task(TaskSpec(str(other)))
    other.write_text("task: [unclosed\n")
    assert not is_qa_task(TaskSpec(str(other)))
    other.unlink()


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "q"}], "roles \\['user'\\]"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "roles \\['assistant', 'user'\\]"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "roles \\['system'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], "string contents"),
])
def test_rows_that_are_not_one_exchange_are_refused(tmp_path, messages, problem):
    with pytest.raises(ValueError, match=f"held-out row 1 \\(x\\).*{problem}"):
        write_qa_task([ROWS[0], {"id": "x", "messages": messages}], tmp_path, "qa")
    with pytest.raises(ValueError, match="no held-out rows"):
        write_qa_task([], tmp_path, "qa")
    with pytest.raises(ValueError, match="task name 'qa task'"):
        write_qa_task(ROWS, tmp_path, "qa task")
    assert not list(tmp_path.iterdir())


def test_a_model_right_by_construction_scores_one_and_wrong_or_untrained_models_zero(scored):
    """The trained model answers every question as it was trained (1.0); the same outputs against answers moved
    to other rows score 0.0, and so does the untrained model. Each score is recomputed from the logged outputs."""
    trained, untrained = scored["trained"], scored["untrained"]
    assert scores(trained) == {("qa_right", "exact_match"): 1.0, ("qa_permuted", "exact_match"): 0.0}
    assert scores(untrained) == {("qa_right", "exact_match"): 0.0}
    right, permuted = (sorted(trained["samples"][t], key=lambda s: s["doc_id"]) for t in ("qa_right", "qa_permuted"))
    assert [s["filtered_resps"][0].strip() for s in right] == [r["messages"][1]["content"] for r in ROWS]
    # The control changes only the targets: the model wrote the same answers to the same prompts.
    assert [s["filtered_resps"] for s in permuted] == [s["filtered_resps"] for s in right]
    assert all(s["filtered_resps"][0].strip() != s["target"] for s in untrained["samples"]["qa_right"])


def test_lm_eval_prompts_with_the_tokens_training_put_before_each_answer(scored):
    """The context lm-eval generated from, encoded as its hf backend encodes it (no BOS added: the template's own
    starts it), is exactly the training tokens before the answer's first target (the oracle: raypack's tokenizer)."""
    from raypack.data.tokenize import IGNORE_INDEX, tokenize_conversations
    from raypack.model import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    samples = tokenize_conversations(ROWS, tokenizer, 64).samples
    logged_samples = sorted(scored["trained"]["samples"]["qa_right"], key=lambda s: s["doc_id"])
    for logged, sample in zip(logged_samples, samples, strict=True):
        context = logged["arguments"][0][0]
        first_target = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
        assert tokenizer.encode(context, add_special_tokens=False) == list(sample["input_ids"][:first_target])
        assert context.startswith(tokenizer.bos_token) and context.count(tokenizer.bos_token) == 1


def test_the_task_is_refused_without_the_chat_template(models, tasks):
    spec = TaskSpec(str(tasks["right"]))
    for run in (evaluate, evaluate_on_ray):  # evaluate_on_ray refuses before Ray starts
        with pytest.raises(ValueError, match="qa_right.yaml: held-out questions.*set eval.apply_chat_template=true"):
            run(models["trained"], [spec], EvalConfig(apply_chat_template=False))
    # Negative control: the same check lets a task that is not one through.
    refuse_without_chat_template([TaskSpec("raypack_copy")], apply_chat_template=False)


def quickstart(tmp_path, *overrides):
    return load_config("jobs/quickstart.yaml", [f"output_dir={tmp_path / 'out'}",
                                                f"prepare.output_dir={tmp_path / 'prepared'}", *overrides])


def test_raypack_eval_scores_the_held_out_questions_of_facts_data(models, tmp_path, monkeypatch):
    """`raypack eval` (evaluate_checkpoints) on a config whose data has held-out questions (the stand-in for
    synth.task=facts gives ROWS) writes the task under output_dir and scores it beside the preset's tasks:
    1.0 for the trained model. Controls: words data gets no such task; the task without the chat template is
    refused before anything is scored."""
    from raypack.eval.run import evaluate_checkpoints

    words = quickstart(tmp_path, f"eval.model_dir={models['trained']}", "eval.preset=none",
                       "eval.apply_chat_template=true")
    assert qa_task.heldout_rows(words) is None and heldout_task(words, tmp_path / "none") is None
    sourced = dataclasses.replace(words, synth=SimpleNamespace(task="facts"),
                                  data=dataclasses.replace(words.data, sources=["x.jsonl"]))
    assert qa_task.heldout_rows(sourced) is None  # given data files: the synth section is not used

    monkeypatch.setattr(qa_task, "heldout_rows", lambda cfg: ROWS)
    with one_thread():
        results = evaluate_checkpoints(words)
    (result,) = results.values()
    assert scores(result) == {(HELDOUT_TASK, "exact_match"): 1.0}
    written = Path(words.output_dir) / "tasks" / words.name / f"{HELDOUT_TASK}.yaml"
    assert result["tasks"] == [{"name": str(written), "num_fewshot": None}] and is_qa_task(TaskSpec(str(written)))
    off = dataclasses.replace(words, eval=dataclasses.replace(words.eval, apply_chat_template=False))
    with pytest.raises(ValueError, match="facts_heldout: .*set eval.apply_chat_template=true"):
        evaluate_checkpoints(off)


@pytest.mark.skipif(not hasattr(SynthConfig(), "task"), reason="synth.task (the facts generator) is not merged yet")
def test_facts_data_gives_its_held_out_split_as_the_task(tmp_path):
    from raypack.data.synth import facts_heldout

    cfg = quickstart(tmp_path, "synth.task=facts", "eval.apply_chat_template=true")
    rows = qa_task.heldout_rows(cfg)
    assert rows and rows == facts_heldout(cfg.synth, cfg.data.tokenizer)
    spec = heldout_task(cfg, tmp_path / "tasks")
    lines = Path(spec.name).with_suffix(".jsonl").read_text().splitlines()
    assert [json.loads(line)["answer"] for line in lines] == [r["messages"][1]["content"] for r in rows]
