"""Which lm-eval tasks a run scores: presets, 'task:N' specs and the code-execution guard.

Pure: imports neither lm_eval nor ray, so configs and the CLI can resolve and refuse
tasks before anything heavy loads.

    >>> resolve_tasks("paper", ["gsm8k:8", "arc_easy"])[:2]
    [TaskSpec(name='mmlu', num_fewshot=5), TaskSpec(name='gsm8k', num_fewshot=8)]
    >>> resolve_tasks("offline", [])
    [TaskSpec(name='raypack_offline', num_fewshot=None)]

The paper preset uses the task and group names of lm-eval 0.4.13 (tests check each
exists in the installed registry):

    MMLU 5-shot       mmlu              the 57-subject group, 5 dev-split shots
    GSM8K 4-shot      gsm8k             train-split shots with worked answers
    MATH 4-shot       minerva_math      the 4 Minerva prompts (Lewkowycz et al.)
    BBH 3-shot        bbh_cot_fewshot   the 3 chain-of-thought shots of Suzgun et al.
                                        (lm-eval's `bbh` group is the same tasks)
    IFEval 0-shot     ifeval
    HumanEval 0-shot  humaneval         pass@1; runs model-written code. Under a chat
                                        template (chat=True) humaneval_instruct: the
                                        prompt asks for the function and the answer
                                        starts with its signature, since a chat model
                                        does not continue bare code (lm-eval's variant
                                        for instruct models, the Llama-3 evals' prompt)

Headline metrics (HEADLINE_METRICS): lm-eval reports several metrics or filters
for some benchmarks; the study's score of each is the one below, named as result
rows name it ("metric" under lm-eval's filter "none", else "metric,filter"). The
paper's table gives one number per benchmark without naming the variant, so each
is the common practice for chat-tuned models, and every other metric stays in the
full lm-eval result (`raypack eval`):

    benchmark           metric                        why
    mmlu                acc                           the only metric: accuracy over all questions
                                                      (lm-eval's group average, weighted by subject size)
    gsm8k               exact_match,flexible-extract  the last number of the answer; strict-match needs
                                                      the shots' "#### N" form, so it scores a chat model's
                                                      format, not its arithmetic (IFEval measures format)
    minerva_math        exact_match                   Minerva's normalised final-answer equivalence, the
                                                      metric of the prompt's paper (math_verify is newer)
    bbh_cot_fewshot     exact_match,get-answer        the answer after "the answer is", Suzgun et al.'s
                                                      chain-of-thought protocol
    bbh                 exact_match,get-answer        the same tasks as bbh_cot_fewshot
    ifeval              prompt_level_strict_acc       Zhou et al.'s headline: a prompt counts only when
                                                      every instruction in it is followed, checked strictly
    humaneval           pass@1,create_test            Chen et al.'s pass@1, greedy, one sample per problem
    humaneval_instruct  pass@1,create_test            the same, prompted for a chat model

A task without an entry (raypack's offline tasks, any other) scores its first metric.

Code execution (HumanEval): lm-eval scores it by running the code the model wrote,
unsandboxed, on the evaluating node. It runs only when eval.allow_code_execution is
on; then raypack.eval.harness runs the evaluation in a child process without
credentials in its environment (raypack.eval.credentials). With it off (the default,
and every job in jobs/), a preset's code tasks are skipped and said to be
(`eval_tasks`: the paper preset scores its other five benchmarks and its HumanEval
row reads SKIPPED_CODE), while a code task named in eval.tasks, a task YAML or a
group lm-eval marks `unsafe_code` is refused (`refuse_code_execution`): asking for
it by name with the flag off is a mistake to correct, not a row to skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raypack.config import EvalConfig

OFFLINE_GROUP = "raypack_offline"
# The tasks shipped in raypack/assets/eval_tasks (scripts/build_eval_tasks.py writes them).
OFFLINE_TASK_NAMES = (OFFLINE_GROUP, "raypack_arithmetic", "raypack_copy")

# lm-eval task families that execute model-written code (their YAMLs say `unsafe_code: true`).
CODE_EXECUTION_PREFIXES = ("humaneval", "mbpp", "cruxeval", "longproc")
# What a report and `raypack eval` say in a code task's row when eval.allow_code_execution is off.
SKIPPED_CODE = "skipped: allow_code_execution is off (runs model-written code)"


@dataclass(frozen=True)
class TaskSpec:
    """One thing to score: an lm-eval task, group or tag name, or a task YAML path.

    `num_fewshot` None keeps the task's own default; an int sets it on every task
    of a group, 0 included.
    """

    name: str
    num_fewshot: int | None = None

    @classmethod
    def parse(cls, text: str) -> TaskSpec:
        """'gsm8k:4' -> TaskSpec('gsm8k', 4); 'gsm8k' and 'my/task.yaml' keep the default."""
        name, sep, shots = text.strip().rpartition(":")
        if not sep:
            return cls(shots)
        if not name or not shots.isdigit():
            raise ValueError(f"eval.tasks: {text!r} is not 'task' or 'task:N' with N a whole number of shots")
        return cls(name, int(shots))

    @property
    def is_path(self) -> bool:
        """A local task YAML rather than a registered name."""
        return self.name.endswith((".yaml", ".yml"))

    @property
    def is_offline(self) -> bool:
        """One of raypack's own offline tasks (no network, shipped with the package)."""
        return self.name in OFFLINE_TASK_NAMES


PRESETS: dict[str, tuple[TaskSpec, ...]] = {
    "offline": (TaskSpec(OFFLINE_GROUP),),
    "paper": (TaskSpec("mmlu", 5), TaskSpec("gsm8k", 4), TaskSpec("minerva_math", 4),
              TaskSpec("bbh_cot_fewshot", 3), TaskSpec("ifeval", 0), TaskSpec("humaneval", 0)),
    "none": (),
}


# A preset's task and the variant it runs under a chat template (eval.apply_chat_template).
CHAT_VARIANTS = {"humaneval": "humaneval_instruct"}


# The headline metric of each benchmark, as raypack.eval.harness.result_rows names it; why each: the table of the
# module docstring (a test checks the two agree, and that each exists in the installed lm-eval).
HEADLINE_METRICS: dict[str, str] = {
    "mmlu": "acc",
    "gsm8k": "exact_match,flexible-extract",
    "minerva_math": "exact_match",
    "bbh_cot_fewshot": "exact_match,get-answer",
    "bbh": "exact_match,get-answer",
    "ifeval": "prompt_level_strict_acc",
    "humaneval": "pass@1,create_test",
    "humaneval_instruct": "pass@1,create_test",
}


def resolve_tasks(preset: str, tasks: list[str] | tuple[str, ...] = (), chat: bool = False) -> list[TaskSpec]:
    """The preset's tasks (with `chat`, each of CHAT_VARIANTS as its chat variant), then `tasks` ('name' or
    'name:N').

    A task also in the preset replaces the preset's entry in place, so
    `resolve_tasks("paper", ["gsm8k:8"])` runs GSM8K 8-shot; naming a task twice in
    `tasks` is an error.

        >>> [s.name for s in resolve_tasks("paper", chat=True)][-1]
        'humaneval_instruct'
    """
    if preset not in PRESETS:
        raise ValueError(f"eval.preset: unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    specs = [TaskSpec(CHAT_VARIANTS.get(s.name, s.name) if chat else s.name, s.num_fewshot) for s in PRESETS[preset]]
    seen: set[str] = set()
    for text in tasks:
        spec = TaskSpec.parse(text)
        if spec.name in seen:
            raise ValueError(f"eval.tasks: {spec.name!r} is given twice")
        seen.add(spec.name)
        same = [i for i, s in enumerate(specs) if s.name == spec.name]
        if same:
            specs[same[0]] = spec
        else:
            specs.append(spec)
    return specs


def needs_code_execution(name: str) -> bool:
    """Whether the registered lm-eval task `name` runs model-written code."""
    return name.startswith(CODE_EXECUTION_PREFIXES)


def eval_tasks(ev: EvalConfig) -> tuple[list[TaskSpec], dict[str, str]]:
    """What the eval section scores, and the preset's tasks it skips with why ({task: SKIPPED_CODE}).

    With eval.allow_code_execution off, a task of the preset that runs model-written
    code is skipped; a code task named in eval.tasks is refused (ValueError saying what
    to set), as `refuse_code_execution` refuses it.

        >>> from raypack.config import EvalConfig
        >>> specs, skipped = eval_tasks(EvalConfig(preset="paper", apply_chat_template=True))
        >>> [s.name for s in specs], skipped == {"humaneval_instruct": SKIPPED_CODE}
        (['mmlu', 'gsm8k', 'minerva_math', 'bbh_cot_fewshot', 'ifeval'], True)
    """
    specs = resolve_tasks(ev.preset, ev.tasks, chat=ev.apply_chat_template)
    named = {TaskSpec.parse(text).name for text in ev.tasks}
    skipped = {} if ev.allow_code_execution else {
        s.name: SKIPPED_CODE for s in specs if s.name not in named and not s.is_path and needs_code_execution(s.name)}
    specs = [s for s in specs if s.name not in skipped]
    refuse_code_execution(specs, ev.allow_code_execution)
    return specs, skipped


def refuse_code_execution(specs: list[TaskSpec], allow_code_execution: bool, unsafe_tasks: tuple[str, ...] = ()) -> None:
    """Raise if a task would execute model-written code and that is not allowed.

    Named tasks are checked here, before anything loads; the harness adds
    `unsafe_tasks`, the tasks lm-eval marks `unsafe_code` once it has parsed them
    (task YAML paths, groups), before the model is loaded.
    """
    risky = [s.name for s in specs if not s.is_path and needs_code_execution(s.name)]
    risky += [name for name in unsafe_tasks if name not in risky]
    if risky and not allow_code_execution:
        raise ValueError(
            f"{', '.join(risky)} would run code written by the model being evaluated, unsandboxed; set "
            "eval.allow_code_execution=true (in the config or as an override) to allow it (it then runs without "
            "credentials in its environment, docs/cluster.md#what-raypack-trusts), preferably in a sandboxed "
            "container, or drop the task")
