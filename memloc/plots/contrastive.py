"""Figures for sparse unlearning/editing (Stoehr et al. Fig. 5) and activation patching (Fig. 11)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["finetune_trajectories", "patching_heatmap"]

_SPLIT_NAMES = {"memorized": "MP", "non-memorized": "NMP"}


def finetune_trajectories(df: pd.DataFrame, *, value: str = "em") -> go.Figure:
    """Stoehr Fig. 5: mean EM of MPs and NMPs per fine-tuning step, one line per mask type and
    split, one facet per objective (unlearning / editing).  For editing runs (rows with an
    ``edit_em`` column, as :func:`memloc.contrastive.sparse_finetune` returns for
    ``objective="edit"``) a third line per mask shows the **edit target**: the EM of the model's
    continuation of the edit prefix against the edit target (the PMP's continuation), i.e.
    whether the edit took hold (``edit_nll`` when ``value="nll"``).  Error bars are ±1 standard
    error of the mean over the paragraphs of each line; the subtitle gives their numbers.

    Args:
        df: the DataFrame of :func:`memloc.contrastive.sparse_finetune`, or several of them
            concatenated (e.g. masks "top", "random", "all" × objectives "unlearn", "edit").
        value: column to average per step (``"em"`` or ``"nll"``).
    """
    need = {"step", "split", "mask", "objective", value}
    if not isinstance(df, pd.DataFrame) or not need <= set(df.columns):
        raise ValueError(f"df must be a DataFrame from sparse_finetune with columns {sorted(need)}")
    if df.empty:
        raise ValueError("df is empty")
    cols = ["objective", "mask", "split", "step"]
    long = df[cols + [value]].rename(columns={value: "value"})
    edit_col = f"edit_{value}"
    has_edit = edit_col in df.columns and df[edit_col].notna().any()
    if has_edit:
        e = df[df[edit_col].notna()]
        long = pd.concat([long, e[cols].assign(split="edit target", value=e[edit_col].to_numpy())],
                         ignore_index=True)
    agg = long.groupby(cols, sort=True)["value"].agg(["mean", "sem", "count"]).reset_index()
    agg["sem"] = agg["sem"].fillna(0.0)
    agg["paragraphs"] = agg["split"].map(lambda s: _SPLIT_NAMES.get(s, s))
    label = value.upper() if value in ("em", "nll") else value
    fig = px.line(agg, x="step", y="mean", color="mask", line_dash="paragraphs", facet_col="objective",
                  error_y="sem", markers=True,
                  labels={"mean": f"mean {label} (±1 SEM over paragraphs)", "step": "optimization step",
                          "paragraphs": "paragraphs"},
                  category_orders={"mask": ["top", "all", "random"], "objective": ["unlearn", "edit"],
                                   "paragraphs": ["MP", "NMP", "edit target"]},
                  line_dash_map={"MP": "solid", "NMP": "dot", "edit target": "dashdot"})
    facet = {"unlearn": "unlearning (CO↓)", "edit": "editing into PMPs (CO↔)"}
    fig.for_each_annotation(lambda a: a.update(text=facet.get(a.text.split("=")[-1], a.text)))
    n = agg.groupby("paragraphs")["count"].max()
    plural = {"MP": "MPs", "NMP": "NMPs", "edit target": "edit targets"}
    counts = ", ".join(f"{int(n[k])} {plural[k]}" for k in plural if k in n.index)
    sub = f"error bars: ±1 standard error of the mean over the paragraphs of each line ({counts})"
    sub += "<br>NMP: EM against their original greedy continuation"
    if has_edit:
        sub += "; edit target: EM of the PMP prefix's continuation against the PMP continuation"
    fig.update_layout(title=dict(text="Sparse fine-tuning on the contrastive objective (Stoehr et al. Fig. 5)"
                                      f"<br><sup>{sub}</sup>"),
                      template="plotly_white", margin=dict(t=120), width=1150, height=560)
    return fig


def patching_heatmap(df: pd.DataFrame) -> go.Figure:
    """Stoehr Fig. 11: mean NLL change at the impact token per layer (rows) × component
    (columns; per head for ``z``), one panel per patching direction.

    Args:
        df: the DataFrame of :func:`memloc.patching.activation_patching`.
    """
    need = {"direction", "layer", "component", "head", "value"}
    if not isinstance(df, pd.DataFrame) or not need <= set(df.columns):
        raise ValueError(f"df must be a DataFrame from activation_patching with columns {sorted(need)}")
    if df.empty:
        raise ValueError("df is empty")
    d = df.copy()
    d["column"] = [c if h < 0 else f"{c} H{h}" for c, h in zip(d["component"], d["head"])]
    order = list(dict.fromkeys(d.sort_values(["head"], kind="stable")["column"]))
    directions = list(dict.fromkeys(d["direction"]))
    titles = {"mp_to_pmp": "MP → PMP (clean: PMP)", "pmp_to_mp": "PMP → MP (clean: MP)"}
    fig = make_subplots(rows=1, cols=len(directions), subplot_titles=[titles.get(x, x) for x in directions],
                        shared_yaxes=True)
    vmax = float(d.groupby(["direction", "layer", "column"])["value"].mean().abs().max()) or 1.0
    for j, direction in enumerate(directions, start=1):
        mat = (d[d["direction"] == direction].groupby(["layer", "column"])["value"].mean()
               .unstack("column").reindex(columns=order))
        fig.add_trace(go.Heatmap(z=mat.to_numpy(), x=list(mat.columns), y=[f"L{l}" for l in mat.index],
                                 zmin=-vmax, zmax=vmax, colorscale="RdBu_r", colorbar=dict(title="ΔNLL"),
                                 showscale=j == len(directions)), row=1, col=j)
    fig.update_layout(title="Two-way activation patching: ΔNLL at the impact token (Stoehr et al. Fig. 11)",
                      template="plotly_white")
    fig.update_yaxes(autorange="reversed")
    return fig
