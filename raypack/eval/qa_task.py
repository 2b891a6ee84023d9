"""An offline lm-eval task scoring held-out questions by exact match of the answer (pure: no lm_eval, no ray).

`write_qa_task(rows, folder, name)` turns single-exchange conversation rows, each
{"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}], ...}
(the held-out split of synthetic facts, raypack.data.synth.facts_heldout), into
<folder>/<name>.jsonl ({"question": Q, "answer": A} per row, in order) and
<folder>/<name>.yaml, a generation task in the style of raypack's offline tasks
(scripts/build_eval_tasks.py):

    task: facts_heldout
    dataset_kwargs: {data_files: {test: /abs/study/tasks/facts_heldout.jsonl}}
    output_type: generate_until
    doc_to_text: question          the user turn as it is (a field, not a Jinja template)
    doc_to_target: answer
    generation_kwargs: {until: ["<|eot_id|>"], max_gen_toks: 12, do_sample: false}
    metric_list: [exact_match, leading and trailing whitespace ignored]
    metadata: {written_by: raypack.eval.qa_task, ...}

How lm-eval's hf backend scores it, and why the answer compares equal:
- the prompt: with eval.apply_chat_template lm-eval renders [user Q] through the
  checkpoint tokenizer's chat template with the generation prompt; raypack's export
  saves the template training rendered with (raypack.model.prepare_export), so the
  prompt is exactly the text training put before the answer, and it starts with
  <|begin_of_text|>, so lm-eval adds no second BOS. Without the template the model
  would see "Q" bare, a prompt it was never trained on: `refuse_without_chat_template`
  refuses that (the harness calls it before the model loads), and the YAML's
  metadata marks the task for it.
- the stop: generation ends at the end-of-turn token training supervised after every
  answer. The exported generation config lists it among its eos ids (so each
  sequence of a batch stops on its own); `until` names it too, and lm-eval adds the
  tokenizer's eos.
- the text: lm-eval decodes the new tokens with skip_special_tokens=True, so
  <|eot_id|> and the pads after it are dropped and "A" is left; exact_match then
  compares it with the answer, whitespace at either end ignored.
- max_gen_toks: the longest answer's length in UTF-8 bytes plus one (the
  end-of-turn token): a byte-level tokenizer spends at least one byte per token, so
  an answer always fits, and a model that runs on is cut off soon.

The data path is absolute (lm-eval resolves a relative one against the current
directory); the study rewrites the task each time it starts, so a moved study
folder gets a fresh path. `is_qa_task` lets the harness load such a task without
lm-eval's built-in registry (it is self-contained: local data, no includes).

    >>> rows = [{"messages": [{"role": "user", "content": "filler what colour lamp?"},
    ...                       {"role": "assistant", "content": "red stone"}]}]
    >>> [r["answer"] for r in qa_docs(rows)]
    ['red stone']

`heldout_task(cfg, folder)` is the wiring `raypack study` and `raypack eval` share:
the config's held-out task, written into `folder`, when its data is synthetic facts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from raypack.eval.tasks import TaskSpec

if TYPE_CHECKING:
    from raypack.config import Config

WRITTEN_BY = "raypack.eval.qa_task"
HELDOUT_TASK = "facts_heldout"
END_OF_TURN = "<|eot_id|>"  # the built-in template's (raypack.data.tokenize.END_OF_TURN)
REGISTERED_METRIC = {"aggregation": "mean", "higher_is_better": True}
HEADER = ("# Written by raypack.eval.qa_task from held-out conversations: the user turn is the prompt, the assistant\n"
          "# turn the answer, scored by exact match. Run it with eval.apply_chat_template=true (as the model was\n"
          "# trained); raypack refuses it otherwise.\n")


def qa_docs(rows: list[dict]) -> list[dict]:
    """{"question": user content, "answer": assistant content} of each row; ValueError unless every row is one
    exchange [user, assistant] with string contents."""
    if not rows:
        raise ValueError("no held-out rows to write a task from; give at least one [user, assistant] conversation")
    docs = []
    for i, row in enumerate(rows):
        messages = row.get("messages")
        roles = [m.get("role") for m in messages] if isinstance(messages, list) else None
        if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"held-out row {i} ({row.get('id', 'no id')}): messages must be exactly one user turn "
                             f"then one assistant turn with string contents, not roles {roles}; give single-exchange "
                             "conversations (a question and its answer)")
        docs.append({"question": messages[0]["content"], "answer": messages[1]["content"]})
    return docs


def task_config(name: str, data_file: Path, max_gen_toks: int, until: tuple[str, ...]) -> dict:
    """The lm-eval YAML of a task `write_qa_task` writes."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "question",
        "doc_to_target": "answer",
        "num_fewshot": 0,
        "generation_kwargs": {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [{"metric": "exact_match", **REGISTERED_METRIC, "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        "metadata": {"version": 1.0, "written_by": WRITTEN_BY, "requires_chat_template": True},
    }


def write_qa_task(rows: list[dict], folder: str | Path, name: str, until: tuple[str, ...] = (END_OF_TURN,)) -> Path:
    """Write <folder>/<name>.jsonl and <folder>/<name>.yaml (module docstring); returns the YAML's path.

    `until`: the text that ends an assistant turn under the template training used
    (raypack.data.tokenize.end_of_turn; the built-in template's by default).
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"task name {name!r}: use letters, digits and underscores, starting with a letter "
                         "(it names the files and the benchmark column)")
    docs = qa_docs(rows)
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    max_gen_toks = max(len(d["answer"].encode()) for d in docs) + 1
    path = folder / f"{name}.yaml"
    path.write_text(HEADER + yaml.safe_dump(task_config(name, data_file, max_gen_toks, until), sort_keys=False))
    return path


class _TaskLoader(yaml.SafeLoader):
    """Reads any lm-eval task YAML: its tags (`!function utils.process_results`) are read as None."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def is_qa_task(spec: TaskSpec) -> bool:
    """Whether `spec` is a task YAML write_qa_task wrote (self-contained; needs the chat template)."""
    if not spec.is_path or not Path(spec.name).is_file():
        return False
    try:
        cfg = yaml.load(Path(spec.name).read_text(), Loader=_TaskLoader)  # a SafeLoader
    except yaml.YAMLError:
        return False  # not ours; lm-eval says what is wrong with it
    return isinstance(cfg, dict) and isinstance(cfg.get("metadata"), dict) and \
        cfg["metadata"].get("written_by") == WRITTEN_BY


def refuse_without_chat_template(specs: list[TaskSpec], apply_chat_template: bool) -> None:
    """ValueError naming the tasks write_qa_task wrote when eval.apply_chat_template is off."""
    tasks = [s.name for s in specs if is_qa_task(s)]
    if tasks and not apply_chat_template:
        raise ValueError(f"{', '.join(tasks)}: held-out questions are scored as the model was trained, through its "
                         "chat template; set eval.apply_chat_template=true (in the config or as an override)")


def has_heldout_questions(cfg: Config) -> bool:
    """Whether the config's data has held-out questions (synthetic facts: synth.task facts, no data.sources)."""
    return not cfg.data.sources and getattr(cfg.synth, "task", None) == "facts"


def check_heldout_task(cfg: Config) -> bool:
    """Whether `heldout_task` will write a task for this config; ValueError when it will and
    eval.apply_chat_template is off (called before anything trains)."""
    if not has_heldout_questions(cfg):
        return False
    _require_chat_template(cfg)
    return True


def _require_chat_template(cfg: Config) -> None:
    if not cfg.eval.apply_chat_template:
        raise ValueError(f"{HELDOUT_TASK}: the facts data's held-out questions are scored through the model's chat "
                         "template, as it was trained; set eval.apply_chat_template=true (in the config or as an "
                         "override)")


def heldout_rows(cfg: Config) -> list[dict] | None:
    """The config's held-out question rows: synthetic facts' held-out split, else None (the data has no held-out
    questions)."""
    if not has_heldout_questions(cfg):
        return None
    from raypack.data.synth import facts_heldout

    return facts_heldout(cfg.synth, cfg.data.tokenizer)


def heldout_task(cfg: Config, folder: str | Path) -> TaskSpec | None:
    """The config's held-out exact-match task (HELDOUT_TASK), written into `folder`; None when its data has no
    held-out questions. ValueError (before anything trains) when eval.apply_chat_template is off."""
    rows = heldout_rows(cfg)
    if rows is None:
        return None
    _require_chat_template(cfg)
    from raypack.data.tokenize import end_of_turn
    from raypack.model import load_tokenizer

    stop = (end_of_turn(load_tokenizer(cfg.data.tokenizer), cfg.data.template) or "").strip()
    return TaskSpec(str(write_qa_task(rows, folder, HELDOUT_TASK, until=(stop,) if stop else ())))
