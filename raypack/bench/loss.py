"""What the loss costs at a real vocabulary: one training step, train.loss_impl full vs fused (`raypack bench loss`).

    raypack bench loss jobs/compare.yaml data.max_seq_len=2048 [--vocab 128256] [--steps 3] [--json F]

(rows: train.micro_batch_size, tokens per row: data.max_seq_len.)

Each impl runs in a fresh Python process of its own (so one's peak memory cannot hide
the other's): a 2-layer tiny Llama (raypack.model.build_tiny_model: hidden 64) with
the given vocabulary (Llama-3's 128,256 by default), fp32 on CPU, torch AdamW; a
micro-batch of `rows` x `tokens` random tokens, every target supervised (the fused
loss gains nothing from skipping prompt tokens here); `steps` optimizer steps of
forward -> token losses (raypack.train.head.model_token_losses) -> the `token`
reduction -> backward -> AdamW step. Printed per impl: the fastest step's time (the
first step allocates AdamW's states), the process's peak RSS over the whole run
(VmHWM: model, optimizer, steps) and its RSS before the first step; then fused / full.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LLAMA3_VOCAB = 128_256


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_process(impl: str, vocab: int, rows: int, tokens: int, steps: int, seed: int = 0) -> dict:
    """The steps of one impl in THIS process (bench_loss runs it in a fresh one)."""
    import torch

    from raypack.model import build_tiny_model
    from raypack.train.head import model_token_losses
    from raypack.train.loss import reduce_token_losses, step_denominator

    torch.manual_seed(seed)
    model = build_tiny_model(seed=seed, vocab_size=vocab).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (rows, tokens))
    batch = {"input_ids": ids, "labels": ids.clone()}
    denominator = step_denominator([batch], "token")
    rss_before = _rss_mb("VmRSS")
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses_, _ = model_token_losses(model, model, {"input_ids": ids}, batch["labels"], impl)
        out = reduce_token_losses(losses_, batch, "token", denominator, 1)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(out.loss.item())
    return {"impl": impl, "step_time_s": min(times), "step_times_s": times, "losses": losses,
            "peak_rss_mb": _rss_mb("VmHWM"), "rss_mb_before_steps": rss_before, "threads": torch.get_num_threads()}


def bench_loss(vocab: int = LLAMA3_VOCAB, rows: int = 2, tokens: int = 2048, steps: int = 3) -> dict:
    """Run full and fused, each in its own subprocess; their figures and the fused / full ratios."""
    out = {"vocab": vocab, "rows": rows, "tokens": tokens, "steps": steps}
    for impl in ("full", "fused"):
        cmd = [sys.executable, "-m", "raypack.bench.loss", "--impl", impl, "--vocab", str(vocab), "--rows", str(rows),
               "--tokens", str(tokens), "--steps", str(steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench loss: the {impl} process failed:\n{done.stderr[-2000:]}")
        out[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    out["memory_ratio_full_over_fused"] = out["full"]["peak_rss_mb"] / out["fused"]["peak_rss_mb"]
    out["time_ratio_fused_over_full"] = out["fused"]["step_time_s"] / out["full"]["step_time_s"]
    return out


def format_loss_result(result: dict) -> str:
    lines = [(f"bench loss: 2-layer tiny Llama, vocabulary {result['vocab']:,}, {result['rows']} x "
              f"{result['tokens']} tokens, fp32 CPU, {result['steps']} steps (fastest shown)"),
             f"{'impl':>6}  {'step_time_s':>11}  {'peak_rss_mb':>11}  {'rss_before_mb':>13}  first loss"]
    for impl in ("full", "fused"):
        r = result[impl]
        lines.append(f"{impl:>6}  {r['step_time_s']:>11.2f}  {r['peak_rss_mb']:>11.0f}  "
                     f"{r['rss_mb_before_steps']:>13.0f}"
                     f"  {r['losses'][0]:.6f}")
    lines.append(f"peak RSS full / fused: {result['memory_ratio_full_over_fused']:.2f}x; step time fused / full: "
                 f"{result['time_ratio_fused_over_full']:.2f}x")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description="one impl's steps (raypack bench loss runs this per impl)")
    parser.add_argument("--impl", choices=("full", "fused"), required=True)
    parser.add_argument("--vocab", type=int, default=LLAMA3_VOCAB)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(one_process(args.impl, args.vocab, args.rows, args.tokens, args.steps)))


if __name__ == "__main__":
    _main()
