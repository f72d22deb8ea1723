"""``contrastive``: contrastive-objective gradients and their top component (Stoehr Fig. 4 bottom)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .._format import fmt_head
from ..context import RunContext
from ..runner import Inputs, Stage


@dataclass(frozen=True)
class ContrastiveResult:
    """Attributes:
        gradients: CO↓ gradient attribution per (layer, component[, head]) (:func:`memloc.contrastive.contrastive_gradients`).
    """

    gradients: pd.DataFrame

    def top(self, k: int = 3) -> pd.DataFrame:
        from ...contrastive import top_components

        return top_components(self.gradients, k)

    def top_wv(self) -> pd.Series:
        """The most salient value matrix (the paper's memorization head candidate)."""
        c = self.gradients
        return c[c.component == "W_V"].sort_values("value", ascending=False).iloc[0]


def needs_both_groups(ctx: RunContext, inputs: Inputs) -> str | None:
    mem = inputs["memorization"]
    if not len(mem.mp_rows) or not len(mem.nmp_rows):
        return "needs memorized and non-memorized paragraphs"
    return None


def compute(ctx: RunContext, inputs: Inputs) -> ContrastiveResult:
    from ...contrastive import contrastive_gradients

    mem = inputs["memorization"]
    nmp = ctx.device_tokens(mem.nmp)
    return ContrastiveResult(contrastive_gradients(ctx.model, ctx.device_tokens(mem.mp), nmp, mem.prefix_len,
                                                   n_nmp_per_batch=min(8, len(nmp)), seed=0,
                                                   progress_bar=ctx.progress_bar))


def component_name(row: pd.Series) -> str:
    return f"L{int(row.layer)} {row.component}" + (f" head {int(row['head'])}" if row["head"] >= 0 else "")


def render(ctx: RunContext, r: ContrastiveResult) -> str:
    from ...plots import gradient_heatmap

    c = r.gradients
    ctx.table("contrastive", c, "contrastive_gradients")
    ctx.fig("contrastive", gradient_heatmap(
        c, title="Contrastive-objective (CO↓) gradient attribution (Stoehr Fig. 4 bottom)"),
        "fig4_contrastive_gradients")
    top = r.top(3)
    t0 = top.iloc[0]
    name = component_name(t0)
    wv = r.top_wv()
    ctx.result.summary.update(top_contrastive=name, top_wv_head=fmt_head(wv.layer, wv["head"]))
    return (f"top component of the contrastive gradient: {name} ({t0.value:.3g}); next: "
            + ", ".join(f"L{int(x.layer)} {x.label}" for x in top.iloc[1:].itertuples())
            + f"; most salient value matrix W_V: {fmt_head(wv.layer, wv['head'])} (the paper: L1 W_V head 2)")


STAGE = Stage("contrastive", "Contrastive-objective gradients (Stoehr et al. Fig. 4 bottom)", compute, render,
              requires=("memorization",), skip=needs_both_groups)
