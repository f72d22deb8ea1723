"""ACTIVATIONS (Chang et al. §4, Eq. 8)."""

from __future__ import annotations

from typing import Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_choice
from ..borrow import borrowed
from ..models import Model, neuron_hook_name
from ._common import capture_clean, prepare_sequence, suffix_positions, w_out

__all__ = ["activations"]


def activations(model: Model, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int, *,
                reduce: Literal["mean_abs", "abs_mean"] = "mean_abs") -> Float[Tensor, "layer neuron"]:
    """ACTIVATIONS attribution (Chang et al. Eq. 8): ``A^l(i) = 1/T sum_t |h^l_{i,t}| * ||v^l_i||``.

    ``h^l_{i,t}`` is neuron i's activation (``blocks.{l}.mlp.hook_post``) "when the input consists of
    all the tokens before s_t, i.e. [p, s_<t]" — the activation at the last position of that input,
    which in one causal forward of the whole sequence is position ``prefix_len - 1 + t``; so the T
    positions are ``prefix_len-1 .. seq-2`` (the positions whose logits predict the suffix; the
    authors' code slices ``activations[:, prompt_len-1:-1]`` likewise).  ``v^l_i`` is the neuron's
    value vector, row i of ``W_out[l]`` (the column of V^l in Eq. 2-3).

    Args:
        model: TransformerBridge (borrowed: left unchanged).
        tokens: one sequence, ``[seq]`` or ``[1, seq]``.
        prefix_len: length of the prefix p (1..seq-1).
        reduce: ``"mean_abs"`` (Eq. 8 as printed: mean of |h|) or ``"abs_mean"`` (|mean of h|, what the
            authors' released code computes).

    Precision: the activations come from the model's dtype; the mean over positions and the norms
    are computed in float32 (float64 for a float64 model).

    Returns:
        Float[Tensor, "layer neuron"] (float32) scores on the model's device (one forward pass).
    """
    check_choice(reduce, "reduce", ("mean_abs", "abs_mean"))
    tokens = prepare_sequence(model, tokens, prefix_len)
    with borrowed(model):
        n_layers = model.cfg.n_layers
        names = [neuron_hook_name(l) for l in range(n_layers)]
        _, acts, _ = capture_clean(model, tokens, names, capture_blocks=False)
        pos = suffix_positions(tokens.shape[1], prefix_len)
        exact = torch.promote_types(acts[names[0]].dtype, torch.float32)
        h = torch.stack([acts[n][0, pos] for n in names]).to(exact)  # [layer, T, neuron]
        if reduce == "mean_abs":
            coef = einops.reduce(h.abs(), "layer T neuron -> layer neuron", "mean")
        else:
            coef = einops.reduce(h, "layer T neuron -> layer neuron", "mean").abs()
        norms = w_out(model).to(exact).norm(dim=-1)  # [layer, neuron]
        return (coef * norms).float()
