"""Attribution patching: a first-order estimate of ZERO-OUT (beyond Chang et al.; Nanda 2023,
Syed et al. 2023)."""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..borrow import borrowed, trainable_only
from ..models import Model, layer_hooks
from ._common import memorization_loss, prepare_sequence, suffix_positions

__all__ = ["attribution_patching"]


def attribution_patching(model: Model, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"],
                         prefix_len: int) -> Float[Tensor, "layer neuron"]:
    """Linear estimate of ZERO-OUT's score (Chang et al. Eq. 7) from one forward and one backward.

    Zeroing neuron i of layer l moves its activation from ``h^l_{pos,i}`` to 0 at every position,
    so to first order the memorization loss (Eq. 6) changes by
    ``ΔL^l_i ≈ sum_pos (0 - h^l_{pos,i}) ∂L/∂h^l_{pos,i} = -sum_pos h^l_{pos,i} ∂L/∂h^l_{pos,i}``
    (all positions: the activations of prefix positions reach the suffix through attention).
    The gradients are taken at ``blocks.{l}.mlp.hook_post`` (the first one made a leaf tensor in a
    forward hook, so model weights need no gradients).

    Precision: the gradients come from the model's dtype (the loss of Eq. 6 in float32 or better);
    the products and the sum over positions run in float32 (float64 for a float64 model).

    Returns:
        Float[Tensor, "layer neuron"] (float32) estimated loss increases on the model's device.
    """
    tokens = prepare_sequence(model, tokens, prefix_len)
    with borrowed(model):
        trainable_only(model)
        n_layers = model.cfg.n_layers
        leaves: dict[int, Tensor] = {}

        def leaf(act, hook, *, layer):
            # the first hooked layer becomes a leaf; later layers are already in its graph (detaching
            # them would cut the paths from earlier neurons through later layers' neurons)
            x = act if act.requires_grad else act.detach().requires_grad_(True)
            leaves[layer] = x
            return x

        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=layer_hooks("post", range(n_layers), leaf))
            pos = suffix_positions(tokens.shape[1], prefix_len)
            loss = memorization_loss(logits[:, pos], tokens[:, prefix_len:])[0]
            hs = [leaves[l] for l in range(n_layers)]
            grads = torch.autograd.grad(loss, hs)
        exact = torch.promote_types(hs[0].dtype, torch.float32)
        h = torch.stack([x.detach()[0] for x in hs]).to(exact)
        g = torch.stack([x[0] for x in grads]).to(exact)
        return -einops.einsum(h, g, "layer pos neuron, layer pos neuron -> layer neuron").float()
