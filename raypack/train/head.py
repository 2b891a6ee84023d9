"""The model's per-token losses, from its logits (`full`) or fused into its output layer (`fused`).

    losses, mask = model_token_losses(engine, engine.module, inputs, labels, "fused")   # the loop
    losses, mask = model_token_losses(model, model, inputs, labels, "full")             # a bare model

Both return ([B, T-1] fp32 token losses, [B, T-1] target mask), as
raypack.train.loss.token_losses does; the loop reduces them with
raypack.train.loss.reduce_token_losses, validation sums them.

`fused`: for the length of one forward, the output layer (`get_output_embeddings()`,
lm_head; the embedding matrix when the embeddings are tied) computes the token losses
instead of the logits (raypack.train.loss.fused_token_losses on the final hidden
states and its own weight), and the model hands them back as its `.logits`. The loss
is thus computed INSIDE the output layer's forward, through the module's own call
(its hooks run), which is what ZeRO-3 needs: DeepSpeed gathers lm_head.weight once
for that forward (not once per chunk) and once more for its backward, and the weight's
gradient reaches its partition, tied or not. Read outside the module's forward the
weight would be an empty partition (DeepSpeed's documented failure; its remedies are
zero.register_external_parameter or computing inside the module's forward: this is
the second, so no DeepSpeed import is needed here). tests/test_fused_loss.py checks
the gradients at ZeRO 0, 2 and 3.

Refused with `fused` (use train.loss_impl=full): an output layer with a bias, and
models that transform the logits after it (final_logit_softcapping, logit_scale).
"""

from __future__ import annotations

import torch

from raypack.data.tokenize import IGNORE_INDEX
from raypack.train.loss import LOSS_IMPLS, fused_token_losses, token_losses

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def check_fused_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's output layer, if the fused loss can replace its logits; ValueError saying what to change."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(f"train.loss_impl=fused needs an output layer that is a torch.nn.Linear without bias, "
                         f"got {type(head).__name__}; set train.loss_impl=full")
    config = getattr(model, "config", None)
    transforms = [key for key in _LOGIT_TRANSFORMS if getattr(config, key, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(f"train.loss_impl=fused computes the loss from hidden @ lm_head.weight, but this model "
                         f"transforms its logits after that ({', '.join(transforms)}); set train.loss_impl=full")
    return head


def model_token_losses(call, model: torch.nn.Module, inputs: dict, labels: torch.Tensor,
                       impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T-1] token losses, mask) of one forward: `call(**inputs, use_cache=False)` (the DeepSpeed engine or
    the model itself) over `model` (the nn.Module it runs), with `impl` from LOSS_IMPLS (module docstring)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"train.loss_impl {impl!r} is not one of {', '.join(LOSS_IMPLS)}")
    if impl == "full":
        return token_losses(call(**inputs, use_cache=False).logits, labels)
    head = check_fused_head(model)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return fused_token_losses(hidden, head.weight, labels)

    head.forward = forward  # this instance only, for this one call: its hooks (ZeRO-3's gather) still run
    try:
        losses = call(**inputs, use_cache=False).logits
    finally:
        del head.forward
    return losses, labels[:, 1:].to(losses.device) != IGNORE_INDEX
