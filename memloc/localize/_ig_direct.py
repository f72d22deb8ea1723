"""IG's ``direct`` path (Chang et al. A.2, Eq. 14-15) for GPT-Neo and GPT-2: the single-token pass
of the ``kv_cache`` path written out on the model's own weights instead of going through the
Hugging Face forward.

Every (position q, layer l, step k) row starts from the clean ``blocks.{l}.hook_resid_mid`` at q
plus the patched MLP output ``α_k h^l_q W_out + b_out`` and runs layers ``l+1..L-1`` for that one
token: LayerNorms, MLPs and a one-query-row attention over the clean run's keys/values
(``attn.hook_k``/``hook_v``) of positions ``< q`` (causal, and GPT-Neo's local window: keys
``q - window < p <= q``) plus the row's own recomputed key/value at q; GPT-2 scales scores by
``1/sqrt(d_head)``, GPT-Neo does not.  Then ``ln_final``, unembedding and P(s_t); one backward per
batch of rows.  It runs no hooks after the clean forward, so with hooks active that change the
model's output its setup check fails and ``"auto"`` uses a path through the model's forward.

The Riemann sum itself (Eq. 15-16) is :func:`memloc.localize.integrated_gradients.accumulate`,
shared by the three paths; this module only yields gradients.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .._progress import progress
from ..models import Model
from ._common import relative_error

__all__ = ["ARCHS", "DirectWeights", "check", "default_batch", "direct_weights", "gradients", "model_type",
           "rows_logits"]

logger = logging.getLogger(__name__)


#: Hugging Face ``model_type`` values the direct path implements.
ARCHS = ("gpt2", "gpt_neo")


def model_type(model: Model) -> str | None:
    from ..architectures import model_type as _model_type

    return _model_type(model)


class DirectWeights:
    """The weights of the direct single-token pass (detached, from the bridge's TransformerLens-style
    properties and LayerNorm modules), fused per layer: ``W_qkv`` [layer, d_model, 3*heads*d_head]
    (columns Q | K | V, each head-major), ``W_O`` [layer, heads*d_head, d_model], and per layer the
    attention score scale and local-attention window (None = global)."""

    def __init__(self, model: Model, scales: list[float], windows: list[int | None], act: Any) -> None:
        from einops import rearrange

        cfg = model.cfg
        L, H, dh, d = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model

        def bias(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
            try:
                b = getattr(model, name)
            except (AttributeError, ValueError, RuntimeError):  # bias-free projections raise
                b = None
            return torch.zeros(shape, dtype=like.dtype, device=like.device) if b is None else b.detach()

        W_Q, W_K, W_V = (w.detach() for w in (model.W_Q, model.W_K, model.W_V))
        self.W_qkv = torch.cat([rearrange(w, "l h d e -> l d (h e)") for w in (W_Q, W_K, W_V)], dim=-1).contiguous()
        self.b_qkv = torch.cat([rearrange(bias(n, (L, H, dh), W_Q), "l h e -> l (h e)")
                                for n in ("b_Q", "b_K", "b_V")], dim=-1)
        self.W_O = rearrange(model.W_O.detach(), "l h e d -> l (h e) d").contiguous()
        self.b_O = bias("b_O", (L, d), W_Q)
        self.W_in, self.W_out = model.W_in.detach().contiguous(), model.W_out.detach().contiguous()
        self.b_in, self.b_out = bias("b_in", (L, cfg.d_mlp), W_Q), bias("b_out", (L, d), W_Q)
        self.W_U = model.W_U.detach().contiguous()
        self.b_U = bias("b_U", (cfg.d_vocab,), W_Q)
        self.ln1 = [(b.ln1.w.detach(), b.ln1.b.detach()) for b in model.blocks]
        self.ln2 = [(b.ln2.w.detach(), b.ln2.b.detach()) for b in model.blocks]
        self.ln_final = (model.ln_final.w.detach(), model.ln_final.b.detach())
        self.eps = float(getattr(getattr(model.ln_final, "original_component", None), "eps", cfg.eps))
        self.n_layers, self.n_heads, self.d_head, self.d_model = L, H, dh, d
        self.scales, self.windows, self.act = scales, windows, act
        dtype = W_Q.dtype
        if W_Q.device.type == "cpu" and torch.finfo(dtype).bits < 32:
            # CPU half-precision matrix products of these single-token shapes are slow (measured on the
            # 2-core machine, embedded model in bfloat16: the direct pass 25x slower than in float32,
            # against 16x for the papers' batched loop), so on a CPU the pass runs on float32 copies
            self._cast(torch.float32)
            logger.info("integrated_gradients: the direct pass runs in float32 on the CPU (model in %s)", dtype)

    def _cast(self, dtype: torch.dtype) -> None:
        self.ln_final = tuple(t.to(dtype) for t in self.ln_final)
        self.ln1, self.ln2 = ([tuple(t.to(dtype) for t in pair) for pair in ln] for ln in (self.ln1, self.ln2))
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                setattr(self, name, value.to(dtype))


def direct_weights(model: Model) -> DirectWeights | None:
    """The direct path's weights for GPT-Neo / GPT-2 (None for other architectures or configurations).

    GPT-Neo: unscaled scores; ``config.attention_layers[l] == "local"`` layers see keys ``p`` with
    ``0 ≤ q - p < window_size`` (HF ``GPTNeoSelfAttention``: ``tril ^ tril(-window_size)``).
    GPT-2: scores times ``d_head**-0.5`` (if ``scale_attn_weights``) and ``1/(l+1)`` (if
    ``scale_attn_by_inverse_layer_idx``), as HF ``GPT2Attention.scaling``."""

    from ..architectures import adapter_for
    from ..placement import offloaded_modules

    if offloaded_modules(model):
        logger.warning("integrated_gradients: the direct single-token pass needs a resident copy of every weight, "
                       "but accelerate has offloaded some (device_map with 'cpu'/'disk' entries); using the "
                       "kv_cache path (single-token forwards through the model: typically 2-4x slower)")
        return None
    try:
        adapter = adapter_for(model)
        geometry = adapter.attention_geometry(model)  # GPT-Neo windows, GPT-2 scaling (memloc.architectures)
        if geometry is None:
            return None
        return DirectWeights(model, geometry.scales, geometry.windows, adapter.mlp_activation(model))
    except (AttributeError, KeyError, ValueError, RuntimeError) as exc:  # an unexpected variant: not supported
        logger.info("direct IG path unavailable: %s", exc)
        return None


def rows_logits(w: DirectWeights, q: Tensor, l_rows: Tensor, leaf: Tensor, state: dict[str, Tensor]) -> Tensor:
    """Logits [rows, vocab] of the single-token pass: row r is the token at position ``q[r]`` whose
    ``blocks.{l_rows[r]}.mlp.hook_post`` is ``leaf[r]``; rows must be sorted by layer.  Row r starts
    from the clean ``resid_mid`` of its layer at q plus ``leaf W_out + b_out`` and runs the later
    blocks attending to the clean keys/values of positions < q (``state["k"]``, ``state["v"]``)
    and its own key/value at q."""
    import torch.nn.functional as F

    H, dh, d = w.n_heads, w.d_head, w.d_model
    S = max(int(q.max()), 1)  # keys of positions < max(q)
    p = torch.arange(S, device=q.device)
    x = None
    first = int(l_rows[0])
    for j in range(first, w.n_layers):
        if x is not None:  # block j on the rows already started (those of layers < j)
            n = x.shape[0]
            qj = q[:n]
            allowed = p[None] < qj[:, None]
            if w.windows[j] is not None:
                allowed &= (qj[:, None] - p[None]) < w.windows[j]
            a = F.layer_norm(x, (d,), *w.ln1[j], w.eps)
            qh, kh, vh = (a @ w.W_qkv[j] + w.b_qkv[j]).view(n, 3, H, dh).unbind(1)
            K, V = state["k"][j, :S].to(x.dtype), state["v"][j, :S].to(x.dtype)
            s_clean = torch.einsum("bhe,she->bhs", qh.float(), K.float()) * w.scales[j]
            s_clean = s_clean.masked_fill(~allowed[:, None, :], float("-inf"))
            s_self = (qh.float() * kh.float()).sum(-1, keepdim=True) * w.scales[j]
            pat = torch.softmax(torch.cat([s_clean, s_self], dim=-1), dim=-1).to(x.dtype)
            z = torch.einsum("bhs,she->bhe", pat[..., :S], V) + pat[..., S:] * vh
            x = x + z.reshape(n, H * dh) @ w.W_O[j] + w.b_O[j]
            m = F.layer_norm(x, (d,), *w.ln2[j], w.eps)
            x = x + w.act(m @ w.W_in[j] + w.b_in[j]) @ w.W_out[j] + w.b_out[j]
        sel = (l_rows == j).nonzero().flatten()
        if len(sel):  # rows patched at layer j start here (after their MLP)
            new = state["resid_mid"][j, q[sel]] + leaf[sel].to(w.W_out.dtype) @ w.W_out[j] + w.b_out[j]
            x = new if x is None else torch.cat([x, new])
    return F.layer_norm(x, (d,), *w.ln_final, w.eps) @ w.W_U + w.b_U


def check(w: DirectWeights, tokens: Tensor, prefix_len: int, clean: Tensor, acts: Tensor,
          state: dict[str, Tensor]) -> float:
    """Relative error (max |Δlogit| / max(1, max |logit|)) of unpatched direct rows (leaf = clean h,
    every layer) against the clean logits at the first and last suffix positions; ``inf`` where the
    clean run lacks the hooks the path starts from or the pass fails."""
    if not state:
        return float("inf")
    qs = sorted({prefix_len - 1, tokens.shape[1] - 2})
    L = w.n_layers
    q = torch.tensor(qs, device=tokens.device).repeat(L)
    l_rows = torch.arange(L, device=tokens.device).repeat_interleave(len(qs))
    try:
        with torch.no_grad():
            out = rows_logits(w, q, l_rows, acts[l_rows, q], state)
    except (RuntimeError, ValueError, IndexError) as exc:
        logger.info("direct IG check failed: %s", exc)
        return float("inf")
    return relative_error(out, clean[0, q])


#: Memory budget (bytes) of one direct batch's activations; sets its default batch size.
DIRECT_BUDGET_BYTES = 512 * 2**20


def default_batch(model: Model, seq: int) -> int:
    cfg = model.cfg
    # float32 per row: logits, softmax and their grads; per layer about 4 d_mlp + 16 d_model + 4 heads*seq
    per_row = 4 * (4 * int(cfg.d_vocab) + int(cfg.n_layers) * (4 * int(cfg.d_mlp) + 16 * int(cfg.d_model)
                                                                   + 4 * int(cfg.n_heads) * max(seq, 1)))
    return max(1, DIRECT_BUDGET_BYTES // per_row)


def gradients(w: DirectWeights, tokens: Tensor, positions: Sequence[int], alphas: Tensor, batch_size: int,
              layers: list[int], acts: Tensor, state: dict[str, Tensor],
              progress_bar: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(j, q, g)`` per batch: for each row, the index j into ``layers``, its position q and
    ``g = ∂P(s_t | [p, s_<t]) / ∂h`` at ``h = α_k h^{layers[j]}_q`` (Eq. 14-15).

    Rows (layer l, position q, step k) are sorted by layer, ``batch_size`` per pass of
    :func:`rows_logits`; one backward per batch gives the gradients of all its rows."""
    dev = tokens.device
    steps = len(alphas)
    qs_all = torch.tensor(positions, device=dev)
    layer_t = torch.tensor(layers, device=dev)
    n_pos = len(positions)
    # row order: layer outer (sorted), then position, then step
    order = torch.argsort(layer_t, stable=True)
    j_rows = order.repeat_interleave(n_pos * steps)  # index into `layers`
    l_rows_all = layer_t[j_rows]
    q_rows_all = qs_all.repeat_interleave(steps).repeat(len(layers))
    k_rows_all = torch.arange(steps, device=dev).repeat(len(layers) * n_pos)
    starts = list(range(0, len(q_rows_all), batch_size))
    for i in progress(starts, enabled=progress_bar, desc="integrated gradients"):
        sl = slice(i, i + batch_size)
        q, lr, kr, jr = q_rows_all[sl], l_rows_all[sl], k_rows_all[sl], j_rows[sl]
        leaf = (alphas[kr, None] * acts[lr, q]).requires_grad_(True)
        with torch.enable_grad():
            logits = rows_logits(w, q, lr, leaf, state)
            prob = torch.softmax(logits.float(), dim=-1).gather(1, tokens[0, q + 1][:, None])
            (g,) = torch.autograd.grad(prob.sum(), [leaf])
        yield jr, q, g
