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

    Implementations (identical results up to float rounding):

    * ``"direct"`` (fastest; GPT-Neo and GPT-2): the same observation as ``"kv_cache"`` below, with
      the single-token pass written out on the model's own weights instead of going through the
      Hugging Face forward: every (position q, layer l, step k) row starts from the clean
      ``blocks.{l}.hook_resid_mid`` at q plus the patched MLP output ``α_k h^l_q W_out + b_out``
      and runs layers ``l+1..L-1`` for that one token: LayerNorms, MLPs and a one-query-row
      attention over the clean run's keys/values (``attn.hook_k``/``hook_v``) of positions ``< q``
      (causal, and GPT-Neo's local window: keys ``q - window < p ≤ q``) plus the row's own
      recomputed key/value at q; GPT-2 scales scores by ``1/sqrt(d_head)``, GPT-Neo does not.
      Then ``ln_final``, unembedding and P(s_t); one backward per batch of rows.  It runs no hooks
      after the clean forward, so with hooks active that change the model's output the setup check
      below fails and ``"auto"`` uses one of the paths through the model's forward.
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
    * ``"auto"``: ``"direct"`` where the architecture is supported and its unpatched rows
      (α = 1, every layer) reproduce the full forward's logits at the first and last suffix
      positions (relative 1e-4); otherwise ``"kv_cache"`` after the same check of the cached
      single-token forward; otherwise ``"full"``.

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
        Float[Tensor, "layer neuron"] on the model's device.

    Raises:
        ValueError: bad arguments, or ``implementation="direct"`` for an architecture other than
            GPT-Neo / GPT-2 (both before any work).
        RuntimeError: ``implementation="direct"`` when its setup check against the full forward fails.
    """
    tokens = prepare_sequence(model, tokens, prefix_len)
    check_positive_int(steps, "steps")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    check_choice(implementation, "implementation", ("auto", "direct", "kv_cache", "full"))
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
    if implementation == "direct" and _model_type(model) not in _DIRECT_ARCHS:
        raise ValueError(f"implementation='direct' supports {sorted(_DIRECT_ARCHS)} models only, got "
                         f"{_model_type(model)!r}; use 'auto' (falls back to 'kv_cache' or 'full')")
    with borrowed(model):
        for p in model.parameters():
            p.requires_grad_(False)  # only the patched activations need gradients
        weights = _direct_weights(model) if implementation in ("auto", "direct") else None
        clean, cache, acts, state = _clean_run(model, tokens)
        if weights is not None:
            if _direct_ok(weights, tokens, prefix_len, clean, acts, state):
                implementation = "direct"
            elif implementation == "direct":
                raise RuntimeError("implementation='direct': the direct single-token pass does not reproduce this "
                                   "model's logits (active hooks? reduced precision?); use 'auto'")
        if implementation == "auto":
            implementation = "kv_cache" if _kv_cache_ok(model, tokens, prefix_len, clean, cache) else "full"
            if implementation == "full":
                logger.warning("integrated_gradients: the KV-cache path does not reproduce this model's "
                               "logits; using the slow full-forward path")
        scores = torch.full((n_layers, d_mlp), float("nan"), device=tokens.device)
        if implementation == "direct":
            batch = batch_size or _default_direct_batch(model, tokens.shape[1])
            ig = _ig_direct(weights, tokens, positions, steps, batch, layers, acts, state, progress_bar)
        elif implementation == "kv_cache":
            kv_batch = batch_size or _default_kv_batch(model, tokens.shape[1], len(layers), steps)
            ig = _ig_kv_cache(model, tokens, positions, steps, kv_batch, layers, cache, acts, progress_bar)
        else:
            ig = _ig_full(model, tokens, positions, steps, batch_size or steps, layers, acts, progress_bar)
        scores[layers] = ig
        return scores


#: Clean-run activations the direct path starts from (TransformerLens hook names, ``{l}`` = layer).
_STATE_HOOKS = {"resid_mid": "blocks.{l}.hook_resid_mid", "k": "blocks.{l}.attn.hook_k",
                "v": "blocks.{l}.attn.hook_v"}


def _clean_run(model: Any, tokens: Tensor) -> tuple[Tensor, Any, Tensor, dict[str, Tensor]]:
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
    state_names = [h.format(l=l) for h in _STATE_HOOKS.values() for l in range(n_layers)]
    if all(n in model.hook_dict for n in state_names):
        names += state_names
    cache = DynamicCache()
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, past_key_values=cache, use_cache=True,
                                      fwd_hooks=[(n, saver(n)) for n in names])
    acts = torch.stack([saved[neuron_hook_name(l)] for l in range(n_layers)])
    state = {}
    if all(n in saved for n in state_names):
        state = {key: torch.stack([saved[h.format(l=l)] for l in range(n_layers)]) for key, h in _STATE_HOOKS.items()}
    return logits.detach(), cache, acts, state


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


#: Hugging Face ``model_type`` values the direct path implements.
_DIRECT_ARCHS = ("gpt2", "gpt_neo")


def _model_type(model: Any) -> str | None:
    config = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(config, "model_type", None)


class _DirectWeights:
    """The weights of the direct single-token pass (detached, from the bridge's TransformerLens-style
    properties and LayerNorm modules), fused per layer: ``W_qkv`` [layer, d_model, 3*heads*d_head]
    (columns Q | K | V, each head-major), ``W_O`` [layer, heads*d_head, d_model], and per layer the
    attention score scale and local-attention window (None = global)."""

    def __init__(self, model: Any, scales: list[float], windows: list[int | None], act: Any) -> None:
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


def _direct_weights(model: Any) -> _DirectWeights | None:
    """The direct path's weights for GPT-Neo / GPT-2 (None for other architectures or configurations).

    GPT-Neo: unscaled scores; ``config.attention_layers[l] == "local"`` layers see keys ``p`` with
    ``0 ≤ q - p < window_size`` (HF ``GPTNeoSelfAttention``: ``tril ^ tril(-window_size)``).
    GPT-2: scores times ``d_head**-0.5`` (if ``scale_attn_weights``) and ``1/(l+1)`` (if
    ``scale_attn_by_inverse_layer_idx``), as HF ``GPT2Attention.scaling``."""
    from transformers.activations import ACT2FN

    config = getattr(getattr(model, "original_model", None), "config", None)
    kind = getattr(config, "model_type", None)
    L, dh = model.cfg.n_layers, model.cfg.d_head
    try:
        if kind == "gpt_neo":
            types = list(config.attention_layers)
            if len(types) != L or any(t not in ("global", "local") for t in types):
                return None
            scales = [1.0] * L
            windows = [int(config.window_size) if t == "local" else None for t in types]
        elif kind == "gpt2":
            base = dh ** -0.5 if config.scale_attn_weights else 1.0
            scales = [base / (l + 1) if config.scale_attn_by_inverse_layer_idx else base for l in range(L)]
            windows = [None] * L
        else:
            return None
        act = ACT2FN[config.activation_function]
        return _DirectWeights(model, scales, windows, act)
    except (AttributeError, KeyError, ValueError, RuntimeError) as exc:  # an unexpected variant: not supported
        logger.info("direct IG path unavailable: %s", exc)
        return None


def _direct_rows(w: _DirectWeights, q: Tensor, l_rows: Tensor, leaf: Tensor, state: dict[str, Tensor]) -> Tensor:
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


def _direct_ok(w: _DirectWeights, tokens: Tensor, prefix_len: int, clean: Tensor, acts: Tensor,
               state: dict[str, Tensor]) -> bool:
    """Do unpatched direct rows (leaf = clean h, every layer) reproduce the clean logits at the first
    and last suffix positions (relative 1e-4)?"""
    if not state:
        return False
    qs = sorted({prefix_len - 1, tokens.shape[1] - 2})
    L = w.n_layers
    q = torch.tensor(qs, device=tokens.device).repeat(L)
    l_rows = torch.arange(L, device=tokens.device).repeat_interleave(len(qs))
    try:
        with torch.no_grad():
            out = _direct_rows(w, q, l_rows, acts[l_rows, q], state)
    except (RuntimeError, ValueError, IndexError) as exc:
        logger.info("direct IG check failed: %s", exc)
        return False
    ref = clean[0, q].float()
    return bool(((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < 1e-4)


#: Memory budget (bytes) of one direct batch's activations; sets its default batch size.
DIRECT_BUDGET_BYTES = 512 * 2**20


def _default_direct_batch(model: Any, seq: int) -> int:
    cfg = model.cfg
    # float32 per row: logits, softmax and their grads; per layer about 4 d_mlp + 16 d_model + 4 heads*seq
    per_row = 4 * (4 * int(cfg.d_vocab) + int(cfg.n_layers) * (4 * int(cfg.d_mlp) + 16 * int(cfg.d_model)
                                                                   + 4 * int(cfg.n_heads) * max(seq, 1)))
    return max(1, DIRECT_BUDGET_BYTES // per_row)


def _ig_direct(w, tokens, positions, steps, batch_size, layers, acts, state, progress_bar) -> Tensor:
    """Rows (layer l, position q, step k) sorted by layer, ``batch_size`` per pass of
    :func:`_direct_rows`; one backward per batch gives ∂P(s_t)/∂(α_k h^l_q) for all its rows."""
    dev = tokens.device
    alphas = riemann_alphas(steps, device=dev).to(acts.dtype)
    qs_all = torch.tensor(positions, device=dev)
    layer_t = torch.tensor(layers, device=dev)
    n_pos = len(positions)
    # row order: layer outer (sorted), then position, then step
    order = torch.argsort(layer_t, stable=True)
    j_rows = order.repeat_interleave(n_pos * steps)  # index into `layers`
    l_rows_all = layer_t[j_rows]
    q_rows_all = qs_all.repeat_interleave(steps).repeat(len(layers))
    k_rows_all = torch.arange(steps, device=dev).repeat(len(layers) * n_pos)
    total = torch.zeros(len(layers), acts.shape[-1], dtype=torch.float64, device=dev)
    starts = list(range(0, len(q_rows_all), batch_size))
    for i in progress(starts, enabled=progress_bar, desc="integrated gradients"):
        sl = slice(i, i + batch_size)
        q, lr, kr, jr = q_rows_all[sl], l_rows_all[sl], k_rows_all[sl], j_rows[sl]
        h = acts[lr, q]
        leaf = (alphas[kr, None] * h).requires_grad_(True)
        with torch.enable_grad():
            logits = _direct_rows(w, q, lr, leaf, state)
            prob = torch.softmax(logits.float(), dim=-1).gather(1, tokens[0, q + 1][:, None])
            (g,) = torch.autograd.grad(prob.sum(), [leaf])
        total.index_add_(0, jr, (h * g).double())
    return (total / (steps * n_pos)).float()


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
