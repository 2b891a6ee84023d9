"""How lm-eval scores a checkpoint: its model backend, model arguments, prompt settings and Ray resources (pure).

One function, `eval_launch`, turns the eval section into everything
raypack.eval.harness hands to `lm_eval.simple_evaluate` and to `ray.remote`, so that
the translation is tested without lm-eval, Ray or a GPU:

    >>> launch = eval_launch(EvalConfig(model_parallel=True, num_gpus=8, apply_chat_template=True), "m", 4096,
    ...                      on_ray=True)
    >>> launch.model, launch.model_args, launch.device, launch.num_gpus
    ('hf', {'pretrained': 'm', 'dtype': 'auto', 'parallelize': True}, 'cuda', 8)
    >>> launch = eval_launch(EvalConfig(backend="vllm", num_gpus=8), "m", 4096, on_ray=True)
    >>> launch.model_args["tensor_parallel_size"], launch.model_args["max_model_len"], launch.batch_size
    (8, 4096, 'auto')

Models that do not fit one GPU run as ONE Ray task holding `eval.num_gpus` GPUs,
which Ray places on one node (a task's GPUs are never split over nodes):

    hf + model_parallel  lm-eval's `parallelize=True`: accelerate's device_map "auto"
                         spreads the layers over every GPU the task sees (Ray sets
                         CUDA_VISIBLE_DEVICES to the task's GPUs). Layers run one
                         GPU after another, so it is slow, but needs nothing beyond
                         the hf path the tests run.
    vllm                 tensor parallel over the task's GPUs (`tensor_parallel_size`
                         = eval.num_gpus), max_model_len = data.max_seq_len (the
                         length the model was trained on), vLLM's own batching
                         ("auto"). Its workers are processes of the task
                         (`distributed_executor_backend: mp`): a Ray executor would
                         ask Ray for GPUs the task already holds and wait forever.

The chat settings (`eval.apply_chat_template`, `fewshot_as_multiturn`,
`system_instruction`) go to simple_evaluate unchanged; both backends render with
the checkpoint tokenizer's own chat template, which raypack's export sets to the
template training used (raypack.model.prepare_export).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raypack.config import EvalConfig, validate_eval


@dataclass(frozen=True)
class EvalLaunch:
    """What one lm-eval run of a checkpoint is given."""

    model: str  # lm-eval's model type: "hf" or "vllm"
    model_args: dict  # its model_args
    device: str | None  # simple_evaluate's device; "auto" is resolved where torch runs, None leaves it to vLLM
    batch_size: int | str
    num_gpus: float  # the Ray task's resources (when it runs as one)
    num_cpus: float
    chat: dict = field(default_factory=dict)  # apply_chat_template, fewshot_as_multiturn, system_instruction


def eval_launch(ev: EvalConfig, model_dir: str, max_seq_len: int, on_ray: bool) -> EvalLaunch:
    """The lm-eval model, its arguments, the prompt settings and the Ray resources for scoring `model_dir`.

    `on_ray`: the run is a Ray task holding ev.num_gpus GPUs (device cuda when > 0,
    else cpu); otherwise it runs in this process on ev.device. The eval section's
    rules are checked first (raypack.config.validate_eval), for sections built in code.
    """
    validate_eval(ev)
    chat = {"apply_chat_template": ev.apply_chat_template, "fewshot_as_multiturn": ev.fewshot_as_multiturn,
            "system_instruction": ev.system_instruction or None}
    resources = {"num_gpus": ev.num_gpus, "num_cpus": ev.num_cpus, "chat": chat}
    if ev.backend == "vllm":
        gpus = int(ev.num_gpus)
        args = {"pretrained": model_dir, "dtype": ev.dtype, "tensor_parallel_size": gpus,
                "max_model_len": max_seq_len, **({"distributed_executor_backend": "mp"} if gpus > 1 else {})}
        return EvalLaunch("vllm", args, None, "auto", **resources)
    args = {"pretrained": model_dir, "dtype": ev.dtype, **({"parallelize": True} if ev.model_parallel else {})}
    if on_ray:
        device = "cuda" if ev.num_gpus > 0 else "cpu"
    else:
        device = "cuda" if ev.model_parallel else ev.device
    return EvalLaunch("hf", args, device, ev.batch_size, **resources)
