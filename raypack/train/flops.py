"""Model FLOPs of a training step and the MFU estimate (pure: no torch, no ray).

Per step, counted on the tokens the model should compute (real tokens, never
padding), in the PaLM / torchtitan convention (forward + backward = 3 x forward,
attention counted over the whole causal square, not halved):

    flops = 6 * N * real_tokens + 12 * L * H * sum(s ** 2 for every attention segment s)

N is the parameter count that takes part in matmuls (the input embedding is a
lookup and is left out unless tied to the output head), L the number of layers,
H the hidden size. A segment is what one token may attend to: one sample in the
`padding`, `padfree` and `isolated` arms, a whole packed row in `cross`. So
padding and padfree count the same FLOPs: padding's pads are computed but not
counted, which is what its lower MFU shows. MFU divides the
step's flops over all ranks by step time x ranks x the accelerator's peak
dense TFLOPS at the training precision (`train.peak_tflops`, or the table below
for bf16).
"""

from __future__ import annotations

# Peak dense bf16 tensor-core TFLOPS per GPU, from the vendor data sheets (no sparsity).
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str, precision: str, configured: float = 0.0) -> float | None:
    """The peak to divide by: `configured` when > 0, else the bf16 table entry for this GPU, else None."""
    if configured > 0:
        return configured
    if precision != "bf16":
        return None
    name = device_name.upper()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def step_flops(matmul_params: int, num_layers: int, hidden_size: int, real_tokens: int,
               segment_lengths) -> float:
    """Training FLOPs of the real tokens of one step (module docstring)."""
    square = sum(int(s) * int(s) for s in segment_lengths)
    return 6.0 * matmul_params * real_tokens + 12.0 * num_layers * hidden_size * square


def gpu_hours(flops: float, peak: float, utilisation: float) -> float:
    """GPU-hours that `flops` take at `utilisation` of a `peak` TFLOPS GPU (raypack plan's bill).

    >>> round(gpu_hours(3.56e18, peak=989.0, utilisation=0.35), 3)   # 3.56 EFLOP at 35% of an H100's bf16 peak
    2.857
    """
    return flops / (peak * 1e12 * utilisation) / 3600


def mfu(flops_all_ranks: float, step_time_s: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one step, or None when no peak is known."""
    if not peak or step_time_s <= 0:
        return None
    return flops_all_ranks / (step_time_s * world_size * peak * 1e12)
