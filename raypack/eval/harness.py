"""lm-evaluation-harness scores of a local checkpoint, in this process or as a Ray task.

    from raypack.config import EvalConfig
    from raypack.eval.tasks import resolve_tasks
    result = evaluate("out/quickstart/model", resolve_tasks("offline"), EvalConfig(limit=20))
    print(format_results(result))
    ev = EvalConfig(num_gpus=8, model_parallel=True, apply_chat_template=True, fewshot_as_multiturn=True,
                    allow_code_execution=True)
    result = evaluate_on_ray("out/paper-70b/model", resolve_tasks("paper", chat=True), ev, max_seq_len=4096)

`model_dir` is a Hugging Face checkpoint folder (config.json, safetensors, tokenizer
files), scored with lm-eval's `hf` backend, or `vllm` (eval.backend); what lm-eval
is given for each setting (model arguments, chat settings, the Ray task's GPUs) comes
from raypack.eval.backend.eval_launch. The result is JSON-ready:

    {"model": "out/quickstart/model", "seconds": 6.1, "limit": 20,
     "results": [{"task": "raypack_arithmetic", "metric": "acc", "value": 0.25, "stderr": 0.099,
                  "num_fewshot": 0}, ...],
     "num_samples": {"raypack_arithmetic": 20, "raypack_copy": 20}, ...}

With eval.allow_code_execution on (HumanEval runs the model's code), the evaluation
runs in a child process, `python -m raypack.eval.harness REQUEST RESULT`, whose
environment has no credentials (evaluate_without_credentials, raypack.eval.credentials).

The only module that imports lm_eval (STYLE.md); it imports it inside functions, after
setting the hub-offline variables that `datasets` and `huggingface_hub` read at import.
raypack's offline tasks are rendered with absolute `data_files` paths, because lm-eval
resolves a task's local files against the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from raypack.config import EvalConfig
from raypack.eval.backend import eval_launch
from raypack.eval.qa_task import is_qa_task, refuse_without_chat_template
from raypack.eval.scores import benchmark_scores
from raypack.eval.tasks import TaskSpec, refuse_code_execution

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

ASSET_DIR = Path(__file__).parents[1] / "assets" / "eval_tasks"
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def evaluate(model_dir: str, specs: list[TaskSpec], ev: EvalConfig | None = None, max_seq_len: int = 4096,
             on_ray: bool = False, log_samples: bool = False) -> dict:
    """Score the checkpoint in `model_dir` on `specs` as the eval section says; one result row per task (and
    group) and metric.

    ev.limit > 0 scores at most that many examples per task (smoke runs);
    `max_seq_len` is the trained length (vllm's max_model_len); `on_ray`: this runs
    as the Ray task evaluate_on_ray started. With `log_samples`, the result also holds
    lm-eval's per-example records under "samples". Unknown task names, missing
    checkpoint files, a checkpoint without the chat template eval.apply_chat_template
    needs, a held-out question task (raypack.eval.qa_task) without
    eval.apply_chat_template and refused code execution are ValueErrors raised before
    the model is loaded.
    With ev.allow_code_execution the evaluation runs in a child process without
    credentials (evaluate_without_credentials), else in this one (evaluate_in_process).
    """
    ev = ev or EvalConfig()
    specs = list(specs)
    if not specs:
        raise ValueError("no tasks to evaluate: choose a preset other than 'none' or name tasks")
    refuse_code_execution(specs, ev.allow_code_execution)
    refuse_without_chat_template(specs, ev.apply_chat_template)
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face checkpoint folder (no config.json); give the folder "
                         "a trained model was saved to")
    run = evaluate_without_credentials if ev.allow_code_execution else evaluate_in_process
    return run(model_dir, specs, ev, max_seq_len, on_ray, log_samples)


def evaluate_in_process(model_dir: str, specs: list[TaskSpec], ev: EvalConfig, max_seq_len: int = 4096,
                        on_ray: bool = False, log_samples: bool = False) -> dict:
    """`evaluate` in this process, with its environment as it is: what `evaluate` runs when no model-written code
    may run, and what the child process of evaluate_without_credentials runs."""
    start = time.perf_counter()
    launch = eval_launch(ev, str(Path(model_dir).resolve()), max_seq_len, on_ray)
    if ev.apply_chat_template:
        check_chat_template(model_dir)
    manager, objects = load_tasks(specs, ev.allow_code_execution)

    import lm_eval

    device = _device(launch.device) if launch.device else None
    out = lm_eval.simple_evaluate(
        model=launch.model, model_args=launch.model_args, tasks=objects, limit=ev.limit or None,
        batch_size=launch.batch_size, device=device, task_manager=manager, log_samples=log_samples,
        confirm_run_unsafe_code=ev.allow_code_execution, **launch.chat)
    result = {
        "model": model_dir,
        "tasks": [{"name": s.name, "num_fewshot": s.num_fewshot} for s in specs],
        "limit": ev.limit,
        "backend": {"model": launch.model, "model_args": launch.model_args, **launch.chat},
        "results": result_rows(out),
        "group_subtasks": {g: list(kids) for g, kids in out.get("group_subtasks", {}).items()},
        "num_samples": {task: n["effective"] for task, n in out.get("n-samples", {}).items()},
        "lm_eval_version": lm_eval.__version__,
        "device": device,
    }
    if log_samples:
        result["samples"] = json.loads(json.dumps(out["samples"], default=_to_json))
    result["seconds"] = time.perf_counter() - start
    return result


def evaluate_without_credentials(model_dir: str, specs: list[TaskSpec], ev: EvalConfig, max_seq_len: int = 4096,
                                 on_ray: bool = False, log_samples: bool = False) -> dict:
    """`evaluate_in_process` in a fresh child process (`python -m raypack.eval.harness`, not a fork: none of
    this process's memory) whose environment has no credentials: raypack.eval.credentials.scrubbed_env, HOME an
    empty temporary folder. lm-eval runs the model's code in processes of that child, so they inherit it.

    The child imports the same raypack as this process and runs in the same folder;
    its ValueErrors are raised here as ValueErrors, any other failure as a
    RuntimeError (its traceback is on stderr).
    """
    import raypack
    from raypack.eval.credentials import scrubbed_env

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raypack-eval-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        env, removed = scrubbed_env(os.environ, str(home), os.environ.get("XDG_CACHE_HOME") or
                                    str(Path.home() / ".cache"), site.getuserbase())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(raypack.__file__).parents[1]), env.get("PYTHONPATH"))
                                            if p)  # the same raypack as this process
        request, answer = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"model_dir": model_dir, "specs": [dataclasses.asdict(s) for s in specs],
                                       "ev": dataclasses.asdict(ev), "max_seq_len": max_seq_len, "on_ray": on_ray,
                                       "log_samples": log_samples}))
        print(f"eval.allow_code_execution: lm-eval runs the model's code, so it runs in a child process without "
              f"credentials: HOME={home} (empty), removed {', '.join(removed) or 'no variables'}", flush=True)
        child = subprocess.run([sys.executable, "-m", "raypack.eval.harness", str(request), str(answer)], env=env,
                               check=False)
        reply = json.loads(answer.read_text()) if answer.is_file() else {}
    if "error" in reply:
        raise ValueError(reply["error"])
    if child.returncode != 0 or "result" not in reply:
        raise RuntimeError(f"the evaluation without credentials (a child process) failed with exit code "
                           f"{child.returncode}; its traceback is above")
    return {**reply["result"], "seconds": time.perf_counter() - start}


def _child(request_path: str, answer_path: str) -> int:
    """The child process of evaluate_without_credentials: the request in, the result (or a ValueError) out."""
    request = json.loads(Path(request_path).read_text())
    specs = [TaskSpec(**s) for s in request["specs"]]
    try:
        result = evaluate_in_process(request["model_dir"], specs, EvalConfig(**request["ev"]), request["max_seq_len"],
                                     request["on_ray"], request["log_samples"])
    except ValueError as err:
        Path(answer_path).write_text(json.dumps({"error": str(err)}))
        return 2
    Path(answer_path).write_text(json.dumps({"result": result}))
    return 0


def evaluate_on_ray(model_dir: str, specs: list[TaskSpec], ev: EvalConfig | None = None, max_seq_len: int = 4096,
                    log_samples: bool = False) -> dict:
    """`evaluate` as one Ray task holding the GPUs and CPUs raypack.eval.backend.eval_launch gives the section
    (eval.num_gpus, all on one node; device cuda when > 0).

    Ray must already be initialized (the CLI calls `raypack.ray_start.ensure_ray`).
    Local paths are made absolute here, so they must be visible from the worker's node.
    """
    import ray

    ev = ev or EvalConfig()
    refuse_code_execution(list(specs), ev.allow_code_execution)
    refuse_without_chat_template(list(specs), ev.apply_chat_template)
    launch = eval_launch(ev, model_dir, max_seq_len, on_ray=True)  # its rules are checked before Ray waits for GPUs
    specs = [TaskSpec(str(Path(s.name).resolve()), s.num_fewshot) if s.is_path else s for s in specs]
    remote = ray.remote(evaluate).options(num_gpus=launch.num_gpus, num_cpus=launch.num_cpus)
    result = ray.get(remote.remote(str(Path(model_dir).resolve()), specs, ev, max_seq_len, on_ray=True,
                                   log_samples=log_samples))
    result["model"] = model_dir
    return result


def score_on_ray(model_dir: str, specs: list[TaskSpec], ev: EvalConfig, max_seq_len: int) -> dict:
    """A checkpoint's benchmark scores as the study and the sweep report them ({"task/metric": value}): lm-eval as
    one Ray task with the eval section's settings and resources (raypack.eval.scores picks the scores)."""
    return benchmark_scores(evaluate_on_ray(model_dir, specs, ev, max_seq_len), specs)


def check_chat_template(model_dir: str) -> None:
    """ValueError unless the checkpoint's tokenizer has a chat template (eval.apply_chat_template renders with it)."""
    from transformers import AutoTokenizer

    if not getattr(AutoTokenizer.from_pretrained(model_dir), "chat_template", None):
        raise ValueError(
            f"{model_dir}: its tokenizer has no chat template, so eval.apply_chat_template cannot prompt the model "
            "as it was trained. A model `raypack train` exports carries the template it was trained with; save "
            "another checkpoint's tokenizer with the template its training used (tokenizer.chat_template, then "
            "save_pretrained into the folder), or set eval.apply_chat_template=false and eval.fewshot_as_multiturn=false")


def load_tasks(specs: list[TaskSpec], allow_code_execution: bool) -> tuple[TaskManager, list]:
    """lm-eval's task registry and the specs' top-level task and group objects, ready to run.

    When every spec is one of raypack's offline tasks or a held-out question task
    (raypack.eval.qa_task: local data, no includes), the hub-offline variables are set
    (they count only before the process first imports lm_eval) and lm-eval's built-in
    registry is not indexed.
    """
    offline = all(s.is_offline or is_qa_task(s) for s in specs)
    if offline:
        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
    manager = task_manager(include_defaults=not offline)
    check_known(specs, manager)
    objects, leaves = [], []
    for spec in specs:
        top, tasks = _load(manager, spec)
        objects += top
        leaves += tasks
    unsafe = tuple(t.task_name for t in leaves if getattr(t, "UNSAFE_CODE", False))
    refuse_code_execution(specs, allow_code_execution, unsafe)
    if unsafe:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # Hugging Face `code_eval` refuses to run without it
    return manager, objects


@functools.cache
def offline_task_dir() -> Path:
    """raypack's task YAMLs with absolute `data_files`, in a folder named after their content.

    Every process renders (or finds) the same files, so nothing is left to clean up;
    files are written under a temporary name and renamed, so concurrent writers are safe.
    """
    rendered = {}
    for path in sorted(ASSET_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files")
        if files:
            cfg["dataset_kwargs"]["data_files"] = {split: str(ASSET_DIR / name) for split, name in files.items()}
        rendered[path.name] = yaml.safe_dump(cfg, sort_keys=False)
    digest = hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"raypack-eval-tasks-{os.getuid()}-{digest}"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        if not (out / name).is_file() or (out / name).read_text() != text:
            tmp = out / f".{name}.{os.getpid()}"
            tmp.write_text(text)
            os.replace(tmp, out / name)
    return out


@functools.cache
def task_manager(include_defaults: bool = True) -> TaskManager:
    """lm-eval's task registry plus raypack's offline tasks, built once per process.

    Indexing lm-eval's ~15k built-in task names takes seconds, so runs of only raypack's
    offline tasks skip it (`include_defaults=False`).
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(offline_task_dir()), include_defaults=include_defaults)


def check_known(specs: list[TaskSpec], manager: TaskManager) -> None:
    """Raise a ValueError naming every spec that is neither a registered name nor an existing YAML."""
    problems = []
    for spec in specs:
        if spec.is_path and not Path(spec.name).is_file():
            problems.append(f"{spec.name} (no such task YAML)")
        elif not spec.is_path and spec.name not in manager.task_index:
            close = difflib.get_close_matches(spec.name, manager.all_tasks, n=3)
            problems.append(spec.name + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if problems:
        raise ValueError(f"unknown lm-eval task(s): {'; '.join(problems)}. Names are lm-eval's task, group or "
                         "tag names (`lm-eval ls tasks`), raypack_offline's tasks, or paths to task YAMLs")


def _load(manager: TaskManager, spec: TaskSpec) -> tuple[list, list]:
    """The spec's top-level lm-eval objects (a group, a task or a tag's tasks) and its leaf tasks.

    A set `num_fewshot` goes on every leaf task, 0 included (lm-eval's own num_fewshot
    argument leaves tasks whose YAML says 0 at 0).
    """
    try:
        loaded = manager.load([spec.name])
    except ImportError as err:  # a task's utils.py imports its own dependencies
        raise ValueError(f"task {spec.name} cannot load: {err}. Install lm-eval's extras for it (pip install "
                         "'lm-eval[ifeval,math]' covers the paper preset)") from err
    children = {name for kids in loaded.get("group_map", {}).values() for name in kids}
    top = [g for name, g in loaded.get("groups", {}).items() if name not in children]
    top += [t for name, t in loaded["tasks"].items() if name not in children]
    if spec.num_fewshot is not None:
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
    return top, list(loaded["tasks"].values())


def result_rows(out: dict) -> list[dict]:
    """One row per task (or group) and metric of lm-eval's results; stderr None where lm-eval has none.

    A metric under a filter other than "none" is named "metric,filter" (gsm8k's
    "exact_match,strict-match"). A group's num_fewshot is its tasks' when they agree.
    """
    shots = _num_fewshot(out)
    rows = []
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue
            rows.append({"task": task, "metric": metric if filter_name == "none" else key,
                         "value": _number(value), "stderr": _number(metrics.get(f"{metric}_stderr,{filter_name}")),
                         "num_fewshot": shots.get(task)})
    return rows


def _num_fewshot(out: dict) -> dict:
    leaves = {task: n for task, n in out.get("n-shot", {}).items() if task not in out.get("group_subtasks", {})}

    def shots(name: str):
        if name not in out.get("group_subtasks", {}):
            return leaves.get(name)
        values = {shots(child) for child in out["group_subtasks"][name]}
        return values.pop() if len(values) == 1 else None

    return {name: shots(name) for name in out["results"]}


def _number(value) -> float | None:
    """lm-eval's number, or None for its "N/A" and missing values."""
    return None if value is None or isinstance(value, str) else float(value)


def _to_json(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)  # numpy values, then anything else


def _device(device: str) -> str:
    """cuda or cpu for "auto" (where torch runs: the Ray task's node), else `device` as it is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_results(result: dict) -> str:
    """The result as a text table: task, metric, shots, value, stderr ("-" where there is none); then a row per
    task skipped (result["skipped"], {task: why}, raypack.eval.tasks.eval_tasks) saying why."""
    header = ["task", "metric", "n-shot", "value", "stderr"]
    cells = [[r["task"], r["metric"], _cell(r["num_fewshot"]), _cell(r["value"]), _cell(r["stderr"])]
             for r in result["results"]]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]

    def line(row: list[str]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    title = f"{result['model']}: {len(cells)} scores in {result['seconds']:.1f} s"
    if result.get("limit"):
        title += f", at most {result['limit']} examples per task"
    skipped = [f"{task.ljust(widths[0])}  {why}" for task, why in result.get("skipped", {}).items()]
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, cells), *skipped])


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":  # evaluate_without_credentials' child process
    sys.exit(_child(*sys.argv[1:]))
