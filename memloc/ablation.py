"""Selecting located neurons and dropping them out (Chang et al. §2 "Dropout", §3.2, A.8, A.9).

A neuron is one component of the FFN hidden state h^l (``blocks.{l}.mlp.hook_post``).
Selections are boolean masks ``Bool[Tensor, "layer neuron"]``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ._checks import check_choice, check_fraction, check_positive_int, check_tokens
from .models import Model, layer_hooks, neuron_hook_name

__all__ = ["select_top_k", "ablate", "mean_activations", "n_selected"]


def _check_scores(scores: Any) -> Tensor:
    if not isinstance(scores, Tensor) or scores.ndim != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a 2-D float tensor [layer, neuron], got "
                         f"{type(scores).__name__} {getattr(scores, 'shape', '')}")
    if torch.isnan(scores).all():
        raise ValueError("scores are NaN everywhere: no neuron is scored (NaN marks an unscored neuron)")
    return scores


def n_selected(ratio: float, n: int) -> int:
    """Number of neurons a ratio selects out of ``n``: round(ratio * n), at least 1."""
    return max(1, int(math.floor(ratio * n + 0.5)))


def select_top_k(scores: Float[Tensor, "layer neuron"], ratio: float, *, per_layer: bool = True,
                 exclude_layers: Sequence[int] = ()) -> Bool[Tensor, "layer neuron"]:
    """Mask of the top ``ratio`` fraction of neurons by attribution score.

    ``per_layer=True`` (the paper's default) takes the top round(ratio * d_mlp) neurons of every
    layer; ``per_layer=False`` takes the top round(ratio * n_neurons) across all included layers
    (Chang et al. A.9).  Layers in ``exclude_layers`` (e.g. ``[0]``, the DEL default of A.8) get
    none and do not count towards the across-layer budget.  Ties break towards lower indices.

    NaN marks an *unscored* neuron (a partial map, e.g. ``zero_out(..., layers=[2],
    neurons=range(64))``): selection is among the scored neurons only, and ``ratio`` is a fraction
    of them -- round(ratio * n_scored(l)) (at least 1) in a layer with n_scored(l) scored neurons,
    or round(ratio * all scored neurons of the included layers) across layers; a layer with no
    scored neuron (a row of NaN) selects nothing.  E.g. 64 scored neurons of layer 2 at
    ``ratio=0.05`` select the top round(3.2) = 3 of them and nothing elsewhere.  Raises
    ValueError if every neuron is NaN.
    """
    scores = _check_scores(scores)
    check_fraction(ratio, "ratio")
    n_layers, d = scores.shape
    bad = [l for l in exclude_layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"exclude_layers {bad} are outside 0..{n_layers - 1}")
    keep = [l for l in range(n_layers) if l not in set(exclude_layers)]
    if not keep:
        raise ValueError("exclude_layers excludes every layer")
    mask = torch.zeros(n_layers, d, dtype=torch.bool, device=scores.device)
    s = scores.detach().float()
    scored = ~torch.isnan(s)
    if per_layer:
        for l in keep:
            n = int(scored[l].sum())
            if n == 0:
                continue
            # NaN sorts last whatever the direction: rank only the scored entries
            idx = scored[l].nonzero().flatten()
            order = idx[torch.argsort(s[l, idx], descending=True, stable=True)]
            mask[l, order[:n_selected(ratio, n)]] = True
    else:
        sub = s[keep].flatten()
        idx = (~torch.isnan(sub)).nonzero().flatten()
        if len(idx) == 0:
            return mask
        order = idx[torch.argsort(sub[idx], descending=True, stable=True)][:n_selected(ratio, len(idx))]
        rows = torch.tensor(keep, device=scores.device)[order // d]
        mask[rows, order % d] = True
    return mask


@torch.no_grad()
def mean_activations(model: Model, tokens: Int[Tensor, "batch seq"], *, batch_size: int = 32) -> Float[Tensor, "layer neuron"]:
    """Mean activation of every FFN neuron over all positions of a reference batch (for mean ablation)."""
    tokens = check_tokens(model, tokens)
    check_positive_int(batch_size, "batch_size")
    n_layers, d = model.cfg.n_layers, model.cfg.d_mlp
    total = torch.zeros(n_layers, d, dtype=torch.float64)
    count = 0

    def hook(act, hook, *, layer):
        total[layer] += act.double().sum(dim=(0, 1)).cpu()

    hooks = layer_hooks("post", range(n_layers), hook)
    for i in range(0, len(tokens), batch_size):
        x = tokens[i:i + batch_size]
        model.run_with_hooks(x, fwd_hooks=hooks)
        count += x.numel()
    return (total / count).float()


def _as_mask(model: Model, neurons: Any) -> Tensor:
    n_layers, d = model.cfg.n_layers, model.cfg.d_mlp
    if isinstance(neurons, dict):
        mask = torch.zeros(n_layers, d, dtype=torch.bool)
        for l, idx in neurons.items():
            if not 0 <= int(l) < n_layers:
                raise ValueError(f"neurons: layer {l} outside 0..{n_layers - 1}")
            idx = torch.as_tensor(idx, dtype=torch.long)
            if len(idx) and (idx.min() < 0 or idx.max() >= d):
                raise ValueError(f"neurons: indices of layer {l} outside 0..{d - 1}")
            mask[int(l), idx] = True
        return mask
    if not isinstance(neurons, Tensor) or neurons.dtype != torch.bool or tuple(neurons.shape) != (n_layers, d):
        raise ValueError(f"neurons must be a bool mask of shape ({n_layers}, {d}) or a dict layer -> indices, got "
                         f"{type(neurons).__name__} {getattr(neurons, 'shape', '')}")
    return neurons


@contextmanager
def ablate(model: Model, neurons: Bool[Tensor, "layer neuron"] | dict, mode: Literal["zero", "mean"] = "zero", *,
           reference_tokens: Int[Tensor, "batch seq"] | None = None,
           means: Float[Tensor, "layer neuron"] | None = None) -> Iterator[Any]:
    """Drop out ``neurons`` while the context is open (Chang et al. §2 "Dropout").

    ``mode="zero"`` sets the selected activations h^l_i to 0 at every position; ``mode="mean"``
    sets them to their mean over ``reference_tokens`` (or the given ``means``).  Every forward
    run inside the context (metrics, decoding, gradients) sees the ablation; the hooks are
    removed on exit, also on exceptions.
    """
    check_choice(mode, "mode", ("zero", "mean"))
    mask = _as_mask(model, neurons)
    if mode == "mean":
        if means is None:
            if reference_tokens is None:
                raise ValueError("mode='mean' needs reference_tokens or means")
            means = mean_activations(model, reference_tokens)
        if tuple(means.shape) != tuple(mask.shape):
            raise ValueError(f"means must have shape {tuple(mask.shape)}, got {tuple(means.shape)}")
    hooks = []
    for l in range(mask.shape[0]):
        idx = mask[l].nonzero().flatten()
        if len(idx) == 0:
            continue
        fill = None if mode == "zero" else means[l, idx]

        def hook(act, hook, idx=idx, fill=fill):
            act = act.clone()
            i = idx.to(act.device)
            act[..., i] = 0.0 if fill is None else fill.to(act.device, act.dtype)
            return act

        hooks.append((neuron_hook_name(l), hook))
    with model.hooks(fwd_hooks=hooks):
        yield model
