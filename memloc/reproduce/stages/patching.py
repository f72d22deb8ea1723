"""``patching``: two-way activation patching between MPs and their PMPs at the perturbed token
(Stoehr Fig. 11).  Needs the PMPs of the perturbation stage."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..context import RunContext
from ..runner import Inputs, Stage


@dataclass(frozen=True)
class PatchingResult:
    """Attributes:
        table: NLL change per (direction, layer, component, head, PMP) (:func:`memloc.patching.activation_patching`).
        n: PMPs patched.
    """

    table: pd.DataFrame
    n: int

    def top(self) -> dict[str, tuple[int, str, int, float]]:
        """Per direction: (layer, component, head, mean NLL increase) of the strongest site
        (``resid_pre`` left out: it carries everything)."""
        df = self.table
        m = df[df.component != "resid_pre"].groupby(["direction", "layer", "component", "head"])["value"].mean()
        out = {}
        for d in m.index.get_level_values(0).unique():
            top = m.loc[d].sort_values(ascending=False)
            (layer, comp, head), v = top.index[0], float(top.iloc[0])
            out[str(d)] = (int(layer), str(comp), int(head), v)
        return out


def skip(ctx: RunContext, inputs: Inputs) -> str | None:
    pmps = inputs["perturbation"].pmps
    if pmps is None or len(pmps) == 0:
        return "needs perturbed memorized paragraphs (PMPs), i.e. memorized paragraphs"
    return None


def compute(ctx: RunContext, inputs: Inputs) -> PatchingResult:
    from ...patching import activation_patching

    pmps = inputs["perturbation"].pmps
    n = min(len(pmps), ctx.settings.n_patching)
    df = activation_patching(ctx.model, ctx.device_tokens(pmps.original[:n]), ctx.device_tokens(pmps.perturbed[:n]),
                             pmps.position[:n], pmps.first_impacted[:n], pmps.prefix_len,
                             components=("resid_pre", "attn_out", "mlp_out", "z"), batch_size=ctx.settings.batch_size,
                             progress_bar=ctx.progress_bar)
    return PatchingResult(df, n)


def render(ctx: RunContext, r: PatchingResult) -> str:
    from ...plots import patching_heatmap

    ctx.table("patching", r.table, "activation_patching")
    ctx.fig("patching", patching_heatmap(r.table), "fig11_activation_patching")
    parts = [f"{d}: largest NLL increase from L{layer} {comp}{'' if head < 0 else f' H{head}'} ({v:+.2f})"
             for d, (layer, comp, head, v) in r.top().items()]
    return f"{r.n} PMPs; " + "; ".join(parts)


STAGE = Stage("patching", "Activation patching (Stoehr et al. Fig. 11)", compute, render,
              requires=("memorization", "perturbation"), skip=skip, settings=("n_patching", "batch_size"))
