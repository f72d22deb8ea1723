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

Each analysis has its own module, and every name keeps working as ``memloc.heads.<name>``:
:mod:`memloc.attention` (first-token attention, §6.2), :mod:`memloc.rare_tokens` (the rare-token
analysis, §6.3, with its tie handling), and this module (:func:`find_memorization_heads`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int, Real
from torch import Tensor

from ._checks import check_choice, check_fraction, check_frequencies, check_positive_int, check_tokens
from ._deprecation import renamed_kwargs
from .attention import attention_hook_name, first_token_attention, first_token_attention_frame, pattern_rows
from .borrow import borrowed
from .models import Model
from .rare_tokens import (CORRELATIONS, TIES, attention_by_rank, frequency_ranks, rank_frame,
                          rare_token_attention, rare_token_correlation, unigram_counts_from_tokens)

logger = logging.getLogger(__name__)

__all__ = [
    "first_token_attention", "first_token_attention_frame", "unigram_counts_from_tokens", "frequency_ranks",
    "attention_by_rank", "rare_token_attention", "rare_token_correlation", "find_memorization_heads",
    "attention_hook_name", "TIES", "CORRELATIONS", "query_head_rows",
]

#: Evidence kinds of :func:`find_memorization_heads`.
EVIDENCE = ("contrastive", "activation", "rare")


def query_head_rows(df: pd.DataFrame, model: Model) -> pd.DataFrame:
    """Rows of per-head evidence indexed by *query* head.

    With grouped-query attention (Llama, SmolLM2: ``n_key_value_heads < n_heads``) the value
    vectors, their activation gradients (Stoehr Eq. 5) and the ``W_V`` gradients exist once per
    key/value head, shared by ``n_heads / n_key_value_heads`` query heads.  A frame whose ``head``
    column counts key/value heads is expanded so that query head h carries the row of its group
    ``h // (n_heads / n_key_value_heads)``; other frames are returned unchanged."""
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    if n_kv >= n_heads or df.empty or int(df["head"].max()) >= n_kv:
        return df
    rep = n_heads // n_kv
    out = df.loc[df.index.repeat(rep)].copy()
    out["head"] = out["head"].to_numpy() * rep + np.tile(np.arange(rep), len(df))
    return out.reset_index(drop=True)


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


def _contrastive_evidence(model: Model, memorized: Tensor, non_memorized: Tensor, prefix_len: int,
                          kwargs: dict, progress_bar: bool) -> pd.DataFrame:
    from .contrastive import contrastive_gradients

    kwargs.setdefault("progress_bar", progress_bar)
    kwargs.setdefault("n_nmp_per_batch", min(8, len(non_memorized)))
    df = contrastive_gradients(model, memorized, non_memorized, prefix_len, **kwargs)
    return df[df["component"] == "W_V"]


def _activation_evidence(model: Model, tokens: Tensor, prefix_len: int, kwargs: dict,
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
def find_memorization_heads(model: Model, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "m seq"],
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
    mp, nmp, evidence, freq = _check_inputs(model, memorized, non_memorized, prefix_len, frequencies, evidence, ties,
                                            method, batch_size, rare_fraction)
    _check_precomputed(model, prefix_len, contrastive, activation_memorized, activation_non_memorized,
                       contrastive_kwargs, activation_kwargs)
    if freq is None and "rare" in evidence:
        freq = _paragraph_counts(model, mp, nmp, prefix_len)
    out = pd.DataFrame(index=_head_index(model))
    with borrowed(model):
        if "contrastive" in evidence:
            out["contrastive_wv"] = _contrastive_column(model, mp, nmp, prefix_len, contrastive, contrastive_kwargs,
                                                        progress_bar)
        if "activation" in evidence:
            _add_activation_columns(out, model, mp, nmp, prefix_len, activation_memorized, activation_non_memorized,
                                    activation_kwargs, progress_bar)
        if "rare" in evidence:
            _add_rare_columns(out, model, mp, nmp, prefix_len, freq, ties, method, rare_fraction, batch_size,
                              progress_bar)
    return _combine_ranks(out, evidence)


def _head_index(model: Model) -> pd.MultiIndex:
    """Every (layer, head) of the model, the index of :func:`find_memorization_heads`' table."""
    return pd.MultiIndex.from_product([range(int(model.cfg.n_layers)), range(int(model.cfg.n_heads))],
                                      names=["layer", "head"])


def _check_inputs(model: Model, memorized: Any, non_memorized: Any, prefix_len: Any, frequencies: Any, evidence: Any,
                  ties: Any, method: Any, batch_size: Any, rare_fraction: Any
                  ) -> tuple[Tensor, Tensor, list[str], Tensor | None]:
    """Validate the inputs of :func:`find_memorization_heads` (before any work): the MP and NMP tokens,
    the evidence list and the checked frequencies (None if not given)."""
    mp = check_tokens(model, memorized, prefix_len, name="memorized")
    nmp = check_tokens(model, non_memorized, prefix_len, name="non_memorized")
    if (isinstance(evidence, str) or not evidence or not set(evidence) <= set(EVIDENCE)
            or len(set(evidence)) != len(list(evidence))):
        raise ValueError(f"evidence must be a non-empty sequence of distinct names from {EVIDENCE}, got {evidence!r}")
    check_choice(ties, "ties", TIES)
    check_choice(method, "method", CORRELATIONS)
    check_positive_int(batch_size, "batch_size")
    check_fraction(rare_fraction, "rare_fraction")
    freq = None if frequencies is None else check_frequencies(frequencies, int(model.cfg.d_vocab))
    return mp, nmp, list(evidence), freq


def _check_precomputed(model: Model, prefix_len: int, contrastive: Any, activation_memorized: Any,
                       activation_non_memorized: Any, contrastive_kwargs: Any, activation_kwargs: Any) -> None:
    """Validate the extra arguments and the precomputed evidence tables (before any work)."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    for name, val in (("contrastive_kwargs", contrastive_kwargs), ("activation_kwargs", activation_kwargs)):
        if val is not None and not isinstance(val, dict):
            raise ValueError(f"{name} must be a dict, got {type(val).__name__}")
    if contrastive is not None:
        _per_head(contrastive[contrastive["component"] == "W_V"] if "component" in getattr(contrastive, "columns", [])
                  else contrastive, "contrastive", n_layers, n_heads)
    for val in (activation_memorized, activation_non_memorized):
        if val is not None:
            _value_gradient_per_head(val, prefix_len)


def _paragraph_counts(model: Model, mp: Tensor, nmp: Tensor, prefix_len: int) -> Tensor:
    """Unigram counts of the given prefixes, the stand-in for corpus frequencies (with a WARNING)."""
    logger.warning("find_memorization_heads: no corpus frequencies given; counting the given paragraphs")
    prefixes = torch.cat([mp[:, :prefix_len], nmp[:, :prefix_len]]).cpu()
    return unigram_counts_from_tokens(prefixes, int(model.cfg.d_vocab)).double()


def _contrastive_column(model: Model, mp: Tensor, nmp: Tensor, prefix_len: int, contrastive: pd.DataFrame | None,
                        contrastive_kwargs: dict | None, progress_bar: bool) -> pd.Series:
    """Evidence (1): the contrastive ``W_V`` gradient per head (Stoehr Eq. 3 with Eq. 2 max pooling)."""
    c = contrastive if contrastive is not None else _contrastive_evidence(
        model, mp, nmp, prefix_len, dict(contrastive_kwargs or {}), progress_bar)
    if "component" in c.columns:
        c = c[c["component"] == "W_V"]
    return _per_head(query_head_rows(c, model), "contrastive", int(model.cfg.n_layers), int(model.cfg.n_heads))


def _add_activation_columns(out: pd.DataFrame, model: Model, mp: Tensor, nmp: Tensor, prefix_len: int,
                            activation_memorized: pd.DataFrame | None, activation_non_memorized: pd.DataFrame | None,
                            activation_kwargs: dict | None, progress_bar: bool) -> None:
    """Evidence (2): value-activation gradients (Stoehr Eq. 5) of the MPs relative to the NMPs'."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    akw = dict(activation_kwargs or {})
    a_mp = (_activation_evidence(model, mp, prefix_len, akw, progress_bar) if activation_memorized is None
            else _value_gradient_per_head(activation_memorized, prefix_len))
    a_nmp = (_activation_evidence(model, nmp, prefix_len, akw, progress_bar) if activation_non_memorized is None
             else _value_gradient_per_head(activation_non_memorized, prefix_len))
    out["value_grad_mp"] = _per_head(query_head_rows(a_mp, model), "activation_memorized", n_layers, n_heads)
    out["value_grad_nmp"] = _per_head(query_head_rows(a_nmp, model), "activation_non_memorized", n_layers, n_heads)
    out["activation_ratio"] = out["value_grad_mp"] / out["value_grad_nmp"].where(out["value_grad_nmp"] > 0)


def _add_rare_columns(out: pd.DataFrame, model: Model, mp: Tensor, nmp: Tensor, prefix_len: int, freq: Tensor,
                      ties: str, method: str, rare_fraction: float, batch_size: int, progress_bar: bool) -> None:
    """Evidence (3): the rare-token correlation (Stoehr §6.3, Fig. 7) over MPs + NMPs and each set
    alone, and the attention mass on the rarest ``rare_fraction`` of ranks per set."""
    layers = list(range(int(model.cfg.n_layers)))
    att_mp = pattern_rows(model, mp, prefix_len, layers, batch_size, progress_bar)
    att_nmp = pattern_rows(model, nmp, prefix_len, layers, batch_size, progress_bar)
    r_mp = frequency_ranks(mp[:, :prefix_len].cpu(), freq, ties=ties)
    r_nmp = frequency_ranks(nmp[:, :prefix_len].cpu(), freq, ties=ties)
    for col, att, rk in (("rare_corr", torch.cat([att_mp, att_nmp]), torch.cat([r_mp, r_nmp])),
                         ("rare_corr_mp", att_mp, r_mp), ("rare_corr_nmp", att_nmp, r_nmp)):
        corr = rare_token_correlation(rank_frame(attention_by_rank(att, rk), rk, layers), method=method)
        out[col] = corr.set_index(["layer", "head"])["correlation"].reindex(out.index)
    cut = max(1, int(np.ceil(rare_fraction * prefix_len)))
    for col, att, rk in (("rare_mass_mp", att_mp, r_mp), ("rare_mass_nmp", att_nmp, r_nmp)):
        mass = (att * (rk < cut)[:, None, None, :].to(att)).sum(-1).mean(0)  # [layer, head]
        out[col] = mass.double().reshape(-1).numpy()


def _combine_ranks(out: pd.DataFrame, evidence: list[str]) -> pd.DataFrame:
    """Rank each selected evidence column (1 = most memorization-like, ties averaged), average the
    ranks into ``score`` and ``combined_rank``, and sort the table best first."""
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
