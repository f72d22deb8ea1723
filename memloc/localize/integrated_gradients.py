"""Integrated gradients on FFN neurons (Chang et al. §4 "IG", A.2 Eq. 14-16; Dai et al. 2022)."""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_choice, check_positive_int
from .._progress import progress
from ..borrow import borrowed
from ..models import neuron_hook_name
from ._common import prepare_sequence

__all__ = ["integrated_gradients", "riemann_alphas"]

logger = logging.getLogger(__name__)


def riemann_alphas(steps: int, device: Any = None) -> Float[Tensor, "steps"]:
    """The Riemann-sum points of Eq. 15 as in the authors' code (EleutherAI knowledge-neurons):
    ``linspace(0, 1, steps)``, both ends included, the sum divided by ``steps``."""
    return torch.linspace(0.0, 1.0, steps, device=device)


def integrated_gradients(model: Any, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int, *,
                         steps: int = 20, batch_size: int | None = None, layers: list[int] | None = None,
                         positions: Sequence[int] | None = None,
                         implementation: Literal["auto", "kv_cache", "full"] = "auto",
                         progress_bar: bool = True) -> Float[Tensor, "layer neuron"]:
    """IG attribution of every FFN neuron (Chang et al. A.2, Eq. 14-16).

    For each suffix token ``s_t`` (predicted at position ``q = prefix_len-1+t``) and layer l, the
    hidden state ``h^l_t`` at position q only (``blocks.{l}.mlp.hook_post``; other positions keep
    their clean activations) is replaced by ``α h^l_t`` and the gradient of the *probability*
    ``P(s_t | p, s_<t)`` (Eq. 14) with respect to it is accumulated:
    ``IG_i(h) = h_i * 1/m sum_k ∂P(α_k h)/∂h_i`` (Eq. 15, zero baseline, Riemann sum with
    ``α_k = linspace(0, 1, m)``, ``m = steps``, as in the authors' code), and
    ``A^l(i) = 1/T sum_t IG_i(h^l_t)`` (Eq. 16).

    Implementations (identical results up to float rounding):

    * ``"kv_cache"`` (fast): scaling position q's activation at layer l changes, by causal
      attention, only position q's own stream in layers ≥ l, and Eq. 14 reads P at q.  So one clean
      forward fills a KV cache; then every (position q, layer l, step k) is one batch row: the single
      token at q (position id q) attending to the clean keys/values of positions < q (left-padded
      and masked so rows of different q share a batch), patching only its own layer; one backward
      per batch gives all their gradients.  Works through the model's own attention, so
      local (windowed) attention, rotary embeddings and grouped-query attention are handled by
      the Hugging Face implementation.
    * ``"full"`` (the papers' loop, slow): a forward of ``[p, s_<t]`` per (layer, position) with the
      ``steps`` scaled copies in the batch.
    * ``"auto"``: ``"kv_cache"`` after checking that the cached single-token forward reproduces
      the full forward's logits at the first suffix position; otherwise ``"full"``.

    Args:
        model: TransformerBridge (borrowed: left unchanged).
        tokens: one sequence, ``[seq]`` or ``[1, seq]``.
        prefix_len: prefix length (1..seq-1).
        steps: Riemann steps m (paper: 20).
        batch_size: rows per forward (``kv_cache``: (position, layer, step) rows, default from a
            512 MiB budget for the padded key/value copies; ``full``: Riemann steps, default ``steps``).
        layers: layers to score (default all); rows of other layers are NaN.
        positions: the positions q averaged over in Eq. 16 (default all suffix positions
            ``prefix_len-1 .. seq-2``); a subset gives the average over those only.
        implementation: see above.
        progress_bar: show a progress bar.

    Returns:
        Float[Tensor, "layer neuron"] on the model's device.
    """
    tokens = prepare_sequence(model, tokens, prefix_len)
    check_positive_int(steps, "steps")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    check_choice(implementation, "implementation", ("auto", "kv_cache", "full"))
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
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
    with borrowed(model):
        for p in model.parameters():
            p.requires_grad_(False)  # only the patched activations need gradients
        clean, cache, acts = _clean_run(model, tokens)
        if implementation == "auto":
            implementation = "kv_cache" if _kv_cache_ok(model, tokens, prefix_len, clean, cache) else "full"
            if implementation == "full":
                logger.warning("integrated_gradients: the KV-cache path does not reproduce this model's "
                               "logits; using the slow full-forward path")
        scores = torch.full((n_layers, d_mlp), float("nan"), device=tokens.device)
        if implementation == "kv_cache":
            kv_batch = batch_size or _default_kv_batch(model, tokens.shape[1], len(layers), steps)
            ig = _ig_kv_cache(model, tokens, positions, steps, kv_batch, layers, cache, acts, progress_bar)
        else:
            ig = _ig_full(model, tokens, positions, steps, batch_size or steps, layers, acts, progress_bar)
        scores[layers] = ig
        return scores


def _clean_run(model: Any, tokens: Tensor) -> tuple[Tensor, Any, Tensor]:
    """Clean forward filling a DynamicCache; returns logits, cache and h [layer, seq, d_mlp]."""
    from transformers import DynamicCache

    n_layers = model.cfg.n_layers
    acts: dict[int, Tensor] = {}

    def save(act, hook):
        acts[int(hook.name.split(".")[1])] = act.detach()[0]

    cache = DynamicCache()
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, past_key_values=cache, use_cache=True,
                                      fwd_hooks=[(neuron_hook_name(l), save) for l in range(n_layers)])
    return logits.detach(), cache, torch.stack([acts[l] for l in range(n_layers)])


def _empty_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _kv_cache_ok(model: Any, tokens: Tensor, prefix_len: int, clean: Tensor, cache: Any) -> bool:
    """Does a padded-cache single-token forward reproduce the clean logits (first and last suffix position)?"""
    q = torch.tensor(sorted({prefix_len - 1, tokens.shape[1] - 2}), device=tokens.device)
    try:
        with torch.no_grad():
            if int(q.max()) > 0:
                past, mask = _padded_cache(cache, q)
                kw = dict(past_key_values=past, attention_mask=mask)
            else:
                kw = dict(past_key_values=_empty_cache())
            out = model(tokens[0, q][:, None], use_cache=True, position_ids=q[:, None], **kw)
    except Exception as exc:  # an architecture whose forward rejects these arguments
        logger.info("KV-cache check failed: %s", exc)
        return False
    ref = clean[0, q].float()
    return bool(((out[:, -1].float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 1e-4)


#: Memory budget (bytes) of the padded key/value copies of one kv_cache batch; sets the default batch.
KV_BUDGET_BYTES = 512 * 2**20


def _default_kv_batch(model: Any, seq: int, n_layers_scored: int, steps: int) -> int:
    cfg = model.cfg
    kv_dim = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * int(cfg.d_head)
    per_row = 2 * 2 * int(cfg.n_layers) * max(seq, 1) * kv_dim * 4  # K and V, copy + concatenation, float32
    return max(steps, min(n_layers_scored * steps * 16, KV_BUDGET_BYTES // per_row))


def _padded_cache(cache: Any, qs: Tensor) -> tuple[Any, Tensor]:
    """A DynamicCache whose row r holds the clean keys/values of positions ``< qs[r]``, left-padded to
    ``max(qs)``, and the matching 2-D attention mask (padding 0, real keys and the new token 1)."""
    from transformers import DynamicCache

    L = int(qs.max())
    idx = torch.arange(L, device=qs.device)[None] - (L - qs)[:, None]
    valid = idx >= 0
    idx = idx.clamp(min=0)
    out = DynamicCache()
    for l, layer in enumerate(cache.layers):
        # index whole [heads * d_head] rows of a [seq, heads, d_head] copy: a contiguous gather
        k = layer.keys[0][:, idx].transpose(0, 1)  # [batch, heads, L, d_head]
        v = layer.values[0][:, idx].transpose(0, 1)
        out.update(k, v, l)
    mask = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1).long()
    return out, mask


def _ig_kv_cache(model, tokens, positions, steps, batch_size, layers, cache, acts, progress_bar) -> Tensor:
    """Rows (position q, layer l, step k) sorted by q, ``batch_size`` per forward: each row is the
    single token at q with position id q, attending to the clean keys/values of positions < q
    (left-padded, masked), and patches ``blocks.{l}.mlp.hook_post`` with ``α_k h^l_q``."""
    seq = tokens.shape[1]
    dev = tokens.device
    alphas = riemann_alphas(steps, device=dev).to(acts.dtype)
    qs_all = torch.tensor(positions, device=dev)
    layer_t = torch.tensor(layers, device=dev)
    # row order: q outer, then layer, then step
    q_rows = qs_all.repeat_interleave(len(layers) * steps)
    l_rows = layer_t.repeat_interleave(steps).repeat(len(qs_all))
    k_rows = torch.arange(steps, device=dev).repeat(len(qs_all) * len(layers))
    total = torch.zeros(len(layers), acts.shape[-1], dtype=torch.float64, device=dev)
    starts = list(range(0, len(q_rows), batch_size))
    for i in progress(starts, enabled=progress_bar, desc="integrated gradients"):
        q, lr, kr = q_rows[i:i + batch_size], l_rows[i:i + batch_size], k_rows[i:i + batch_size]
        b = len(q)
        present = [j for j, l in enumerate(layers) if bool((lr == l).any())]
        rows = {layers[j]: (lr == layers[j]).nonzero().flatten() for j in present}
        leaves = {l: (alphas[kr[r], None] * acts[l, q[r]]).requires_grad_(True) for l, r in rows.items()}

        def patch(act, hook):
            l = int(hook.name.split(".")[1])
            act = act.clone()
            act[rows[l], -1] = leaves[l].to(act.dtype)
            return act

        kwargs = {}
        if int(q.max()) > 0:
            past, mask = _padded_cache(cache, q)
            kwargs = dict(past_key_values=past, attention_mask=mask)
        else:
            kwargs = dict(past_key_values=_empty_cache())
        with torch.enable_grad():
            logits = model.run_with_hooks(tokens[0, q][:, None], use_cache=True, position_ids=q[:, None],
                                          fwd_hooks=[(neuron_hook_name(l), patch) for l in rows], **kwargs)
            prob = torch.softmax(logits[:, -1].float(), dim=-1).gather(1, tokens[0, q + 1][:, None])
            grads = torch.autograd.grad(prob.sum(), [leaves[l] for l in rows])
        for j, g in zip(present, grads):
            l = layers[j]
            total[j] += (acts[l, q[rows[l]]] * g).sum(0).double()
    return (total / (steps * len(positions))).float()


def _ig_full(model, tokens, positions, steps, batch_size, layers, acts, progress_bar) -> Tensor:
    """The authors' loop: per (layer, position), forwards of [p, s_<t] with the scaled copies batched."""
    seq = tokens.shape[1]
    alphas = riemann_alphas(steps, device=tokens.device).to(acts.dtype)
    total = torch.zeros(len(layers), acts.shape[-1], dtype=torch.float64, device=tokens.device)
    jobs = [(j, l, q) for j, l in enumerate(layers) for q in positions]
    for j, l, q in progress(jobs, enabled=progress_bar, desc="integrated gradients (full)"):
        target = int(tokens[0, q + 1])
        for i in range(0, steps, batch_size):
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
            total[j] += (acts[l, q] * g.sum(0)).double()
    return (total / (steps * len(positions))).float()
