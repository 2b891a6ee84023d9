"""Validation loss on the shared held-out split: one number, computed the same way for every arm.

The validation split (prepared once, the same conversations for every arm) holds
one sample per row. Its loss is the mean over every supervised token of the
split (the `token` rule), each sample attending only to itself, whatever the arm
trained on: rows are collated in `padding` mode, longest first so a micro-batch
holds rows of similar length. With several ranks each takes every world_size-th
micro-batch; every rank runs the same number of forwards (ZeRO-3 gathers
parameters collectively), a rank with none left repeats its first one with zero
weight. The sums are all-reduced.

    groups, n = validation_groups(rows, micro_batch_size, rank, world_size)
    loss_sum, num_tokens = validation_sums(losses_of, rows, groups, n, pad_token_id)   # in the training loop
    validation_loss_of_model(model_dir, val_folder)                # `raypack eval --val FOLDER`
"""

from __future__ import annotations

import math

import numpy as np
import torch

from raypack.data.collate import collate
from raypack.data.prepared import RowStore
from raypack.train.head import check_fused_head, model_token_losses


def validation_groups(rows: RowStore, micro_batch_size: int, rank: int,
                      world_size: int) -> tuple[list[np.ndarray], int]:
    """This rank's micro-batches as row indices, and how many forwards every rank runs."""
    lengths = np.asarray(rows.num_tokens)
    order = np.argsort(-lengths, kind="stable")
    groups = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return groups[rank::world_size], math.ceil(len(groups) / world_size)


@torch.no_grad()
def validation_sums(losses_of, rows: RowStore, groups: list[np.ndarray], num_forwards: int,
                    pad_token_id: int, boundaries: bool = False) -> tuple[float, int]:
    """(sum of token losses, number of supervised tokens) over this rank's groups of rows.

    `losses_of(batch) -> ([B, T-1] token losses, mask)`, as raypack.train.head.model_token_losses
    gives them (the loop: train.loss_impl, the same as training). A rank with fewer groups repeats its first with
    zero weight, so every rank calls forward num_forwards times (a rank with no
    group at all can only occur when the split has fewer micro-batches than
    ranks; it then repeats row 0). `boundaries`: the batches carry the sample boundaries an attention such
    as raypack_varlen needs (raypack.data.collate.takes_boundaries).
    """
    loss_sum, num_tokens = 0.0, 0
    for i in range(num_forwards):
        idx = groups[i] if i < len(groups) else (groups[0] if groups else np.zeros(1, dtype=np.int64))
        batch = collate(rows.take(idx), "padding", pad_token_id, boundaries=boundaries)
        losses, mask = losses_of(batch)
        if i < len(groups):
            loss_sum += float(losses[mask].sum())
            num_tokens += int(mask.sum())
    return loss_sum, num_tokens


def validation_loss_of_model(model_dir: str, val_folder: str, micro_batch_size: int = 4,
                             device: str = "cpu") -> dict:
    """Validation loss of a saved Hugging Face model on a prepared validation split (one process)."""
    from transformers import AutoModelForCausalLM

    from raypack.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # a pad token even if the folder's has none
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    rows = RowStore.open(val_folder)
    groups, num_forwards = validation_groups(rows, micro_batch_size, 0, 1)

    def losses_of(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        return model_token_losses(model, model, inputs, batch["labels"], impl)

    try:  # the fused loss where the model allows it (the logits of a 128k vocabulary are large), else full
        check_fused_head(model)
        impl = "fused"
    except ValueError:
        impl = "full"

    loss_sum, num_tokens = validation_sums(losses_of, rows, groups, num_forwards, tokenizer.pad_token_id)
    return {"val_loss": loss_sum / num_tokens if num_tokens else float("nan"), "val_tokens": num_tokens,
            "val_rows": rows.num_rows}
