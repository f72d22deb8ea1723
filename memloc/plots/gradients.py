"""Figures of parameter and activation gradients (Stoehr et al. Fig. 4, 6, 9)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["gradient_heatmap", "gradient_heatmaps_by_group", "attention_vs_mlp_totals", "activation_gradient_heatmap"]


def _matrix(df: pd.DataFrame) -> tuple[np.ndarray, list[str], list[int]]:
    from ..gradients import parameter_gradient_tensor

    mat, cols = parameter_gradient_tensor(df)
    layers = sorted(df["layer"].unique().tolist())
    return mat.numpy(), cols, layers


#: Colour-bar title of the parameter-gradient heatmaps: what the value is, and its unit (the loss is in nats).
GRADIENT_UNITS = "|∂loss/∂θ|,<br>pooled per<br>block (nats per<br>unit weight)"


def gradient_heatmap(df: pd.DataFrame, *, title: str = "Parameter gradient attribution",
                     colorscale: str = "Viridis", colorbar_title: str | None = None) -> go.Figure:
    """Fig. 4: layer x component(head) heatmap of a ``parameter_gradients`` table (paragraphs averaged).

    ``colorbar_title`` names the value and its unit (default :data:`GRADIENT_UNITS`; e.g. ``"max
    |∂CO/∂θ| (nats per unit weight)"`` for :func:`memloc.contrastive.contrastive_gradients`)."""
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ValueError("df must be a non-empty parameter_gradients DataFrame")
    z, cols, layers = _matrix(df)
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=[f"L{l}" for l in layers], colorscale=colorscale,
                               colorbar=dict(title=dict(text=colorbar_title or GRADIENT_UNITS, font=dict(size=12))),
                               hovertemplate="%{y} %{x}: %{z:.3g}<extra></extra>"))
    fig.update_layout(title=title, height=max(400, 220 + 40 * len(layers)), width=max(760, 18 * len(cols) + 260),
                      yaxis=dict(autorange="reversed"))
    fig.update_xaxes(tickangle=-90, dtick=1)
    return fig


def gradient_heatmaps_by_group(df: pd.DataFrame, group_col: str = "group", *,
                               title: str = "Parameter gradients by group", shared_scale: bool = True,
                               colorbar_title: str | None = None) -> go.Figure:
    """Fig. 4 / Fig. 9: one heatmap per group (MP vs NMP, or EM bins), stacked vertically; the colour bar
    is titled ``colorbar_title`` (default :data:`GRADIENT_UNITS`)."""
    if not isinstance(df, pd.DataFrame) or group_col not in df.columns:
        raise ValueError(f"df must be a DataFrame with a {group_col!r} column (parameter_gradients_by_group)")
    groups = list(pd.unique(df[group_col]))
    mats = {g: _matrix(df[df[group_col] == g]) for g in groups}
    zmin = min(np.nanmin(m[0]) for m in mats.values()) if shared_scale else None
    zmax = max(np.nanmax(m[0]) for m in mats.values()) if shared_scale else None
    fig = make_subplots(rows=len(groups), cols=1, subplot_titles=[str(g) for g in groups], shared_xaxes=True,
                        vertical_spacing=0.25 / max(1, len(groups)))
    for i, g in enumerate(groups):
        z, cols, layers = mats[g]
        fig.add_trace(go.Heatmap(z=z, x=cols, y=[f"L{l}" for l in layers], zmin=zmin, zmax=zmax,
                                 coloraxis="coloraxis" if shared_scale else None,
                                 colorbar=None if shared_scale else dict(title=dict(text=colorbar_title
                                                                                    or GRADIENT_UNITS,
                                                                                    font=dict(size=12))),
                                 hovertemplate=f"{g}: " + "%{y} %{x}: %{z:.3g}<extra></extra>"), row=i + 1, col=1)
        fig.update_yaxes(autorange="reversed", row=i + 1, col=1)
    n_layers = max(len(m[2]) for m in mats.values())
    fig.update_layout(title=title, height=120 + len(groups) * (60 + 25 * n_layers),
                      width=max(700, 14 * len(mats[groups[0]][1])))
    if shared_scale:
        fig.update_layout(coloraxis=dict(colorscale="Viridis",
                                         colorbar=dict(title=dict(text=colorbar_title or GRADIENT_UNITS,
                                                                  font=dict(size=12)))))
    fig.update_xaxes(tickangle=-90)
    return fig


def attention_vs_mlp_totals(df: pd.DataFrame, group_col: str | None = None, *,
                            title: str = "Attention vs MLP gradient totals per layer") -> go.Figure:
    """Fig. 9 bars: per-layer totals of attention vs MLP scores (use ``pooling="sum"`` for absolute gradient sums).

    ``df`` is a ``parameter_gradients`` table (or ``parameter_gradients_by_group`` with
    ``group_col``), or already the output of ``memloc.gradients.attention_mlp_totals``.
    """
    from ..gradients import attention_mlp_totals

    if not isinstance(df, pd.DataFrame):
        raise ValueError("df must be a DataFrame")
    by = [group_col] if group_col else []
    tot = df if {"block", "total"} <= set(df.columns) else attention_mlp_totals(df, by=by)
    groups = list(pd.unique(tot[group_col])) if group_col else [None]
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=[str(g) for g in groups] if group_col else None,
                        shared_yaxes=True)
    colors = {"attn": "#ff7f0e", "mlp": "#2ca02c"}
    for i, g in enumerate(groups):
        d = tot if g is None else tot[tot[group_col] == g]
        for block in ("attn", "mlp"):
            b = d[d["block"] == block]
            fig.add_trace(go.Bar(x=[f"L{l}" for l in b["layer"]], y=b["total"], name=block,
                                 marker_color=colors[block], showlegend=i == 0), row=1, col=i + 1)
    fig.update_layout(title=title, barmode="group", height=400, width=max(600, 300 * len(groups)))
    return fig


def activation_gradient_heatmap(df: pd.DataFrame, component: str = "v", layer: int = 1, *,
                                token_labels: Sequence[str] | None = None, paragraph: int | None = None,
                                title: str | None = None) -> go.Figure:
    """Fig. 6 top: head x position heatmap of one layer's activation gradients (x labels: decoded tokens)."""
    from ..gradients import activation_gradient_tensor
    from .perturbation import unique_labels

    t = activation_gradient_tensor(df, component, paragraph=paragraph)
    if not 0 <= layer < t.shape[0]:
        raise ValueError(f"layer {layer} is not in df (layers 0..{t.shape[0] - 1})")
    z = t[layer].numpy()
    x: list[Any] = list(range(z.shape[1]))
    if token_labels is not None:
        if len(token_labels) < z.shape[1]:
            raise ValueError(f"token_labels has {len(token_labels)} entries for {z.shape[1]} positions")
        x = unique_labels(list(token_labels)[: z.shape[1]])
    heads = sorted(df[df["component"] == component]["head"].unique())
    fig = go.Figure(go.Heatmap(z=z, x=x, y=[f"H{h}" if h >= 0 else component for h in heads], colorscale="Viridis"))
    fig.update_layout(title=title or f"Activation gradients of {component}, layer {layer}",
                      height=150 + 25 * len(heads), width=max(700, 14 * z.shape[1]))
    fig.update_xaxes(tickangle=-60, type="category")
    return fig
