"""``gradients``: parameter gradients MP vs NMP (Stoehr Fig. 4 top) and by EM bin (Fig. 9)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..context import RunContext
from ..runner import Inputs, Stage
from .memorization import needs_a_group


@dataclass(frozen=True)
class GradientsResult:
    """Attributes:
        split: max-|grad| scores per (group MP/NMP, layer, block, component[, head]).
        bins: summed |grad| per (EM bin, layer, block, component[, head]), bins in EM order.
        totals: attention vs MLP totals per (EM bin, layer) (:func:`memloc.gradients.attention_mlp_totals`).
    """

    split: pd.DataFrame
    bins: pd.DataFrame
    totals: pd.DataFrame | None

    def layer_shares(self) -> pd.DataFrame:
        """Share of each layer in a group's summed max-|grad| score: [group x layer], rows sum to 1
        (Stoehr §5: compare where the gradient sits, not its size)."""
        lay = self.split.groupby(["group", "layer"])["value"].sum().unstack("layer")
        return lay.div(lay.sum(axis=1), axis=0)

    def bin_order(self) -> list[str]:
        return list(pd.unique(self.bins["group"]))


def compute(ctx: RunContext, inputs: Inputs) -> GradientsResult:
    from ...gradients import attention_mlp_totals, em_bins, parameter_gradients_by_group

    s, mem = ctx.settings, inputs["memorization"]
    rows = np.concatenate([mem.mp_rows, mem.nmp_rows])
    labels = ["MP"] * len(mem.mp_rows) + ["NMP"] * len(mem.nmp_rows)
    x = ctx.device_tokens(mem.tokens[torch.as_tensor(rows, dtype=torch.long)])
    g = parameter_gradients_by_group(ctx.model, x, mem.prefix_len, labels, pooling="max", batch_size=8,
                                     progress_bar=ctx.progress_bar)
    # Fig. 9: EM bins, absolute gradient sums
    T = mem.T
    bins = em_bins(mem.table["em"], ((0, 10), (11, 29), (30, T - 1), (T, T)))
    bin_rows = np.concatenate([np.flatnonzero((bins == b).to_numpy())[:s.n_mp] for b in pd.unique(bins.dropna())])
    bin_rows.sort()
    xb = ctx.device_tokens(mem.tokens[torch.as_tensor(bin_rows, dtype=torch.long)])
    gb = parameter_gradients_by_group(ctx.model, xb, mem.prefix_len, list(bins.iloc[bin_rows]), pooling="sum",
                                      batch_size=8, progress_bar=ctx.progress_bar)
    order = [b for b in ("0-10", "11-29", f"30-{T - 1}", str(T)) if b in set(gb["group"])]
    gb = gb.set_index("group").loc[order].reset_index()
    return GradientsResult(g, gb, attention_mlp_totals(gb, by=["group"]))


def render(ctx: RunContext, r: GradientsResult) -> str:
    from ...plots import attention_vs_mlp_totals, gradient_heatmaps_by_group

    g = r.split
    ctx.table("gradients", g, "param_gradients_mp_vs_nmp")
    ctx.fig("gradients", gradient_heatmaps_by_group(
        g, title="Parameter gradient attribution (max |grad|), MP vs NMP (Stoehr Fig. 4 top)"),
        "fig4_param_gradients_mp_vs_nmp")
    ctx.table("gradients", r.bins, "param_gradients_em_bins")
    ctx.fig("gradients", gradient_heatmaps_by_group(
        r.bins, title="Parameter gradients (sum |grad|) by EM bin (Stoehr Fig. 9)"), "fig9_param_gradients_em_bins")
    ctx.table("gradients", r.totals, "attention_vs_mlp_totals")
    ctx.fig("gradients", attention_vs_mlp_totals(r.totals, "group", title="Attention vs MLP gradient totals per "
                                                 "layer by EM bin (Stoehr Fig. 9)"), "fig9_attention_vs_mlp")
    if {"MP", "NMP"} <= set(g["group"]):
        m = g.groupby(["group", "block"])["value"].mean().unstack("block")
        lay = g.groupby(["group", "layer"])["value"].mean().unstack("layer")
        ratio = lay.loc["NMP"] / lay.loc["MP"]
        shares = r.layer_shares()
        msg = ("NMP/MP ratio of the mean max-|grad| score per layer: "
               + ", ".join(f"L{l} {v:.2f}" for l, v in ratio.items())
               + f" (attention MP {m.loc['MP', 'attn']:.3g} vs NMP {m.loc['NMP', 'attn']:.3g}; "
               f"MLP MP {m.loc['MP', 'mlp']:.3g} vs NMP {m.loc['NMP', 'mlp']:.3g}); share of each layer in the "
               "summed score, MP vs NMP: " + ", ".join(f"L{l} {shares.loc['MP', l]:.2f} vs {shares.loc['NMP', l]:.2f}"
                                                       for l in shares.columns))
    else:
        msg = f"only groups {sorted(set(g['group']))} exist on this model"
    shares = r.totals.pivot_table(index="group", columns="block", values="total", aggfunc="sum")
    shares = (shares["attn"] / shares.sum(axis=1)).reindex(r.bin_order())
    return msg + "; attention share of the summed |grad| by EM bin: " + ", ".join(
        f"{b} {v:.2f}" for b, v in shares.items())


STAGE = Stage("gradients", "Parameter gradients, MP vs NMP and EM bins (Stoehr et al. Fig. 4 top, Fig. 9)", compute,
              render, requires=("memorization",), skip=needs_a_group, settings=("n_mp",))
