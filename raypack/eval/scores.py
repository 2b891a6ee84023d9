"""One score per benchmark from an lm-eval result, as the paper's table shows them (pure: no lm_eval, no ray).

Both recipes score their models with it: a study arm (raypack.study.run, into
result.json and the report) and a sweep's best trial of each arm
(raypack.tune.sweep, into best_eval.json). `result` is what
raypack.eval.harness.evaluate returns: {"results": [{"task", "metric", "value", ...}],
"group_subtasks": {group: [task, ...]}}.

    >>> result = {"results": [{"task": "mmlu", "metric": "acc", "value": 0.6},
    ...                       {"task": "mmlu_law", "metric": "acc", "value": 0.4},
    ...                       {"task": "gsm8k", "metric": "exact_match,strict-match", "value": 0.3},
    ...                       {"task": "gsm8k", "metric": "exact_match,flexible-extract", "value": 0.35}],
    ...           "group_subtasks": {"mmlu": ["mmlu_law"]}}
    >>> benchmark_scores(result, [TaskSpec("mmlu", 5), TaskSpec("gsm8k", 4)])
    {'mmlu/acc': 0.6, 'gsm8k/exact_match,strict-match': 0.3}
"""

from __future__ import annotations

from pathlib import Path

from raypack.eval.tasks import TaskSpec


def benchmark_scores(result: dict, specs: list[TaskSpec]) -> dict:
    """One score per benchmark, as the paper's table: {"task/metric": value}.

    For each requested task or group: its own first metric when lm-eval reports
    one (a group with an aggregate, e.g. mmlu's acc), else the first metric of each
    leaf task under it (a group without an aggregate, e.g. raypack_offline).
    """
    first: dict[str, tuple[str, float | None]] = {}
    for row in result["results"]:
        first.setdefault(row["task"], (row["metric"], row["value"]))
    groups = result.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        return [leaf for kid in groups[name] for leaf in leaves(kid)] if name in groups else [name]

    scores = {}
    for spec in specs:
        name = Path(spec.name).stem if spec.is_path else spec.name
        chosen = [name] if name in first else leaves(name)
        if spec.is_path and name not in first and name not in groups:  # a YAML's task name differs from its file
            chosen = [t for t in first if not any(t in kids for kids in groups.values()) and t not in groups]
        for task in chosen:
            if task in first:
                metric, value = first[task]
                scores[f"{task}/{metric}"] = value
    return scores
