"""ZERO-OUT (Chang et al. §4, Eq. 7), exhaustive and exact, recomputing only the layers after the
ablated one.

Precision: the clean forward runs in the model's dtype.  The re-run blocks ``l+1..L-1``, final
norm and unembedding of the fast path run in ``compute_dtype``: by default float32 for a
float16/bfloat16 model and the model's dtype otherwise; a float32 copy of the re-run weights is
held for the call when it takes at most a quarter of the free device memory, and otherwise each
block is cast for each call (never stored twice; ``_held_in``).  Why: one neuron's effect on the loss is usually far below
bfloat16's resolution of the residual stream and logits (ε = 2^-7 relative), so half-precision
re-runs rank neurons by rounding noise - measured on the embedded model, Spearman with the
float32 model's scores 0.71 in bfloat16 against 0.9996 with float32 re-runs (and on CPU the
float32 re-runs were also 4.6x faster).  The baseline loss of each layer is computed by the
same re-run of its clean stream, so each score is a difference of two losses computed alike.
The papers' loop (full half-precision forwards, :func:`memloc.localize.reference.reference_zero_out`)
has the same problem and no such remedy; the full-forward fallback here runs in the model's dtype.
The memorization losses (Eq. 6) and their differences (Eq. 7) are computed in float32 (float64
for a float64 model); the returned scores are float32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_layers, check_positive_int
from .._progress import progress
from ..borrow import borrowed
from ..models import Model, hook_name, neuron_hook_name
from ._common import (capture_clean, cast_bytes, check_tolerance, logits_at, memorization_loss, mlp_out_is_linear,
                      prepare_sequence, run_blocks_from, suffix_positions, w_out, weights_in_dtype)

__all__ = ["zero_out"]

logger = logging.getLogger(__name__)


def zero_out(model: Model, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int, *,
             batch_size: int = 64, layers: list[int] | None = None,
             neurons: Sequence[int] | Tensor | None = None, compute_dtype: torch.dtype | str | None = None,
             progress_bar: bool = True) -> Float[Tensor, "layer neuron"]:
    """ZERO-OUT attribution (Chang et al. Eq. 7): ``A^l(i) = l_mem(θ without n^l_i) - l_mem(θ)``, the
    change of the memorization loss (Eq. 6, mean suffix NLL) when neuron i of layer l alone is set
    to zero at every position.  Exhaustive and exact.

    Fast path: one clean forward caches ``hook_resid_post`` and ``mlp.hook_post`` of every layer
    and the arguments each block received.  Zeroing neuron i of layer l only removes
    ``h^l_{pos,i} * v^l_i`` from the MLP output (Eq. 3), so the residual stream after layer l is
    ``resid_post^l - h^l_{:,i} ⊗ v^l_i``; ``batch_size`` such streams (one per neuron) are stacked
    in the batch and only blocks ``l+1 .. L-1`` are run, followed by the final norm and unembedding
    at the T suffix positions only.  Per layer l this costs ``L-1-l`` blocks instead of the
    ``L`` blocks + embedding + full unembedding of the papers' one-forward-per-mask loop.  If the
    MLP output is not linear in ``hook_post`` in the model's coordinates (checked on the clean run),
    it falls back to the exact full-forward path (a hook zeroing one neuron per batch row), with a
    logging WARNING naming the measured error and the cost.  That check compares in float32 (float64
    for float64 models) with a tolerance that follows the model's dtype
    (:func:`memloc.localize._common.check_tolerance`), so float16 and bfloat16 models keep the fast
    path.  The chosen path is logged at INFO with ``extra={"memloc_path": "fast" | "full_forward"}``.

    Precision (re-runs in float32 for half-precision models): see the module docstring.

    Args:
        model: TransformerBridge (borrowed: left unchanged).
        tokens: one sequence, ``[seq]`` or ``[1, seq]``.
        prefix_len: prefix length (1..seq-1).
        batch_size: neurons evaluated per forward.
        layers: layers to score (default all); rows of other layers are NaN.
        neurons: neuron indices to score in each scored layer (default all); others are NaN.
        compute_dtype: floating dtype of the fast path's re-run blocks (default: float32 for
            float16/bfloat16 models, else the model's dtype; pass the model's dtype to trade
            resolution for the speed of half-precision matmuls on a GPU).
        progress_bar: show a progress bar (also silenced by ``MEMLOC_PROGRESS=0``).

    Returns:
        Float[Tensor, "layer neuron"] (float32) loss increases, on the model's device.
    """
    tokens = prepare_sequence(model, tokens, prefix_len)
    check_positive_int(batch_size, "batch_size")
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    layers = check_layers(model, layers)
    neuron_idx = _neuron_indices(neurons, d_mlp).to(tokens.device)
    model_dtype = next(model.parameters()).dtype
    compute_dtype = _compute_dtype(compute_dtype, model_dtype)
    with borrowed(model), torch.no_grad():
        names = [n for l in range(n_layers) for n in
                 (neuron_hook_name(l), hook_name("resid_post", l), hook_name("mlp_out", l))]
        logits, acts, inputs = capture_clean(model, tokens, names)
        pos = suffix_positions(tokens.shape[1], prefix_len)
        target = tokens[:, prefix_len:]
        base = memorization_loss(logits[:, pos], target)[0]
        scores = torch.full((n_layers, d_mlp), float("nan"), device=tokens.device)
        fast = _fast_path_applies(model, acts, layers)
        W = w_out(model)
        recompute = fast and compute_dtype != model_dtype
        if recompute:
            logger.info("zero_out: re-running the blocks after the ablated layer in %s (model in %s)",
                        compute_dtype, model_dtype)

        def rerun(resid: Tensor, l: int) -> Tensor:
            final = run_blocks_from(model, resid, l + 1, inputs, compute_dtype=compute_dtype)
            return logits_at(model, final[:, pos], compute_dtype=compute_dtype)

        jobs = [(l, i) for l in layers for i in range(0, len(neuron_idx), batch_size)]
        layer_base = {}
        with _held_in(model, layers, compute_dtype) if recompute else contextlib.nullcontext():
            for l, i in progress(jobs, enabled=progress_bar, desc="zero-out"):
                idx = neuron_idx[i:i + batch_size]
                if fast:
                    clean = acts[hook_name("resid_post", l)].to(compute_dtype)
                    if recompute and l not in layer_base:  # the clean loss, re-run the same way
                        layer_base[l] = memorization_loss(rerun(clean, l), target)[0]
                    h = acts[neuron_hook_name(l)][0, :, idx].to(compute_dtype)  # [seq, b]
                    delta = einops.einsum(h, W[l, idx].to(compute_dtype), "pos b, b d -> b pos d")
                    out = rerun(clean - delta, l)
                else:
                    out = _masked_forward(model, tokens, l, idx)[:, pos]
                scores[l, idx] = (memorization_loss(out, target) - layer_base.get(l, base)).to(scores.dtype)
        return scores


#: Share of the free device memory a float32 copy of the re-run blocks may take to be held for a
#: whole :func:`zero_out` call instead of being cast for every neuron batch.
HOLD_SHARE = 0.25


def _held_in(model: Model, layers: list[int], dtype: torch.dtype) -> Any:
    """Context holding the weights that the fast path re-runs (blocks after the first scored layer,
    final norm, unembedding) in ``dtype`` for the whole call when that copy takes at most
    ``HOLD_SHARE`` of the free memory of their device (CUDA: ``mem_get_info``; CPU: available RAM);
    otherwise each call casts its block (a WARNING with the cost; INFO on a model with offloaded weights,
    whose blocks are loaded per call anyway).  Measured
    on an H100 with the GPT-Neo-125M configuration in bfloat16: casting per call made the float32
    re-runs ~1.6x slower than a float32 model's."""
    from ..placement import offloaded_modules

    if offloaded_modules(model):
        logger.info("zero_out: casting each re-run block to %s per call (weights offloaded)", dtype)
        return contextlib.nullcontext()
    modules = [*list(model.blocks)[min(layers) + 1:], model.ln_final, model.unembed]
    need = cast_bytes(modules, dtype)
    device = next(model.parameters()).device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil  # an accelerate dependency

        free = psutil.virtual_memory().available
    if need > HOLD_SHARE * free:
        logger.warning("zero_out: casting each re-run block to %s per call, because a held copy would need %.2f GiB "
                       "of %.2f GiB free (measured on an H100, GPT-Neo-125M in bfloat16: about 1.6x slower re-runs)",
                       dtype, need / 2**30, free / 2**30)
        return contextlib.nullcontext()
    logger.info("zero_out: holding a %s copy of the re-run blocks (%.2f GiB) for this call", dtype, need / 2**30)
    return weights_in_dtype(modules, dtype)


def _neuron_indices(neurons: Any, d_mlp: int) -> Tensor:
    """``neurons`` as int64 indices (all ``d_mlp`` when None); ValueError when not indices in range."""
    if neurons is None:
        return torch.arange(d_mlp)
    try:
        idx = torch.as_tensor(neurons).long().flatten()
    except Exception as exc:
        raise ValueError(f"neurons must be a sequence of neuron indices, got {neurons!r}") from exc
    if len(idx) == 0 or idx.min() < 0 or idx.max() >= d_mlp:
        raise ValueError(f"neurons must be a non-empty set of indices in 0..{d_mlp - 1}")
    return idx


def _compute_dtype(compute_dtype: Any, model_dtype: torch.dtype) -> torch.dtype:
    """The re-run dtype: float32 for 16-bit models and the model's dtype otherwise (None), or the
    floating dtype asked for (a torch dtype or its name, e.g. ``"float32"`` from JSON)."""
    if compute_dtype is None:
        return torch.float32 if torch.finfo(model_dtype).bits < 32 else model_dtype
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype.removeprefix("torch."), compute_dtype)
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating torch dtype (or its name, e.g. 'float32') or None, "
                         f"got {compute_dtype!r}")
    return compute_dtype


def _fast_path_applies(model: Model, acts: dict[str, Tensor], layers: list[int]) -> bool:
    """Whether every scored layer's MLP output is linear in ``hook_post`` (the fast path's premise),
    logged as the chosen path (INFO), or as a WARNING with the cost of the full-forward path."""
    n_layers = int(model.cfg.n_layers)
    dtype = acts[neuron_hook_name(0)].dtype
    tol = check_tolerance(dtype)
    nonlinear = [l for l in layers if not mlp_out_is_linear(model, acts, l, atol=tol)]
    if not nonlinear:
        logger.info("zero_out: fast path (MLP output linear in hook_post within %.3g)", tol,
                    extra={"memloc_path": "fast"})
        return True
    blocks_fast = sum(max(n_layers - 1 - l, 1) for l in layers)
    logger.warning("zero_out: MLP output is not linear in hook_post in these coordinates (layers %s, "
                   "relative tolerance %.3g for %s); using the full-forward path: %d instead of %d "
                   "block evaluations per neuron batch summed over the layers (about %.1fx slower)",
                   nonlinear, tol, dtype, len(layers) * n_layers, blocks_fast,
                   len(layers) * n_layers / blocks_fast, extra={"memloc_path": "full_forward"})
    return False


def _masked_forward(model: Model, tokens: Tensor, layer: int, idx: Tensor) -> Tensor:
    """Full forward of ``len(idx)`` copies of the sequence, copy b with neuron ``idx[b]`` zeroed."""
    b = len(idx)

    def hook(act, hook):
        act = act.clone()
        act[torch.arange(b, device=act.device), :, idx.to(act.device)] = 0.0
        return act

    return model.run_with_hooks(tokens.expand(b, -1), fwd_hooks=[(neuron_hook_name(layer), hook)])
