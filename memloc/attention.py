"""The attention of the first decoded token onto the prefix (Stoehr et al. 2024, §6.2, Fig. 6 bottom).

:func:`first_token_attention` reads the key-query attention pattern ``softmax(k q)`` (Stoehr §6.2)
from the query position that produces the first decoded token (position ``prefix_len - 1``,
whose output predicts token ``prefix_len``) onto every prefix token, per layer and head, at
TransformerLens's ``blocks.{l}.attn.hook_pattern`` ([batch, head, query, key]);
:func:`first_token_attention_frame` is its tidy table.  The rare-token analysis
(:mod:`memloc.rare_tokens`) and :func:`memloc.heads.find_memorization_heads` build on it.

Coordinates.  Attention patterns do not depend on LayerNorm folding or weight centering, so the
analysis gives the same numbers with ``load_model(..., process_weights=True)`` or ``False``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._checks import check_layers, check_positive_int, check_tokens
from ._deprecation import renamed_kwargs
from ._progress import progress
from .borrow import borrowed
from .models import Model, hook_name, layer_hooks

__all__ = ["attention_hook_name", "first_token_attention", "first_token_attention_frame", "pattern_rows"]


def attention_hook_name(layer: int) -> str:
    """TransformerLens hook point of layer ``layer``'s attention pattern [batch, head, query, key]."""
    return hook_name("pattern", layer)


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


@torch.no_grad()
def pattern_rows(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int, layers: Sequence[int], batch_size: int,
                 progress_bar: bool) -> Float[Tensor, "n layer head prefix"]:
    """The attention rows of :func:`first_token_attention` without its validation and borrowing:
    query ``prefix_len - 1`` onto keys ``0..prefix_len-1``, per paragraph, layer and head.

    The model is causal, so the row depends only on the prefix: only ``tokens[:, :prefix_len]`` is
    run, and the forward stops after the last requested layer.  The hooks are
    ``run_with_hooks``'s temporary ones, so the model is left as it was found.

    Args:
        model: a TransformerBridge in compatibility mode.
        tokens: Int[Tensor, "n seq"] paragraphs, already checked (int64 on the model's device,
            ``1 <= prefix_len < seq``; :func:`memloc._checks.check_tokens`).
        prefix_len: prefix length.
        layers: the layers to read, each in ``0..n_layers-1`` (the result's ``layer`` axis, in this order).
        batch_size: paragraphs per forward pass.
        progress_bar: show a progress bar over batches.

    Returns:
        Float[Tensor, "n layer head prefix"], float32, CPU.

    Raises:
        RuntimeError: the model never ran ``hook_pattern`` of a requested layer (not a bridge in
            compatibility mode).
    """
    out = []
    stop = max(layers) + 1
    for sl in progress(list(_batches(len(tokens), batch_size)), enabled=progress_bar,
                       desc="first-token attention"):
        got: dict[int, Tensor] = {}

        def grab(pattern: Tensor, hook: Any, *, layer: int) -> None:
            got[layer] = pattern[:, :, prefix_len - 1, :prefix_len].detach().float().cpu()

        fwd = layer_hooks("pattern", layers, grab)
        model.run_with_hooks(tokens[sl, :prefix_len], fwd_hooks=fwd,
                             stop_at_layer=stop if stop < int(model.cfg.n_layers) else None)
        missing = [li for li in layers if li not in got]
        if missing:
            raise RuntimeError(f"the model never ran hook_pattern of layers {missing}; "
                               "is it a TransformerBridge in compatibility mode?")
        out.append(torch.stack([got[li] for li in layers], dim=1))
    return torch.cat(out)


def _checked_rows(model: Model, tokens: Any, prefix_len: Any, layers: Any, batch_size: Any,
                  progress_bar: bool) -> tuple[Tensor, list[int], Float[Tensor, "n layer head prefix"]]:
    """Validate (before any forward pass), then the attention rows of :func:`pattern_rows` on the
    borrowed model; returns the checked tokens, the chosen layers and the rows."""
    tokens = check_tokens(model, tokens, prefix_len)
    chosen = check_layers(model, layers, "layers")
    check_positive_int(batch_size, "batch_size")
    with borrowed(model):
        return tokens, chosen, pattern_rows(model, tokens, prefix_len, chosen, batch_size, progress_bar)


@renamed_kwargs(layer="layers")
def first_token_attention(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int, *,
                          layers: int | Sequence[int] | None = None, batch_size: int = 32,
                          progress_bar: bool = True
                          ) -> Float[Tensor, "n layer head prefix"] | Float[Tensor, "n head prefix"]:
    """Attention of the first decoded token onto the prefix (Stoehr et al. §6.2, Fig. 6 bottom).

    For every paragraph, layer and head: the row of the key-query attention pattern
    ``softmax(q k^T / sqrt(d_head) + mask)`` (TransformerLens ``blocks.{l}.attn.hook_pattern``) at
    the query position ``prefix_len - 1`` — the position whose output predicts the first
    continuation token ``tokens[:, prefix_len]`` — restricted to the keys ``0..prefix_len-1``.
    For a causal model each row sums to 1 (local-attention layers with a window shorter than the
    prefix put zeros outside the window).

    Args:
        model: a TransformerBridge in compatibility mode (borrowed, left unchanged).
        tokens: Int[Tensor, "n seq"] paragraphs; only the prefix is run through the model.
        prefix_len: prefix length (1..seq-1).
        layers: ``None`` (all layers, result "n layer head prefix"), one int (result
            "n head prefix"), or a sequence of ints (result "n layer head prefix" in that order).
            (``layer=`` is its deprecated name.)
        batch_size: paragraphs per forward pass.
        progress_bar: show a progress bar over batches.

    Returns:
        Float[Tensor, "n layer head prefix"] (or "n head prefix" for one int layer), float32, CPU.

    Raises:
        ValueError: bad tokens, prefix_len, layers or batch_size (before any forward pass).
    """
    _, _, out = _checked_rows(model, tokens, prefix_len, layers, batch_size, progress_bar)
    return out[:, 0] if isinstance(layers, (int, np.integer)) else out


@renamed_kwargs(layer="layers")
def first_token_attention_frame(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int, *,
                                layers: int | Sequence[int] | None = None, batch_size: int = 32,
                                decode: bool = True, progress_bar: bool = True) -> pd.DataFrame:
    """Tidy version of :func:`first_token_attention` (Stoehr et al. §6.2, Fig. 6 bottom).

    Returns:
        One row per (paragraph, layer, head, position) with columns ``paragraph``, ``layer``,
        ``head``, ``position`` (key position in the prefix), ``token_id``, ``attention`` and, if
        ``decode`` and the model has a tokenizer, ``token`` (the decoded key token).
    """
    tokens, layers, att = _checked_rows(model, tokens, prefix_len, layers, batch_size, progress_bar)
    n, n_l, n_h, p = att.shape
    idx = pd.MultiIndex.from_product([range(n), layers, range(n_h), range(p)],
                                     names=["paragraph", "layer", "head", "position"])
    df = pd.DataFrame({"attention": att.reshape(-1).numpy()}, index=idx).reset_index()
    prefix = tokens[:, :prefix_len].cpu().numpy()
    df["token_id"] = prefix[df["paragraph"].to_numpy(), df["position"].to_numpy()]
    tok = getattr(model, "tokenizer", None)
    if decode and tok is not None:
        vocab = {int(t): tok.decode([int(t)]) for t in np.unique(prefix)}
        df["token"] = df["token_id"].map(vocab)
    return df
