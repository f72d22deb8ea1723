"""IG's ``kv_cache`` path (Chang et al. A.2, Eq. 14-15): single-token forwards over the clean run's
KV cache, through the model's own (hooked) forward, so any architecture Hugging Face implements
(local windows, rotary embeddings, grouped-query attention) is handled by Hugging Face.

Scaling position q's activation at layer l changes, by causal attention, only position q's own
stream in layers >= l, and Eq. 14 reads P at q.  So one clean forward fills a KV cache; then every
(position q, layer l, step k) is one batch row: the single token at q (position id q) attending to
the clean keys/values of positions < q (left-padded and masked so rows of different q share a
batch), patching only its own layer; one backward per batch gives all their gradients.

The Riemann sum itself (Eq. 15-16) is :func:`memloc.localize.integrated_gradients.accumulate`,
shared by the three paths; this module only yields gradients.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .._progress import progress
from ..models import Model, neuron_hook_name
from ._common import relative_error

__all__ = ["check", "default_batch", "gradients", "padded_cache"]

logger = logging.getLogger(__name__)

#: Memory budget (bytes) of the padded key/value copies of one batch; sets the default batch size.
KV_BUDGET_BYTES = 512 * 2**20


def _empty_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def padded_cache(cache: Any, qs: Tensor) -> tuple[Any, Tensor]:
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


def _cache_kwargs(cache: Any, q: Tensor) -> dict[str, Any]:
    if int(q.max()) > 0:
        past, mask = padded_cache(cache, q)
        return dict(past_key_values=past, attention_mask=mask)
    return dict(past_key_values=_empty_cache())


def check(model: Model, tokens: Tensor, prefix_len: int, clean: Tensor, cache: Any) -> float:
    """Relative error (max |Δlogit| / max(1, max |logit|)) of padded-cache single-token forwards at
    the first and last suffix positions against the clean forward; ``inf`` where the model's forward
    rejects these arguments."""
    q = torch.tensor(sorted({prefix_len - 1, tokens.shape[1] - 2}), device=tokens.device)
    try:
        with torch.no_grad():
            out = model(tokens[0, q][:, None], use_cache=True, position_ids=q[:, None], **_cache_kwargs(cache, q))
    except Exception as exc:  # an architecture whose forward rejects these arguments
        logger.info("KV-cache check failed: %s", exc)
        return float("inf")
    return relative_error(out[:, -1], clean[0, q])


def default_batch(model: Model, seq: int, n_layers_scored: int, steps: int) -> int:
    """Rows per forward so the padded key/value copies of one batch stay within ``KV_BUDGET_BYTES``."""
    cfg = model.cfg
    kv_dim = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * int(cfg.d_head)
    itemsize = next(model.parameters()).element_size()
    per_row = 2 * 2 * int(cfg.n_layers) * max(seq, 1) * kv_dim * itemsize  # K and V, copy + concatenation
    return max(steps, min(n_layers_scored * steps * 16, KV_BUDGET_BYTES // per_row))


def gradients(model: Model, tokens: Tensor, positions: Sequence[int], alphas: Tensor, batch_size: int,
              layers: list[int], cache: Any, acts: Tensor,
              progress_bar: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(j, q, g)`` per batch: for each row, the index j into ``layers``, its position q and
    ``g = ∂P(s_t | [p, s_<t]) / ∂h`` at ``h = α_k h^{layers[j]}_q`` (Eq. 14-15).

    Rows (position q, layer l, step k) are sorted by q, ``batch_size`` per forward: each row is the
    single token at q with position id q, attending to the clean keys/values of positions < q
    (left-padded, masked), and patches ``blocks.{l}.mlp.hook_post`` with ``α_k h^l_q``."""
    dev = tokens.device
    steps = len(alphas)
    qs_all = torch.tensor(positions, device=dev)
    layer_t = torch.tensor(layers, device=dev)
    # row order: q outer, then layer, then step
    q_rows = qs_all.repeat_interleave(len(layers) * steps)
    l_rows = layer_t.repeat_interleave(steps).repeat(len(qs_all))
    k_rows = torch.arange(steps, device=dev).repeat(len(qs_all) * len(layers))
    starts = list(range(0, len(q_rows), batch_size))
    for i in progress(starts, enabled=progress_bar, desc="integrated gradients"):
        q, lr, kr = q_rows[i:i + batch_size], l_rows[i:i + batch_size], k_rows[i:i + batch_size]
        present = [j for j, l in enumerate(layers) if bool((lr == l).any())]
        rows = {layers[j]: (lr == layers[j]).nonzero().flatten() for j in present}
        leaves = {l: (alphas[kr[r], None] * acts[l, q[r]]).requires_grad_(True) for l, r in rows.items()}

        def make_patch(l: int):
            def patch(act, hook):
                act = act.clone()
                act[rows[l], -1] = leaves[l].to(act.dtype)
                return act
            return patch

        with torch.enable_grad():
            logits = model.run_with_hooks(tokens[0, q][:, None], use_cache=True, position_ids=q[:, None],
                                          fwd_hooks=[(neuron_hook_name(l), make_patch(l)) for l in rows],
                                          **_cache_kwargs(cache, q))
            prob = torch.softmax(logits[:, -1].float(), dim=-1).gather(1, tokens[0, q + 1][:, None])
            grads = torch.autograd.grad(prob.sum(), [leaves[l] for l in rows])
        j = torch.cat([torch.full((len(rows[layers[jj]]),), jj, device=dev) for jj in present])
        qq = torch.cat([q[rows[layers[jj]]] for jj in present])
        yield j, qq, torch.cat(grads)
