"""Figures of the memorization-head analysis (Stoehr et al. 2024, Fig. 6 and Fig. 7)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

__all__ = ["head_token_heatmaps", "rank_attention"]


def _matrix(values: Any, what: str) -> np.ndarray:
    """A [head, position] array from a tensor/array or a tidy DataFrame (head, position, value)."""
    if isinstance(values, pd.DataFrame):
        col = next((c for c in ("value", "attention") if c in values.columns), None)
        if col is None or not {"head", "position"} <= set(values.columns):
            raise ValueError(f"{what}: a DataFrame needs columns head, position and value (or attention)")
        for extra in ("layer", "paragraph", "component"):
            if extra in values.columns and values[extra].nunique() > 1:
                raise ValueError(f"{what}: the DataFrame holds several values of {extra!r}; select one first")
        return values.pivot_table(index="head", columns="position", values=col, aggfunc="mean").to_numpy(float)
    arr = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [head, position], got shape {arr.shape}")
    return arr


def _default_colorbar_title(panel: str) -> str:
    """A unit for a Fig. 6 panel named like the reproduce pipeline names them."""
    name = panel.lower()
    if "attention" in name:
        return "attention<br>weight"
    if "gradient" in name:
        return "max |∂NLL/∂act|<br>(nats per unit<br>activation)"
    return "value"


def head_token_heatmaps(values: Float[Tensor, "head position"] | pd.DataFrame | Mapping[str, Any],
                        token_labels: Sequence[str] | None = None, title: str = "", *,
                        colorscale: str = "Blues",
                        colorbar_titles: str | Sequence[str] | Mapping[str, str] | None = None) -> go.Figure:
    """Per-head heatmaps over the prefix tokens (Stoehr et al. Fig. 6).

    Args:
        values: one [head, position] matrix — a tensor/array, or a tidy DataFrame with columns
            ``head``, ``position`` and ``value``/``attention`` for one layer (e.g. value-activation
            gradients of ``memloc.gradients.activation_gradients`` or the attention of
            ``memloc.heads.first_token_attention_frame``) — or a mapping ``{panel title:
            matrix}`` to stack several panels sharing the x axis (Fig. 6: gradients on top,
            attention below).
        token_labels: the decoded prefix tokens, one per position (x tick labels; repeated
            tokens stay separate columns).
        title: figure title.
        colorscale: plotly colorscale.
        colorbar_titles: what each panel's colour bar measures, with its unit: one string, one
            per panel (sequence in panel order or ``{panel title: text}``); default from the
            panel title: "attention weight" for attention panels, "max |∂NLL/∂act| (nats per unit
            activation)" for gradient panels (``activation_gradients`` with ``pooling="max"``).

    Returns:
        A plotly Figure, heads on the y axis (H0 at the top), tokens on the x axis.
    """
    panels = dict(values) if isinstance(values, Mapping) else {"": values}
    if not panels:
        raise ValueError("values is an empty mapping; pass at least one [head, position] matrix")
    mats = {k: _matrix(v, f"values[{k!r}]" if k else "values") for k, v in panels.items()}
    widths = {m.shape[1] for m in mats.values()}
    if len(widths) != 1:
        raise ValueError(f"all panels must have the same number of positions, got {sorted(widths)}")
    width = widths.pop()
    if token_labels is not None:
        token_labels = [str(t) for t in token_labels]
        if len(token_labels) != width:
            raise ValueError(f"token_labels has {len(token_labels)} labels for {width} positions")
    names = list(mats)
    if colorbar_titles is None:
        cb = {k: _default_colorbar_title(k) for k in names}
    elif isinstance(colorbar_titles, str):
        cb = {k: colorbar_titles for k in names}
    elif isinstance(colorbar_titles, Mapping):
        missing = [k for k in names if k not in colorbar_titles]
        if missing:
            raise ValueError(f"colorbar_titles has no entry for panels {missing}")
        cb = {k: str(colorbar_titles[k]) for k in names}
    else:
        cb_list = [str(t) for t in colorbar_titles]
        if len(cb_list) != len(names):
            raise ValueError(f"colorbar_titles has {len(cb_list)} entries for {len(names)} panels")
        cb = dict(zip(names, cb_list))
    fig = make_subplots(rows=len(mats), cols=1, shared_xaxes=True, subplot_titles=list(mats) if len(mats) > 1 else None,
                        vertical_spacing=0.08)
    x = list(range(width))
    for i, (name, m) in enumerate(mats.items(), start=1):
        heads = [f"H{h}" for h in range(m.shape[0])]
        hover = "head %{y}<br>position %{x}<br>value %{z:.4g}<extra></extra>"
        text = None
        if token_labels is not None:
            text = [token_labels] * m.shape[0]
            hover = "head %{y}<br>position %{x} (%{text})<br>value %{z:.4g}<extra></extra>"
        fig.add_trace(go.Heatmap(z=m, x=x, y=heads, colorscale=colorscale, text=text, hovertemplate=hover,
                                 colorbar=dict(len=0.9 / len(mats), y=1 - (i - 0.5) / len(mats),
                                               title=dict(text=cb[name], font=dict(size=12))),
                                 name=name or "values"),
                      row=i, col=1)
        fig.update_yaxes(autorange="reversed", row=i, col=1)
    if token_labels is not None:
        fig.update_xaxes(tickmode="array", tickvals=x, ticktext=token_labels, tickangle=-60, row=len(mats), col=1)
    fig.update_layout(title=title, height=260 * len(mats) + 120, width=max(700, 18 * width + 200),
                      template="plotly_white")
    return fig


_HIGHLIGHT_COLORS = ("crimson", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


def _highlights(highlight: Any) -> dict[tuple[int, int], str]:
    """``(layer, head)``, a list of them, or ``{(layer, head): label}`` -> ordered ``{head: label}``."""
    if highlight is None:
        return {}
    if isinstance(highlight, Mapping):
        items = list(highlight.items())
    elif (isinstance(highlight, (tuple, list)) and len(highlight) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in highlight)):
        items = [(tuple(highlight), "")]
    elif isinstance(highlight, (tuple, list)):
        items = [(h, "") for h in highlight]
    else:
        raise ValueError(f"highlight must be (layer, head), a list of them or {{(layer, head): label}}, got {highlight!r}")
    out: dict[tuple[int, int], str] = {}
    for key, label in items:
        if not isinstance(key, (tuple, list)) or len(key) != 2:
            raise ValueError(f"highlight entries must be (layer, head) pairs, got {key!r}")
        out[(int(key[0]), int(key[1]))] = str(label)
    return out


def rank_attention(df: pd.DataFrame, highlight: Any = None, *,
                   correlations: pd.DataFrame | None = None, layers: Sequence[int] | None = None,
                   mark_most_rare: bool = True,
                   title: str = "Attention of the first decoded token per token-frequency rank") -> go.Figure:
    """Aggregated attention per corpus-frequency rank, one line per head (Stoehr et al. Fig. 7).

    Args:
        df: the DataFrame of ``memloc.heads.rare_token_attention`` (layer, head, rank, attention).
        highlight: heads drawn in colour, thick and labelled on the plot: ``(layer, head)`` (e.g.
            the memorization head), a list of them, or ``{(layer, head): label}`` (e.g.
            ``{(0, 1): "memorization head"}``); the other heads are thin grey lines.
        correlations: optional ``memloc.heads.rare_token_correlation`` result; each line's name
            then shows its rank-attention correlation.
        layers: restrict to these layers (default: all in ``df``).
        mark_most_rare: with ``correlations``, also highlight and label the most rare-token-focused
            head (the most negative correlation: attention falls fastest with frequency rank).
        title: figure title.

    Returns:
        A plotly Figure, rank (0 = rarest) on x, aggregated attention on y; each highlighted head
        carries an on-plot label (an annotation at its rank-0 point).
    """
    if not isinstance(df, pd.DataFrame) or not {"layer", "head", "rank", "attention"} <= set(df.columns):
        raise ValueError("df must be a DataFrame with columns layer, head, rank, attention "
                         "(the result of rare_token_attention)")
    if layers is not None:
        df = df[df["layer"].isin(list(layers))]
        if df.empty:
            raise ValueError(f"no rows for layers {list(layers)}")
    heads = sorted({(int(l), int(h)) for l, h in zip(df["layer"], df["head"])})
    marked = _highlights(highlight)
    for key in marked:
        if key not in heads:
            raise ValueError(f"highlight {key} is not a (layer, head) in df")
    corr = {}
    if correlations is not None:
        if not {"layer", "head", "correlation"} <= set(correlations.columns):
            raise ValueError("correlations must have columns layer, head, correlation")
        corr = {(int(r.layer), int(r.head)): float(r.correlation) for r in correlations.itertuples()}
        in_df = {k: v for k, v in corr.items() if k in heads and np.isfinite(v)}
        if mark_most_rare and in_df:
            rare = min(in_df, key=in_df.get)
            label = "most rare-token-focused head"
            marked[rare] = f"{marked[rare]}; {label}" if marked.get(rare) else label
    if "n_tokens" in df.columns:  # ranks that no token has carry no information
        df = df[df["n_tokens"] > 0]
    order = list(marked)
    fig = go.Figure()
    annotations = []
    for key in sorted(heads, key=lambda k: (k in marked, -order.index(k) if k in marked else 0)):  # marked on top
        g = df[(df["layer"] == key[0]) & (df["head"] == key[1])].sort_values("rank")
        head = f"L{key[0]}H{key[1]}"
        name = head + (f" (r={corr[key]:.2f})" if key in corr else "")
        hot = key in marked
        color = _HIGHLIGHT_COLORS[order.index(key) % len(_HIGHLIGHT_COLORS)] if hot else "rgba(120,120,120,0.35)"
        if hot and marked[key]:
            name += f": {marked[key]}"
        fig.add_trace(go.Scatter(x=g["rank"], y=g["attention"], mode="lines+markers" if hot else "lines", name=name,
                                 line=dict(color=color, width=3 if hot else 1),
                                 showlegend=hot or len(heads) <= 16))
        if hot and len(g):
            first = g.iloc[0]
            annotations.append(dict(x=float(first["rank"]), y=float(first["attention"]), xref="x", yref="y",
                                    text=f"<b>{head}</b>" + (f" {marked[key]}" if marked[key] else ""),
                                    showarrow=True, arrowhead=2, ax=60, ay=-30 - 28 * order.index(key),
                                    font=dict(color=color, size=13), bgcolor="rgba(255,255,255,0.8)"))
    sub = ""
    if "n" in df.columns and df["n"].notna().any():
        sub = f"<br><sup>mean attention over {int(df['n'].max())} paragraphs per rank; grey: the other heads</sup>"
    fig.update_layout(title=title + sub, xaxis_title="token-frequency rank in the prefix (0 = rarest)",
                      yaxis_title="aggregated attention of the first decoded token", template="plotly_white",
                      annotations=annotations, legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
                      height=560, width=900)
    return fig
