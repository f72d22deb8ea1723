"""Attention heads and memorization: the first decoded token's attention, the rare-token
analysis and the "memorization head" (Stoehr et al. 2024, §6, Fig. 6 and Fig. 7).

* :func:`first_token_attention` — the key-query attention pattern ``softmax(k q)`` (Stoehr §6.2)
  from the query position that produces the first decoded token (position ``prefix_len - 1``,
  whose output predicts token ``prefix_len``) onto every prefix token, per layer and head.  It is
  read at TransformerLens's ``blocks.{l}.attn.hook_pattern`` ([batch, head, query, key]).
* :func:`frequency_ranks` / :func:`attention_by_rank` / :func:`rare_token_attention` /
  :func:`rare_token_correlation` — the rare-token analysis of Stoehr §6.3 (Fig. 7): every
  prefix token is ranked *within its paragraph's prefix* by its corpus unigram frequency, from
  0 (rarest) to ``prefix_len - 1`` (most frequent), ties allowed; per paragraph, the attention a
  head puts on the tokens of each rank is summed; the per-rank sums are aggregated over
  paragraphs, and each head gets the correlation between rank and aggregated attention (a
  strongly negative correlation — the paper reports -0.97 for GPT-Neo 125M's L1H2 — means the
  head attends to the rare tokens of the paragraph).
* :func:`find_memorization_heads` — ranks heads by the three kinds of evidence that single out
  L1H2 in Stoehr §5.2-6.3 (contrastive ``W_V`` gradient, value-activation gradients, rare-token
  correlation) and combines them by rank averaging.

Ties.  The paper ranks "allowing ties" and notes that "due to ties in token frequencies, often
not all ranks up to rank 49 receive attention".  The default ``ties="min"`` is competition
ranking (scipy/pandas ``method="min"``): a token's rank is the number of prefix tokens that are
strictly rarer, so tied tokens (including repeats of one token) share the lowest rank of their
group, the ranks after the group are skipped, and the rank keeps its 0..prefix_len-1 scale in
every paragraph.  ``ties="dense"`` (consecutive ranks, 0..n_distinct-1) is available too.

Coordinates.  Attention patterns do not depend on LayerNorm folding or weight centering, so the
analysis gives the same numbers with ``load_model(..., process_weights=True)`` or ``False``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int, Real
from torch import Tensor

from ._checks import check_choice, check_fraction, check_layers, check_positive_int, check_tokens
from ._deprecation import renamed_kwargs
from ._progress import progress
from .borrow import borrowed
from .models import hook_name, layer_hooks

logger = logging.getLogger(__name__)

__all__ = [
    "first_token_attention", "first_token_attention_frame", "unigram_counts_from_tokens", "frequency_ranks",
    "attention_by_rank", "rare_token_attention", "rare_token_correlation", "find_memorization_heads",
    "attention_hook_name", "TIES", "CORRELATIONS",
]

#: Tie handling of :func:`frequency_ranks` (pandas/scipy ``rank`` methods, shifted to start at 0).
TIES = ("min", "dense")
#: Correlation coefficients of :func:`rare_token_correlation`.
CORRELATIONS = ("pearson", "spearman")
#: Evidence kinds of :func:`find_memorization_heads`.
EVIDENCE = ("contrastive", "activation", "rare")


def attention_hook_name(layer: int) -> str:
    """TransformerLens hook point of layer ``layer``'s attention pattern [batch, head, query, key]."""
    return hook_name("pattern", layer)


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def _prefix_len_for_attention(model: Any, tokens: Any, prefix_len: Any) -> Tensor:
    """Validate tokens/prefix_len; the first decoded token must exist (prefix_len < seq)."""
    return check_tokens(model, tokens, prefix_len)


@torch.no_grad()
def _pattern_rows(model: Any, tokens: Tensor, prefix_len: int, layers: list[int], batch_size: int,
                  progress_bar: bool) -> Float[Tensor, "n layer head prefix"]:
    """Attention rows of query ``prefix_len - 1`` onto keys ``0..prefix_len-1`` (no validation).

    The model is causal, so the row depends only on the prefix: only ``tokens[:, :prefix_len]`` is
    run, and the forward stops after the last requested layer.
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


@renamed_kwargs(layer="layers")
def first_token_attention(model: Any, tokens: Int[Tensor, "n seq"], prefix_len: int, *,
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
    tokens = _prefix_len_for_attention(model, tokens, prefix_len)
    chosen = check_layers(model, layers, "layers")
    check_positive_int(batch_size, "batch_size")
    with borrowed(model):
        out = _pattern_rows(model, tokens, prefix_len, chosen, batch_size, progress_bar)
    return out[:, 0] if isinstance(layers, (int, np.integer)) else out


@renamed_kwargs(layer="layers")
def first_token_attention_frame(model: Any, tokens: Int[Tensor, "n seq"], prefix_len: int, *,
                                layers: int | Sequence[int] | None = None, batch_size: int = 32,
                                decode: bool = True, progress_bar: bool = True) -> pd.DataFrame:
    """Tidy version of :func:`first_token_attention` (Stoehr et al. §6.2, Fig. 6 bottom).

    Returns:
        One row per (paragraph, layer, head, position) with columns ``paragraph``, ``layer``,
        ``head``, ``position`` (key position in the prefix), ``token_id``, ``attention`` and, if
        ``decode`` and the model has a tokenizer, ``token`` (the decoded key token).
    """
    tokens = _prefix_len_for_attention(model, tokens, prefix_len)
    layers = check_layers(model, layers, "layers")
    check_positive_int(batch_size, "batch_size")
    with borrowed(model):
        att = _pattern_rows(model, tokens, prefix_len, layers, batch_size, progress_bar)
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


# --------------------------------------------------------------------------- rare tokens (§6.3)

def unigram_counts_from_tokens(tokens: Int[Tensor, "..."] | Int[np.ndarray, "..."], vocab: int) -> Int[Tensor, "vocab"]:
    """Unigram counts of every token id in ``tokens`` (any shape), length ``vocab`` (Stoehr §6.3).

    A stand-in for the training corpus's unigram distribution when only a token sample is at hand.
    """
    if not isinstance(tokens, Tensor):
        try:
            tokens = torch.as_tensor(np.array(tokens))  # a copy: read-only arrays warn
        except Exception as exc:
            raise ValueError(f"tokens must be an integer tensor, could not convert: {exc}") from exc
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab <= 0:
        raise ValueError(f"vocab must be a positive int, got {vocab!r}")
    flat = tokens.reshape(-1).long().cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
        raise ValueError(f"tokens holds ids outside [0, {vocab}): min {int(flat.min())}, max {int(flat.max())}")
    return torch.bincount(flat, minlength=int(vocab))


def _check_frequencies(frequencies: Any, d_vocab: int) -> Float[Tensor, "vocab"]:
    if frequencies is None:
        raise ValueError("frequencies must be a 1-D table of corpus unigram counts, got None")
    if not isinstance(frequencies, Tensor):
        try:
            frequencies = torch.as_tensor(np.array(frequencies))
        except Exception as exc:
            raise ValueError(f"frequencies must be a 1-D numeric table of length {d_vocab}: {exc}") from exc
    if frequencies.dtype == torch.bool or frequencies.dtype.is_complex:
        raise ValueError(f"frequencies must be numeric counts, got dtype {frequencies.dtype}")
    if frequencies.ndim != 1 or frequencies.shape[0] != d_vocab:
        raise ValueError(f"frequencies must be a 1-D table with one count per vocabulary entry "
                         f"(length {d_vocab}), got shape {tuple(frequencies.shape)}")
    freq = frequencies.detach().double().cpu()
    if not torch.isfinite(freq).all() or bool((freq < 0).any()):
        raise ValueError("frequencies must be finite and non-negative")
    return freq


def frequency_ranks(prefix: Int[Tensor, "n prefix"], frequencies: Real[Tensor, "vocab"], *,
                    ties: Literal["min", "dense"] = "min") -> Int[Tensor, "n prefix"]:
    """Rank each prefix token by corpus frequency within its paragraph (Stoehr et al. §6.3).

    Rank 0 is the rarest token of the paragraph's prefix; tokens of equal corpus frequency
    (including repeats of the same token) share a rank.  ``ties="min"`` (default, competition
    ranking): rank = number of prefix tokens that are strictly rarer, ranks after a tie are
    skipped, so ranks lie in 0..prefix-1 as in the paper.  ``ties="dense"``: rank = number of
    distinct strictly smaller frequencies in the prefix (consecutive ranks).

    Args:
        prefix: Int[Tensor, "n prefix"] token ids.
        frequencies: Float/Int[Tensor, "vocab"] corpus unigram counts (or probabilities).
        ties: ``"min"`` or ``"dense"``.

    Returns:
        Int[Tensor, "n prefix"] (int64, CPU).
    """
    check_choice(ties, "ties", TIES)
    if not isinstance(prefix, Tensor) or prefix.ndim != 2 or prefix.dtype.is_floating_point:
        raise ValueError(f"prefix must be a 2-D integer tensor [n, prefix], got "
                         f"{getattr(prefix, 'shape', type(prefix).__name__)}")
    if not isinstance(frequencies, Tensor) or frequencies.ndim != 1:
        raise ValueError("frequencies must be a 1-D tensor with one count per vocabulary entry")
    prefix = prefix.long().cpu()
    if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= len(frequencies)):
        raise ValueError(f"prefix holds ids outside the frequency table [0, {len(frequencies)})")
    freq = frequencies.double().cpu()[prefix].numpy()
    ranks = pd.DataFrame(freq).rank(axis=1, method=ties).to_numpy() - 1
    return torch.from_numpy(ranks.astype(np.int64))


def attention_by_rank(attention: Float[Tensor, "n layer head prefix"], ranks: Int[Tensor, "n prefix"]
                   ) -> Float[Tensor, "n layer head rank"]:
    """Sum the attention each head puts on the prefix tokens of each frequency rank (Stoehr §6.3).

    ``out[i, l, h, r] = sum_{j : ranks[i, j] = r} attention[i, l, h, j]`` for ``r`` in
    0..prefix-1 (ranks that no token has get 0).

    Args:
        attention: Float[Tensor, "n layer head prefix"] from :func:`first_token_attention`.
        ranks: Int[Tensor, "n prefix"] from :func:`frequency_ranks`.

    Returns:
        Float[Tensor, "n layer head rank"] with ``rank`` = prefix.
    """
    if not isinstance(attention, Tensor) or attention.ndim != 4:
        raise ValueError(f"attention must be a 4-D tensor [n, layer, head, prefix], got "
                         f"{getattr(attention, 'shape', type(attention).__name__)}")
    want = (attention.shape[0], attention.shape[3])
    if not isinstance(ranks, Tensor) or ranks.ndim != 2 or tuple(ranks.shape) != want:
        raise ValueError(f"ranks must be an integer tensor [n, prefix] = {want}, "
                         f"got {getattr(ranks, 'shape', type(ranks).__name__)}")
    p = attention.shape[-1]
    ranks = ranks.long().to(attention.device)
    if int(ranks.min()) < 0 or int(ranks.max()) >= p:
        raise ValueError(f"ranks must lie in 0..{p - 1}")
    index = ranks[:, None, None, :].expand_as(attention)
    return torch.zeros_like(attention).scatter_add_(-1, index, attention)


def _rank_frame(per_rank: Float[Tensor, "n layer head rank"], ranks: Int[Tensor, "n prefix"],
                layers: list[int]) -> pd.DataFrame:
    n, n_l, n_h, p = per_rank.shape
    counts = torch.zeros(n, p, dtype=torch.long).scatter_add_(1, ranks.long(), torch.ones_like(ranks, dtype=torch.long))
    mean = per_rank.double().mean(0)  # [layer, head, rank]
    idx = pd.MultiIndex.from_product([layers, range(n_h), range(p)], names=["layer", "head", "rank"])
    df = pd.DataFrame({"attention": mean.reshape(-1).numpy()}, index=idx).reset_index()
    df["n_tokens"] = np.tile(counts.sum(0).numpy(), n_l * n_h)
    df["n_paragraphs"] = np.tile((counts > 0).sum(0).numpy(), n_l * n_h)
    df["n"] = n
    return df


@renamed_kwargs(layer="layers")
def rare_token_attention(model: Any, tokens: Int[Tensor, "n seq"], prefix_len: int,
                         frequencies: Real[Tensor, "vocab"], *, layers: int | Sequence[int] | None = None,
                         ties: Literal["min", "dense"] = "min", batch_size: int = 32,
                         attention: Float[Tensor, "n layer head prefix"] | None = None,
                         progress_bar: bool = True) -> pd.DataFrame:
    """Attention of the first decoded token per corpus-frequency rank (Stoehr et al. §6.3, Fig. 7).

    Ranks every paragraph's prefix tokens by corpus frequency (:func:`frequency_ranks`, 0 =
    rarest), sums the first-decoded-token attention (:func:`first_token_attention`) each head puts
    on each rank (:func:`attention_by_rank`) and aggregates over paragraphs by the mean (so a head's
    values over ranks sum to 1 when its row lies inside the prefix).

    Args:
        model: the TransformerBridge (borrowed, left unchanged).
        tokens: Int[Tensor, "n seq"] paragraphs.
        prefix_len: prefix length (1..seq-1).
        frequencies: Int/Float[Tensor, "vocab"] corpus unigram counts, one per vocabulary entry
            (``memloc.data.unigram_counts("tiny")`` or :func:`unigram_counts_from_tokens`).
        layers: layers to analyse (None = all; ``layer=`` is its deprecated name).
        ties: ``"min"`` (default) or ``"dense"``, see :func:`frequency_ranks`.
        batch_size: paragraphs per forward pass.
        attention: optional precomputed :func:`first_token_attention` result for ``layers``
            (skips the forward passes).
        progress_bar: progress bar over batches.

    Returns:
        DataFrame, one row per (layer, head, rank): ``attention`` (mean over paragraphs of the
        per-paragraph attention sum on that rank), ``n_tokens`` (prefix tokens of that rank over
        all paragraphs), ``n_paragraphs`` (paragraphs where the rank occurs), ``n`` (paragraphs).
    """
    tokens = _prefix_len_for_attention(model, tokens, prefix_len)
    layers = check_layers(model, layers, "layers")
    freq = _check_frequencies(frequencies, int(model.cfg.d_vocab))
    check_choice(ties, "ties", TIES)
    check_positive_int(batch_size, "batch_size")
    if attention is not None:
        want = (len(tokens), len(layers), int(model.cfg.n_heads), prefix_len)
        if not isinstance(attention, Tensor) or tuple(attention.shape) != want:
            raise ValueError(f"attention must be a precomputed tensor of shape {want} "
                             f"[n, layer, head, prefix], got {getattr(attention, 'shape', type(attention).__name__)}")
        att = attention.detach().float().cpu()
    else:
        with borrowed(model):
            att = _pattern_rows(model, tokens, prefix_len, layers, batch_size, progress_bar)
    ranks = frequency_ranks(tokens[:, :prefix_len].cpu(), freq, ties=ties)
    return _rank_frame(attention_by_rank(att, ranks), ranks, layers)


def rare_token_correlation(rank_frame: pd.DataFrame, *, method: Literal["pearson", "spearman"] = "pearson",
                           min_tokens: int = 1) -> pd.DataFrame:
    """Per head, the correlation between frequency rank and aggregated attention (Stoehr Fig. 7).

    The correlation runs over the ranks that at least ``min_tokens`` prefix tokens have (ranks no
    paragraph has carry no information about the head).  Negative = the head attends to rare
    tokens; the paper reports -0.97 for GPT-Neo 125M's memorization head L1H2.  Pearson is the
    default (the paper does not name the coefficient); Spearman is available.

    Baseline: a head with uniform attention is not at 0 — it puts ``n_tokens / (n * prefix_len)``
    on each rank, and with min-ranking the repeats of frequent tokens collapse onto one rank while
    rare tokens are spread out (on the embedded model a uniform head scores about -0.17).  Compare
    heads against each other, or against ``rare_token_attention(..., attention=uniform)``.

    Args:
        rank_frame: the DataFrame of :func:`rare_token_attention` (columns ``layer``, ``head``,
            ``rank``, ``attention`` and optionally ``n_tokens``).
        method: ``"pearson"`` or ``"spearman"``.
        min_tokens: minimum ``n_tokens`` of a rank to enter the correlation.

    Returns:
        DataFrame, one row per (layer, head): ``correlation``, ``p_value``, ``n_ranks``.
    """
    from scipy import stats

    check_choice(method, "method", CORRELATIONS)
    check_positive_int(min_tokens, "min_tokens")
    needed = {"layer", "head", "rank", "attention"}
    if not isinstance(rank_frame, pd.DataFrame) or not needed <= set(rank_frame.columns):
        raise ValueError("rank_frame must be a DataFrame with columns layer, head, rank, attention "
                         "(the result of rare_token_attention)")
    df = rank_frame
    if "n_tokens" in df.columns:
        df = df[df["n_tokens"] >= min_tokens]
    fn = stats.pearsonr if method == "pearson" else stats.spearmanr
    rows = []
    for (layer, head), g in df.groupby(["layer", "head"], sort=True):
        x, y = g["rank"].to_numpy(float), g["attention"].to_numpy(float)
        if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            r, pv = float("nan"), float("nan")
        else:
            res = fn(x, y)
            r, pv = float(res[0]), float(res[1])
        rows.append({"layer": int(layer), "head": int(head), "correlation": r, "p_value": pv, "n_ranks": len(x)})
    return pd.DataFrame(rows, columns=["layer", "head", "correlation", "p_value", "n_ranks"])


# --------------------------------------------------------------------------- the memorization head

def _per_head(df: pd.DataFrame, what: str, n_layers: int, n_heads: int) -> pd.Series:
    """Validate an evidence DataFrame (layer, head, value) and index it by (layer, head)."""
    if not isinstance(df, pd.DataFrame) or not {"layer", "head", "value"} <= set(df.columns):
        raise ValueError(f"{what} must be a DataFrame with columns layer, head, value")
    s = df.groupby(["layer", "head"])["value"].mean()
    full = pd.MultiIndex.from_product([range(n_layers), range(n_heads)], names=["layer", "head"])
    missing = full.difference(s.index)
    if len(missing) == len(full):
        raise ValueError(f"{what} has no rows for this model's (layer, head) pairs")
    return s.reindex(full)


def _contrastive_evidence(model: Any, memorized: Tensor, non_memorized: Tensor, prefix_len: int,
                          kwargs: dict, progress_bar: bool) -> pd.DataFrame:
    from .contrastive import contrastive_gradients

    kwargs.setdefault("progress_bar", progress_bar)
    kwargs.setdefault("n_nmp_per_batch", min(8, len(non_memorized)))
    df = contrastive_gradients(model, memorized, non_memorized, prefix_len, **kwargs)
    return df[df["component"] == "W_V"]


def _activation_evidence(model: Any, tokens: Tensor, prefix_len: int, kwargs: dict,
                         progress_bar: bool) -> pd.DataFrame:
    """Value-activation gradient per head: max over prefix positions of the Eq. 5 score."""
    from .gradients import activation_gradients

    kwargs.setdefault("components", ["v"])
    kwargs.setdefault("progress_bar", progress_bar)
    df = activation_gradients(model, tokens, prefix_len, **kwargs)
    return _value_gradient_per_head(df, prefix_len)


def _value_gradient_per_head(df: pd.DataFrame, prefix_len: int) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame) or not {"layer", "component", "head", "position", "value"} <= set(df.columns):
        raise ValueError("activation gradients must be a DataFrame with columns layer, component, head, position, "
                         "value")
    v = df[df["component"].astype(str).isin(["v", "hook_v", "V"])]
    if v.empty:
        raise ValueError(f"activation gradients have no value ('v') component; components: "
                         f"{sorted(df['component'].astype(str).unique())}")
    v = v[v["position"] < prefix_len]
    if "paragraph" not in v.columns:  # already aggregated over paragraphs
        return v.groupby(["layer", "head"], as_index=False)["value"].max()
    peak = v.groupby(["paragraph", "layer", "head"], as_index=False)["value"].max()  # per paragraph: max over prefix
    return peak.groupby(["layer", "head"], as_index=False)["value"].mean()


@renamed_kwargs(nonmemorized="non_memorized", activation_nonmemorized="activation_non_memorized")
def find_memorization_heads(model: Any, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "m seq"],
                            prefix_len: int, *, frequencies: Real[Tensor, "vocab"] | None = None,
                            evidence: Sequence[str] = EVIDENCE, ties: Literal["min", "dense"] = "min",
                            method: Literal["pearson", "spearman"] = "pearson",
                            contrastive: pd.DataFrame | None = None,
                            activation_memorized: pd.DataFrame | None = None,
                            activation_non_memorized: pd.DataFrame | None = None,
                            contrastive_kwargs: dict | None = None, activation_kwargs: dict | None = None,
                            rare_fraction: float = 0.1, batch_size: int = 32,
                            progress_bar: bool = True) -> pd.DataFrame:
    """Rank attention heads as candidate "memorization heads" (Stoehr et al. §5.2, §6.1-6.3).

    Three pieces of evidence single out GPT-Neo 125M's L1H2 in the paper; each is computed per
    (layer, head) and ranked (1 = most memorization-like, ties averaged):

    1. ``contrastive`` — the contrastive-objective parameter gradient of the head's value matrix
       ``W_V`` (Stoehr Eq. 3 with the Eq. 2 max-abs pooling; ``memloc.contrastive.
       contrastive_gradients``, component ``"W_V"``).  Larger = more salient.
    2. ``activation`` — value-activation gradients (Stoehr Eq. 5, ``memloc.gradients.
       activation_gradients``, component ``"v"``: ``|dNLL/d hook_v|`` max-pooled over ``d_head``),
       per paragraph the max over prefix positions, averaged over paragraphs; for the memorized
       paragraphs divided by the same quantity for the non-memorized ones (NMPs have larger
       gradients everywhere, Stoehr §5.1; the ratio asks which heads matter *relatively* more
       for MPs).  Larger = more salient.
    3. ``rare`` — the rare-token correlation of :func:`rare_token_correlation` over all given
       paragraphs (MPs and NMPs, as the paper uses "every paragraph").  More negative = more
       focused on rare tokens.

    The combined score is the mean of the selected evidence ranks (rank averaging: scale-free,
    so gradient magnitudes and correlations can be combined); rows are sorted by it.  The result
    also reports the rare-token correlation on MPs and NMPs separately (``rare_corr_mp``,
    ``rare_corr_nmp``) and the mean attention mass on the rarest ``rare_fraction`` of ranks
    (ranks < ceil(rare_fraction * prefix_len); ``rare_mass_mp``, ``rare_mass_nmp``) to show
    whether a head's attention differs between the two sets.

    Args:
        model: the TransformerBridge (borrowed, left unchanged).
        memorized: Int[Tensor, "n seq"] memorized paragraphs (MPs).
        non_memorized: Int[Tensor, "m seq"] non-memorized paragraphs (NMPs) (``nonmemorized=`` is
            its deprecated name, as ``activation_nonmemorized=`` is of ``activation_non_memorized=``).
        prefix_len: prefix length (1..seq-1).
        frequencies: corpus unigram counts [d_vocab]; ``None`` counts the given paragraphs
            (:func:`unigram_counts_from_tokens`, a weak stand-in for corpus counts: pass them).
        evidence: which of ``("contrastive", "activation", "rare")`` enter the combined rank.
        ties, method: for the rare-token analysis.
        rare_fraction: fraction of ranks counted as "rare" in ``rare_mass_*`` (0 < f <= 1).
        contrastive: precomputed ``contrastive_gradients`` DataFrame (layer, component, head,
            value) to skip that computation.
        activation_memorized, activation_non_memorized: precomputed ``activation_gradients``
            DataFrames (layer, component, head, position, value) for MPs and NMPs.
        contrastive_kwargs, activation_kwargs: extra arguments of those functions.
        batch_size: paragraphs per forward pass (attention).
        progress_bar: progress bars.

    Returns:
        DataFrame, one row per (layer, head) sorted best first: ``layer``, ``head``, the evidence
        columns ``contrastive_wv``, ``activation_ratio`` (with ``value_grad_mp``,
        ``value_grad_nmp``), ``rare_corr`` (and ``rare_corr_mp``, ``rare_corr_nmp``, ``rare_mass_mp``,
        ``rare_mass_nmp``), their ranks
        ``rank_contrastive``, ``rank_activation``, ``rank_rare`` (NaN for evidence not used),
        ``score`` (mean rank) and ``combined_rank`` (1 = best).
    """
    mp = check_tokens(model, memorized, prefix_len, name="memorized")
    nmp = check_tokens(model, non_memorized, prefix_len, name="non_memorized")
    if (isinstance(evidence, str) or not evidence or not set(evidence) <= set(EVIDENCE)
            or len(set(evidence)) != len(list(evidence))):
        raise ValueError(f"evidence must be a non-empty sequence of distinct names from {EVIDENCE}, got {evidence!r}")
    evidence = list(evidence)
    check_choice(ties, "ties", TIES)
    check_choice(method, "method", CORRELATIONS)
    check_positive_int(batch_size, "batch_size")
    check_fraction(rare_fraction, "rare_fraction")
    n_layers, n_heads, d_vocab = int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_vocab)
    if frequencies is None:
        freq = None
    else:
        freq = _check_frequencies(frequencies, d_vocab)
    for name, val in (("contrastive_kwargs", contrastive_kwargs), ("activation_kwargs", activation_kwargs)):
        if val is not None and not isinstance(val, dict):
            raise ValueError(f"{name} must be a dict, got {type(val).__name__}")
    if contrastive is not None:
        _per_head(contrastive[contrastive["component"] == "W_V"] if "component" in getattr(contrastive, "columns", [])
                  else contrastive, "contrastive", n_layers, n_heads)
    for val in (activation_memorized, activation_non_memorized):
        if val is not None:
            _value_gradient_per_head(val, prefix_len)
    if freq is None and "rare" in evidence:
        logger.warning("find_memorization_heads: no corpus frequencies given; counting the given paragraphs")
        freq = unigram_counts_from_tokens(torch.cat([mp[:, :prefix_len], nmp[:, :prefix_len]]).cpu(), d_vocab).double()

    full = pd.MultiIndex.from_product([range(n_layers), range(n_heads)], names=["layer", "head"])
    out = pd.DataFrame(index=full)
    with borrowed(model):
        # (1) contrastive W_V gradient
        if "contrastive" in evidence:
            c = contrastive if contrastive is not None else _contrastive_evidence(
                model, mp, nmp, prefix_len, dict(contrastive_kwargs or {}), progress_bar)
            if "component" in c.columns:
                c = c[c["component"] == "W_V"]
            out["contrastive_wv"] = _per_head(c, "contrastive", n_layers, n_heads)
        # (2) value-activation gradients, MPs relative to NMPs
        if "activation" in evidence:
            akw = dict(activation_kwargs or {})
            a_mp = (_activation_evidence(model, mp, prefix_len, akw, progress_bar) if activation_memorized is None
                    else _value_gradient_per_head(activation_memorized, prefix_len))
            a_nmp = (_activation_evidence(model, nmp, prefix_len, akw, progress_bar) if activation_non_memorized is None
                     else _value_gradient_per_head(activation_non_memorized, prefix_len))
            out["value_grad_mp"] = _per_head(a_mp, "activation_memorized", n_layers, n_heads)
            out["value_grad_nmp"] = _per_head(a_nmp, "activation_non_memorized", n_layers, n_heads)
            out["activation_ratio"] = out["value_grad_mp"] / out["value_grad_nmp"].where(out["value_grad_nmp"] > 0)
        # (3) rare-token correlation, MPs + NMPs (and each set alone)
        if "rare" in evidence:
            layers = list(range(n_layers))
            att_mp = _pattern_rows(model, mp, prefix_len, layers, batch_size, progress_bar)
            att_nmp = _pattern_rows(model, nmp, prefix_len, layers, batch_size, progress_bar)
            r_mp = frequency_ranks(mp[:, :prefix_len].cpu(), freq, ties=ties)
            r_nmp = frequency_ranks(nmp[:, :prefix_len].cpu(), freq, ties=ties)
            for col, att, rk in (("rare_corr", torch.cat([att_mp, att_nmp]), torch.cat([r_mp, r_nmp])),
                                 ("rare_corr_mp", att_mp, r_mp), ("rare_corr_nmp", att_nmp, r_nmp)):
                corr = rare_token_correlation(_rank_frame(attention_by_rank(att, rk), rk, layers), method=method)
                out[col] = corr.set_index(["layer", "head"])["correlation"].reindex(full)
            cut = max(1, int(np.ceil(rare_fraction * prefix_len)))
            for col, att, rk in (("rare_mass_mp", att_mp, r_mp), ("rare_mass_nmp", att_nmp, r_nmp)):
                mass = (att * (rk < cut)[:, None, None, :].to(att)).sum(-1).mean(0)  # [layer, head]
                out[col] = mass.double().reshape(-1).numpy()

    rank_cols = {"contrastive": ("contrastive_wv", False), "activation": ("activation_ratio", False),
                 "rare": ("rare_corr", True)}
    for kind, (col, ascending) in rank_cols.items():
        rc = f"rank_{kind}"
        out[rc] = out[col].rank(ascending=ascending, method="average") if kind in evidence else np.nan
    used = [f"rank_{k}" for k in evidence]
    out["score"] = out[used].mean(axis=1)
    out["combined_rank"] = out["score"].rank(method="min")
    out = out.reset_index().sort_values(["score", "layer", "head"], kind="stable").reset_index(drop=True)
    order = ["layer", "head", "contrastive_wv", "value_grad_mp", "value_grad_nmp", "activation_ratio", "rare_corr",
             "rare_corr_mp", "rare_corr_nmp", "rare_mass_mp", "rare_mass_nmp", "rank_contrastive", "rank_activation",
             "rank_rare", "score", "combined_rank"]
    return out[[c for c in order if c in out.columns]]
