"""GPU check: sample isolation per attention backend, and padding vs packing speed on a ~1B Llama.

One script for one accelerator with only torch, transformers and numpy (no Ray,
DeepSpeed, flash-attn or numba needed), run from the repository root:

    python scripts/gpu_check.py --out $OUT/gpu_check.json    # one H200: a few minutes
    python scripts/gpu_check.py --dry-run --out /tmp/x.json  # CPU, tiny model, same code path: ~15 s on 2 cores
    python scripts/gpu_check.py --dry-run --cpu-flex         # also flex_attention, compiled on CPU (+20-100 s)
    python scripts/gpu_check.py --sections arms --arms padding,bfd-cross   # only these arms' speed
    python scripts/gpu_check.py --save-model DIR [--dry-run] # write the model the arms train (random init) and stop

--save-model writes the arms' model (GPU model below, bf16; the dry run's in fp32) as a Hugging Face
folder, so that scripts/gpu_run.sh trains the very same model through `raypack bench train`
(model.name_or_path=DIR) and the two sets of figures compare.

It prints ONE JSON object (also written to --out, and rewritten there after every
arm and backend, so a run stopped early keeps what it measured); progress goes to
stderr. What each figure means:

data      The SAME synthetic samples feed every arm: the lengths of the paper's 1.2M
          dataset (`raypack.data.synth.sample_lengths("opensource-1.2m")`:
          lognormal, mean ~670 tokens, long tail) scaled by max_seq_len / 4096 and
          capped at max_seq_len (num_capped); random token ids; the first 20-60% of
          each sample is prompt (labels IGNORE_INDEX). Packed rows: a plain-Python
          best-fit-decreasing over the lengths (capacity max_seq_len), shuffled, laid
          out as raypack's packer writes them ("input_ids", "labels", "position_ids"
          restarting per sample, "seq_lens"); padding rows hold one sample each.
arms      padding / padfree / bfd-isolated / bfd-cross / bfd-isolated/sdpa (collate
          modes padding / isolated as ONE flat row of padding's 2 samples, no pads /
          isolated / cross / isolated), attention (attn_implementation): sdpa for
          padding and bfd-cross, raypack_varlen (raypack.attention: torch's varlen_attn,
          the sample boundaries computed on the host) for padfree and bfd-isolated, and
          bfd-isolated/sdpa the same rows on sdpa's block mask (the figure before
          issue 24); auto_attn_implementation: what model.attn_implementation=auto would
          pick for the arm on this machine. Each on a fresh model (same seed) with plain torch AdamW; one micro-batch of
          2 rows per optimizer step (padding and padfree: 2 consecutive samples),
          `warmup` untimed steps, then the `steps` timed batches once untimed (so every
          shape is seen once: padding's change every step; first_pass_step_time_s is
          that pass), then the same batches timed, each step between two synchronizes
          (collation outside). tokens_per_sec counts real tokens,
          row_tokens_per_sec everything the model computed (pads included),
          padding_fraction = 1 - real / row tokens (bfd-isolated: 0 as one flat row under
          raypack_varlen; bfd-isolated/sdpa: [B, T] rows as the loop gives them to sdpa),
          mfu = raypack.train.flops.step_flops / (time x peak_tflops of the device; null
          when unknown, e.g. CPU), peak_memory_mb = torch.cuda.max_memory_allocated
          after a reset per arm (weights, grads, AdamW state, activations),
          tokens_per_sec_vs_padding / _vs_cross: each arm's tokens_per_sec over padding's /
          bfd-cross's (issue 24's target: bfd-isolated >= 0.95x bfd-cross).
          The dry run runs raypack_varlen with the reference kernel injected
          (raypack.attention.reference_varlen_attn, per-sample sdpa; varlen_kernel says
          which): the same code path, not torch's kernel (CUDA only).
isolation Per dtype (bf16 and fp32; the dry run fp32 only) and attention backend,
          on the arms' model: a micro-batch of 2 packed rows (3-8 samples each, their
          lengths in seq_lens) runs as `isolated` and as `cross`, and every sample
          runs alone (batch of 1, padding collate). isolated_* / cross_* are the max
          and mean |per-token loss in the micro-batch - the same token's loss alone|
          over supervised tokens (raypack.train.loss.token_losses); isolated_flat_*
          the same rows as one flat row (padfree's layout) where the backend isolates
          [B, T] rows. ok: isolated (and isolated_flat) max < tolerance in fp32 (1e-4
          on GPU, 1e-5 on CPU), MEAN < 0.05 in bf16 (`tolerance_on`), and cross max >
          10x isolated max, the negative control showing that the check can fail.
          Why the mean in bf16: a random-init loss is ~ln(vocab) = 10.4, where one
          bf16 step is 0.0625, and a kernel that reduces in another order moves some
          of ~10^4 tokens by a step or more; on the H200 (2026-11-30) eager, sdpa and
          flex alike gave max 0.07-0.09 and mean 0.015 against a cross max of 5.
          raypack_varlen: the micro-batch carries the host-side boundaries (cross rows: one
          segment per row, i.e. without the samples' boundaries: the control), and each
          sample alone runs on sdpa (the per-sample reference, not the kernel checked);
          its fp32 row on a GPU is skipped with varlen_attn's error where its flash kernel
          has no fp32. seconds includes flex_attention's compilation. A backend that cannot run
          is {"skipped": reason} (flash_attention_2 without flash_attn or in fp32,
          raypack_varlen without varlen_attn, an error's message). peak_memory_mb: the largest allocation of the check.
loss      The output layer and the loss alone (train.loss_impl full vs fused, issue 24): hidden
          states [2, max_seq_len, hidden] and an output weight [128,256, hidden] (Llama-3's
          vocabulary; the dry run: its own), every target supervised, one forward + backward
          each: step_time_s (between synchronizes, the faster of 2 runs), peak_memory_mb =
          max_memory_allocated above what was allocated before (null on CPU), loss (the mean
          token loss), fused_over_full for both, and max_grad_difference (fused vs full,
          hidden and weight gradients). kernel: torch's F.linear_cross_entropy or raypack's
          chunked fallback (raypack.train.loss.default_linear_kernel: torch < 2.13 lacks it).
forbidden_modules  ray/deepspeed/numba/pyarrow modules loaded by this run: [] here.
          (transformers 5.17 imports scikit-learn, hence pandas and pyarrow, when
          they are installed: a non-empty list there comes from that, not raypack.)

GPU model: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocabulary 32768 (not the tiny tokenizer's 4096: nothing is tokenized, and a
realistic output head matters for speed), 1.1 B parameters, bf16 weights and AdamW
state, max_seq_len 4096, 3000 samples, 3 warm-up + 10 timed steps per arm. Dry
run: hidden 64, 2 layers, vocabulary 4096, fp32, max_seq_len 256, 200 samples,
1 + 2 steps.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain copy of the repository

from raypack.attention import (VARLEN, reference_varlen_attn, register_varlen_attention, use_varlen_kernel,
                               varlen_available)
from raypack.data.collate import arm_collation, collate, flatten_isolated, model_inputs, takes_boundaries
from raypack.data.synth import sample_lengths
from raypack.data.tokenize import IGNORE_INDEX
from raypack.model import TINY_PAD_ID, flash_attn_importable, resolve_attn_implementation, tiny_llama_config
from raypack.train.flops import mfu, peak_tflops, step_flops
from raypack.train.loss import (default_linear_kernel, fused_token_losses, micro_batch_loss, step_denominator,
                                token_losses)

# arm -> (strategy, attention as a manifest says, attention implementation); raypack.data.collate.arm_collation
# turns the first two into the loop's collate mode and layout (padfree: padding's micro-batches as one flat isolated
# row, no pads). The isolated arms run on raypack_varlen, bfd-isolated/sdpa is the same arm on sdpa's block mask.
ARMS = {"padding": ("padding", None, "sdpa"), "padfree": ("padfree", "isolated", VARLEN),
        "bfd-isolated": ("bfd", "isolated", VARLEN), "bfd-cross": ("bfd", "cross", "sdpa"),
        "bfd-isolated/sdpa": ("bfd", "isolated", "sdpa")}
FORBIDDEN = {"ray", "deepspeed", "numba", "pyarrow"}
GPU = {"model": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                  "num_attention_heads": 32, "num_key_value_heads": 8},
       "vocab_size": 32768, "loss_vocab_size": 128_256, "max_seq_len": 4096, "num_samples": 3000, "warmup": 3,
       "steps": 10,
       "dtypes": ("bf16", "fp32"), "tolerance": {"bf16": 0.05, "fp32": 1e-4},  # bf16: on the MEAN (docstring)
       "backends": ("sdpa", "eager", "flex_attention", "flash_attention_2", VARLEN)}
CPU = {"model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2},
       "vocab_size": 4096, "loss_vocab_size": 4096, "max_seq_len": 256, "num_samples": 200, "warmup": 1,
       "steps": 2,
       "dtypes": ("fp32",), "tolerance": {"fp32": 1e-5},
       "backends": ("sdpa", "eager", "flex_attention", "flash_attention_2", VARLEN)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_samples(num_samples: int, max_seq_len: int, vocab_size: int, seed: int) -> list[dict]:
    """Synthetic samples with the 1.2M dataset's lengths (module docstring), as one-sample rows."""
    rng = np.random.default_rng(seed)
    lengths = np.rint(sample_lengths("opensource-1.2m", num_samples, seed) * max_seq_len / 4096)
    samples = []
    for n in np.clip(lengths, 8, max_seq_len).astype(int):
        ids = rng.integers(0, vocab_size, n, dtype=np.int32)
        labels = ids.copy()
        labels[: max(1, int(n * rng.uniform(0.2, 0.6)))] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels, "position_ids": np.arange(n, dtype=np.int32),
                        "seq_lens": np.array([n], dtype=np.int32)})
    return samples


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per bin: longest first, each into the fullest bin it still fits."""
    bins, free = [], []  # free: sorted (space left, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            left, b = capacity - lengths[i], len(bins) - 1
        else:
            left, b = free.pop(k)
            bins[b].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(free, (left, b))
    return bins


def pack_row(samples: list[dict]) -> dict:
    row = {k: np.concatenate([s[k] for s in samples]) for k in ("input_ids", "labels", "position_ids", "seq_lens")}
    assert len(row["input_ids"]) == row["seq_lens"].sum()
    return row


def build_model(setup: dict, attn: str, dtype: torch.dtype, device: str, seed: int) -> LlamaForCausalLM:
    config = tiny_llama_config(setup["vocab_size"], max_position_embeddings=setup["max_seq_len"], **setup["model"])
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def forward_losses(model, batch: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**model_inputs(batch, device), use_cache=False).logits
    losses, mask = token_losses(logits, batch["labels"])
    return losses.cpu().double(), mask.cpu()


def sample_diffs(model, rows: list[dict], device: str, flatten: bool, boundaries: bool = False) -> dict:
    """Max and mean |token loss packed - token loss alone| over the samples of `rows`, per collate mode
    (isolated rows flat or [B, T] as raypack's loop gives them to this attention: `flatten`; with the host-side
    sample boundaries where it takes them: `boundaries`, cross rows then one segment each)."""
    alone, offsets = [], []  # per sample: its losses alone; (row, start in the row, start in the flat row)
    flat_start = 0
    packed_backend = model.config._attn_implementation
    if packed_backend == VARLEN:  # its per-sample reference: each sample alone on sdpa, not on the kernel checked
        model.set_attn_implementation("sdpa")
    for r, row in enumerate(rows):
        start = 0
        for n in row["seq_lens"]:
            one = {k: row[k][start: start + n] for k in ("input_ids", "labels")}
            losses, mask = forward_losses(model, collate([one], "padding", TINY_PAD_ID, boundaries=boundaries), device)
            alone.append((losses[0][mask[0]], mask[0]))
            offsets.append((r, start, flat_start + start))
            start += int(n)
        flat_start += start
    model.set_attn_implementation(packed_backend)
    out = {}
    # isolated_flat: the rows as ONE flat row (what padfree always gets), for attentions that isolate [B, T] rows.
    layouts = [("isolated", "isolated", flatten), ("cross", "cross", False)] + \
        ([("isolated_flat", "isolated", True)] if not flatten else [])
    for name, mode, flat_rows in layouts:
        losses, _ = forward_losses(model, collate(rows, mode, TINY_PAD_ID, flatten=flat_rows, boundaries=boundaries),
                                   device)
        diffs = []
        for (ref, mask), (r, start, flat) in zip(alone, offsets):
            row, at = (0, flat) if mode == "isolated" and flat_rows else (r, start)
            diffs.append((losses[row, at: at + len(mask)][mask] - ref).abs())
        diffs = torch.cat(diffs)
        out[f"{name}_max_abs_diff"], out[f"{name}_mean_abs_diff"] = diffs.max().item(), diffs.mean().item()
    return out


def skip_reason(setup: dict, dtype_name: str, backend: str) -> str | None:
    if dtype_name not in setup["dtypes"]:
        return "the dry run checks fp32 only"
    if backend in setup.get("skip", {}):
        return setup["skip"][backend]
    if backend == "flash_attention_2" and dtype_name != "bf16":
        return "flash-attn has no fp32 kernels"
    if backend == "flash_attention_2" and not flash_attn_importable():
        return "flash_attn is not importable"
    if backend == VARLEN and setup is GPU and not varlen_available():  # the dry run injects the reference kernel
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def isolation(setup: dict, rows: list[dict], device: str, seed: int, out: dict, save) -> None:
    """Packed vs alone per dtype and backend into `out`, saved after each; a backend that fails is reported."""
    reset_peak(device)
    out["seq_lens"], out["peak_memory_mb"] = [row["seq_lens"].tolist() for row in rows], None
    for dtype_name in ("bf16", "fp32"):
        results = out[dtype_name] = {b: {"skipped": skip_reason(setup, dtype_name, b)} for b in setup["backends"]}
        if dtype_name not in setup["dtypes"]:
            continue
        model = build_model(setup, "sdpa", DTYPES[dtype_name], device, seed).eval()
        for backend in [b for b in setup["backends"] if results[b]["skipped"] is None]:
            start = time.perf_counter()
            try:
                model.set_attn_implementation(backend)
                with torch.no_grad():
                    diffs = sample_diffs(model, rows, device, flatten_isolated(backend), takes_boundaries(backend))
            except Exception as err:  # noqa: BLE001  (a backend that fails is a finding to report, not a crash)
                results[backend] = {"skipped": f"{type(err).__name__}: {err}"[:500]}
                continue
            tolerance = setup["tolerance"][dtype_name]
            measured = "mean" if dtype_name == "bf16" else "max"  # bf16: rounding makes the max heavy-tailed
            ok = all(diffs[f"{name}_{measured}_abs_diff"] < tolerance and
                     diffs["cross_max_abs_diff"] > 10 * diffs[f"{name}_max_abs_diff"]
                     for name in ("isolated", "isolated_flat") if f"{name}_max_abs_diff" in diffs)
            results[backend] = {**diffs, "tolerance": tolerance, "tolerance_on": measured, "ok": ok, "flat_isolated_rows": flatten_isolated(backend),
                                "seconds": time.perf_counter() - start}  # flex_attention: compilation included
            progress(f"isolation {dtype_name} {backend}: {results[backend]}")
            out["peak_memory_mb"] = peak_memory_mb(device)
            save()
        del model


def run_arm(setup: dict, strategy: str, attention: str | None, batches: list[list[dict]], device: str,
            dtype: torch.dtype, attn: str, seed: int, peak: float | None) -> dict:
    """Warm-up, then the timed batches once untimed (every shape they hold seen once: padding's shapes change
    from step to step), then the same batches timed; one micro-batch of 2 rows per optimizer step."""
    mode, flat = arm_collation(strategy, attention, attn)  # as raypack.train.loop collates this arm
    model = build_model(setup, attn, dtype, device, seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    embedding = model.get_input_embeddings().weight.numel()
    matmul_params = sum(p.numel() for p in model.parameters()) - embedding  # untied, as raypack.train.loop
    reset_peak(device)
    seconds, cold, real, row_tokens, flops = [], [], 0, 0, 0.0
    warmup, timed = batches[:setup["warmup"]], batches[setup["warmup"]:]
    for i, rows in enumerate(warmup + timed + timed):
        batch = collate(rows, mode, TINY_PAD_ID, flatten=flat, boundaries=takes_boundaries(attn))
        synchronize(device)
        start = time.perf_counter()
        logits = model(**model_inputs(batch, device), use_cache=False).logits
        micro_batch_loss(logits, batch, "token", step_denominator([batch], "token"), 1).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if len(warmup) <= i < len(warmup) + len(timed):
            cold.append(time.perf_counter() - start)
        elif i >= len(warmup) + len(timed):
            seconds.append(time.perf_counter() - start)
            num_real = sum(int(r["seq_lens"].sum()) for r in rows)
            real, row_tokens = real + num_real, row_tokens + batch["input_ids"].numel()
            # Attention reaches one sample, except in cross: the whole row (raypack.train.flops).
            segments = [r["seq_lens"].sum() for r in rows] if mode == "cross" else \
                [n for r in rows for n in r["seq_lens"]]
            flops += step_flops(matmul_params, setup["model"]["num_hidden_layers"], setup["model"]["hidden_size"],
                                num_real, segments)
    total = sum(seconds)
    result = {"attn_implementation": attn, "num_timed_steps": len(seconds), "step_time_s": total / len(seconds),
              "first_pass_step_time_s": sum(cold) / len(cold),
              "tokens_per_sec": real / total, "row_tokens_per_sec": row_tokens / total,
              "padding_fraction": 1 - real / row_tokens, "mfu": mfu(flops, total, 1, peak),
              "model_tflops_per_sec": flops / total / 1e12, "peak_memory_mb": peak_memory_mb(device)}
    del model, optimizer
    return result


def loss_step(setup: dict, device: str, dtype: torch.dtype, seed: int) -> dict:
    """The loss section (module docstring): full vs fused on the same hidden states and weight."""
    generator = torch.Generator().manual_seed(seed)
    hidden_size, vocab = setup["model"]["hidden_size"], setup["loss_vocab_size"]
    hidden = (torch.randn(2, setup["max_seq_len"], hidden_size, generator=generator) * 0.5).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(device, dtype)
    labels = torch.randint(0, vocab, (2, setup["max_seq_len"]), generator=generator)
    out = {"tokens": int(labels.numel()), "vocab_size": vocab, "kernel": default_linear_kernel()}
    grads = {}
    for impl in ("full", "fused"):
        times = []
        for _ in range(2):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            synchronize(device)
            reset_peak(device)
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            start = time.perf_counter()
            losses = token_losses(h @ w.T, labels)[0] if impl == "full" else fused_token_losses(h, w, labels)
            loss = losses.sum() / losses.numel()
            loss.backward()
            synchronize(device)
            times.append(time.perf_counter() - start)
            peak = peak_memory_mb(device)
        grads[impl] = (h.grad.float(), w.grad.float())
        out[impl] = {"step_time_s": min(times), "loss": float(loss),
                     "peak_memory_mb": None if peak is None else peak - before / 2**20}
        del h, w, losses, loss
    out["max_grad_difference"] = max(float((a - b).abs().max()) for a, b in zip(grads["full"], grads["fused"]))
    out["fused_over_full"] = {"step_time_s": out["fused"]["step_time_s"] / out["full"]["step_time_s"],
                              "peak_memory_mb": None if device != "cuda" else
                              out["fused"]["peak_memory_mb"] / out["full"]["peak_memory_mb"]}
    return out


def progress(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, fp32: the same code path in seconds")
    parser.add_argument("--cpu-flex", action="store_true",
                        help="dry run: also check flex_attention (compiled on CPU: 20-100 s more on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sections", default="arms,loss,isolation",
                        help="what to run, comma separated: arms, loss, isolation")
    parser.add_argument("--arms", default=",".join(ARMS), help="the arms timed, comma separated")
    parser.add_argument("--save-model", default="", metavar="DIR",
                        help="write the arms' model (random init, seed --seed) to DIR and stop")
    args = parser.parse_args(argv)
    unknown = (set(args.sections.split(",")) - {"arms", "loss", "isolation"}) | (set(args.arms.split(",")) - set(ARMS))
    if unknown:
        parser.error(f"unknown sections or arms {sorted(unknown)}: sections are arms, loss, isolation; arms "
                     f"{', '.join(ARMS)}")
    if args.save_model:
        return save_model(args)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    register_varlen_attention()
    # varlen_attn runs on CUDA only: the dry run takes raypack_varlen's code path with the reference kernel.
    with use_varlen_kernel(reference_varlen_attn if args.dry_run else None):
        return run_check(args)


def save_model(args: argparse.Namespace) -> int:
    """The arms' model, random init from --seed, in the precision the arms train it (--save-model)."""
    setup, dtype = (CPU, torch.float32) if args.dry_run else (GPU, torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    model = build_model(setup, "sdpa", dtype, device, args.seed)
    model.save_pretrained(args.save_model)
    num_params = sum(p.numel() for p in model.parameters())
    progress(f"saved a {num_params / 1e9:.3f} B-parameter Llama ({dtype}) to {args.save_model}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """The check itself (module docstring); main sets up raypack_varlen's kernel around it."""
    started = time.perf_counter()
    setup, device = (dict(CPU), "cpu") if args.dry_run else (GPU, "cuda")
    if args.dry_run and not args.cpu_flex:
        setup["skip"] = {"flex_attention": "not compiled on CPU unless --cpu-flex (20-100 s on 2 cores); "
                                           "tests/test_isolation.py checks flex_attention on CPU"}
    torch.set_float32_matmul_precision("highest")  # fp32 really fp32 (no TF32), for the tight tolerance
    precision = "fp32" if args.dry_run else "bf16"

    samples = make_samples(setup["num_samples"], setup["max_seq_len"], setup["vocab_size"], args.seed)
    lengths = [len(s["input_ids"]) for s in samples]
    rng = np.random.default_rng(args.seed)
    packed = [pack_row([samples[i] for i in b]) for b in best_fit_decreasing(lengths, setup["max_seq_len"])]
    packed = [packed[i] for i in rng.permutation(len(packed))]
    chosen = [r for r in packed if 3 <= len(r["seq_lens"]) <= 8][:2]

    num_params = sum(p.numel() for p in build_model(setup, "sdpa", torch.float32, "meta", args.seed).parameters())
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dry_run": args.dry_run,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
              "model": {**setup["model"], "vocab_size": setup["vocab_size"], "num_params": num_params,
                        "precision": precision},
              "data": {"num_samples": len(samples), "max_seq_len": setup["max_seq_len"],
                       "mean_tokens": float(np.mean(lengths)), "max_tokens": int(max(lengths)),
                       "num_capped": int(sum(n == setup["max_seq_len"] for n in lengths)),
                       "num_bfd_rows": len(packed)}}
    save = lambda: write(result, args.out)  # a run stopped later keeps what it measured

    # The arms first: predictable in time; the isolation check then compiles flex_attention.
    result["varlen_kernel"] = "reference (injected)" if args.dry_run else "torch varlen_attn"
    result["flash_attn_importable"], result["varlen_available"] = flash_attn_importable(), varlen_available()
    result["peak_tflops"] = peak = peak_tflops(result["device"], precision)
    num_steps = setup["warmup"] + setup["steps"]
    batches = {"padding": [[samples[2 * i], samples[2 * i + 1]] for i in range(num_steps)],
               "bfd-isolated": [packed[2 * i: 2 * i + 2] for i in range(num_steps)]}
    batches["bfd-cross"] = batches["bfd-isolated/sdpa"] = batches["bfd-isolated"]
    batches["padfree"] = batches["padding"]
    sections, chosen_arms = args.sections.split(","), args.arms.split(",")
    result["sections"] = sections
    arms = result["arms"] = {}
    for arm, (strategy, attention, attn) in ARMS.items():
        if "arms" not in sections or arm not in chosen_arms:
            continue
        auto = resolve_attn_implementation("auto", device, precision, attention)  # what training would pick here
        try:
            arms[arm] = run_arm(setup, strategy, attention, batches[arm], device, DTYPES[precision], attn, args.seed, peak)
        except Exception as err:  # noqa: BLE001  (e.g. out of memory: keep the other arms' figures)
            arms[arm] = {"attn_implementation": attn, "error": f"{type(err).__name__}: {err}"[:500]}
            reset_peak(device)
        arms[arm]["auto_attn_implementation"] = auto
        progress(f"{arm}: {arms[arm]}")
        save()
    for name, ref in (("tokens_per_sec_vs_padding", "padding"), ("tokens_per_sec_vs_cross", "bfd-cross")):
        result[name] = {arm: arms[arm]["tokens_per_sec"] / arms[ref]["tokens_per_sec"]
                        for arm in arms if "tokens_per_sec" in arms[arm] and "tokens_per_sec" in arms.get(ref, {})}
    if "loss" in sections:
        try:
            result["loss"] = loss_step(setup, device, DTYPES[precision], args.seed)
        except Exception as err:  # noqa: BLE001  (e.g. out of memory at full: keep the rest)
            result["loss"] = {"error": f"{type(err).__name__}: {err}"[:500]}
            reset_peak(device)
        progress(f"loss: {result['loss']}")
        save()
    if "isolation" in sections:
        isolation(setup, chosen, device, args.seed, result.setdefault("isolation", {}), save)
    result["forbidden_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    result["seconds"] = time.perf_counter() - started
    write(result, args.out)
    print(json.dumps(result, indent=1))
    return 1 if any("error" in a for a in arms.values()) else 0


def write(result: dict, out: str) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
