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
    {'mmlu/acc': 0.6, 'gsm8k/exact_match,flexible-extract': 0.35}

Which metric counts for each benchmark is declared, with the reason, in
raypack.eval.tasks (HEADLINE_METRICS and the table of its docstring): GSM8K's
flexible-extract above, though lm-eval reports strict-match first.
"""

from __future__ import annotations

from pathlib import Path

from raypack.eval.tasks import HEADLINE_METRICS, TaskSpec


def benchmark_scores(result: dict, specs: list[TaskSpec]) -> dict:
    """One score per benchmark, as the paper's table: {"task/metric": value}.

    For each requested task or group: its headline metric (HEADLINE_METRICS) when it
    declares one and lm-eval reported it, else its own first metric when lm-eval
    reports one (a group with an aggregate), else the same for each leaf task under
    it (a group without an aggregate, e.g. raypack_offline). The key names the
    metric used, so a fallback is visible.
    """
    reported: dict[str, dict[str, float | None]] = {}
    for row in result["results"]:
        reported.setdefault(row["task"], {}).setdefault(row["metric"], row["value"])
    groups = result.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        return [leaf for kid in groups[name] for leaf in leaves(kid)] if name in groups else [name]

    scores = {}
    for spec in specs:
        name = Path(spec.name).stem if spec.is_path else spec.name
        chosen = [name] if name in reported else leaves(name)
        if spec.is_path and name not in reported and name not in groups:  # a YAML's task name differs from its file
            chosen = [t for t in reported if not any(t in kids for kids in groups.values()) and t not in groups]
        for task in chosen:
            if task in reported:
                metrics = reported[task]
                metric = HEADLINE_METRICS.get(task)
                metric = metric if metric in metrics else next(iter(metrics))
                scores[f"{task}/{metric}"] = metrics[metric]
    return scores
