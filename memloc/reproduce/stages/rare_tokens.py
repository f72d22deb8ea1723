"""``rare_tokens``: first-token attention per token-frequency rank and its correlation per head
(Stoehr Fig. 7), highlighting the head stage's memorization head when it ran."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .._format import fmt_head
from ..context import RunContext
from ..runner import Inputs, Stage
from .memorization import needs_a_group


@dataclass(frozen=True)
class RareTokensResult:
    """Attributes:
        ranks: attention per (layer, head, frequency rank) (:func:`memloc.heads.rare_token_attention`).
        correlations: Pearson r of attention vs rank per head (:func:`memloc.heads.rare_token_correlation`).
        highlight: (layer, head) shown: the memorization head, else the most rare-token-focused head.
        n: paragraphs used; ``frequencies_note`` where the token frequencies come from.
    """

    ranks: pd.DataFrame
    correlations: pd.DataFrame
    highlight: tuple
    n: int
    frequencies_note: str

    def correlation_of(self, layer: int, head: int) -> float:
        c = self.correlations
        return float(c[(c.layer == layer) & (c["head"] == head)].iloc[0].correlation)

    def most_rare_focused(self) -> pd.Series:
        return self.correlations.sort_values("correlation").iloc[0]


def compute(ctx: RunContext, inputs: Inputs) -> RareTokensResult:
    from ...heads import rare_token_attention, rare_token_correlation

    mem = inputs["memorization"]
    x = ctx.device_tokens(torch.cat([mem.mp, mem.nmp]))
    ranks = rare_token_attention(ctx.model, x, mem.prefix_len, ctx.frequencies, batch_size=ctx.settings.batch_size,
                                 progress_bar=ctx.progress_bar)
    corr = rare_token_correlation(ranks)
    head = inputs.get("head")
    low = corr.sort_values("correlation").iloc[0]
    highlight = (head.layer, head.head) if head is not None else (int(low.layer), int(low["head"]))
    return RareTokensResult(ranks, corr, highlight, len(x), ctx.frequencies_note)


def render(ctx: RunContext, r: RareTokensResult) -> str:
    from ...plots import rank_attention

    ctx.table("rare_tokens", r.ranks, "rare_token_attention")
    ctx.table("rare_tokens", r.correlations, "rare_token_correlation")
    ctx.fig("rare_tokens", rank_attention(r.ranks, r.highlight, correlations=r.correlations,
                                          title="First-token attention per token-frequency rank (Stoehr Fig. 7)"),
            "fig7_rare_token_attention")
    low = r.most_rare_focused()
    return (f"most rare-token-focused head: {fmt_head(low.layer, low['head'])} (r = {low.correlation:.2f}); the "
            f"memorization head {fmt_head(*r.highlight)} has r = {r.correlation_of(*r.highlight):.2f} (the paper: "
            f"-0.97 for L1H2); median over heads {r.correlations.correlation.median():.2f}; {r.n} paragraphs, "
            f"{r.frequencies_note}")


def skip(ctx: RunContext, inputs: Inputs) -> str | None:
    return needs_a_group(ctx, inputs) or (None if ctx.frequencies is not None else "no token frequencies")


STAGE = Stage("rare_tokens", "Rare-token attention (Stoehr et al. Fig. 7)", compute, render,
              requires=("memorization",), uses=("head",), skip=skip, settings=("batch_size",))
