"""``del``: the DEL benchmark table and confusion matrix (Chang et al. Table 3, Fig. 2), on
memorized paragraphs other than the tuning dev set (A.7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ...data import subset_evenly
from .._format import ranking, tied_best
from ..context import RunContext
from ..runner import Inputs, Stage


@dataclass(frozen=True)
class DelStageResult:
    """Attributes:
        benchmark: the :class:`memloc.benchmarks.DelResult`.
        ratios: the dropout ratios (per layer).
    """

    benchmark: Any
    ratios: tuple

    def table(self) -> pd.DataFrame:
        from ...benchmarks import del_table

        return del_table(self.benchmark)

    def column(self, name: str, ratio: float | None = None) -> pd.Series:
        """One column of Table 3 (``ΔSelf-Acc %``, ``ΔNeg-Acc %``, ...) at ``ratio`` (default the largest)."""
        return self.table()[(name, max(self.ratios) if ratio is None else ratio)]


def _rows(ctx: RunContext, mem) -> Any:
    # the dev paragraphs the hyperparameters were selected on are not evaluated (A.7)
    t = mem.table
    return t.index[(t["split"] == "memorized") & ~t["id"].isin(ctx.dev_ids)].to_numpy()


def skip(ctx: RunContext, inputs: Inputs) -> str | None:
    n = len(_rows(ctx, inputs["memorization"]))
    return f"needs at least 2 memorized paragraphs, found {n}" if n < 2 else None


def compute(ctx: RunContext, inputs: Inputs) -> DelStageResult:
    from ...benchmarks import del_benchmark

    s, mem = ctx.settings, inputs["memorization"]
    full = _rows(ctx, mem)
    rows = full[subset_evenly(len(full), s.del_set_size)]
    x = ctx.device_tokens(mem.tokens[torch.as_tensor(rows, dtype=torch.long)])
    res = del_benchmark(ctx.model, list(s.methods), x, mem.prefix_len, ids=mem.table.iloc[rows]["id"].tolist(),
                        n_targets=s.del_targets, ratios=list(s.del_ratios), method_kwargs=s.method_kwargs(ctx.tuned),
                        random_tokens=ctx.random_tokens, batch_size=s.batch_size, cache_dir=ctx.score_cache,
                        progress_bar=ctx.progress_bar)
    return DelStageResult(res, tuple(s.del_ratios))


def render(ctx: RunContext, r: DelStageResult) -> str:
    from ...plots import del_confusion_heatmap, del_table_figure

    res, t = r.benchmark, r.table()
    flat = t.copy()
    flat.columns = [f"{m} @{x:g}" for m, x in flat.columns]
    ctx.table("del", flat, "del_table3", index=True)
    ctx.table("del", res.confusion_long(), "del_confusion")
    table_fig = del_table_figure(t, title="DEL benchmark (Chang et al. Table 3)")
    ctx.fig("del", table_fig, "table3_del")
    ratio = max(r.ratios)
    best = r.column("ΔSelf-Acc %").sort_values()
    # the paper's Fig. 2 shows the strongest method's confusion matrix
    ctx.fig("del", del_confusion_heatmap(res.matrices[(best.index[0], ratio)], title=(
        f"DEL confusion (Chang et al. Fig. 2): {best.index[0]}, {ratio * 100:g}% of the neurons per layer<br><sup>"
        "rows: the target whose located neurons are dropped; columns: ΔAcc of every memorized sequence</sup>")),
        "fig2_del_confusion")
    neg = r.column("ΔNeg-Acc %")
    ctx.result.summary["del_best"] = " = ".join(tied_best(best, ascending=True, fmt="{:+.1f}")) + \
        f" (ΔSelf-Acc {best.iloc[0]:+.1f}% at {ratio * 100:g}% per layer)"
    msg = (f"{len(res.ids)} memorized sequences, {res.rows.target_id.nunique()} targets; dropping {ratio * 100:g}% of "
           f"the neurons per layer, ΔSelf-Acc (%): " + ranking(best, ascending=True, fmt="{:+.1f}")
           + f"; ΔNeg-Acc of {best.index[0]}: {neg[best.index[0]]:+.1f}%")
    if best.abs().max() < 0.05:
        msg += " — no method's dropout changes the memorized continuations at this ratio"
    for other in r.ratios:
        if other != ratio:
            msg += f"; at {other * 100:g}% the largest ΔSelf-Acc is {r.column('ΔSelf-Acc %', other).min():+.1f}%"
    return msg


STAGE = Stage("del", "DEL benchmark (Chang et al. Table 3, Fig. 2)", compute, render, requires=("memorization",),
              skip=skip, settings=("methods", "del_set_size", "del_targets", "del_ratios", "mask_steps", "stop_mask_mean", "ig_steps",
                                   "batch_size"))
