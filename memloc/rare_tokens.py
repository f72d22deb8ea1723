"""The rare-token analysis of the first decoded token's attention (Stoehr et al. 2024, §6.3, Fig. 7).

:func:`frequency_ranks` / :func:`attention_by_rank` / :func:`rare_token_attention` /
:func:`rare_token_correlation`: every prefix token is ranked *within its paragraph's prefix* by
its corpus unigram frequency, from 0 (rarest) to ``prefix_len - 1`` (most frequent), ties
allowed; per paragraph, the attention a head puts on the tokens of each rank is summed; the
per-rank sums are aggregated over paragraphs, and each head gets the correlation between rank
and aggregated attention (a strongly negative correlation — the paper reports -0.97 for GPT-Neo
125M's L1H2 — means the head attends to the rare tokens of the paragraph).  The attention is
that of :func:`memloc.attention.first_token_attention`.

Ties.  The paper ranks "allowing ties" and notes that "due to ties in token frequencies, often
not all ranks up to rank 49 receive attention".  The default ``ties="min"`` is competition
ranking (scipy/pandas ``method="min"``): a token's rank is the number of prefix tokens that are
strictly rarer, so tied tokens (including repeats of one token) share the lowest rank of their
group, the ranks after the group are skipped, and the rank keeps its 0..prefix_len-1 scale in
every paragraph.  ``ties="dense"`` (consecutive ranks, 0..n_distinct-1) is available too.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int, Real
from torch import Tensor

from ._checks import check_choice, check_frequencies, check_layers, check_positive_int, check_tokens
from ._deprecation import renamed_kwargs
from .attention import pattern_rows
from .borrow import borrowed
from .models import Model

__all__ = ["unigram_counts_from_tokens", "frequency_ranks", "attention_by_rank", "rank_frame", "rare_token_attention",
           "rare_token_correlation", "TIES", "CORRELATIONS"]

#: Tie handling of :func:`frequency_ranks` (pandas/scipy ``rank`` methods, shifted to start at 0).
TIES = ("min", "dense")
#: Correlation coefficients of :func:`rare_token_correlation`.
CORRELATIONS = ("pearson", "spearman")


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


def rank_frame(per_rank: Float[Tensor, "n layer head rank"], ranks: Int[Tensor, "n prefix"],
               layers: Sequence[int]) -> pd.DataFrame:
    """The table of :func:`rare_token_attention` from per-rank attention sums: the mean over
    paragraphs per (layer, head, rank) and how many prefix tokens and paragraphs have each rank.

    Args:
        per_rank: Float[Tensor, "n layer head rank"] from :func:`attention_by_rank` (``rank`` = prefix).
        ranks: Int[Tensor, "n prefix"] from :func:`frequency_ranks`.
        layers: the layer index of each entry of ``per_rank``'s ``layer`` axis.

    Returns:
        DataFrame, one row per (layer, head, rank): ``attention``, ``n_tokens``, ``n_paragraphs``, ``n``
        (the columns of :func:`rare_token_attention`).
    """
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
def rare_token_attention(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int,
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
    tokens = check_tokens(model, tokens, prefix_len)
    layers = check_layers(model, layers, "layers")
    freq = check_frequencies(frequencies, int(model.cfg.d_vocab))
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
            att = pattern_rows(model, tokens, prefix_len, layers, batch_size, progress_bar)
    ranks = frequency_ranks(tokens[:, :prefix_len].cpu(), freq, ties=ties)
    return rank_frame(attention_by_rank(att, ranks), ranks, layers)


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
