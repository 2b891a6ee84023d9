"""`raypack_varlen`: sample-isolated attention on PyTorch's own variable-length flash kernel (pure torch).

    from raypack.attention import register_varlen_attention
    register_varlen_attention()                 # raypack.model.build_model does it for this name
    model = AutoModelForCausalLM.from_config(config, attn_implementation="raypack_varlen")
    model(input_ids=..., position_ids=..., **batch_boundaries)   # cu_seq_lens_q/k, max_length_q/k

Why: isolated rows given to sdpa carry a block mask, which rules out sdpa's flash
kernel (bfd-isolated ran at 0.80x bfd-cross's tokens/s on an H200), and
flash-attn has no wheel for most torch/CUDA pairs. torch >= 2.10 ships
`torch.nn.attention.varlen.varlen_attn`, a flash kernel over tokens laid end to
end with cumulative sample boundaries: each sample attends causally to itself
only, with no mask and no padding computed.

The attention function (`varlen_attention_forward`, registered under VARLEN
through transformers' AttentionInterface, present in transformers 5.17 and 5.24)
reads the boundaries from the keyword arguments the model passes to every layer,
under the names transformers' flash_attention_2 path uses (BOUNDARY_KEYS). They
are computed once per micro-batch on the host from the rows' `seq_lens`
(raypack.data.collate.sample_boundaries); a call without them is refused (a
ValueError saying so), never silently run as one causal row. The [B, T] queries
are laid end to end (B x T tokens) before the kernel, as transformers'
flash_attention_2 does with these kwargs, so the boundaries index the flattened
micro-batch (raypack's loop gives it one flat row).

The kernel: torch's varlen_attn, adapted once to one calling convention
(`adapt_varlen_attn`) since its signature changed after 2.10:
    torch 2.10   varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)
                 no scale (1/sqrt(head_dim) only), no grouped-query attention (k/v are expanded here)
    torch 2.11+  varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux, scale,
                 window_size=(-1, -1), enable_gqa=False, ...)   causal is window_size=(-1, 0)
varlen_attn runs on CUDA only (bf16/fp16). On CPU the path is exercised by
injecting a kernel (`use_varlen_kernel`): `reference_varlen_attn` is one causal
sdpa per sample, the independent reference tests/test_varlen.py and
scripts/gpu_check.py --dry-run use.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

VARLEN = "raypack_varlen"
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# The kernel hook: None means torch's varlen_attn (adapted); tests and the GPU check's dry run inject one.
_injected: Callable | None = None


def torch_varlen_attn() -> Callable | None:
    """torch.nn.attention.varlen.varlen_attn where this torch has it (>= 2.10), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_available() -> bool:
    """Whether this torch ships varlen_attn (it still needs a CUDA device to run)."""
    return torch_varlen_attn() is not None


def adapt_varlen_attn(varlen_attn: Callable) -> Callable:
    """`varlen_attn` (either signature, module docstring) as kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale,
    causal) -> [tokens, heads, head_dim], k/v with as many or fewer heads than q (grouped-query attention)."""
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch 2.11+
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, causal=True):
            gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                               window_size=(-1, 0) if causal else (-1, -1), **gqa)
    elif "is_causal" in params:  # torch 2.10
        def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, causal=True):
            if scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
                raise ValueError(f"attn_implementation={VARLEN}: torch {torch.__version__}'s varlen_attn has no scale "
                                 f"argument and this model scales by {scale}, not 1/sqrt(head_dim); use torch >= 2.11 "
                                 "or model.attn_implementation=flex_attention")
            k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=causal)
    else:
        raise ValueError(f"varlen_attn{inspect.signature(varlen_attn)}: neither torch 2.10's is_causal nor 2.11+'s "
                         "window_size; set model.attn_implementation to sdpa or flex_attention")
    return kernel


def reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, causal=True) -> torch.Tensor:
    """The reference kernel (any device, any dtype): one scaled_dot_product_attention per sample, causal inside
    it; the same convention as adapt_varlen_attn's kernels. Slow (a host loop): for tests and dry runs."""
    assert torch.equal(cu_q.cpu(), cu_k.cpu()), "self-attention: the same boundaries for queries and keys"
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        one = [x[start:end].transpose(0, 1) for x in (q, _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1]))]
        out[start:end] = F.scaled_dot_product_attention(*one, is_causal=causal, scale=scale).transpose(0, 1)
    return out


@contextlib.contextmanager
def use_varlen_kernel(kernel: Callable | None):
    """Run raypack_varlen with `kernel` (adapt_varlen_attn's convention) inside the block; None: torch's."""
    global _injected
    before, _injected = _injected, kernel
    try:
        yield
    finally:
        _injected = before


def _kernel() -> Callable:
    if _injected is not None:
        return _injected
    varlen_attn = torch_varlen_attn()
    if varlen_attn is None:
        raise ValueError(f"attn_implementation={VARLEN} needs torch >= 2.10 (torch.nn.attention.varlen), this is "
                         f"{torch.__version__}; set model.attn_implementation=auto or flex_attention")
    return adapt_varlen_attn(varlen_attn)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, h, T, d], key/value [B, k, T, d] -> ([B, T, h, d],
    None), each sample (BOUNDARY_KEYS in kwargs) attending causally to itself only. attention_mask is not read:
    transformers builds none for an implementation it has no mask function for, and the boundaries say it all."""
    missing = [name for name in BOUNDARY_KEYS if kwargs.get(name) is None]
    if missing:
        raise ValueError(f"attn_implementation={VARLEN} needs the micro-batch's sample boundaries as model keyword "
                         f"arguments ({', '.join(BOUNDARY_KEYS)}; missing {', '.join(missing)}): collate with "
                         "boundaries=True (raypack.data.collate.sample_boundaries), or use sdpa for this model")
    if dropout:
        raise ValueError(f"attn_implementation={VARLEN} has no attention dropout (the model asks for {dropout}); "
                         "set the model's attention_dropout to 0 or use sdpa")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={VARLEN} does not implement {name} (this model uses it); "
                             "use flash_attention_2 or sdpa")
    batch, heads, length, head_dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[-1]) for x in (query, key, value))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    max_q, max_k = (int(kwargs[name]) for name in ("max_length_q", "max_length_k"))
    out = _kernel()(q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], max_q, max_k, scale=scaling,
                    causal=causal)
    return out.view(batch, length, heads, out.shape[-1]), None


def register_varlen_attention() -> None:
    """Make attn_implementation="raypack_varlen" known to transformers (idempotent; every process that builds a
    model calls it: raypack.model.build_model does)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[tokens, k, d] -> [tokens, heads, d], each of the k key/value heads serving heads / k query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)
