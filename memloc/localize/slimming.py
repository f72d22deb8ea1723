"""SLIMMING (Chang et al. §4, Eq. 9, A.3)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_float as _check_float, check_positive_int
from .._checks import check_start_layer as _check_start_layer
from ..borrow import borrowed
from ._common import prepare_sequence
from ._masks import train_masks

__all__ = ["slimming", "l1_regularizer"]


def l1_regularizer(mask: Float[Tensor, "layer neuron"], start_layer: int = 0) -> Float[Tensor, ""]:
    """The L1 term of Eq. 9, normalized as in the authors' code: ``sum_l ||m^l||_1 / N`` over the
    N masked neurons of layers ``>= start_layer`` (so ``lam`` is per mean neuron)."""
    m = mask[start_layer:]
    return m.abs().sum() / m.numel()


def slimming(model: Any, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int, *,
             lam: float = 1000.0, lr: float = 1e-2, max_steps: int = 5000, stop_loss: float = 0.1,
             check_every: int = 10, start_layer: int = 0, progress_bar: bool = True,
             history: list | None = None) -> Float[Tensor, "layer neuron"]:
    """SLIMMING attribution (Chang et al. Eq. 9): learn a mask ``m^l`` on every FFN hidden state
    (``h^l <- h^l ⊙ m^l`` at ``blocks.{l}.mlp.hook_post``), initialized to 1 and clipped to [0, 1]
    after every step (A.3), minimizing ``l_mem(x) + lam * L1(m)`` with the model frozen and no
    dropout; the score is ``A^l(i) = m^l_i``.

    Defaults are the authors' released settings (MemPi ``downstream.py``; A.7 gives no numbers):
    Adam, ``lr=1e-2``, ``lam=1000`` on the L1 averaged over masked neurons, at most 5000 steps,
    stopping early once the L1 term drops below ``stop_loss=0.1`` (checked every 10 steps).
    ``start_layer=1`` reproduces their DEL setting (bottom layer not masked, its scores stay 1).

    Args:
        model: TransformerBridge (borrowed: weights and flags restored, also on exceptions).
        tokens: one sequence, ``[seq]`` or ``[1, seq]``.
        prefix_len: prefix length (1..seq-1).
        history: optional list receiving (step, memorization loss, regularizer) per step.

    Returns:
        Float[Tensor, "layer neuron"] mask values in [0, 1] on the model's device.
    """
    tokens = prepare_sequence(model, tokens, prefix_len)
    lam = _check_float(lam, "lam", positive=False)
    lr = _check_float(lr, "lr")
    stop_loss = _check_float(stop_loss, "stop_loss", positive=False)
    check_positive_int(max_steps, "max_steps")
    check_positive_int(check_every, "check_every")
    start_layer = _check_start_layer(model, start_layer)
    with borrowed(model):
        dev = tokens.device
        mask = torch.ones(model.cfg.n_layers, model.cfg.d_mlp, device=dev, requires_grad=True)
        train_masks(model, tokens, prefix_len, mask, mask_fn=lambda l: mask[l],
                    regularizer=lambda: l1_regularizer(mask, start_layer), lam=lam, lr=lr, max_steps=max_steps,
                    stop_loss=stop_loss, check_every=check_every, start_layer=start_layer, clip=(0.0, 1.0),
                    progress_bar=progress_bar, desc="slimming", history=history)
        return mask.detach().clone()
