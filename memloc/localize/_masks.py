"""The mask-training loop shared by SLIMMING and HARD CONCRETE (Chang et al. Eq. 9, 12; A.3-A.4).

Sparsity pressure that transfers across model sizes
---------------------------------------------------
The paper prints the penalty as a *sum* over neurons, ``λ Σ_l ||m^l||_1`` (Eq. 9) and
``λ Σ_l R(m̄^l)`` (Eq. 12); the authors' released code (MemPi) divides it by the number N of
masked neurons and uses λ = 1000.  On the mean, λ's pull on each neuron's mask is λ / N, so the
same λ pushes a neuron of a small model far harder than one of a large model:

* GPT2-XL in the authors' DEL setting (48 layers × 6400 neurons, bottom layer not masked):
  N = 47 × 6400 = 300,800 masked neurons, 1000 / 300,800 = 3.32e-3 per neuron
  (all 48 layers, as in INJ: N = 307,200, 3.26e-3: 2 % apart);
* the embedded 4-layer model (1024 neurons per layer, DEL: layers 1-3): N = 3,072,
  1000 / 3,072 = 0.33 per neuron, 98× harder: every mask collapses within a few hundred steps;
* a 7B Llama (32 × 11,008, DEL): N = 341,248, 1000 / 341,248 = 2.9e-3 per neuron.

``lam_scale="per_neuron"`` (the default) applies ``lam`` to the sum over the masked neurons, as
Eq. 9 / 12 are printed, with the default ``lam = DEFAULT_LAM = 1000 / 300,800 = 3.3245e-3``:
exactly the authors' pressure per neuron on GPT2-XL, and the same per-neuron pressure on every
model (on the embedded model's DEL setting it equals λ = 3.3245e-3 × 3,072 = 10.2 on the mean).
``lam_scale="mean"`` is the authors' parameterization (``lam`` on the mean, their λ = 1000 is
``AUTHORS_SETTINGS``).  Internally the loss is ``l_mem + w · mean_i r_i`` with
``w = lam × N`` (per_neuron) or ``w = lam`` (mean): :func:`penalty_weight`.

Stop criterion
--------------
The authors stop once the sparsity term drops below ``stop_loss`` (0.1: the average neuron is
masked to 10 %).  memloc's default stops earlier, at the first check where the *test-time* mask
(the mask the scores are read from: SLIMMING's ``m``, HARD CONCRETE's stretched ``σ(log m)``)
averages at most ``stop_mask_mean = DEFAULT_STOP_MASK_MEAN = 0.4`` over the masked neurons.
Why, measured on the embedded model (DEL, 5 targets, 10 % per layer above layer 0; same targets
and evaluation as ``memloc bench del``): along every training trajectory the neuron ranking is
good early and then degrades -- under the per-neuron default SLIMMING's masks settle with
150-190 neurons of layer 1 tied at the clip value 1 (more than the 102 that make up 10 %), and
under stronger pressure the masks collapse to 0 and tie there.  Stopping when the mask keeps
40 % of the masked neurons' value gave ΔSelf-Acc within 88-126 % of the dev-set-tuned settings for
every pressure tried, from the per-neuron default (weight 10.2 on the mean) to the authors'
λ = 1000 on the mean (a 100× range, wider than the 98× per-neuron gap between the embedded model
and GPT2-XL), for β = 1/3 and 2/3, and no run ended collapsed; thresholds 0.25-0.4 all kept
≥ 80 %.  The threshold is a share of the mask's value, like the authors' ``stop_loss`` and the
DEL dropout ratio: it refers to no neuron count, layer count or λ, so it means the same on any
model size.  ``stop_mask_mean=None`` leaves only the authors' criterion.

The authors' criterion stays as the second way to stop: ``regularizer() < stop_loss`` and, by
default, the memorization loss within ``stop_mem_margin`` nats of its clean (unmasked) value
(``stop_mem_margin=None``: sparsity alone, the authors' code; the sparsity test alone also fires on
a collapsed mask, every neuron near 0, memorization lost, whose ranking is noise).  Whatever the
criterion, a run that ends collapsed -- test-time mask mean below :data:`COLLAPSED_MASK_MEAN` and
memorization loss more than :data:`COLLAPSED_MEM_MARGIN` nats above clean -- logs a WARNING.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import Tensor

from .._checks import check_number, check_positive_int
from .._progress import progress
from ..models import Model, layer_hooks
from ._common import memorization_loss, partial_forward, suffix_positions

logger = logging.getLogger("memloc.localize")

__all__ = ["train_masks", "penalty_weight", "DEFAULT_LAM", "DEFAULT_STOP_MASK_MEAN", "AUTHORS_LAM",
           "GPT2_XL_MASKED_NEURONS", "LAM_SCALES", "AUTHORS_SETTINGS", "COLLAPSED_MASK_MEAN", "COLLAPSED_MEM_MARGIN"]

#: The authors' λ (MemPi ``downstream.py``), on the sparsity term averaged over the masked neurons.
AUTHORS_LAM = 1000.0
#: Masked neurons of GPT2-XL in the authors' DEL setting: 47 layers above the bottom one × 6400.
GPT2_XL_MASKED_NEURONS = 47 * 6400
#: Default per-neuron λ: the authors' pressure per neuron on GPT2-XL, 1000 / 300,800 = 3.3245e-3.
DEFAULT_LAM = AUTHORS_LAM / GPT2_XL_MASKED_NEURONS
#: ``lam_scale`` values: ``"per_neuron"`` (λ on the sum, Eq. 9 / 12 as printed) or ``"mean"`` (the authors' code).
LAM_SCALES = ("per_neuron", "mean")
#: The authors' released SLIMMING / HARD CONCRETE settings that differ from memloc's defaults.
AUTHORS_SETTINGS = {"lam": AUTHORS_LAM, "lam_scale": "mean", "stop_mask_mean": None, "stop_mem_margin": None,
                    "max_steps": 5000}
#: Default ``stop_mask_mean``: stop once the test-time mask averages at most this over the masked
#: neurons (module docstring: measured, and the same on any model size).
DEFAULT_STOP_MASK_MEAN = 0.4
#: A run ends "collapsed" when the test-time mask averages below this over the masked neurons...
COLLAPSED_MASK_MEAN = 0.1
#: ...and the memorization loss under it is more than this many nats above its clean value.
COLLAPSED_MEM_MARGIN = 1.0


def penalty_weight(lam: float, lam_scale: str, n_masked: int) -> float:
    """The weight ``w`` of the *mean* sparsity term in ``l_mem + w · mean_i r_i``.

    ``lam_scale="per_neuron"``: ``w = lam × n_masked`` (so the loss is ``l_mem + lam · Σ_i r_i``
    and every neuron feels ``lam``, whatever the model size); ``"mean"``: ``w = lam`` (the
    authors' code, each neuron feels ``lam / n_masked``).  E.g. the default per-neuron
    ``lam = 1000 / 300,800`` gives ``w = 1000`` on GPT2-XL's 300,800 masked neurons and
    ``w = 10.2`` on the embedded model's 3,072.
    """
    if lam_scale not in LAM_SCALES:
        raise ValueError(f"lam_scale must be one of {LAM_SCALES}, got {lam_scale!r}")
    return float(lam) * n_masked if lam_scale == "per_neuron" else float(lam)


def check_mask_args(model: Model, *, lam: Any, lam_scale: Any, lr: Any, max_steps: Any, stop_loss: Any,
                    stop_mask_mean: Any, stop_mem_margin: Any, check_every: Any, start_layer: Any) -> dict:
    """Validate the hyperparameters shared by SLIMMING and HARD CONCRETE (ValueError naming the argument)."""
    if lam_scale not in LAM_SCALES:
        raise ValueError(f"lam_scale must be one of {LAM_SCALES} (per_neuron: lam on the sum over masked neurons, "
                         f"Eq. 9/12 as printed; mean: the authors' code), got {lam_scale!r}")
    out = {"lam": check_number(lam, "lam", 0.0, what=" (the sparsity weight)"), "lam_scale": lam_scale,
           "lr": check_number(lr, "lr", 0.0, lo_open=True),
           "max_steps": check_positive_int(max_steps, "max_steps"),
           "stop_loss": check_number(stop_loss, "stop_loss", 0.0, 1.0,
                                what=" (threshold on the mean sparsity term, which lies in [0, 1])"),
           "stop_mask_mean": None if stop_mask_mean is None else check_number(
               stop_mask_mean, "stop_mask_mean", 0.0, 1.0, lo_open=True,
               what=" (share of the masked neurons' test-time mask value at which training stops) or None"),
           "stop_mem_margin": None if stop_mem_margin is None else check_number(
               stop_mem_margin, "stop_mem_margin", 0.0, what=" (nats above the clean memorization loss) or None"),
           "check_every": check_positive_int(check_every, "check_every")}
    n = int(model.cfg.n_layers)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n:
        raise ValueError(f"start_layer must be an int in 0..{n - 1}, got {start_layer!r}")
    out["start_layer"] = start_layer
    return out


def train_masks(model: Model, tokens: Tensor, prefix_len: int, param: Tensor, *,
                mask_fn: Callable[[int], Tensor], regularizer: Callable[[], Tensor], lam: float, lam_scale: str,
                lr: float, max_steps: int, stop_loss: float, stop_mask_mean: float | None,
                stop_mem_margin: float | None, check_every: int,
                start_layer: int, clip: tuple[float, float] | None, progress_bar: bool, desc: str,
                eval_mask_fn: Callable[[int], Tensor], history: list | None = None) -> int:
    """Adam on ``param`` [layer, neuron] minimizing ``l_mem(x) + w · regularizer()`` (``w`` from
    :func:`penalty_weight`; ``regularizer`` is the mean over the masked neurons) with
    ``h^l <- h^l * mask_fn(l)`` at ``blocks.{l}.mlp.hook_post`` for layers >= ``start_layer``.

    Every ``check_every`` steps (before that step's update, as in the authors' code) the loop stops
    once the test-time masks ``eval_mask_fn`` average at most ``stop_mask_mean`` over the masked
    neurons (unless None), or once ``regularizer() < stop_loss`` and, unless ``stop_mem_margin`` is
    None, the step's memorization loss is at most ``stop_mem_margin`` above the clean one (one extra
    forward before training; module docstring).  After training one forward with the test-time masks ``eval_mask_fn`` checks for
    a collapse (module docstring) and logs a WARNING if so.  The model's weights are frozen
    (requires_grad off; the caller's ``borrowed`` restores the flags), the model stays in eval mode
    (no dropout, A.3).  Returns the number of optimizer steps taken; appends (step, mem_loss, reg)
    to ``history``.

    Fast path: the masks act on layers >= ``start_layer`` only and the loss reads the suffix
    positions only, so each step re-runs blocks ``start_layer..L-1`` from the cached input of block
    ``start_layer`` and unembeds only the suffix positions (:func:`~memloc.localize._common.partial_forward`,
    checked against a full forward once; identical logits) when that skips blocks or a quarter of
    the positions' unembedding.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    n_layers = int(model.cfg.n_layers)
    n_masked = (n_layers - start_layer) * int(param.shape[1])
    w = penalty_weight(lam, lam_scale, n_masked)
    opt = torch.optim.Adam([param], lr=lr)
    pos = suffix_positions(tokens.shape[1], prefix_len)
    target = tokens[:, prefix_len:]
    with torch.no_grad():
        clean = float(memorization_loss(model(tokens)[:, pos], target)[0])

    def hook(act, hook, *, layer):
        return act * mask_fn(layer).to(act.dtype)

    hooks = layer_hooks("post", range(start_layer, n_layers), hook)
    # worth it when it skips blocks or a good part of the unembedding (not for INJ's prefix_len = 1)
    useful = start_layer > 0 or (pos.stop - pos.start) < 0.75 * tokens.shape[1]
    fast = partial_forward(model, tokens, start_layer, pos, what=desc) if useful else None
    steps = 0
    with model.hooks(fwd_hooks=hooks), torch.enable_grad():
        for step in progress(range(max_steps), enabled=progress_bar, desc=desc):
            opt.zero_grad(set_to_none=True)
            logits = fast() if fast is not None else model(tokens)[:, pos]
            mem = memorization_loss(logits, target)[0]
            reg = regularizer()
            mem_f, reg_f = float(mem.detach()), float(reg.detach())
            if history is not None:
                history.append((step, mem_f, reg_f))
            if (step + 1) % check_every == 0 and (
                    (stop_mask_mean is not None and _test_time_mean(eval_mask_fn, start_layer, n_layers) <= stop_mask_mean)
                    or (reg_f < stop_loss and (stop_mem_margin is None or mem_f <= clean + stop_mem_margin))):
                break
            (mem + w * reg).backward()
            opt.step()
            steps += 1
            if clip is not None:
                with torch.no_grad():
                    param.clamp_(*clip)
    param.grad = None
    _warn_if_collapsed(model, tokens, pos, target, eval_mask_fn, start_layer, clean, steps, desc, lam, lam_scale, w)
    return steps


@torch.no_grad()
def _test_time_mean(eval_mask_fn: Callable[[int], Tensor], start_layer: int, n_layers: int) -> float:
    """Mean of the test-time mask over the masked neurons (layers ``start_layer..n_layers-1``)."""
    return float(torch.stack([eval_mask_fn(l).detach().float().mean() for l in range(start_layer, n_layers)]).mean())


@torch.no_grad()
def _warn_if_collapsed(model: Model, tokens: Tensor, pos: slice, target: Tensor, eval_mask_fn: Callable[[int], Tensor],
                       start_layer: int, clean: float, steps: int, desc: str, lam: float, lam_scale: str,
                       w: float) -> None:
    masks = {l: eval_mask_fn(l).detach() for l in range(start_layer, int(model.cfg.n_layers))}

    def hook(act, hook, *, layer):
        return act * masks[layer].to(act.dtype)

    with model.hooks(fwd_hooks=layer_hooks("post", list(masks), hook)):
        mem = float(memorization_loss(model(tokens)[:, pos], target)[0])
    mean = _test_time_mean(masks.__getitem__, start_layer, int(model.cfg.n_layers))
    if mean < COLLAPSED_MASK_MEAN and mem > clean + COLLAPSED_MEM_MARGIN:
        logger.warning(
            "%s ended collapsed after %d steps: the test-time masks average %.3f over the masked neurons and the "
            "memorization loss under them is %.2f vs %.2f unmasked, so the mask no longer keeps the sequence "
            "memorized and its ranking of neurons is unreliable. The sparsity pressure is too strong for this "
            "model/sequence (lam=%g, lam_scale=%r: weight %.3g on the mean penalty); lower lam, or use "
            "lam_scale='per_neuron' with the default lam.", desc, steps, mean, mem, clean, lam, lam_scale, w)
