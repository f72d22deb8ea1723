"""HARD CONCRETE (Chang et al. §4, Eq. 10-12, A.4, Eq. 17; Louizos et al. 2018)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_number, check_seed
from ..borrow import borrowed
from ..models import Model
from ._common import prepare_sequence
from ._masks import DEFAULT_LAM, DEFAULT_STOP_MASK_MEAN, check_mask_args, train_masks

__all__ = ["hard_concrete", "hard_concrete_mask", "l0_regularizer", "GAMMA", "ZETA"]

#: Stretch interval (γ, ζ) of the hard-concrete distribution (A.4).
GAMMA, ZETA = -0.1, 1.1


def hard_concrete_mask(log_m: Float[Tensor, "... neuron"], beta: float, u: Tensor | None = None) -> Tensor:
    """The hard-concrete mask m̄ (Eq. 10-11 and A.4): ``m̂ = σ((log(u/(1-u)) + log m) / β)`` with
    ``u ~ U(0, 1)`` (clamped to [1e-4, 1-1e-4] as in the authors' code), stretched to (γ, ζ) and
    clipped to [0, 1].  With ``u=None`` it is the test-time estimate ``σ(log m)`` stretched and
    clipped."""
    if u is None:
        s = torch.sigmoid(log_m)
    else:
        u = u.clamp(1e-4, 1 - 1e-4)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_m) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def l0_regularizer(log_m: Float[Tensor, "layer neuron"], beta: float, start_layer: int = 0) -> Float[Tensor, ""]:
    """Expected L0 norm of Eq. 17, ``R(m̄^l) = sum_i σ(log m^l_i - C)`` with ``C = β log(-γ/ζ)``;
    normalized as in the authors' code: mean over neurons of each layer, then mean over the
    masked layers ``>= start_layer``."""
    c = beta * math.log(-GAMMA / ZETA)
    return torch.sigmoid(log_m[start_layer:] - c).mean()


def hard_concrete(model: Model, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int, *,
                  lam: float = DEFAULT_LAM, lam_scale: Literal["per_neuron", "mean"] = "per_neuron", lr: float = 1e-2,
                  beta: float = 2 / 3, mask_init: float = 0.5, max_steps: int = 500, stop_loss: float = 0.1, stop_mask_mean: float | None = DEFAULT_STOP_MASK_MEAN,
                  stop_mem_margin: float | None = 0.5, check_every: int = 10, start_layer: int = 0, seed: int = 0,
                  progress_bar: bool = True, history: list | None = None) -> Float[Tensor, "layer neuron"]:
    """HARD CONCRETE attribution (Chang et al. Eq. 12): learn ``log m^l`` for every FFN neuron,
    multiply ``h^l`` by a freshly sampled hard-concrete mask ``m̄^l`` (one u per neuron per step,
    Eq. 10-11, A.4) at ``blocks.{l}.mlp.hook_post``, and minimize ``l_mem(x) + λ Σ_l R(m̄^l)``
    (Eq. 12, R of Eq. 17) with the model frozen and no dropout; the score is ``A^l(i) = σ(log m^l_i)``.

    ``log m`` is the learned parameter, initialized so the stretched mean mask is ``mask_init``:
    ``log m = logit((mask_init - γ) / (ζ - γ))`` (0 for the default 0.5).

    Sparsity pressure: with ``lam_scale="per_neuron"`` (default) ``lam`` multiplies the *sum* of
    the expected L0 over the N masked neurons, as Eq. 12 is printed; the default
    ``lam = 1000 / 300,800 = 3.3245e-3`` is the authors' pressure per neuron on GPT2-XL (their
    λ = 1000 on the mean over 47 × 6400 = 300,800 masked neurons), the same on any model size (the
    embedded model, 3,072 DEL neurons: λ = 10.2 on the mean).  ``lam_scale="mean"`` is the authors'
    parameterization (``lam`` on the mean; their released settings: ``lam=1000,
    lam_scale="mean", stop_mem_margin=None``, ``memloc.localize._masks.AUTHORS_SETTINGS``).

    Other defaults are the authors' released settings (MemPi: Adam, ``lr=1e-2``, ``beta=2/3``,
    ``mask_p=0.5``, checked every 10 steps), except the step cap (500; theirs 5000) and the stop
    (``memloc.localize._masks``, measured there): by default training stops at the first check
    where the test-time mask (``σ(log m)`` stretched and clipped, which starts at ``mask_init``)
    averages at most ``stop_mask_mean=0.4`` over the masked neurons, or, the authors' criterion,
    once ``R < stop_loss=0.1`` while (by default) the memorization loss is within
    ``stop_mem_margin`` nats of its unmasked value (``stop_mask_mean=None, stop_mem_margin=None``:
    theirs).  A run that ends collapsed logs a WARNING.  The noise comes
    from a ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched), so results are
    deterministic per seed.

    Args:
        lam, lam_scale, lr, max_steps, stop_loss, stop_mem_margin, check_every, start_layer: as
            in :func:`~memloc.localize.slimming`.
        stop_mask_mean: stop once the test-time mask averages at most this over the masked
            neurons (below ``mask_init``, or None; default 0.4).
        beta: temperature β of the concrete distribution (> 0).
        mask_init: initial stretched mean mask, in (0, 1).
        seed: seed of the mask noise (int).

    Returns:
        Float[Tensor, "layer neuron"] scores σ(log m) in (0, 1) on the model's device.
    """
    tokens = prepare_sequence(model, tokens, prefix_len)
    a = check_mask_args(model, lam=lam, lam_scale=lam_scale, lr=lr, max_steps=max_steps, stop_loss=stop_loss,
                        stop_mask_mean=stop_mask_mean, stop_mem_margin=stop_mem_margin, check_every=check_every, start_layer=start_layer)
    beta = check_number(beta, "beta", 0.0, lo_open=True, what=" (the concrete temperature)")
    if isinstance(mask_init, bool) or not isinstance(mask_init, (int, float)) or not 0 < mask_init < 1:
        raise ValueError(f"mask_init must be in (0, 1), got {mask_init!r}")
    check_seed(seed)
    if a["stop_mask_mean"] is not None and a["stop_mask_mean"] >= mask_init:
        raise ValueError(f"stop_mask_mean ({a['stop_mask_mean']:g}) must be below mask_init ({mask_init:g}), the test-time "
                         "mask's starting mean, or training would stop at its first check; or pass None")
    start_layer = a["start_layer"]
    with borrowed(model):
        dev = tokens.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        p = (mask_init - GAMMA) / (ZETA - GAMMA)
        log_m = torch.full((model.cfg.n_layers, model.cfg.d_mlp), math.log(p / (1 - p)), device=dev,
                           requires_grad=True)
        noise: dict[int, Tensor] = {}

        def mask_fn(l: int) -> Tensor:
            if l == start_layer:  # first masked layer of this forward: draw u for every layer
                noise["u"] = torch.rand(log_m.shape, generator=gen, device=dev)
            return hard_concrete_mask(log_m[l], beta, noise["u"][l])

        train_masks(model, tokens, prefix_len, log_m, mask_fn=mask_fn,
                    eval_mask_fn=lambda l: hard_concrete_mask(log_m[l], beta),
                    regularizer=lambda: l0_regularizer(log_m, beta, start_layer), clip=None,
                    progress_bar=progress_bar, desc="hard concrete", history=history, **a)
        return torch.sigmoid(log_m.detach()).clone()
