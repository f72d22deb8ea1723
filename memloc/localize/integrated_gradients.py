"""Integrated gradients on FFN neurons (Chang et al. §4 "IG", A.2 Eq. 14-16; Dai et al. 2022).

The public function validates, runs one clean forward, picks a path by self-checks and sums the
paths' gradients in one place (:func:`accumulate`).  The paths live in their own modules:
``_ig_direct`` (GPT-Neo / GPT-2 single-token pass on the weights), ``_ig_kv_cache`` (single-token
forwards through the model over the clean KV cache) and, here, ``full`` (the papers' loop).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_choice, check_positive_int
from .._progress import progress
from ..borrow import borrowed, trainable_only
from ..models import Model, hook_name, kv_cache_kwarg_aliased, neuron_hook_name
from . import _ig_direct, _ig_kv_cache
from ._common import check_tolerance, prepare_sequence

__all__ = ["integrated_gradients", "riemann_alphas", "accumulate"]

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "direct", "kv_cache", "full")


def riemann_alphas(steps: int, device: Any = None) -> Float[Tensor, "steps"]:
    """The Riemann-sum points of Eq. 15 as in the authors' code (EleutherAI knowledge-neurons):
    ``linspace(0, 1, steps)``, both ends included, the sum divided by ``steps``."""
    return torch.linspace(0.0, 1.0, steps, device=device)


def accumulate(batches: Iterable[tuple[Tensor, Tensor, Tensor]], acts: Float[Tensor, "layer seq neuron"],
               layers: list[int], steps: int, n_positions: int) -> Float[Tensor, "scored neuron"]:
    """Eq. 15-16, shared by every path: ``IG_i(h^l_q) = h_i * 1/m sum_k ∂P(α_k h)/∂h_i`` summed over
    the rows ``(j, q, g)`` the path yields (j indexes ``layers``, q the position, g the gradient at
    ``α_k h^{layers[j]}_q``), then averaged over the ``n_positions`` positions (Eq. 16).

    The products ``h * g`` and their sum run in float64 whatever the model's dtype (a bfloat16
    sum of 20 x T terms would lose most of its digits); the result is float32."""
    total = torch.zeros(len(layers), acts.shape[-1], dtype=torch.float64, device=acts.device)
    layer_t = torch.tensor(layers, device=acts.device)
    for j, q, g in batches:
        h = acts[layer_t[j], q]
        total.index_add_(0, j, h.double() * g.double())
    return (total / (steps * n_positions)).float()


def integrated_gradients(model: Model, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int, *,
                         steps: int = 20, batch_size: int | None = None, layers: list[int] | None = None,
                         positions: Sequence[int] | None = None,
                         implementation: Literal["auto", "direct", "kv_cache", "full"] = "auto",
                         progress_bar: bool = True) -> Float[Tensor, "layer neuron"]:
    """IG attribution of every FFN neuron (Chang et al. A.2, Eq. 14-16).

    For each suffix token ``s_t`` (predicted at position ``q = prefix_len-1+t``) and layer l, the
    hidden state ``h^l_t`` at position q only (``blocks.{l}.mlp.hook_post``; other positions keep
    their clean activations) is replaced by ``α h^l_t`` and the gradient of the *probability*
    ``P(s_t | p, s_<t)`` (Eq. 14) with respect to it is accumulated:
    ``IG_i(h) = h_i * 1/m sum_k ∂P(α_k h)/∂h_i`` (Eq. 15, zero baseline, Riemann sum with
    ``α_k = linspace(0, 1, m)``, ``m = steps``, as in the authors' code), and
    ``A^l(i) = 1/T sum_t IG_i(h^l_t)`` (Eq. 16).

    Implementations (identical results up to float rounding; all share :func:`accumulate`):

    * ``"direct"`` (GPT-Neo and GPT-2; module ``_ig_direct``): the single-token pass of
      ``"kv_cache"`` written out on the model's own weights (no Hugging Face forward, no hooks).
    * ``"kv_cache"`` (any architecture; module ``_ig_kv_cache``): scaling position q's activation at
      layer l changes only position q's own stream in layers ≥ l, and Eq. 14 reads P at q; so one
      clean forward fills a KV cache and every (position, layer, step) is one batch row: the single
      token at q attending to the clean keys/values of positions < q, patching only its own layer.
    * ``"full"`` (the papers' loop, slow): a forward of ``[p, s_<t]`` per (layer, position) with the
      ``steps`` scaled copies in the batch.
    * ``"auto"``: ``"direct"`` where the architecture is supported and its unpatched rows
      (α = 1, every layer) reproduce the full forward's logits at the first and last suffix
      positions; otherwise ``"kv_cache"`` after the same check of the cached single-token forward;
      otherwise ``"full"``.  The checks' relative tolerance follows the model's dtype
      (:func:`memloc.localize._common.check_tolerance`: 1e-4 in float32/float64, 16 ulps in half
      precision), so bfloat16 and float16 models keep the fast paths.  A fallback to a slower
      path is a logging WARNING naming the measured error and the cost in forwards; the chosen path
      is logged at INFO with ``extra={"memloc_path": ...}``.

    Precision: gradients come from the model's own dtype (as the model computes them); the
    softmax of Eq. 14 runs in float32 and the Riemann sum of Eq. 15-16 in float64.

    Args:
        model: TransformerBridge (borrowed: left unchanged).
        tokens: one sequence, ``[seq]`` or ``[1, seq]``.
        prefix_len: prefix length (1..seq-1).
        steps: Riemann steps m (paper: 20).
        batch_size: rows per forward (``direct``/``kv_cache``: (position, layer, step) rows, default
            from a memory budget of 512 MiB; ``full``: Riemann steps, default ``steps``).
        layers: layers to score (default all); rows of other layers are NaN.
        positions: the positions q averaged over in Eq. 16 (default all suffix positions
            ``prefix_len-1 .. seq-2``); a subset gives the average over those only.
        implementation: see above.
        progress_bar: show a progress bar.

    Returns:
        Float[Tensor, "layer neuron"] (float32) on the model's device.

    Raises:
        ValueError: bad arguments, or ``implementation="direct"`` for an architecture other than
            GPT-Neo / GPT-2 (both before any work).
        RuntimeError: ``implementation="direct"`` when its setup check against the full forward fails.
    """
    tokens, layers, positions = _check_args(model, tokens, prefix_len, steps, batch_size, layers, positions,
                                            implementation)
    with borrowed(model), kv_cache_kwarg_aliased(model):
        trainable_only(model)  # only the patched activations need gradients
        clean, cache, acts, state = _clean_run(model, tokens)
        path, weights = _choose_path(model, implementation, tokens, prefix_len, clean, cache, acts, state,
                                     layers, positions, steps, batch_size)
        alphas = riemann_alphas(steps, device=tokens.device).to(acts.dtype)
        grads = _path_gradients(path, model, weights, tokens, positions, alphas, batch_size, steps, layers, cache,
                                acts, state, progress_bar)
        scores = torch.full((model.cfg.n_layers, model.cfg.d_mlp), float("nan"), device=tokens.device)
        scores[layers] = accumulate(grads, acts, layers, steps, len(positions))  # runs the path's generator
        return scores


def _check_args(model: Model, tokens: Any, prefix_len: Any, steps: Any, batch_size: Any, layers: Any, positions: Any,
                implementation: Any) -> tuple[Tensor, list[int], list[int]]:
    """Validate the arguments of :func:`integrated_gradients` (before any work); returns the
    ``[1, seq]`` tokens and the layers and positions with their defaults filled in."""
    tokens = prepare_sequence(model, tokens, prefix_len)
    check_positive_int(steps, "steps")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    check_choice(implementation, "implementation", IMPLEMENTATIONS)
    n_layers = model.cfg.n_layers
    if layers is None:
        layers = list(range(n_layers))
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty list of layer indices in 0..{n_layers - 1}, got {layers!r}")
    seq = tokens.shape[1]
    if positions is None:
        positions = list(range(prefix_len - 1, seq - 1))
    else:
        positions = [int(q) for q in positions] if isinstance(positions, (list, tuple, range, Tensor)) else positions
        if (not isinstance(positions, list) or not positions
                or any(not prefix_len - 1 <= q <= seq - 2 for q in positions)):
            raise ValueError(f"positions must be a non-empty list of positions in {prefix_len - 1}..{seq - 2} "
                             f"(those predicting suffix tokens), got {positions!r}")
    if implementation == "direct" and _ig_direct.model_type(model) not in _ig_direct.ARCHS:
        raise ValueError(f"implementation='direct' supports {sorted(_ig_direct.ARCHS)} models only, got "
                         f"{_ig_direct.model_type(model)!r}; use 'auto' (falls back to 'kv_cache' or 'full')")
    return tokens, layers, positions


def _path_gradients(path: str, model: Model, weights: Any, tokens: Tensor, positions: list[int], alphas: Tensor,
                    batch_size: int | None, steps: int, layers: list[int], cache: Any, acts: Tensor,
                    state: dict[str, Tensor], progress_bar: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The chosen path's generator of ``(j, q, g)`` gradient rows for :func:`accumulate` (Eq. 15),
    with its default batch size where ``batch_size`` is None."""
    seq = tokens.shape[1]
    if path == "direct":
        batch = batch_size or _ig_direct.default_batch(model, seq)
        return _ig_direct.gradients(weights, tokens, positions, alphas, batch, layers, acts, state, progress_bar)
    if path == "kv_cache":
        batch = batch_size or _ig_kv_cache.default_batch(model, seq, len(layers), steps)
        return _ig_kv_cache.gradients(model, tokens, positions, alphas, batch, layers, cache, acts, progress_bar)
    return _full_gradients(model, tokens, positions, alphas, batch_size or steps, layers, acts, progress_bar)


def _choose_path(model: Model, implementation: str, tokens: Tensor, prefix_len: int, clean: Tensor, cache: Any,
                 acts: Tensor, state: dict[str, Tensor], layers: list[int], positions: list[int], steps: int,
                 batch_size: int | None) -> tuple[str, Any]:
    """The path to run (and the direct path's weights), by the self-checks described in
    :func:`integrated_gradients`; logs the choice, and a WARNING for every fallback."""
    tol = check_tolerance(acts.dtype)
    weights = None
    if implementation in ("auto", "direct"):
        weights = _ig_direct.direct_weights(model)
        if weights is not None:
            err = _ig_direct.check(weights, tokens, prefix_len, clean, acts, state)
            if err <= tol:
                return _chosen("direct", err, tol), weights
            if implementation == "direct":
                raise RuntimeError(f"implementation='direct': the direct single-token pass does not reproduce this "
                                   f"model's logits (relative error {err:.3g} > {tol:.3g} for {acts.dtype}; "
                                   "active hooks?); use 'auto'")
            logger.warning("integrated_gradients: the direct single-token pass does not reproduce this model's "
                           "logits (relative error %.3g > tolerance %.3g for %s; active hooks?); using the "
                           "kv_cache path (single-token forwards through the model: typically 2-4x slower)",
                           err, tol, acts.dtype)
    if implementation == "full":
        return _chosen("full", float("nan"), tol), None
    err = _ig_kv_cache.check(model, tokens, prefix_len, clean, cache)
    if err <= tol:
        return _chosen("kv_cache", err, tol), None
    if implementation == "kv_cache":  # explicit request: honoured, with the measured disagreement
        logger.warning("integrated_gradients: implementation='kv_cache' requested although its check fails "
                       "(relative error %.3g > tolerance %.3g for %s)", err, tol, acts.dtype)
        return _chosen("kv_cache", err, tol), None
    batch = batch_size or steps
    n_full = len(layers) * len(positions) * math.ceil(steps / batch)
    logger.warning("integrated_gradients: the KV-cache single-token forward does not reproduce this model's "
                   "logits (relative error %.3g > tolerance %.3g for %s); using the slow full-forward path: "
                   "%d forwards of up to %d tokens instead of about %d single-token batches (typically "
                   "10-100x slower)", err, tol, acts.dtype, n_full, tokens.shape[1],
                   math.ceil(len(layers) * len(positions) * steps
                             / _ig_kv_cache.default_batch(model, tokens.shape[1], len(layers), steps)))
    return _chosen("full", err, tol), None


def _chosen(path: str, err: float, tol: float) -> str:
    logger.info("integrated_gradients: %s path (self-check relative error %.3g, tolerance %.3g)", path, err, tol,
                extra={"memloc_path": path})
    return path


#: Clean-run activations the direct path starts from (TransformerLens activation kinds, see
#: :func:`memloc.models.hook_name`).
_STATE_HOOKS = {"resid_mid": "resid_mid", "k": "k", "v": "v"}


def _clean_run(model: Model, tokens: Tensor) -> tuple[Tensor, Any, Tensor, dict[str, Tensor]]:
    """Clean forward filling a DynamicCache; returns logits, cache, h [layer, seq, d_mlp] and the
    direct path's state: ``resid_mid`` [layer, seq, d_model], ``k``/``v`` [layer, seq, head, d_head]
    (empty dict where the model lacks those hooks)."""
    from transformers import DynamicCache

    n_layers = model.cfg.n_layers
    saved: dict[str, Tensor] = {}

    def saver(name: str):
        def save(act, hook):  # keyed by the requested name: hook.name may be an alias's canonical name
            saved[name] = act.detach()[0]
        return save

    names = [neuron_hook_name(l) for l in range(n_layers)]
    state_names = [hook_name(h, l) for h in _STATE_HOOKS.values() for l in range(n_layers)]
    if all(n in model.hook_dict for n in state_names):
        names += state_names
    cache = DynamicCache()
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, past_key_values=cache, use_cache=True,
                                      fwd_hooks=[(n, saver(n)) for n in names])
    acts = torch.stack([saved[neuron_hook_name(l)] for l in range(n_layers)])
    state = {}
    if all(n in saved for n in state_names):
        state = {key: torch.stack([saved[hook_name(h, l)] for l in range(n_layers)]) for key, h in _STATE_HOOKS.items()}
    return logits.detach(), cache, acts, state


def _full_gradients(model: Model, tokens: Tensor, positions: list[int], alphas: Tensor, batch_size: int,
                    layers: list[int], acts: Tensor, progress_bar: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The authors' loop: per (layer, position), forwards of ``[p, s_<t]`` with ``batch_size`` of the
    scaled copies batched; yields ``(j, q, g)`` rows like the fast paths."""
    dev = tokens.device
    jobs = [(j, l, q) for j, l in enumerate(layers) for q in positions]
    for j, l, q in progress(jobs, enabled=progress_bar, desc="integrated gradients (full)"):
        target = int(tokens[0, q + 1])
        for i in range(0, len(alphas), batch_size):
            a = alphas[i:i + batch_size]
            leaf = (a[:, None] * acts[l, q][None]).requires_grad_(True)

            def patch(act, hook, leaf=leaf):
                act = act.clone()
                act[:, -1] = leaf.to(act.dtype)
                return act

            with torch.enable_grad():
                logits = model.run_with_hooks(tokens[:, :q + 1].expand(len(a), -1),
                                              fwd_hooks=[(neuron_hook_name(l), patch)])
                prob = torch.softmax(logits[:, -1].float(), dim=-1)[:, target]
                (g,) = torch.autograd.grad(prob.sum(), [leaf])
            yield (torch.full((len(a),), j, device=dev), torch.full((len(a),), q, device=dev), g)
