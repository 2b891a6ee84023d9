"""The training loop of one arm, run by every Ray Train worker (`raypack train`).

`train_loop_per_worker(config)` reads top to bottom: rows, model, engine, resume,
then one optimizer step after another. Launched by raypack.train.launch; the
config it gets is {"config": <resolved Config as a dict>, "arm": name,
"folder": prepared rows of the arm, "run_dir": where logs and the model go,
"val_folder": the shared validation split or None}.

Its pieces are public so that a benchmark takes exactly its steps without a flag
in the loop (raypack.bench.train measures the step without data handling):
`set_up` (rows, run plan, model and engine: a `Worker`), `Worker.step_batches`
(a step's rows, fetched and collated by `micro_batch`) and `optimizer_step`.

How rows reach each worker: every worker memory-maps the arm's flat token buffers
(`raypack.data.prepared.RowStore`, a path all workers can reach: the workers of a
node share one page-cache copy, and a micro-batch reads only its own rows' tokens)
and takes its share of each step from `raypack.data.order`: a permutation of the
rows drawn from (train.seed, epoch), cut into whole steps, each rank a disjoint
equal slice.
Every rank therefore takes epochs x steps_per_epoch steps (the run plan,
raypack.train.plan, computed from the manifest, never from an iterator running
dry), and a step's rows follow from its number alone, which makes a resume exact.

The model: weights are loaded in the training precision (bf16 on GPU, never an
fp32 copy first). Under ZeRO-3 it is built inside deepspeed.zero.Init (transformers
sees the DeepSpeed config, raypack.train.engine.partitioned_construction), and a
local safetensors folder is read slice by slice (engine.load_into_partitions): no
rank holds the whole model at any time. The model is put in training mode before
the first step (from_pretrained returns it in eval mode, where checkpointing and
dropout are off) and every optimizer step checks it is; train.gradient_checkpointing
recomputes each layer's activations in the backward pass. Once the model is built
(identically on every rank, from train.seed), each rank reseeds its generators
with its own seed (raypack.train.resume.seed_rank). Isolated micro-batches reach the
model in a layout their attention implementation isolates (raypack.data.collate):
one padding-free row for flash_attention_2 and raypack_varlen (no pad computed),
[B, T] rows with restarting positions for sdpa, eager and flex_attention
(whose block mask then costs B x T^2, not (B x T)^2). The padfree arm's
micro-batches (padding's rows) are one padding-free row on every implementation:
that is the arm (raypack.data.collate.arm_collation). flash_attention_2 and
raypack_varlen (raypack.attention) also get each micro-batch's sample boundaries,
computed on the host from the rows' seq_lens (collate(boundaries=True)), so no layer
derives them from position_ids. model.attn_implementation=auto is resolved per arm
(raypack.model.select_attn_implementation) and the one used is in the start event.

Per step, on each rank:
    fetch and collate its gradient_accumulation micro-batches
    D = all_reduce_sum(step_denominator(micro_batches))       (raypack.train.loss)
    set the LR to lr_at(step, schedule_steps) on every param group  (raypack.train.plan)
    for each micro-batch: forward -> token losses (train.loss_impl: fused in the output layer, or from the
                          logits; raypack.train.head) -> reduce_token_losses (raypack.train.loss)
                          -> engine.backward(loss, scale_wrt_gas=False)
                          -> engine.step()   (DeepSpeed updates at the last one)

Outputs under run_dir (rank 0 unless noted):
    metrics.jsonl            one line per step: loss (per-token mean, the same definition in every
                             arm), lr, grad_norm, step_time_s, tokens_per_sec (real tokens),
                             row_tokens_per_sec (padding included), supervised tokens, samples,
                             padding_fraction, peak_memory_mb, val_loss (at the plan's evaluation steps,
                             RunPlan.evaluates_at: every train.eval_every_steps and the last),
                             model_tflops_per_sec (real tokens' FLOPs, raypack.train.flops), mfu (null on CPU
                             or an unknown accelerator)
    rows-rank<r>.jsonl       every rank: {"step", "epoch", "row_index": [...]} per step
    init-rank<r>.json        every rank: what building the model cost it: RSS before, peak RSS after the
                             model is built and loaded and after DeepSpeed's initialize, parameter elements
                             it holds (its ZeRO-3 partitions) of the model's total, and the names of the
                             parameters AdamW decays and does not (decay_parameters, no_decay_parameters)
    events.jsonl             start / resume / checkpoint / preempted / done, appended by every launch and
                             restart (the run's whole history)
    tensorboard/             the same scalars as TensorBoard event files (`tensorboard --logdir`)
    model/                   the final model (safetensors + tokenizer), when train.export
On a resume the logs are cut back to the steps the restored state has trained,
so they always describe the model's real history.

Checkpoints (every train.checkpoint_every_steps, at each epoch end and on
preemption) hold the DeepSpeed state (every rank's shards, under tag "ds"),
position.json ({"step", "epoch", "step_in_epoch"} and what fixes a step's rows,
raypack.train.resume), every rank's random-generator states (rng-rank<r>.pt:
dropout resumes drawing the masks an uninterrupted run draws) and config.json, handed to `ray.train.report(...,
checkpoint=...)` and uploaded in the background; Ray restores the latest one after
a worker or node failure (train.max_failures) or when the same run is launched
again (the driver first checks position.json against its config). Preemption: when
the driver has written the PREEMPT_FILE (on SIGTERM), the ranks learn it through
the step's all-reduce, checkpoint that step, log "preempted" and return.
An evaluation step without a checkpoint is reported without one, so that a Ray
Tune trial (`raypack sweep`) sees every validation loss.

The driver's progress line (raypack.train.launch, config["report_progress"]; not
in a sweep trial, whose reports go to Ray Tune) comes from these reports too: each
carries, under "progress", rank 0's lines of the steps since the last report
(every train.log_every steps and the last: step, stop_step, loss, lr, tokens/s,
padding, val_loss, time). Ray Train's controller takes one report per worker
every 2 s from a one-slot queue, so a report per step would hold training up:
the lines ride on the next evaluation or checkpoint report, or on a report of
their own once REPORT_INTERVAL_S has passed on rank 0 (every rank learns it
through the step's all-reduce, as each report is a collective).
"""

import ctypes
import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointUploadMode
import torch
import torch.distributed as dist

from raypack.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, from_dict, to_dict
from raypack.data.collate import arm_collation, collate, model_inputs, takes_boundaries
from raypack.data.order import balanced_step_rows, epoch_order, step_rows
from raypack.data.prepared import Manifest, RowStore, read_manifest
from raypack.model import (build_model, checkpointed_layers, enable_checkpointing, has_local_safetensors,
                           import_model_code, load_tokenizer, prepare_export, resolve_attn_implementation)
from raypack.tracking import Run, numeric
from raypack.train.engine import (decay_split, full_state_dict, initialize, load_into_partitions,
                                  local_parameter_elements, partitioned_construction, resolve_precision)
from raypack.train.flops import mfu, peak_tflops, step_flops
from raypack.train.head import model_token_losses
from raypack.train.loss import all_reduce_sum, reduce_token_losses, segment_ids_from_seq_lens, step_denominator
from raypack.train.metrics import EVENTS_FILE, METRICS_FILE, read_jsonl
from raypack.train.plan import RunPlan, lr_at, run_plan
from raypack.train.restore import restored
from raypack.train.resume import PREEMPT_FILE, load_rng_state, save_rng_state, seed_rank, step_identity
from raypack.train.validate import validation_groups, validation_sums

CHECKPOINT_TAG = "ds"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# Ray Train's controller polls each worker's one-slot report queue every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).
REPORT_INTERVAL_S = 2.0
PROGRESS_KEYS = ("step", "loss", "lr", "tokens_per_sec", "row_tokens_per_sec", "padding_fraction", "step_time_s",
                 "val_loss")


def train_loop_per_worker(config: dict) -> None:
    """Train one arm on this rank (the module docstring describes `config`, the data order and outputs)."""
    cfg: Config = from_dict(Config, config["config"])
    train, arm, run_dir = cfg.train, config["arm"], Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    val = None
    if config.get("val_folder") and read_manifest(config["val_folder"]).num_rows > 0:
        val_rows = RowStore.open(config["val_folder"])
        val = (val_rows, *validation_groups(val_rows, train.micro_batch_size, rank, world_size))

    # Rows, model and engine: the manifest fixes the run plan (raypack.train.plan), the weights are loaded in
    # the training precision (under ZeRO-3 already partitioned), DeepSpeed wraps them (set_up).
    w = set_up(config["folder"], train, cfg.optim, cfg.model, cfg.data.tokenizer)
    plan, engine = w.plan, w.engine
    peak = peak_tflops(torch.cuda.get_device_name() if w.device == "cuda" else "cpu", w.precision, train.peak_tflops)
    _write_json(run_dir / f"init-rank{rank}.json", {"rank": rank, "zero_stage": train.zero_stage, **w.memory,
                                                    "decay_parameters": w.decay[0], "no_decay_parameters": w.decay[1]})

    # Resume: the latest checkpoint gives the DeepSpeed state and the data position.
    start_step, rng_restored = 0, False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with restored(checkpoint, rank, ctx.get_local_rank(), barrier,
                      every_rank=engine.zero_elastic_checkpoint()) as ckpt_dir:
            load_path, _ = engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
            if load_path is None:  # DeepSpeed found no state there and would go on from the fresh weights
                raise RuntimeError(f"rank {rank}: no DeepSpeed state under tag {CHECKPOINT_TAG!r} in {ckpt_dir}")
            start_step = json.loads((Path(ckpt_dir) / "position.json").read_text())["step"]
            rng_restored = load_rng_state(ckpt_dir, rank)
    logs = _Logs(run_dir, rank, start_step, resumed=checkpoint is not None,
                 tracking=Run.attach(config.get("tracking"), f"{arm}'s steps") if rank == 0 else None)
    logs.event({"event": "resume" if checkpoint else "start", "step": start_step, "arm": arm,
                "total_steps": plan.total_steps, "stop_step": plan.stop_step, "steps_per_epoch": plan.steps_per_epoch,
                "world_size": world_size, "grad_accum": plan.grad_accum, "attn_implementation": w.attn,
                "mode": w.mode, "precision": w.precision, "flat_isolated_rows": w.flatten and w.mode == "isolated",
                "gradient_checkpointing": train.gradient_checkpointing,
                "checkpointed_layers": checkpointed_layers(engine.module), "loss_impl": train.loss_impl,
                **({"rng_restored": rng_restored} if checkpoint else {}), **w.memory})
    if checkpoint and not rng_restored:
        print(f"[{arm}] rank {rank}: the checkpoint at step {start_step} holds no random-generator state (saved "
              "by an older raypack); dropout masks will differ from an uninterrupted run's", flush=True)

    run_start = time.perf_counter()
    progress = _ProgressLines(config.get("report_progress", False), train.log_every, plan.stop_step)
    identity = step_identity(train, arm, w.manifest.config_hash)
    for step in range(start_step, plan.stop_step):
        epoch = step // plan.steps_per_epoch
        step_start = time.perf_counter()

        # This step's micro-batches, fetched up front for the step's loss denominator.
        indices, picked, micro_batches = w.step_batches(step)
        denominator = all_reduce_sum(step_denominator(micro_batches, train.loss_reduction))
        lr = lr_at(step, plan.schedule_steps, cfg.optim)
        token_loss_sum, num_supervised = optimizer_step(engine, w.optimizer, micro_batches, denominator, lr,
                                                        train.loss_reduction, world_size, train.loss_impl)

        # Metrics: sums over ranks, then rates.
        real_tokens = sum(r["num_tokens"] for mb in picked for r in mb)
        row_tokens = sum(b["input_ids"].numel() for b in micro_batches)
        num_samples = sum(len(r["seq_lens"]) for mb in picked for r in mb)
        segments = [r["num_tokens"] for mb in picked for r in mb] if w.mode == "cross" else \
            [s for mb in picked for r in mb for s in r["seq_lens"]]
        flops = step_flops(w.shape["matmul_params"], w.shape["num_layers"], w.shape["hidden_size"], real_tokens,
                           segments)
        # The preemption flag rides on the step's all-reduce, so every rank stops after the same step.
        preempt = rank == 0 and (run_dir / PREEMPT_FILE).exists()
        totals = _sum_over_ranks([token_loss_sum, num_supervised, real_tokens, row_tokens, num_samples, flops,
                                  float(preempt), float(rank == 0 and progress.due())])
        preempted = totals[6] > 0 and step + 1 < plan.stop_step
        step_time_s = time.perf_counter() - step_start
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "step": step + 1, "epoch": epoch, "loss": totals[0] / max(totals[1], 1.0), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_s": step_time_s, "tokens_per_sec": totals[2] / step_time_s,
            "row_tokens_per_sec": totals[3] / step_time_s, "num_supervised_tokens": int(totals[1]),
            "num_samples": int(totals[4]), "num_tokens": int(totals[2]), "num_row_tokens": int(totals[3]),
            "padding_fraction": 1.0 - totals[2] / max(totals[3], 1.0), "peak_memory_mb": _peak_memory_mb(w.device),
            "model_tflops_per_sec": totals[5] / step_time_s / 1e12,
            "mfu": mfu(totals[5], step_time_s, world_size, peak),
        }
        done = step + 1
        if val and plan.evaluates_at(done):
            metrics["val_loss"] = _validation_loss(engine, val, w.pad_token_id, train.loss_impl, w.attn)
        logs.step(metrics, epoch, [int(i) for mb in indices for i in mb])
        progress.add(metrics)

        if (train.checkpoints and plan.checkpoints_at(done)) or preempted:
            _save_checkpoint(engine, cfg, done, plan.steps_per_epoch, progress.carry(metrics), rank, identity)
            logs.event({"event": "checkpoint", "step": done})
        elif "val_loss" in metrics:
            # Without a checkpoint the report misses Result.metrics but reaches the run's callbacks, so Ray
            # Tune (TuneReportCallback) sees every validation point (raypack.tune.sweep). Collective: every rank.
            ray.train.report(progress.carry(metrics))
        elif progress.lines and totals[7] > 0:
            # Asynchronous: the training thread goes on while an earlier checkpoint report still uploads.
            ray.train.report(progress.carry(metrics), checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        if preempted:
            logs.event({"event": "preempted", "step": done})
            logs.close()
            return

    if train.export:
        _export(engine, cfg.data, run_dir / "model", rank)
    logs.event({"event": "done", "step": plan.stop_step, "seconds": time.perf_counter() - run_start})
    logs.close()


@dataclass
class Worker:
    """One rank set up to train an arm (set_up): its run plan and rows, how they are collated, the engine."""

    train: TrainConfig
    rank: int
    world_size: int
    device: str
    manifest: Manifest
    plan: RunPlan
    rows: RowStore
    mode: str  # padding, isolated or cross: how rows are collated (raypack.data.collate)
    flatten: bool  # isolated micro-batches as one flat row (raypack.data.collate.arm_collation)
    pad_token_id: int
    attn: str
    precision: str
    engine: Any
    optimizer: Any
    shape: dict  # what the FLOPs estimate needs (_model_shape)
    memory: dict  # what building the model cost this rank (init-rank<r>.json)
    decay: tuple = ([], [])  # names of the parameters with and without weight decay (engine.decay_split)
    zero3: Any = None  # under ZeRO-3, transformers holds the DeepSpeed config weakly: keep it while training runs
    order: tuple = (-1, None)  # (epoch, that epoch's row order), drawn once per epoch

    def step_batches(self, step: int) -> tuple[list[list[int]], list[list[dict]], list[dict]]:
        """This rank's share of optimizer step `step` (0-based): its row indices per micro-batch and those rows
        (raypack.data.order, module docstring), and the micro-batches collated from them (micro_batch)."""
        t, plan = self.train, self.plan
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        if epoch != self.order[0]:
            self.order = (epoch, epoch_order(self.manifest.num_rows, t.seed, epoch))
        if t.balance_tokens:
            indices = balanced_step_rows(self.order[1], step_in_epoch, self.rank, self.world_size, t.micro_batch_size,
                                         plan.grad_accum, self.rows.num_tokens)
        else:
            indices = step_rows(self.order[1], step_in_epoch, self.rank, self.world_size, t.micro_batch_size,
                                plan.grad_accum)
        picked = [self.rows.take(idx) for idx in indices]
        batches = [micro_batch(mb_rows, self.mode, self.pad_token_id, t.loss_reduction, self.flatten,
                               takes_boundaries(self.attn)) for mb_rows in picked]
        return indices, picked, batches


def set_up(folder: str, train: TrainConfig, optim: OptimConfig, model_config: ModelConfig, tokenizer: str) -> Worker:
    """This rank, ready to take the steps of the arm prepared in `folder` (the module docstring's rows and model).

    Under Ray Train (it reads the rank and world size from its context). Seeds torch
    with train.seed, opens the rows, builds the model in the training precision
    (under ZeRO-3 already partitioned, a local safetensors folder read slice by
    slice) and wraps it in DeepSpeed, measuring what that costs this rank's memory.
    """
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if train.use_gpu else "cpu"
    torch.manual_seed(train.seed)  # every rank alike until the model is built (weights a checkpoint lacks)

    # Rows: the manifest fixes the plan; the mode follows the arm's packing.
    manifest = read_manifest(folder)
    plan = run_plan(train, optim, manifest, world_size)
    assert plan.rows_per_step == train.global_batch_size, "raypack.train.launch.arm_config resolves the rows per step"
    rows = RowStore.open(folder)
    pad_token_id = load_tokenizer(tokenizer).pad_token_id

    # Model and engine: weights loaded in the training precision; under ZeRO-3 built already partitioned
    # (`zero3` must stay referenced while training runs); DeepSpeed moves the module to the device.
    precision = resolve_precision(train.precision, device)
    attn = resolve_attn_implementation(model_config.attn_implementation, device, precision, manifest.attention)
    mode, flatten = arm_collation(manifest.strategy, manifest.attention, attn)
    if device == "cuda":
        torch.cuda.set_device(ray.train.torch.get_device())  # zero.Init places partitions on the current device
    if device == "cpu":
        _return_freed_tensors_to_the_os()
    zero3 = partitioned_construction(train, world_size, device)
    import_model_code(model_config.name_or_path, model_config.trust_remote_code)
    memory = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
              "rss_mb_before_model": _rss_mb(reset_peak=True)}
    sliced = zero3 is not None and has_local_safetensors(model_config.name_or_path)
    model = build_model(model_config.name_or_path, attn, train.seed, model_config.trust_remote_code,
                        dtype=torch.bfloat16 if precision == "bf16" else torch.float32, load_weights=not sliced)
    if sliced:
        memory.update(load_into_partitions(model, model_config.name_or_path))
    memory["peak_rss_mb_after_model"] = _peak_rss_mb()
    # from_pretrained hands the model over in eval mode, where transformers' gradient checkpointing does
    # nothing and dropout is off: train from the first step (a validation pass switches back after itself).
    model.train()
    if train.gradient_checkpointing:
        enable_checkpointing(model)
    shape = _model_shape(model)
    engine, optimizer = initialize(model, train, optim, world_size, device)
    decay = decay_split(engine.module)
    seed_rank(train.seed, rank)  # the model is built (the same everywhere): now each rank's own dropout masks
    memory["param_elements_local"], memory["param_elements_total"] = local_parameter_elements(engine.module)
    memory["peak_rss_mb_after_engine"] = _peak_rss_mb()
    if device == "cuda":
        memory["peak_gpu_mb_after_engine"] = _peak_memory_mb(device)
    return Worker(train=train, rank=rank, world_size=world_size, device=device, manifest=manifest, plan=plan,
                  rows=rows, mode=mode, flatten=flatten, pad_token_id=pad_token_id, attn=attn,
                  precision=precision, engine=engine, optimizer=optimizer, shape=shape, memory=memory, decay=decay,
                  zero3=zero3)


def optimizer_step(engine, optimizer, micro_batches: list[dict], denominator: float, lr: float,
                   loss_reduction: str, world_size: int, loss_impl: str = "fused") -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches: the LR set on every param group, then per micro-batch
    forward to the token losses (`loss_impl`, raypack.train.head) -> reduce_token_losses ->
    engine.backward(loss, scale_wrt_gas=False) -> engine.step() (DeepSpeed
    updates at the last one; raypack.train.engine states the contract). `denominator` is the step's loss
    denominator summed over ranks (raypack.train.loss.step_denominator). Returns the sum of the micro-batches'
    token losses and their number of supervised tokens (this rank's), the loss read from the device once. The
    model must be in training mode (set_up leaves it there, a validation pass puts it back)."""
    assert engine.module.training, "the model must be in training mode (checkpointing, dropout) at every step"
    for group in optimizer.param_groups:
        group["lr"] = lr
    token_loss_sum, num_supervised = torch.zeros((), device=engine.device), 0
    for batch in micro_batches:
        losses, _ = model_token_losses(engine, engine.module, model_inputs(batch, engine.device), batch["labels"],
                                       loss_impl)
        out = reduce_token_losses(losses, batch, loss_reduction, denominator, world_size)
        engine.backward(out.loss, scale_wrt_gas=False)
        engine.step()
        token_loss_sum += out.token_loss_sum  # stays on the device: read once per step, below
        num_supervised += out.num_tokens
    return float(token_loss_sum), float(num_supervised)


def micro_batch(rows: list[dict], mode: str, pad_token_id: int, reduction: str, flatten: bool = True,
                boundaries: bool = False) -> dict:
    """Collate rows (isolated ones flat for attention kernels that need it, and with the host-side sample
    boundaries for those that take them, raypack.data.collate); cross rows under `sample` weighting also carry
    segment_ids (for the loss only)."""
    batch = collate(rows, mode, pad_token_id, flatten=flatten, boundaries=boundaries)
    if mode == "cross" and reduction == "sample":
        batch["segment_ids"] = segment_ids_from_seq_lens([r["seq_lens"] for r in rows], batch["labels"].shape[1])
    return batch


def _model_shape(model) -> dict:
    """What the FLOPs estimate needs: matmul parameters (raypack.train.flops), layers, hidden size."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {"matmul_params": total - (0 if tied else getattr(embedding, "ds_numel", embedding.numel())),
            "num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size}


def _validation_loss(engine, val: tuple, pad_token_id: int, loss_impl: str, attn: str) -> float:
    """Per-token loss on the shared validation split, summed over ranks (raypack.train.validate), computed as
    training computes it (`loss_impl`; the boundaries `attn` takes)."""
    rows, groups, num_forwards = val

    def forward(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return model_token_losses(engine, engine.module, model_inputs(batch, engine.device), batch["labels"],
                                  loss_impl)

    engine.eval()
    loss_sum, num_tokens = validation_sums(forward, rows, groups, num_forwards, pad_token_id, takes_boundaries(attn))
    engine.train()
    loss_sum, num_tokens = _sum_over_ranks([loss_sum, num_tokens])
    return loss_sum / num_tokens if num_tokens else float("nan")


def barrier() -> None:
    """Every rank waits here (a no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _sum_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def _rss_mb(reset_peak: bool = False) -> float:
    """This process's resident memory now, in MiB; `reset_peak` restarts the peak that _peak_rss_mb reads
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so a peak is measured from this point."""
    if reset_peak:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # the peak then counts from the process start: an over-estimate, never an under-estimate
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """The peak resident memory (VmHWM) since the process started or since _rss_mb(reset_peak=True), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return _peak_memory_mb("cpu")


def _return_freed_tensors_to_the_os() -> None:
    """CPU workers: pin glibc's mmap threshold at 1 MiB, so every freed tensor of 1 MiB or more is unmapped.

    A Ray Train worker runs the loop in a thread of its own, whose glibc arena keeps
    freed memory for reuse; under ZeRO-3, zero.Init's per-module temporaries then
    stay resident (measured: ~130 MB on a 110M-parameter model), and the worker's
    RSS no longer shows what it holds. Without glibc (musl, macOS) nothing changes.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def _save_checkpoint(engine, cfg: Config, done: int, num_steps_per_epoch: int, metrics: dict, rank: int,
                     identity: dict) -> None:
    """Every rank saves its DeepSpeed shards; Ray merges the ranks' folders into one checkpoint.

    The upload to train.storage_path runs in the background (Ray Train's asynchronous
    checkpoint upload): training goes on while the files are copied, and Ray deletes
    the local copy once uploaded. position.json carries the step and what fixes a
    step's rows (raypack.train.resume), checked before a relaunch restores it.
    """
    tmp = tempfile.mkdtemp(prefix="raypack-ckpt-")
    engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
    save_rng_state(tmp, rank)
    if rank == 0:
        epoch, step_in_epoch = divmod(done, num_steps_per_epoch)
        position = {"step": done, "epoch": epoch, "step_in_epoch": step_in_epoch, **identity}
        (Path(tmp) / "position.json").write_text(json.dumps(position))
        (Path(tmp) / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC)


def _export(engine, data: DataConfig, out: Path, rank: int) -> None:
    """The final weights as a Hugging Face folder (safetensors + tokenizer), written by rank 0.

    The tokenizer carries its pad token and the chat template training used, and the
    configs name the pad id and the end-of-turn stop (raypack.model.prepare_export),
    so lm-eval and generation can batch and prompt the model as it was trained.
    """
    state = full_state_dict(engine)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        tokenizer = prepare_export(engine.module, data.tokenizer, data.template)
        engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    if dist.is_initialized():
        dist.barrier()


class _ProgressLines:
    """The progress lines waiting for the next ray.train.report (module docstring); none unless `enabled`."""

    def __init__(self, enabled: bool, log_every: int, stop_step: int):
        self.enabled, self.log_every, self.stop_step = enabled, log_every, stop_step
        self.lines: list[dict] = []
        self.last_report = time.perf_counter()

    def due(self) -> bool:
        """Whether REPORT_INTERVAL_S has passed since this rank's last report."""
        return self.enabled and time.perf_counter() - self.last_report >= REPORT_INTERVAL_S

    def add(self, metrics: dict) -> None:
        """Keep this step's line when it is one the driver prints: every log_every steps and the last."""
        step = metrics["step"]
        if self.enabled and (step % self.log_every == 0 or step == self.stop_step):
            line = {key: metrics[key] for key in PROGRESS_KEYS if key in metrics}
            self.lines.append({**line, "stop_step": self.stop_step, "time": time.time()})

    def carry(self, metrics: dict) -> dict:
        """What this step reports: its metrics and, under "progress", the lines waiting (then none wait)."""
        self.last_report = time.perf_counter()
        if not self.lines:
            return dict(metrics)
        report, self.lines = {**metrics, "progress": self.lines}, []
        return report


class _Logs:
    """metrics.jsonl, events.jsonl (rank 0) and rows-rank<r>.jsonl, cut back to `start_step` on resume; rank 0
    also sends each step's metrics to the run's MLflow run (`tracking`, raypack.tracking)."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, resumed: bool, tracking: Run | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.tracking = rank, tracking
        self.rows = _open_log(run_dir / f"rows-rank{rank}.jsonl", start_step, resumed)
        self.metrics = self.events = self.tensorboard = None
        if rank == 0:
            self.metrics = _open_log(run_dir / METRICS_FILE, start_step, resumed)
            self.events = (run_dir / EVENTS_FILE).open("a")  # every launch and restart: the run's history
            self.tensorboard = _tensorboard(run_dir / "tensorboard")

    def step(self, metrics: dict, epoch: int, row_index: list[int]) -> None:
        self.rows.write(json.dumps({"step": metrics["step"], "epoch": epoch, "row_index": row_index}) + "\n")
        self.rows.flush()
        if self.metrics:
            self.metrics.write(json.dumps(metrics) + "\n")
            self.metrics.flush()
        scalars = numeric(metrics)  # the finite numbers, what TensorBoard and MLflow plot
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, metrics["step"])
        if self.tracking:
            self.tracking.log_step(scalars, metrics["step"])

    def event(self, event: dict) -> None:
        if self.events:
            self.events.write(json.dumps({"time": time.time(), **event}) + "\n")
            self.events.flush()

    def close(self) -> None:
        if self.tracking:
            self.tracking.flush()
        for f in (self.rows, self.metrics, self.events, self.tensorboard):
            if f:
                f.close()


def _open_log(path: Path, start_step: int, resumed: bool):
    """Append to a per-step log, first dropping the lines of steps after `start_step` (redone on resume)."""
    kept = [entry for entry in read_jsonl(path) if entry["step"] <= start_step] if resumed else []
    f = path.open("w")
    f.writelines(json.dumps(entry) + "\n" for entry in kept)
    f.flush()
    return f


def _tensorboard(folder: Path):
    from tensorboardX import SummaryWriter  # event files TensorBoard reads; no TensorFlow needed

    return SummaryWriter(str(folder), flush_secs=5)

