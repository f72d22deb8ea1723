"""``memorization``: EM and NLL of every paragraph and the MP/NMP split (Stoehr §3.2, Fig. 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ...data import select_groups, subset_evenly
from ..context import RunContext
from ..runner import Inputs, Stage


@dataclass(frozen=True)
class MemorizationResult:
    """The scored paragraphs and the groups every later stage draws from.

    Attributes:
        table: one row per scored paragraph: ``em``, ``nll``, ..., ``id``, ``split``.
        tokens: Int[Tensor, "n seq"] the scored paragraphs (CPU), rows aligned with ``table``.
        prefix_len: prefix length; ``non_memorized_max_em`` the NMP threshold.
        mp_rows, nmp_rows: rows of up to ``n_mp`` MPs and ``n_nmp`` NMPs (evenly spaced).
    """

    table: pd.DataFrame
    tokens: Tensor
    prefix_len: int
    non_memorized_max_em: int
    mp_rows: np.ndarray
    nmp_rows: np.ndarray

    @property
    def T(self) -> int:
        return int(self.tokens.shape[1] - self.prefix_len)

    @property
    def mp(self) -> Tensor:
        return self.tokens[torch.as_tensor(self.mp_rows, dtype=torch.long)]

    @property
    def nmp(self) -> Tensor:
        return self.tokens[torch.as_tensor(self.nmp_rows, dtype=torch.long)]

    def count(self, split: str) -> int:
        return int((self.table["split"] == split).sum())


def skip(ctx: RunContext, inputs: Inputs) -> str | None:
    if ctx.paragraphs is None:
        return (f"no paragraphs: no bundled paragraph set fits this model's vocabulary ({int(ctx.model.cfg.d_vocab)} "
                "tokens); pass paragraphs=")
    return None


def needs_a_group(ctx: RunContext, inputs: Inputs) -> str | None:
    """Skip rule of the stages that run on MPs, NMPs or both."""
    mem = inputs["memorization"]
    return "no memorized or non-memorized paragraphs" if not len(mem.mp_rows) and not len(mem.nmp_rows) else None


def compute(ctx: RunContext, inputs: Inputs) -> MemorizationResult:
    from ...metrics import memorization, split_memorization

    s, ps = ctx.settings, ctx.paragraphs
    sub = ps.subset(torch.as_tensor(subset_evenly(len(ps), s.max_paragraphs)))
    counts = sub.table["count"].to_numpy() if "count" in sub.table and sub.table["count"].notna().all() else None
    df = memorization(ctx.model, ctx.device_tokens(sub.tokens), sub.prefix_len, counts=counts,
                      batch_size=s.batch_size, progress_bar=ctx.progress_bar)
    df["id"] = sub.table["id"].to_numpy()
    for col in ("set", "seen"):
        if col in sub.table:
            df[col] = sub.table[col].to_numpy()
    T = sub.tokens.shape[1] - sub.prefix_len
    df["split"] = split_memorization(df, memorized_min_em=T, non_memorized_max_em=ctx.non_memorized_max_em)
    mp_rows, nmp_rows = select_groups(df, s.n_mp, s.n_nmp)
    return MemorizationResult(df, sub.tokens.cpu(), sub.prefix_len, ctx.non_memorized_max_em, mp_rows, nmp_rows)


def render(ctx: RunContext, r: MemorizationResult) -> str:
    from ...plots import memorization_scatter

    df = r.table
    ctx.table("memorization", df, "memorization")
    ctx.fig("memorization", memorization_scatter(df), "fig2_memorization_split")
    if "count" in df:
        ctx.fig("memorization", memorization_scatter(df, color="count"), "fig2_memorization_by_count")
    n = {sp: r.count(sp) for sp in ("memorized", "non-memorized", "partial")}
    ctx.result.summary.update(n_paragraphs=len(df), n_mp=n["memorized"], n_nmp=n["non-memorized"],
                              n_partial=n["partial"])
    if not len(r.mp_rows):
        ctx.notes.append("no paragraph is memorized (EM = T) by this model: the stages that need memorized "
                         "paragraphs are skipped and the others run on the non-memorized ones")
    if not len(r.nmp_rows):
        ctx.notes.append("no paragraph is non-memorized by this model: NMP-dependent stages are skipped")
    msg = (f"{len(df)} paragraphs: {n['memorized']} memorized (EM = {r.T}), {n['non-memorized']} "
           f"non-memorized (EM <= {r.non_memorized_max_em}), {n['partial']} partial; mean NLL "
           + " vs ".join(f"{df.loc[df.split == sp, 'nll'].mean():.3f} ({lab})"
                         for sp, lab in (("memorized", "MP"), ("non-memorized", "NMP")) if n[sp]))
    if "count" in df and (df["count"] > 0).sum() > 2:
        seen = df[df["count"] > 0]
        rho = seen[["em", "count"]].corr(method="spearman").iloc[0, 1]
        msg += f"; Spearman(EM, duplication count) = {rho:.2f} over the {len(seen)} seen paragraphs"
    return msg


STAGE = Stage("memorization", "Memorized vs non-memorized paragraphs (Stoehr et al. Fig. 2)", compute, render,
              skip=skip, settings=("max_paragraphs", "batch_size", "n_mp", "n_nmp"))
