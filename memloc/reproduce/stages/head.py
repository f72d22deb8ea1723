"""``head``: the memorization head from contrastive W_V, value-activation gradient and rare-token
evidence; gradients and first-token attention of its layer (Stoehr Fig. 6).  Uses the
contrastive stage's gradients as evidence when it ran."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import Tensor

from .._format import fmt_head
from ..context import RunContext
from ..runner import Inputs, Stage


@dataclass(frozen=True)
class HeadResult:
    """Attributes:
        heads: every head ranked (:func:`memloc.heads.find_memorization_heads`); row 0 is the memorization head.
        evidence: the evidence combined; ``stand_in`` True when, without MPs, two NMP halves stood in.
        gradients: value-activation gradients [head, prefix position] of the head's layer on the first MP.
        attention: first-decoded-token attention [head, prefix position] of that layer on the first MP.
        prefix: Int[Tensor, "prefix"] that MP's prefix (token labels).
    """

    heads: pd.DataFrame
    evidence: list
    stand_in: bool
    gradients: np.ndarray
    attention: np.ndarray
    prefix: Tensor

    @property
    def layer(self) -> int:
        return int(self.heads.iloc[0].layer)

    @property
    def head(self) -> int:
        return int(self.heads.iloc[0]["head"])


def _groups(mem) -> tuple[Tensor, Tensor, bool]:
    if len(mem.mp_rows):
        return mem.mp, mem.nmp, False
    nmp = mem.nmp
    return nmp[: len(nmp) // 2], nmp[len(nmp) // 2:], True


def skip(ctx: RunContext, inputs: Inputs) -> str | None:
    a, b, _ = _groups(inputs["memorization"])
    return "needs two non-empty paragraph groups" if not len(a) or not len(b) else None


def compute(ctx: RunContext, inputs: Inputs) -> HeadResult:
    from ...gradients import activation_gradients
    from ...heads import find_memorization_heads, first_token_attention, query_head_rows

    mem, s = inputs["memorization"], ctx.settings
    a, b, stand_in = _groups(mem)
    a, b, p = ctx.device_tokens(a), ctx.device_tokens(b), mem.prefix_len
    contrastive = getattr(inputs.get("contrastive"), "gradients", None)
    a_mp = activation_gradients(ctx.model, a, p, components=["v"], batch_size=8, progress_bar=ctx.progress_bar)
    a_nmp = activation_gradients(ctx.model, b, p, components=["v"], batch_size=8, progress_bar=ctx.progress_bar)
    evidence = ["activation", "rare"] + (["contrastive"] if contrastive is not None else [])
    heads = find_memorization_heads(ctx.model, a, b, p, frequencies=ctx.frequencies, evidence=evidence,
                                    contrastive=contrastive, activation_memorized=a_mp,
                                    activation_non_memorized=a_nmp, batch_size=s.batch_size,
                                    progress_bar=ctx.progress_bar)
    layer = int(heads.iloc[0].layer)
    grads = query_head_rows(a_mp[(a_mp.paragraph == 0) & (a_mp.layer == layer) & (a_mp.position < p)], ctx.model)
    att = first_token_attention(ctx.model, a[:1], p, layers=layer, progress_bar=False)[0]
    gmat = grads.pivot_table(index="head", columns="position", values="value").to_numpy()
    return HeadResult(heads, evidence, stand_in, gmat, np.asarray(att), a[0, :p].cpu())


def render(ctx: RunContext, r: HeadResult) -> str:
    from ...plots import head_token_heatmaps, token_labels

    if r.stand_in:
        ctx.notes.append("memorization head: without MPs the two halves of the NMPs stand in for MP/NMP")
    ctx.table("head", r.heads, "memorization_heads")
    name = fmt_head(r.layer, r.head)
    labels = token_labels(ctx.model, r.prefix.tolist()) if getattr(ctx.model, "tokenizer", None) else None
    fig = head_token_heatmaps({f"value-activation gradients, layer {r.layer}": r.gradients,
                               f"attention of the first decoded token, layer {r.layer}": r.attention},
                              labels, title=f"Layer {r.layer}: gradients and attention per head; memorization head "
                                            f"{name} (Stoehr Fig. 6)")
    ctx.fig("head", fig, "fig6_memorization_head_layer")
    ctx.result.summary["memorization_head"] = name
    best, runner_up = r.heads.iloc[0], r.heads.iloc[1]
    ev = ", ".join(f"{k} rank {int(best[f'rank_{k}'])}" for k in r.evidence)
    return (f"memorization head (combined rank of {', '.join(r.evidence)} evidence): {name} ({ev}); its "
            f"value-gradient MP/NMP ratio {best.activation_ratio:.2f}, rare-token correlation {best.rare_corr:.2f}; "
            f"runner-up {fmt_head(runner_up.layer, runner_up['head'])}")


STAGE = Stage("head", "The memorization head: activation gradients and attention (Stoehr et al. Fig. 6)", compute,
              render, requires=("memorization",), uses=("contrastive",), skip=skip, settings=("batch_size",))
