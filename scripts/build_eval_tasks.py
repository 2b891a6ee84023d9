"""Write the offline lm-eval tasks committed in raypack/assets/eval_tasks.

    .venv/bin/python scripts/build_eval_tasks.py [--out raypack/assets/eval_tasks] [--seed 0]

Two small tasks that need no network, grouped as `raypack_offline`:

- `raypack_arithmetic` (multiple_choice, acc and acc_norm): "Question: 23 + 48 =" with
  four numeric choices, one of them the sum. Scored by loglikelihood, so even a
  random-init model gets per-choice scores and a chance-level accuracy near 0.25.
- `raypack_copy` (generate_until, exact_match): "Repeat: blue cat seven" -> the same
  words, greedy decoding stopped at the first newline.

Each task is a YAML plus a JSONL of 80 examples. The YAMLs name their JSONL relative
to their own folder; `raypack.eval.harness` renders them with absolute paths at run
time, because lm-eval resolves `data_files` against the current directory. The
examples come from `random.Random(seed)`, so reruns write the same bytes.
"""

import argparse
import json
import random
from pathlib import Path

import yaml

NUM_EXAMPLES = 80
WORDS = ["red", "blue", "green", "cat", "dog", "bird", "tree", "stone", "river", "one", "two", "three",
         "seven", "moon", "sun", "rain", "book", "door", "fish", "milk"]
REGISTERED_METRIC = {"aggregation": "mean", "higher_is_better": True}


def arithmetic_examples(rng: random.Random, n: int) -> list[dict]:
    """'a + b =' with the sum and three distinct positive wrong sums (off by 1, 2 or 10), shuffled."""
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        total = a + b
        wrong = rng.sample([total + d for d in (-10, -2, -1, 1, 2, 10) if total + d > 0], 3)
        choices = [total, *wrong]
        rng.shuffle(choices)
        rows.append({"question": f"{a} + {b} =", "choices": [str(c) for c in choices],
                     "answer": choices.index(total)})
    return rows


def copy_examples(rng: random.Random, n: int) -> list[dict]:
    """Two to four words to repeat verbatim."""
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))} for _ in range(n)]


def task_configs() -> dict[str, dict]:
    """The lm-eval YAML of each task and of the group, by file name."""
    arithmetic = {
        "task": "raypack_arithmetic",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "raypack_arithmetic.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", **REGISTERED_METRIC}, {"metric": "acc_norm", **REGISTERED_METRIC}],
        "metadata": {"version": 1.0},
    }
    copy = {
        "task": "raypack_copy",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "raypack_copy.jsonl"}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Repeat: {{text}}\nOutput:",
        "doc_to_target": "{{text}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
        # The model's answer starts with the space after "Output:".
        "metric_list": [{"metric": "exact_match", **REGISTERED_METRIC, "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        "metadata": {"version": 1.0},
    }
    group = {"group": "raypack_offline", "task": ["raypack_arithmetic", "raypack_copy"],
             "metadata": {"version": 1.0}}
    return {"raypack_arithmetic.yaml": arithmetic, "raypack_copy.yaml": copy, "raypack_offline.yaml": group}


class _Dumper(yaml.SafeDumper):
    """Double-quotes strings with newlines, so prompts read as written ("...\\nAnswer:")."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)


_Dumper.add_representer(str, _represent_str)
HEADER = ("# Written by scripts/build_eval_tasks.py. data_files is relative to this folder: run it by name\n"
          "# (raypack eval CONFIG eval.tasks=[{name}]), which renders an absolute path; lm-eval alone resolves it "
          "from cwd.\n")
GROUP_HEADER = ("# Written by scripts/build_eval_tasks.py: raypack's offline preset (raypack eval CONFIG "
                "eval.preset=offline).\n")


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "raypack" / "assets" / "eval_tasks"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_jsonl(arithmetic_examples(rng, NUM_EXAMPLES), out / "raypack_arithmetic.jsonl")
    write_jsonl(copy_examples(rng, NUM_EXAMPLES), out / "raypack_copy.jsonl")
    for name, cfg in task_configs().items():
        header = GROUP_HEADER if "group" in cfg else HEADER.format(name=cfg["task"])
        (out / name).write_text(header + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False))
    print(f"wrote {NUM_EXAMPLES} examples per task and {len(task_configs())} YAMLs to {out}")


if __name__ == "__main__":
    main()
