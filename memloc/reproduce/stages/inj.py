"""``inj``: the INJ benchmark, Recall@k% of injected neurons (Chang et al. Table 2 and Table 6)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .._format import ranking, tied_best
from ..context import RunContext
from ..runner import Inputs, Stage


@dataclass(frozen=True)
class InjResult:
    """Attributes:
        rows: one row per (sequence, ratio, method) (:func:`memloc.benchmarks.inj_benchmark`).
        ratios: the injection ratios.
    """

    rows: pd.DataFrame
    ratios: tuple

    def table(self, selection: str = "per_layer") -> pd.DataFrame:
        from ...benchmarks import inj_table

        return inj_table(self.rows, selection=selection)

    def recall(self) -> pd.Series:
        """Recall@r (x100, top-k per layer) per method at the largest ratio, best first."""
        t = self.table()
        return t.loc[max(self.ratios)][t.columns[0]].sort_values(ascending=False)


def skip(ctx: RunContext, inputs: Inputs) -> str | None:
    return "the model has no tokenizer to encode the ECBD sequences" if getattr(ctx.model, "tokenizer", None) is None \
        else None


def compute(ctx: RunContext, inputs: Inputs) -> InjResult:
    from ...benchmarks import inj_benchmark

    s = ctx.settings
    df = inj_benchmark(ctx.model, list(s.methods), n=s.inj_n, ratios=list(s.inj_ratios),
                       method_kwargs=s.method_kwargs(ctx.tuned), max_steps=s.inj_max_steps,
                       cache_dir=ctx.score_cache, progress_bar=ctx.progress_bar)
    return InjResult(df, tuple(s.inj_ratios))


def render(ctx: RunContext, r: InjResult) -> str:
    from ...plots import inj_recall_bars

    df = r.rows
    ctx.table("inj", r.table(), "inj_table2", index=True)
    ctx.table("inj", r.table("across_layers"), "inj_table6_across_layers", index=True)
    ctx.fig("inj", inj_recall_bars(df, title="INJ benchmark: Recall@k% of injected neurons, top-k per layer "
                                             "(Chang et al. Table 2)"), "table2_inj_recall")
    rank = r.recall()
    conv = df.drop_duplicates(["seq_id", "ratio"])["inj_converged"]
    ctx.result.summary["inj_best"] = " = ".join(tied_best(rank, ascending=False, fmt="{:.0f}")) + \
        f" ({rank.iloc[0]:.0f})"
    return (f"{df.seq_id.nunique()} ECBD sequences injected ({int(conv.sum())}/{len(conv)} injections reached loss "
            f"< 0.05); Recall@{max(r.ratios) * 100:g}% (x100, top-k per layer): "
            + ranking(rank, ascending=False, fmt="{:.0f}"))


STAGE = Stage("inj", "INJ benchmark (Chang et al. Table 2)", compute, render, skip=skip,
              settings=("methods", "inj_n", "inj_ratios", "inj_max_steps", "mask_steps", "stop_mask_mean", "ig_steps"))
