"""What scoring one model on the benchmarks costs, for the bill `raypack plan` and `raypack study` print (pure).

Per benchmark of the paper preset, its size and typical token counts (the test
split lm-eval scores; prompt tokens with the preset's shots under a Llama-3
tokenizer, a multiple-choice task reading its context once per choice; generated
tokens a typical answer, not the generation limit). Planning figures, not an invoice:

    prefill seconds = 2 N x tokens read / (peak x mfu)         compute-bound, like training's forward
    decode seconds  = tokens generated / batch x 2N bytes / HBM bandwidth     memory-bound: one read of
                      the bf16 weights per decoding step of `batch` sequences

N is the parameter count. Spread over G GPUs (model parallel) both take 1/G of the
time on G GPUs, so GPU-hours do not depend on G. Tasks outside the table
(raypack's small offline tasks, your own) are listed as not estimated.

    >>> round(eval_gpu_hours([TaskSpec("gsm8k", 4)], 8.03e9, peak_tflops=989, mfu=0.35, hbm_tbps=3.35,
    ...                      batch_size=8)[0], 4)
    0.0474

The paper preset with the chat template (humaneval_instruct), the defaults of
`plan` and `eval.batch_size` 8, per model: about 1.1 GPU-hours for Llama-3-8B and
9.6 for Llama-3-70B (their published parameter counts, raypack.train.memory):

    >>> from raypack.eval.tasks import resolve_tasks
    >>> paper = resolve_tasks("paper", chat=True)
    >>> [round(eval_gpu_hours(paper, n, 989, 0.35, 3.35, 8)[0], 1) for n in (8_030_261_248, 70_553_706_496)]
    [1.1, 9.6]
"""

from __future__ import annotations

from typing import NamedTuple

from raypack.eval.tasks import TaskSpec


class TaskCost(NamedTuple):
    examples: int  # the scored split's size
    tokens_read: int  # per example: prompt with shots (x choices for multiple choice)
    tokens_generated: int  # per example: a typical answer (0 for log-likelihood tasks)


# MMLU: 14,042 questions x 4 choices of a ~600-token 5-shot prompt; GSM8K: 1,319 problems, 4 worked shots;
# minerva_math: 5,000 problems, 4 Minerva shots; BBH: 6,511 questions over 27 tasks, 3 CoT shots; IFEval: 541
# prompts, long answers; HumanEval: 164 problems.
TASK_COSTS = {
    "mmlu": TaskCost(14_042, 4 * 620, 0),
    "gsm8k": TaskCost(1_319, 850, 150),
    "minerva_math": TaskCost(5_000, 1_000, 300),
    "bbh_cot_fewshot": TaskCost(6_511, 900, 150),
    "ifeval": TaskCost(541, 80, 400),
    "humaneval": TaskCost(164, 150, 200),
    "humaneval_instruct": TaskCost(164, 200, 250),  # the chat variant (eval.apply_chat_template): a user turn
}


def eval_gpu_hours(specs: list[TaskSpec], num_params: float, peak_tflops: float, mfu: float, hbm_tbps: float,
                   batch_size: int) -> tuple[float, list[str]]:
    """GPU-hours of one evaluation of one model on `specs`, and the names of the tasks not estimated."""
    seconds, unknown = 0.0, []
    for spec in specs:
        cost = TASK_COSTS.get(spec.name)
        if cost is None:
            unknown.append(spec.name)
            continue
        prefill = 2 * num_params * cost.examples * cost.tokens_read / (peak_tflops * 1e12 * mfu)
        decode = cost.examples * cost.tokens_generated / batch_size * 2 * num_params / (hbm_tbps * 1e12)
        seconds += prefill + decode
    return seconds / 3600, unknown
