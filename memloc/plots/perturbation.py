"""Figures of the prefix-token perturbation (Stoehr et al. Fig. 3)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Int
from plotly.subplots import make_subplots
from torch import Tensor

from ..models import Model

__all__ = ["perturbation_bars", "perturbation_by_position", "token_labels", "unique_labels"]


@runtime_checkable
class _Tokenizer(Protocol):
    """Anything that decodes token ids (a Hugging Face tokenizer)."""

    def decode(self, ids: list[int]) -> str: ...


def token_labels(model_or_tokenizer: Model | _Tokenizer, ids: Sequence[int] | Int[Tensor, "n"]) -> list[str]:
    """Decoded token strings for axis labels (``model.to_str_tokens`` or a tokenizer's ``decode``)."""
    ids = [int(i) for i in ids]
    tok = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    if hasattr(tok, "decode"):
        return [tok.decode([i]) for i in ids]
    if hasattr(model_or_tokenizer, "to_str_tokens"):
        return list(model_or_tokenizer.to_str_tokens(ids, prepend_bos=False))
    raise ValueError("model_or_tokenizer must be a model with a tokenizer or a tokenizer with decode()")


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Axis labels for a category axis, one per position: plotly merges equal category labels, so
    each label gets ``i`` invisible zero-width spaces (its position) appended; blank labels are
    shown by their ``repr`` and newlines as ``\\n``."""
    out = []
    for i, s in enumerate(labels):
        s = s.replace("\n", "\\n") if s.strip() else repr(s)
        out.append(s + "\u200b" * i)
    return out


def perturbation_bars(df: pd.DataFrame, token_labels: Sequence[str] | None = None, *,
                      title: str = "Prefix token perturbation") -> go.Figure:
    """Fig. 3 top: EM drop and NLL change per perturbed prefix token of one paragraph.

    Args:
        df: rows of one paragraph from ``PerturbationResult.profile`` (columns ``position``,
            ``em_drop_mean``, ``nll_change_mean``, optionally ``em_drop_max``) or ``.samples``
            (``em_drop``, ``nll_change``; averaged over samples).
        token_labels: decoded prefix tokens (e.g. ``token_labels(model, tokens[i, :prefix_len])``),
            indexed by position; the x axis shows them instead of position numbers.
    """
    if not isinstance(df, pd.DataFrame) or "position" not in df.columns:
        raise ValueError("df must be a DataFrame with a 'position' column (PerturbationResult.profile)")
    if "paragraph" in df.columns and df["paragraph"].nunique() > 1:
        raise ValueError("df holds several paragraphs; select one (df[df.paragraph == i])")
    if "em_drop_mean" in df.columns:
        d = df.sort_values("position")
        em, nll = d["em_drop_mean"], d["nll_change_mean"]
    elif "em_drop" in df.columns:
        d = df.groupby("position", sort=True)[["em_drop", "nll_change"]].mean().reset_index()
        em, nll = d["em_drop"], d["nll_change"]
    else:
        raise ValueError("df needs em_drop_mean/nll_change_mean (profile) or em_drop/nll_change (samples)")
    pos = d["position"].tolist()
    if token_labels is not None:
        if len(token_labels) <= max(pos):
            raise ValueError(f"token_labels has {len(token_labels)} entries; positions go up to {max(pos)}")
        x = unique_labels([token_labels[p] for p in pos])
    else:
        x = [str(p) for p in pos]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("EM drop", "NLL change of the true continuation"))
    fig.add_trace(go.Bar(x=x, y=em, name="EM drop", marker_color="#d62728",
                         customdata=pos, hovertemplate="pos %{customdata}: %{x}<br>EM drop %{y:.2f}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=nll, name="NLL change", marker_color="#1f77b4",
                         customdata=pos, hovertemplate="pos %{customdata}: %{x}<br>ΔNLL %{y:.3f}<extra></extra>"),
                  row=2, col=1)
    fig.update_layout(title=title, showlegend=False, height=550, width=max(700, 18 * len(pos)))
    fig.update_xaxes(tickangle=-60, type="category", row=2, col=1)
    return fig


def perturbation_by_position(df: pd.DataFrame, *, title: str = "Mean EM drop per prefix position") -> go.Figure:
    """Fig. 3 bottom: mean EM drop per prefix position, one line per group (e.g. memorized vs non-memorized).

    Args:
        df: output of ``memloc.perturb.em_drop_by_position`` (columns ``group, position, mean, sem``,
            optionally ``n``); error bars are ±1 ``sem`` (standard error over the paragraphs of a
            group), and the y axis and subtitle say so (with each group's ``n``).
    """
    need = {"group", "position", "mean"}
    if not isinstance(df, pd.DataFrame) or not need <= set(df.columns):
        raise ValueError(f"df must have columns {sorted(need)} (memloc.perturb.em_drop_by_position)")
    colors = {"memorized": "#d62728", "non-memorized": "#1f77b4"}
    fig = go.Figure()
    for g, d in df.groupby("group", sort=True):
        d = d.sort_values("position")
        err = dict(type="data", array=d["sem"], visible=True) if "sem" in d.columns else None
        fig.add_trace(go.Scatter(x=d["position"], y=d["mean"], mode="lines+markers", name=str(g), error_y=err,
                                 line=dict(color=colors.get(str(g)))))
    ytitle = "mean EM drop"
    if "sem" in df.columns:
        ytitle += " (±1 SEM over paragraphs)"
        if "n" in df.columns:
            n = df.groupby("group")["n"].max()
            title += ("<br><sup>error bars: ±1 standard error of the mean over the paragraphs of each group ("
                      + ", ".join(f"{g}: {int(v)}" for g, v in n.items()) + ")</sup>")
    fig.update_layout(title=title, xaxis_title="perturbed prefix position", yaxis_title=ytitle,
                      height=450, width=850, margin=dict(t=100))
    return fig
