"""`raypack study`: every arm prepared, trained, evaluated and compared on the same data, model and seeds.

    raypack study jobs/quickstart.yaml [key=value ...]

1. prepare every arm of pack.arms (or of the paper's setting, or both: study.setting)
   from one tokenization pass, with one shared validation split
   (raypack.data.pipeline; reused when already prepared); an arm's over-length policy
   is its +truncate/+split/+drop suffix, else data.overlength;
2. fit the arms to the comparison asked for (study.match):
     epochs  every arm trains train.epochs epochs (the paper);
     steps   every arm takes the fewest optimizer steps any arm takes, its LR
             schedule spanning exactly those steps;
     tokens  every arm's optimizer step holds about as many real tokens as a
             padding step (train.global_batch_tokens, see raypack.train.plan);
3. per seed (train.seed, train.seed + 1, ...) and arm: train on Ray Train
   (validation loss every train.eval_every_steps, about 10 points by default),
   export the model, score it with lm-eval (eval.*) as a Ray task (the
   preset's HumanEval skipped, and recorded as skipped, unless
   eval.allow_code_execution; with synthetic facts data also the held-out
   questions by exact match, a task written into <study>/tasks at the start,
   raypack.eval.qa_task), run the
   context-reliance probe on the held-out split (probe.*,
   raypack.eval.probe), and write <study>/runs/<arm>/seed<k>/result.json;
4. report.md, report.json and PNG plots in <study> (raypack.study.report).

A study that stops resumes where it was: an arm with a result.json is not run
again, and a half-trained arm resumes from its latest checkpoint (Ray Train).
With RAY_ADDRESS set it runs on that cluster, else on a local Ray instance.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from raypack.config import Config, setting_configs, to_dict
from raypack.data.pipeline import prepare
from raypack.data.prepared import read_manifest
from raypack.eval.harness import score_on_ray
from raypack.eval.qa_task import heldout_task
from raypack.eval.tasks import eval_tasks
from raypack.ray_start import ensure_ray
from raypack.study.report import describe_data, write_report
from raypack.tracking import Run, numeric, open_run
from raypack.train.launch import arm_config, run_name, train_arm
from raypack.train.metrics import read_metrics
from raypack.train.plan import EVAL_POINTS, run_plan
from raypack.train.resume import Preempted


def study_dir(cfg: Config) -> Path:
    return Path(cfg.study.out or Path(cfg.output_dir) / "study" / cfg.name).resolve()


def arm_plan(cfg: Config, folders: dict) -> tuple[dict[str, Config], list[str]]:
    """Each arm's config under study.match, and notes saying what was matched."""
    train = cfg.train
    manifests = {arm: read_manifest(folders[arm]) for arm in cfg.pack.arms}
    notes = []
    if cfg.study.match == "tokens" and not train.global_batch_tokens:
        # Padding's tokens per step, else a full row's worth per global-batch row.
        ref = manifests.get("padding")
        tokens = round(train.global_batch_size * (ref.num_tokens / ref.num_rows if ref else cfg.data.max_seq_len))
        train = replace(train, global_batch_tokens=tokens)
        notes.append(f"match tokens: every optimizer step holds about {tokens:,} real tokens "
                     "(padding's step of train.global_batch_size rows).")
    if cfg.study.match == "steps":
        # Each arm's steps under the run plan train_arm applies (rows per step, train.global_batch_tokens).
        fewest = min(run_plan(train, cfg.optim, m, train.num_workers).total_steps for m in manifests.values())
        train = replace(train, max_steps=fewest, schedule_steps=fewest)
        notes.append(f"match steps: every arm takes {fewest} optimizer steps (the fewest of any arm at "
                     f"{cfg.train.epochs} epochs), its LR schedule spanning them.")
    elif cfg.study.match == "epochs":
        notes.append(f"match epochs: every arm trains {cfg.train.epochs} epochs, so packed arms take fewer, "
                     "larger steps (the paper's setting).")
    plans = {arm: arm_config(replace(cfg, train=replace(train, export=True)), folders[arm], EVAL_POINTS)
             for arm in manifests}
    return plans, notes


def run_study(cfg: Config) -> Path:
    """Run (or resume) the study; returns its folder."""
    out = study_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    # bad task names and refused code tasks fail before any training; the preset's code tasks are skipped
    specs, skipped = eval_tasks(cfg.eval)
    heldout = heldout_task(cfg, out / "tasks")  # facts data: its held-out questions, one more benchmark column
    specs += [heldout] if heldout else []
    ensure_ray()
    folders, plans, notes = {}, {}, []
    for variant in setting_configs(cfg):  # study.setting=both: the paper's arms reuse the tokenized cache
        folders.update(prepare(variant))
        variant_plans, variant_notes = arm_plan(variant, folders)
        plans.update(variant_plans)
        notes += [f"{variant.study.setting} setting: {note}" if cfg.study.setting == "both" else note
                  for note in variant_notes]
    if cfg.train.use_gpu:
        from raypack.train.plan_report import study_bill

        print("raypack study: " + "\n".join(study_bill(plans, folders, cfg.study.seeds)), flush=True)
    parent = open_run(cfg.tracking, cfg.output_dir, out, f"study {cfg.name}", "study", params=to_dict(cfg))
    records = []
    try:
        for k in range(cfg.study.seeds):
            seed = cfg.train.seed + k
            for arm, arm_cfg in plans.items():
                records.append(_run_arm(arm_cfg, arm, seed, folders, specs, skipped, out, parent))
    except BaseException as e:
        if parent:
            parent.end("KILLED" if isinstance(e, (Preempted, KeyboardInterrupt)) else "FAILED")
        raise
    title = f"raypack study {cfg.name}: padding or packing?"
    notes = [f"Data: {describe_data(to_dict(cfg))}; model {cfg.model.name_or_path}; "
             f"max_seq_len {cfg.data.max_seq_len}; {cfg.train.num_workers} workers; "
             f"validation: {read_manifest(folders['val']).num_rows} held-out samples, the same for every arm.",
             *[_setting_note(variant) for variant in setting_configs(cfg)], *notes]
    write_report(records, out, title, notes, cfg.study.reference)
    if parent:
        parent.log_artifacts([out / "config.json", *sorted(out.glob("report.*")), *sorted(out.glob("*.png"))])
        parent.end()
    print(f"study report: {out / 'report.md'}", flush=True)
    return out


def _setting_note(cfg: Config) -> str:
    what = {"paper": "the paper's setting (its arms' over-length policies, window, loss and match)",
            "corrected": "as configured"}[cfg.study.setting]
    return (f"Arms {', '.join(cfg.pack.arms)}: {what}; pack.window {cfg.pack.window}, loss_reduction "
            f"{cfg.train.loss_reduction}, match {cfg.study.match}.")


def _run_arm(cfg: Config, arm: str, seed: int, folders: dict, specs: list, skipped: dict, out: Path,
             parent: Run | None) -> dict:
    """Train, evaluate and record one (arm, seed); reuses a finished result.json. `specs` and `skipped`: what
    eval_tasks scores and skips. Its MLflow run is a child of the study's (`parent`): the loop's steps, then the
    scores and the probe as metrics."""
    result_path = out / "runs" / arm / f"seed{seed}" / "result.json"
    if result_path.exists():
        print(f"[{arm} seed {seed}] done before: {result_path}", flush=True)
        return json.loads(result_path.read_text())
    run_cfg = replace(cfg, name=f"{cfg.name}-seed{seed}",
                      train=replace(cfg.train, seed=seed, storage_path=cfg.train.storage_path or str(out / "train")))
    tracking = open_run(cfg.tracking, cfg.output_dir, result_path.parent, run_name(run_cfg, arm), "study arm",
                        parent=parent, tags={"raypack.arm": arm, "raypack.seed": seed,
                                             "raypack.setting": cfg.study.setting})
    start = time.perf_counter()
    summary = train_arm(run_cfg, arm, folders[arm], folders["val"], tracking)
    fit_seconds = time.perf_counter() - start
    metrics = read_metrics(summary["run_dir"])
    scores = score_on_ray(summary["model_dir"], specs, run_cfg.eval, run_cfg.data.max_seq_len) if specs else {}
    probe = _probe(run_cfg, summary["model_dir"], folders["val"]) if cfg.probe.num_samples else None
    elapsed, curve = 0.0, []
    for m in metrics:
        elapsed += m["step_time_s"]
        curve.append({"step": m["step"], "loss": m["loss"], "time_s": elapsed,
                      **({"val_loss": m["val_loss"]} if "val_loss" in m else {})})
    record = {
        "arm": arm, "setting": cfg.study.setting, "seed": seed, "steps": len(metrics), "fit_seconds": fit_seconds,
        "train_seconds": sum(m["step_time_s"] for m in metrics),
        "samples": sum(m["num_samples"] for m in metrics), "tokens": sum(m["num_tokens"] for m in metrics),
        "row_tokens": sum(m["num_row_tokens"] for m in metrics), "final_train_loss": metrics[-1]["loss"],
        "val_loss": next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), float("nan")),
        "global_batch_size": summary["global_batch_size"], "attn_implementation": summary["attn_implementation"],
        "scores": scores, "skipped": skipped,
        "manifest": read_manifest(folders[arm]).to_dict(), "curve": curve, "model_dir": summary["model_dir"],
        "probe": probe,
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(record, indent=2))
    if tracking:
        tracking.log_metrics(record_metrics(record), step=record["steps"])
        tracking.log_artifacts([result_path])
        tracking.end()
    return record


def record_metrics(record: dict) -> dict[str, float]:
    """What a study arm's MLflow run ends with: its totals and losses, each benchmark's score (score/<task>/<metric>)
    and the probe's figures (probe/...), as in its result.json."""
    totals = {k: record[k] for k in ("fit_seconds", "train_seconds", "samples", "tokens", "row_tokens",
                                     "final_train_loss", "val_loss")}
    return {**numeric(totals, "final/"), **numeric(record["scores"], "score/"), **numeric(record["probe"] or {}, "probe/")}


def _probe(cfg: Config, model_dir: str, val_folder: str) -> dict:
    """The context-reliance probe of the exported model (a Ray task with the eval task's resources); its contexts
    by topic when the packs were grouped by topic."""
    from raypack.eval.probe import probe_on_ray

    return probe_on_ray(model_dir, val_folder, cfg.probe, seed=cfg.seed, num_gpus=cfg.eval.num_gpus,
                        num_cpus=cfg.eval.num_cpus, by_topic=cfg.pack.group_backend == "topic")

