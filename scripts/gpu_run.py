"""raypack's own path on one GPU: train, time and score a ~1B Llama, into one JSON rewritten after each part.

Run by scripts/gpu_run.sh (which installs the wheelhouse first and sets PYTHONPATH), from the repository root:

    bash scripts/gpu_run.sh --out $OUT/gpu_run.json                  # the GPU host, after the bundle is copied
    bash scripts/gpu_run.sh --dry-run --out /tmp/gpu_run.json       # CPU, the tiny model, the repo's .venv

Parts, in order (a part that fails records its error and the parts that need it are skipped):
model   scripts/gpu_check.py --save-model: the random-init model the arms train (GPU: hidden 2048, 16 layers,
        vocabulary 32768, 1.1 B parameters, bf16), written once, so raypack and the bare loop train the same
        model; the job (jobs/gpu-1x.yaml) names its folder.
bare    scripts/gpu_check.py --sections arms: the arms in a bare loop (torch AdamW, no Ray, no DeepSpeed) on
        samples of the same length profile: tokens/s, MFU, peak memory per arm.
bench   `raypack bench train` of the job (--no-replay): each arm through Ray Train and DeepSpeed (ZeRO-2, torch's
        AdamW, nothing compiled), one worker: tokens/s, MFU and peak GPU memory over the steps after the first
        (whose time is reported: kernels chosen, caches warmed), the attention and loss implementation each arm
        ran; `vs_bare` is raypack's warm tokens/s over the bare loop's for the arm (target >= 0.9).
zero3   `raypack train` of one arm (bfd-isolated) at ZeRO-3 with gradient checkpointing, 3 steps, exported:
        losses, peak memory, checkpointed_layers (decoder layers recomputing in the backward pass, from the
        run's start event) and the validation loss at its last step.
eval    `raypack eval` of the exported model (the offline lm-eval tasks, and the validation loss on the same
        split): `val_loss_difference` = |eval's - training's|, ok within VAL_TOLERANCE (bf16 training forward
        vs eval's fp32 forward of the bf16 weights).
Also: `forbidden_loaded` (mlflow modules in this process: tracking is off and must import none) and the time
of each part. The dry run takes the same parts on CPU with the dry-run model of gpu_check and small overrides
(DRY_RUN), fp32, 2 steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a plain copy of the repository

JOB = ROOT / "jobs" / "gpu-1x.yaml"
ARMS = ("padding", "padfree", "bfd-isolated", "bfd-cross")
ZERO3_ARM = "bfd-isolated"
VAL_TOLERANCE = 0.05  # nats, |eval's validation loss - training's| (module docstring)
# The dry run: CPU, gloo, fp32, gpu_check's dry-run model (max_position_embeddings 256), few samples and steps.
DRY_RUN = ["train.use_gpu=false", "train.precision=auto", "data.max_seq_len=256", "synth.num_samples=80",
           "data.val_count=8", "train.max_steps=2", "prepare.num_tokenizer_actors=1", "train.worker_cpus=0.5",
           "eval.limit=2", "eval.device=cpu", "eval.batch_size=2"]
DRY_RUN_ARMS = ("padding", "bfd-isolated")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON, rewritten after each part")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: the same parts in a few minutes")
    parser.add_argument("--work-dir", default="", help="runs, prepared data and the model; default out/gpu-1x "
                        "(dry run: a folder beside --out)")
    parser.add_argument("--arms", default="", help="comma separated; default every arm of the job (dry run: "
                        f"{','.join(DRY_RUN_ARMS)})")
    parser.add_argument("--install-seconds", type=float, default=None, help="gpu_run.sh: the bundle's install")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAYPACK_TRACKING", "0")
    out = Path(args.out)
    work = Path(args.work_dir or (out.parent / "gpu_run_work" if args.dry_run else ROOT / "out" / "gpu-1x")).resolve()
    arms = tuple(args.arms.split(",")) if args.arms else (DRY_RUN_ARMS if args.dry_run else ARMS)
    model_dir = work / "init-model"
    overrides = [f"output_dir={work}", f"model.name_or_path={model_dir}", f"prepare.output_dir={work / 'prepared'}",
                 *(DRY_RUN if args.dry_run else [])]
    result = {"dry_run": args.dry_run, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "job": str(JOB.relative_to(ROOT)), "overrides": overrides, "arms": list(arms),
              "install_seconds": args.install_seconds, "environment": environment(), "parts": {}}
    started = time.perf_counter()

    def part(name: str, fn, *needs: str) -> dict | None:
        missing = [n for n in needs if not result.get(n, {}).get("ok")]
        if missing:
            result[name] = {"ok": False, "skipped": f"needs {', '.join(missing)}"}
        else:
            start = time.perf_counter()
            try:
                result[name] = {"ok": True, **fn()}
            except Exception as err:  # noqa: BLE001  (a stopped part is a finding; the JSON keeps the others)
                result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                                "traceback": traceback.format_exc()[-3000:]}
            result[name]["seconds"] = time.perf_counter() - start
        result["parts"][name] = result[name]["ok"]
        result["seconds"] = time.perf_counter() - started
        write(result, out)
        print(f"gpu_run: {name}: {'ok' if result[name]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
        return result[name]

    write(result, out)
    part("model", lambda: save_model(model_dir, args.dry_run))
    part("bare", lambda: bare_loop(work, arms, args.dry_run))
    part("bench", lambda: bench(overrides, work, arms, result.get("bare", {})), "model")
    part("zero3", lambda: zero3(overrides), "model")
    part("eval", lambda: evaluate(overrides, result["zero3"]), "zero3")
    result["forbidden_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")
    result["ok"] = all(result["parts"].values()) and not result["forbidden_loaded"] and \
        result["eval"].get("val_loss_matches") is True
    result["seconds"] = time.perf_counter() - started
    write(result, out)
    print(json.dumps({k: result[k] for k in ("parts", "ok", "seconds")}), flush=True)
    return 0 if result["ok"] else 1


def environment() -> dict:
    try:
        import torch
        import transformers
    except ImportError as err:  # the parts will fail on it too; the JSON still says why
        return {"python": sys.version.split()[0], "error": f"{type(err).__name__}: {err}",
                "pythonpath": os.environ.get("PYTHONPATH", "")}

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            # Absent on the GPU host (hidden in the dry run): asked in a child process, so that this one imports
            # nothing of them and forbidden_loaded stays a real check. ray.dashboard.optional_deps is Ray's own
            # test of its dashboard's extras: where it fails, a local Ray starts without the dashboard.
            "importable": {m: subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True,
                                             check=False).returncode == 0
                           for m in ("mlflow", "aiohttp_cors", "ray.dashboard.optional_deps")}}


def gpu_check(*flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *flags], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"gpu_check {' '.join(flags)}: exit {done.returncode}: {done.stderr[-2000:]}")
    return done


def save_model(model_dir: Path, dry_run: bool) -> dict:
    if not (model_dir / "config.json").is_file():
        gpu_check("--save-model", str(model_dir), *(["--dry-run"] if dry_run else []))
    config = json.loads((model_dir / "config.json").read_text())
    return {"dir": str(model_dir), "hidden_size": config["hidden_size"], "layers": config["num_hidden_layers"],
            "vocab_size": config["vocab_size"], "dtype": config.get("dtype") or config.get("torch_dtype")}


def bare_loop(work: Path, arms: tuple[str, ...], dry_run: bool) -> dict:
    out = work / "gpu_check.json"
    gpu_check("--sections", "arms", "--arms", ",".join(arms), "--out", str(out), *(["--dry-run"] if dry_run else []))
    report = json.loads(out.read_text())
    return {"model": report["model"], "data": report["data"], "arms": report["arms"]}


def bench(overrides: list[str], work: Path, arms: tuple[str, ...], bare: dict) -> dict:
    from raypack.bench.train import bench_train

    report = bench_train(str(JOB), overrides, str(work / "bench"), arms=arms, replay=False)
    for arm, figures in report["arms"].items():
        bare_tps = bare.get("arms", {}).get(arm, {}).get("tokens_per_sec")
        figures["vs_bare"] = figures["warm_tokens_per_sec"] / bare_tps if bare_tps else None
    return report


def zero3(overrides: list[str]) -> dict:
    from raypack.config import load_config
    from raypack.train.launch import train
    from raypack.train.metrics import read_events, read_metrics

    cfg = load_config(str(JOB), [*overrides, "name=gpu-1x-zero3", f"train.arm={ZERO3_ARM}", "train.zero_stage=3",
                                 "train.gradient_checkpointing=true", "train.max_steps=3", "train.export=true"])
    summary = train(cfg)[0]
    metrics = read_metrics(summary["run_dir"])
    start = [e for e in read_events(summary["run_dir"]) if e["event"] == "start"][-1]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    return {"arm": ZERO3_ARM, "run_dir": summary["run_dir"], "model_dir": summary["model_dir"],
            "losses": [m["loss"] for m in metrics], "step_time_s": [m["step_time_s"] for m in metrics],
            "peak_memory_mb": max((m["peak_memory_mb"] or 0) for m in metrics) or None,
            "checkpointed_layers": start.get("checkpointed_layers"),
            "gradient_checkpointing": start.get("gradient_checkpointing"),
            "attn_implementation": start.get("attn_implementation"), "loss_impl": start.get("loss_impl"),
            "val_loss": val[-1] if val else None, "overrides": ["train.zero_stage=3", "train.max_steps=3"]}


def evaluate(overrides: list[str], trained: dict) -> dict:
    from raypack.config import load_config
    from raypack.eval.run import evaluate_checkpoints

    cfg = load_config(str(JOB), [*overrides, f"eval.model_dir={trained['model_dir']}"])
    scores = evaluate_checkpoints(cfg)[trained["model_dir"]]
    eval_val, train_val = scores.get("val_loss"), trained["val_loss"]
    difference = abs(eval_val - train_val) if eval_val is not None and train_val is not None else None
    return {"results": scores.get("results"), "skipped": scores.get("skipped"), "val_loss": eval_val,
            "training_val_loss": train_val, "val_loss_difference": difference, "tolerance": VAL_TOLERANCE,
            "val_loss_matches": difference is not None and difference < VAL_TOLERANCE}


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)  # a run killed mid-write keeps the previous part's JSON whole


if __name__ == "__main__":
    sys.exit(main())
