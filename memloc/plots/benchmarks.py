"""Figures of the INJ and DEL benchmarks (Chang et al. Tables 2, 3 and Figure 2)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["inj_recall_bars", "del_table_figure", "del_confusion_heatmap"]

_LABELS = {"hard_concrete": "HARD CONCRETE", "slimming": "SLIMMING", "zero_out": "ZERO-OUT",
           "integrated_gradients": "IG", "activations": "ACTIVATIONS", "random": "RANDOM",
           "attribution_patching": "ATTR. PATCHING"}


def _label(method: str) -> str:
    return _LABELS.get(method, method)


def inj_recall_bars(df: pd.DataFrame, *, selection: str = "per_layer", title: str | None = None) -> go.Figure:
    """Grouped bars of mean Recall@k% (x100) per method, one bar per k, one panel per injection
    ratio (Chang et al. Table 2 as a figure); error bars are standard errors over sequences.

    Args:
        df: the DataFrame :func:`memloc.benchmarks.inj_benchmark` returns.
        selection: ``"per_layer"`` (Table 2) or ``"across_layers"`` (Table 6).
    """
    from ..benchmarks._scores import PAPER_ORDER

    need = {"seq_id", "method", "ratio", "k", "selection", "recall"}
    if not isinstance(df, pd.DataFrame) or not need <= set(df.columns):
        raise ValueError(f"df must be the DataFrame inj_benchmark returns (columns {sorted(need)})")
    if selection not in set(df["selection"]):
        raise ValueError(f"selection must be one of {sorted(set(df['selection']))}, got {selection!r}")
    d = df[df["selection"] == selection]
    ratios = sorted(set(d["ratio"]), reverse=True)
    names = list(dict.fromkeys(d["method"]))
    order = [m for m in PAPER_ORDER if m in names] + [m for m in names if m not in PAPER_ORDER]
    fig = make_subplots(rows=1, cols=len(ratios), shared_yaxes=True,
                        subplot_titles=[f"injection ratio {r * 100:g}% ({int(d[d['ratio'] == r]['n_injected'].iloc[0])} "
                                        f"neurons)" if "n_injected" in d else f"ratio {r * 100:g}%" for r in ratios])
    mults = sorted(set((d["k"] / d["ratio"]).round(6)))
    colors = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2"]
    for c, r in enumerate(ratios, start=1):
        dr = d[d["ratio"] == r].assign(mult=lambda x: (x["k"] / x["ratio"]).round(6))
        g = dr.groupby(["method", "mult"])["recall"]
        mean, sem = g.mean() * 100, g.sem().fillna(0) * 100
        for j, m in enumerate(mults):
            ys = [mean.get((meth, m), np.nan) for meth in order]
            es = [sem.get((meth, m), 0.0) for meth in order]
            fig.add_trace(go.Bar(x=[_label(meth) for meth in order], y=ys, error_y=dict(type="data", array=es),
                                 name=f"k = {m:g}r", legendgroup=f"k{m:g}", showlegend=c == 1,
                                 marker_color=colors[j % len(colors)],
                                 hovertemplate="%{x}<br>Recall@" + f"{r * m * 100:g}%" + ": %{y:.1f}<extra></extra>"),
                          row=1, col=c)
    n_seq = int(d["seq_id"].nunique())
    sub = (f"<br><sup>bars: mean over {n_seq} injected sequence{'s' if n_seq != 1 else ''}; error bars: ±1 standard "
           "error of the mean over the sequences</sup>")
    fig.update_layout(barmode="group",
                      title=(title or f"INJ benchmark: Recall@k% ({selection.replace('_', ' ')})") + sub,
                      yaxis_title=f"recall x 100 (±1 SEM, n = {n_seq})", template="plotly_white",
                      legend_title="top-k%", margin=dict(t=100))
    return fig


def del_table_figure(df: pd.DataFrame | Any, *, title: str | None = None) -> go.Figure:
    """The DEL benchmark in Chang et al. Table 3 layout as a plotly table: mean ΔSelf-Acc (%),
    ΔSelf-Dist, ΔNeg-Acc (%), ΔNeg-Dist and ΔRand-PPL per method and dropout ratio.

    Args:
        df: ``DelResult``, its ``rows``, or the output of :func:`memloc.benchmarks.del_table`.

    The figure is sized to its content (fixed row heights, 14 px text, tight margins), so its PNG
    is the table itself; overriding ``height``/``width`` afterwards only adds blank space.
    """
    from ..benchmarks.dele import DelResult, del_table

    n_targets = None
    if isinstance(df, DelResult) or (isinstance(df, pd.DataFrame) and "target_id" in df.columns):
        t = del_table(df)
        n_targets = (df.rows if isinstance(df, DelResult) else df)["target_id"].nunique()
    elif isinstance(df, pd.DataFrame) and isinstance(df.columns, pd.MultiIndex):
        t = df
    else:
        raise ValueError("df must be a DelResult, DelResult.rows or the table del_table returns")
    header = ["method"] + [f"<b>{m}</b><br>k = {r * 100:g}%" for m, r in t.columns]
    cells = [[f"<b>{_label(m)}</b>" for m in t.index]]
    for m, r in t.columns:
        fmt = "{:+.1f}%" if "%" in m else "{:+.2f}" if "PPL" in m else "{:+.1f}"
        cells.append([fmt.format(v) if pd.notna(v) else "-" for v in t[(m, r)]])
    # sized to the content: fixed row heights, a readable font, tight margins (the PNG is exactly the table)
    font, header_h, cell_h = 14, 52, 30
    method_w = max(110, 11 * max(len(_label(m)) for m in t.index) + 30)
    col_w = max(100, 9 * max(len(m) for m, _ in t.columns) + 10)
    width = method_w + col_w * len(t.columns) + 40
    title_h = 50
    height = title_h + header_h + cell_h * len(t) + 24
    fig = go.Figure(go.Table(columnwidth=[method_w] + [col_w] * len(t.columns),
                             header=dict(values=header, fill_color="#dde5f0", align="center", height=header_h,
                                         font=dict(size=font)),
                             cells=dict(values=cells, align=["left"] + ["right"] * (len(header) - 1), height=cell_h,
                                        font=dict(size=font))))
    text = title or "DEL benchmark (Δ after dropout; Self-Acc ↓, Self-Dist ↑, Neg ≈ 0, Rand-PPL ≈ 0)"
    if n_targets is not None:
        text += f" — mean over {n_targets} targets; k: neurons dropped per layer"
    fig.update_layout(title=dict(text=text, font=dict(size=16), y=1 - 12 / height, yanchor="top", x=0.01),
                      template="plotly_white", height=height, width=width,
                      margin=dict(l=20, r=20, t=title_h, b=10))
    return fig


def del_confusion_heatmap(matrix_df: pd.DataFrame, categories: Mapping | pd.Series | None = None, *,
                          title: str | None = None, percent: bool = True) -> go.Figure:
    """Chang et al. Figure 2: ΔAcc of every sequence (columns) after dropping out the neurons
    located for each target (rows).  With ``categories`` (sequence id -> category) rows and
    columns are grouped by category, with the category names on the axes and lines between
    groups.

    Args:
        matrix_df: one of ``DelResult.matrices`` (index ``target_id``, columns ``seq_id``).
        categories: optional mapping / Series from sequence id to category.
        percent: show ΔAcc in % (default) instead of a fraction.
    """
    if not isinstance(matrix_df, pd.DataFrame) or matrix_df.empty:
        raise ValueError("matrix_df must be a non-empty DataFrame target x sequence (DelResult.matrices[...])")
    m = matrix_df.astype(float) * (100 if percent else 1)
    rows, cols = list(m.index), list(m.columns)
    shapes, tick_rows, tick_cols = [], None, None
    if categories is not None:
        cat = pd.Series(categories) if not isinstance(categories, pd.Series) else categories
        missing = [c for c in cols if c not in cat.index]
        if missing:
            raise ValueError(f"categories has no entry for sequences {missing[:5]}")
        order = list(dict.fromkeys(cat[cols]))
        rank = {c: i for i, c in enumerate(order)}
        cols = sorted(cols, key=lambda s: (rank[cat[s]], cols.index(s)))
        rows = sorted(rows, key=lambda s: (rank[cat[s]] if s in cat.index else len(order), rows.index(s)))
        m = m.loc[rows, cols]
        for axis, seq in (("x", cols), ("y", rows)):
            labels = [cat[s] if s in cat.index else "" for s in seq]
            for i in range(1, len(seq)):
                if labels[i] != labels[i - 1]:
                    if axis == "x":
                        shapes.append(dict(type="line", x0=i - 0.5, x1=i - 0.5, y0=-0.5, y1=len(rows) - 0.5,
                                           line=dict(color="black", width=1)))
                    else:
                        shapes.append(dict(type="line", y0=i - 0.5, y1=i - 0.5, x0=-0.5, x1=len(cols) - 0.5,
                                           line=dict(color="black", width=1)))
        tick_cols = [f"{cat[s]}: {s}" for s in cols]
        tick_rows = [f"{cat[s]}: {s}" if s in cat.index else str(s) for s in rows]
    lim = float(np.nanmax(np.abs(m.to_numpy()))) or 1.0
    fig = go.Figure(go.Heatmap(z=m.to_numpy(), x=list(range(len(cols))), y=list(range(len(rows))),
                               colorscale="RdBu", zmin=-lim, zmax=lim,
                               colorbar=dict(title="ΔAcc %" if percent else "ΔAcc"),
                               customdata=np.array([[f"{r} → {c}" for c in cols] for r in rows]),
                               hovertemplate="target → sequence: %{customdata}<br>ΔAcc: %{z:.1f}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(cols))),
                     ticktext=tick_cols or [str(c) for c in cols], title="sequence", tickangle=-60)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))),
                     ticktext=tick_rows or [str(r) for r in rows], title="dropout target", autorange="reversed")
    fig.update_layout(title=title or "DEL confusion: ΔAcc of each sequence after dropping out a target's neurons",
                      shapes=shapes, template="plotly_white", width=max(500, 14 * len(cols) + 250),
                      height=max(450, 14 * len(rows) + 200))
    return fig
