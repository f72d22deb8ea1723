"""Figure of the memorization split (Stoehr et al. 2024, §3.2, Fig. 2)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

__all__ = ["memorization_scatter"]

_SPLIT_COLORS = {"memorized": "#d62728", "non-memorized": "#1f77b4", "partial": "#9e9e9e"}


def memorization_scatter(df: pd.DataFrame, *, color: str = "split", title: str | None = None) -> go.Figure:
    """Stoehr et al. Fig. 2: continuation NLL against exact match (EM) of every paragraph.

    Each point is one paragraph (prefix 50 / continuation 50 tokens): x = EM of the greedy
    continuation (Stoehr §3.2), y = mean NLL of the true continuation (Chang et al. Eq. 6).

    Args:
        df: the DataFrame of :func:`memloc.metrics.memorization` (columns ``em``, ``nll``; a ``split``
            column from :func:`memloc.metrics.split_memorization` and a ``count`` column are used
            when present; an ``id`` column is shown on hover).
        color: ``"split"`` (memorized / non-memorized / partial; needs a ``split`` column) or
            ``"count"`` (training-set duplication count on a log scale; needs ``count``).
        title: figure title (default: names the counts of each split).

    Returns:
        A plotly Figure.
    """
    if not isinstance(df, pd.DataFrame) or not {"em", "nll"} <= set(df.columns):
        raise ValueError("df must be a DataFrame with columns 'em' and 'nll' (memloc.memorization)")
    if df.empty:
        raise ValueError("df is empty")
    if color not in ("split", "count"):
        raise ValueError(f"color must be 'split' or 'count', got {color!r}")
    if color not in df.columns:
        raise ValueError(f"color={color!r} needs a {color!r} column in df")
    d = df.copy()
    hover = [c for c in ("id", "count", "accuracy", "set") if c in d.columns]
    if color == "split":
        counts = d["split"].value_counts()
        order = [s for s in ("memorized", "partial", "non-memorized") if s in counts.index]
        order += [s for s in counts.index if s not in order]
        d["split"] = d["split"].map(lambda s: f"{s} ({counts[s]})")
        cmap = {f"{s} ({counts[s]})": _SPLIT_COLORS.get(s, "#555555") for s in order}
        fig = px.scatter(d, x="em", y="nll", color="split", hover_data=hover, color_discrete_map=cmap,
                         category_orders={"split": [f"{s} ({counts[s]})" for s in order]}, opacity=0.7)
        default = "NLL vs exact match of every paragraph (Stoehr et al. Fig. 2)"
    else:
        d["log10(count + 1)"] = np.log10(d["count"].astype(float) + 1.0)
        fig = px.scatter(d, x="em", y="nll", color="log10(count + 1)", hover_data=hover,
                         color_continuous_scale="Viridis", opacity=0.75)
        default = "NLL vs exact match, colored by training duplication count"
    fig.update_layout(title=title or default, xaxis_title="exact match (EM, tokens)",
                      yaxis_title="continuation NLL", template="plotly_white", width=800, height=500)
    return fig
