"""The loss of one micro-batch, normalised over the whole optimizer step (pure torch).

An optimizer step runs `gradient_accumulation_steps` (G) micro-batches on each of
W data-parallel ranks. Before the step each rank fetches its G micro-batches,
counts their denominator with `step_denominator`, and sums the counts over ranks
once with `all_reduce_sum`; the result D is the same on every rank. Each
micro-batch then backwards

    loss_mb = numerator_mb * W / D

The factor W undoes the gradient AVERAGING over ranks done by DDP/DeepSpeed, and
nothing else may divide by G: call `engine.backward(loss, scale_wrt_gas=False)`
(the rest of the engine contract is in raypack.train.engine).
Summed over the step, the gradient is that of  sum(numerator_mb) / D  over all
micro-batches of all ranks, however the step's rows are split across ranks and
micro-batches (tests/test_loss.py shows it). Per `reduction`:

    token   numerator_mb = sum of the micro-batch's token losses
            D            = supervised targets of the step
            -> the exact mean over every supervised token of the step.
    sample  numerator_mb = sum over its samples of (mean token loss of the sample)
            D            = samples with >= 1 target in the step
            -> every sample weighs the same, whatever its length.
    paper   numerator_mb = mean token loss of the micro-batch (0 if it has no target)
            D            = micro-batches of the step (G * W)
            -> the mean of micro-batch means, as the paper's code (HF Trainer +
               DeepSpeed) did: tokens of short samples weigh more when padded.

Targets are shifted as in transformers: logits[:, t] predicts labels[:, t + 1];
positions whose label is IGNORE_INDEX carry no loss. If a step has no target at
all, D = 0 is replaced by 1 so the loss is 0 (every rank still backwards, so the
ranks stay in step).

Samples (for `sample`) are found per row, in this order:
1. `batch["segment_ids"]` if present: int64 [B, T], one id per sample within its
   row (pads may share an id with no targets). Build it with
   `segment_ids_from_seq_lens` from the packed rows' `seq_lens`. REQUIRED for
   `cross` batches: their position_ids run 0..T-1 over the whole row, so the
   samples cannot be read from them and the row would count as one sample.
2. else `batch["position_ids"]`: a new sample wherever the position does not go
   up by exactly 1 (as transformers' find_packed_sequence_indices); right for
   `isolated` batches.
3. else one sample per row (`padding` batches).
In `random` packing a sample cut across rows counts as one sample per piece.

`segment_ids` is for the loss only: pass the model only input_ids,
attention_mask and position_ids.

Example (one row, two packed samples, isolated positions; targets 12, 13 in
sample a and 22 in sample b; token losses l12, l13, l22):

    labels        [[-100, 12, 13, -100, 22]]
    position_ids  [[0, 1, 2, 0, 1]]
    token:   numerator = l12 + l13 + l22,          D = 3
    sample:  numerator = (l12 + l13) / 2 + l22,    D = 2
    paper:   numerator = (l12 + l13 + l22) / 3,    D = 1

Two ways to the token losses (train.loss_impl, LOSS_IMPLS), the same reductions after:

    full    token_losses(logits, labels): the model's [B, T, vocab] logits, upcast to fp32.
    fused   fused_token_losses(hidden, weight, labels): from the final hidden states [B, T, H] and
            the output weight [vocab, H], for the supervised positions only, in chunks of
            `chunk_rows` tokens; each chunk's logits exist only while that chunk is computed, in
            forward and again (recomputed) in backward, so no [tokens, vocab] tensor is ever kept.
            `linear_token_losses` picks the kernel in one place: torch's own
            F.linear_cross_entropy (reduction="none", which recomputes in backward) where torch has
            it (2.13, the version raypack pins), else raypack's `ChunkedLinearCrossEntropy` (older
            torch, e.g. a GPU image's 2.11). Both chunk alike (`chunk_rows`: a chunk's fp32 logits
            take about CHUNK_BYTES). raypack.train.head hands the model's hidden states and output
            weight to it from inside the output layer's forward (ZeRO-3 gathers the weight there).

For metrics, `MicroBatchLoss.token_loss_sum` and `.num_tokens` give the same
per-token mean in every arm and reduction: sum both over the step's micro-batches
and ranks and divide. `token_loss_sum` stays a tensor on the logits' device (sum it
there and read it once per step): `micro_batch_loss` reads no value back from the
device, so a GPU's queue never waits on the host mid-step. What it needs to count
(targets, a sample's targets) comes from the labels, which the collator leaves on
the host (tests/test_loss.py checks it with logits on the meta device).
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raypack.data.tokenize import IGNORE_INDEX

LOSS_REDUCTIONS = ("token", "sample", "paper")
LOSS_IMPLS = ("fused", "full")
LINEAR_KERNELS = ("torch", "chunked")  # what linear_token_losses runs: torch's op or raypack's fallback
CHUNK_BYTES = 64 * 2**20  # a chunk's fp32 logits, about


class MicroBatchLoss(NamedTuple):
    """What one micro-batch contributes to the step."""

    loss: torch.Tensor  # scalar to backward (already normalised over the step)
    token_loss_sum: torch.Tensor  # sum of its token losses (detached, on the logits' device), for the metric
    num_tokens: int  # its supervised targets (counted from the labels on the host)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target cross-entropy in fp32, shifted: ([B, T-1] losses, [B, T-1] bool mask).

    losses[b, t] is the loss of predicting labels[b, t+1] from logits[b, t]; it is 0
    where mask is False (label IGNORE_INDEX).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, T, vocab] with labels {tuple(labels.shape)} [B, T]")
    targets = labels[:, 1:].to(logits.device)
    shifted = logits[:, :-1].float()
    losses = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return losses, targets != IGNORE_INDEX


def segment_ids(batch: dict) -> torch.Tensor:
    """Per-token sample ids within each row, [B, T] int64 (see the module docstring for the rules)."""
    labels = batch["labels"]
    if "segment_ids" in batch:
        ids = batch["segment_ids"]
        if ids.shape != labels.shape or ids.dtype.is_floating_point or (ids.numel() and int(ids.min()) < 0):
            raise ValueError(f"segment_ids must be non-negative integers shaped like labels {tuple(labels.shape)}")
        return ids.long()
    if "position_ids" in batch:
        positions = batch["position_ids"]
        first = positions[:, :1] - 1
        return (torch.diff(positions, prepend=first, dim=-1) != 1).long().cumsum(-1)
    return torch.zeros_like(labels, dtype=torch.long)


def segment_ids_from_seq_lens(seq_lens: list, length: int) -> torch.Tensor:
    """Segment ids for rows with the given per-row sample lengths, right-padded to `length`.

    >>> segment_ids_from_seq_lens([[3, 2], [4]], 5).tolist()
    [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]

    The pad run of a row gets the next id; it has no targets, so it never counts.
    """
    out = torch.empty(len(seq_lens), length, dtype=torch.long)
    for i, lens in enumerate(seq_lens):
        lens = [int(n) for n in lens]
        if sum(lens) > length:
            raise ValueError(f"row {i}: seq_lens {lens} add up to more than the batch length {length}")
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
        out[i, : len(ids)] = ids
        out[i, len(ids):] = len(lens)
    return out


def _sample_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the host, from the labels and segments alone: ([B, T-1] target mask, [B, T-1] sample key of each
    position (unique per row and sample), targets per key)."""
    mask = batch["labels"][:, 1:].cpu() != IGNORE_INDEX
    segments = segment_ids(batch)[:, 1:].cpu()
    per_row = int(segments.max()) + 1 if segments.numel() else 1
    key = torch.arange(mask.shape[0]).unsqueeze(1) * per_row + segments
    return mask, key, torch.bincount(key[mask], minlength=mask.shape[0] * per_row)


def _sample_weights(batch: dict) -> torch.Tensor:
    """[B, T-1] float32 on the host: 1 / (targets of its sample) at each target, 0 elsewhere.

    The `sample` numerator, sum over samples of their mean token loss, is then
    (token_losses * weights).sum(): computed from the labels alone (on the host, where
    the collator leaves them), so the device never has to report a count back.
    """
    mask, key, counts = _sample_targets(batch)
    return torch.where(mask, 1.0 / counts[key].clamp(min=1), 0.0)


def _check_reduction(reduction: str) -> None:
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r} is not one of {', '.join(LOSS_REDUCTIONS)}")


def step_denominator(micro_batches: list[dict], reduction: str) -> float:
    """This rank's share of D for the step: targets (token), samples with a target (sample)
    or micro-batches (paper). Sum it over ranks with `all_reduce_sum`."""
    _check_reduction(reduction)
    if reduction == "paper":
        return float(len(micro_batches))
    total = 0
    for batch in micro_batches:
        if reduction == "token":
            total += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        else:
            total += int((_sample_targets(batch)[2] > 0).sum())
    return float(total)


def all_reduce_sum(value: float, group=None) -> float:
    """Sum a number over the ranks of `group`; the value itself when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return float(tensor.item())


def micro_batch_loss(logits: torch.Tensor, batch: dict, reduction: str, denominator: float,
                     world_size: int) -> MicroBatchLoss:
    """The micro-batch's loss to backward: numerator * world_size / denominator (module docstring).

    `denominator` is the step's D summed over ranks; `world_size` the number of
    data-parallel ranks whose gradients are averaged.
    """
    _check_reduction(reduction)
    return reduce_token_losses(token_losses(logits, batch["labels"])[0], batch, reduction, denominator, world_size)


def reduce_token_losses(losses: torch.Tensor, batch: dict, reduction: str, denominator: float,
                        world_size: int) -> MicroBatchLoss:
    """micro_batch_loss from the micro-batch's [B, T-1] token losses (token_losses or fused_token_losses):
    0 where the label is IGNORE_INDEX."""
    _check_reduction(reduction)
    if world_size < 1 or denominator < 0:
        raise ValueError(f"world_size must be >= 1 and denominator >= 0, got {world_size} and {denominator}")
    if losses.shape != batch["labels"][:, 1:].shape:
        raise ValueError(f"token losses {tuple(losses.shape)} must be [B, T-1] for labels "
                         f"{tuple(batch['labels'].shape)}")
    # No value is read back from the device here (one host sync per micro-batch would stall a GPU's queue):
    # the ignored targets' losses are 0 (cross_entropy's ignore_index), and the counts and sample weights come
    # from the labels, which stay on the host.
    token_sum = losses.sum()
    num_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if reduction == "token":
        numerator = token_sum
    elif reduction == "paper":
        numerator = token_sum / max(num_tokens, 1)
    else:
        numerator = (losses * _sample_weights(batch).to(losses.device, non_blocking=True)).sum()
    loss = numerator * (world_size / (denominator if denominator > 0 else 1.0))
    return MicroBatchLoss(loss, token_sum.detach(), num_tokens)


# ------------------------------------------------------------------ fused linear cross-entropy


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk: a chunk's fp32 logits take about CHUNK_BYTES, in multiples of 64 rows.

    >>> chunk_rows(128_256)
    128
    """
    return max(64, CHUNK_BYTES // (4 * vocab_size) // 64 * 64)


def chunks(num_rows: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of `rows` rows covering 0..num_rows (the last may be shorter).

    >>> chunks(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    if rows < 1:
        raise ValueError(f"chunk rows must be >= 1, got {rows}")
    return [(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]


def default_linear_kernel() -> str:
    """'torch' where this torch has F.linear_cross_entropy with chunking options (2.13), else 'chunked'."""
    return "torch" if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions") \
        else "chunked"


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of hidden @ weight.T against targets, chunk by chunk (torch without its own op).

    forward: per chunk, logits = (h @ W.T) in fp32 (the matmul in the inputs' dtype, as the
    output layer does in the full path), loss = logsumexp(logits) - logits[target]; only the
    [rows] losses are kept. backward recomputes each chunk's logits: dlogits = (softmax - onehot)
    x the rows' upstream gradient; dh = dlogits @ W, dW summed over chunks in fp32. It saves the
    weight itself (not a detached copy), so under ZeRO-3 backward reads the weight DeepSpeed
    gathers again for the output layer's backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start, end in chunks(hidden.shape[0], rows):
            logits = (hidden[start:end] @ weight.T).float()
            target_logits = logits.gather(1, targets[start:end, None]).squeeze(1)
            losses[start:end] = torch.logsumexp(logits, dim=-1) - target_logits
        ctx.save_for_backward(hidden, weight, targets)
        ctx.rows = rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start, end in chunks(hidden.shape[0], ctx.rows):
            h = hidden[start:end]
            grad_logits = torch.softmax((h @ weight.T).float(), dim=-1)
            grad_logits[torch.arange(end - start, device=h.device), targets[start:end]] -= 1.0
            grad_logits *= grad_losses[start:end, None].float()
            if need_hidden:
                grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, h.float())
        return grad_hidden, grad_weight.to(weight.dtype) if need_weight else None, None, None


def linear_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int | None = None,
                        kernel: str | None = None) -> torch.Tensor:
    """[N] cross-entropy of each row of hidden [N, H] @ weight [V, H].T against targets [N] (all real targets),
    `rows` tokens per chunk (default chunk_rows(V)), on `kernel` (LINEAR_KERNELS; default_linear_kernel())."""
    rows = rows or chunk_rows(weight.shape[0])
    kernel = kernel or default_linear_kernel()
    if kernel == "torch":
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows, chunking_method=None)
        return F.linear_cross_entropy(hidden, weight, targets, reduction="none", ignore_index=IGNORE_INDEX,
                                      options=options)
    if kernel != "chunked":
        raise ValueError(f"linear kernel {kernel!r} is not one of {', '.join(LINEAR_KERNELS)}")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, rows)


def fused_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int | None = None,
                       kernel: str | None = None) -> torch.Tensor:
    """The [B, T-1] token losses of token_losses(hidden @ weight.T, labels), without the logits.

    hidden: [B, T, H] final hidden states (after the final norm); weight: the output layer's
    [V, H]. Only the supervised positions are computed (their indices come from the labels on
    the host, so nothing is read back from the device); the others are 0, as in token_losses.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape or weight.dim() != 2 \
            or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [B, T, H] with labels {tuple(labels.shape)} [B, T] "
                         f"and weight {tuple(weight.shape)} [vocab, H]")
    batch_size, length = labels.shape
    targets = labels[:, 1:].cpu()
    at_row, at_col = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    device = hidden.device
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, (at_row * length + at_col).to(device))
    losses = linear_token_losses(picked, weight, targets[at_row, at_col].long().to(device), rows, kernel)
    out = torch.zeros(batch_size * (length - 1), dtype=torch.float32, device=device)
    return out.index_copy(0, (at_row * (length - 1) + at_col).to(device), losses.float()).view(batch_size, length - 1)
