"""``finetune``: sparse unlearning (CO↓) and editing into PMPs (CO↔) of the top 0.1 % vs random
0.1 % vs all weights (Stoehr Fig. 5).  Uses the PMPs of the perturbation stage as edit targets."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..._progress import progress
from ..context import RunContext
from ..runner import Inputs, Stage
from .contrastive import needs_both_groups


@dataclass(frozen=True)
class FinetuneResult:
    """Attributes:
        trajectories: EM/NLL per (objective, mask, step, split) (:func:`memloc.contrastive.sparse_finetune`).
        masks: the masks compared; ``fraction`` the fraction of weights trained (top/random); ``T`` the continuation length.
    """

    trajectories: pd.DataFrame
    masks: tuple
    fraction: float
    T: int

    def final(self, objective: str, mask: str, split: str = "memorized") -> pd.DataFrame:
        df = self.trajectories
        last = df[df["step"] == df["step"].max()]
        return last[(last.objective == objective) & (last["mask"] == mask) & (last.split == split)]

    def first(self, objective: str, mask: str, split: str = "memorized") -> pd.DataFrame:
        df = self.trajectories
        d0 = df[df["step"] == 0]
        return d0[(d0.objective == objective) & (d0["mask"] == mask) & (d0.split == split)]


def compute(ctx: RunContext, inputs: Inputs) -> FinetuneResult:
    from ...contrastive import sparse_finetune
    from ...metrics import greedy_continuation

    s, mem = ctx.settings, inputs["memorization"]
    mp, nmp = ctx.device_tokens(mem.mp[:s.n_finetune]), ctx.device_tokens(mem.nmp)
    pmps = getattr(inputs.get("perturbation"), "pmps", None)
    jobs = [("unlearn", m, mp, None) for m in s.finetune_masks]
    if pmps is not None and len(pmps) > 0:
        n_edit = min(len(pmps), s.n_finetune)
        edit_mp = ctx.device_tokens(pmps.original[:n_edit])
        targets = ctx.device_tokens(pmps.perturbed[:n_edit, mem.prefix_len:])
        jobs += [("edit", m, edit_mp, targets) for m in s.finetune_masks]
    # the NMPs' greedy continuation is the same for every variant: decode it once (exact)
    nmp_cont = greedy_continuation(ctx.model, nmp, mem.prefix_len, batch_size=s.batch_size)
    frames = []
    for objective, mask, x, tgt in progress(jobs, enabled=ctx.progress_bar, desc="sparse fine-tuning",
                                            total=len(jobs)):
        frames.append(sparse_finetune(ctx.model, x, nmp, mem.prefix_len, objective=objective, mask=mask,
                                      fraction=s.finetune_fraction, steps=s.finetune_steps, lr=s.finetune_lr, seed=0,
                                      edit_targets=tgt, batch_size=s.batch_size, progress_bar=False,
                                      non_memorized_continuation=nmp_cont))
    return FinetuneResult(pd.concat(frames, ignore_index=True), tuple(s.finetune_masks), s.finetune_fraction, mem.T)


def _describe(r: FinetuneResult, objective: str, mask: str) -> str | None:
    d, d0 = r.final(objective, mask), r.first(objective, mask)
    if d.empty:
        return None
    n, n0 = r.final(objective, mask, "non-memorized"), r.first(objective, mask, "non-memorized")
    nmp_label = "NMP EM (vs. their original continuation)" if objective == "unlearn" and mask == r.masks[0] else "NMP EM"
    txt = (f"{objective}/{mask}: MP EM {d0['em'].mean():.0f}→{d['em'].mean():.1f}, {nmp_label} "
           f"{n0['em'].mean():.0f}→{n['em'].mean():.1f}")
    if objective == "edit" and "edit_em" in d:
        txt += f", edit-target EM {d0['edit_em'].mean():.1f}→{d['edit_em'].mean():.1f}"
    return txt


def render(ctx: RunContext, r: FinetuneResult) -> str:
    from ...plots import finetune_trajectories

    df = r.trajectories
    ctx.table("finetune", df, "sparse_finetune")
    ctx.fig("finetune", finetune_trajectories(df), "fig5_sparse_unlearning_editing")
    parts = [p for o in ("unlearn", "edit") for m in r.masks if (p := _describe(r, o, m)) is not None]
    summary = []
    for mask in r.masks:
        u, e = r.final("unlearn", mask), r.final("edit", mask)
        txt = f"{mask}: unlearning leaves MP EM {u['em'].mean():.1f}/{r.T}" if not u.empty else f"{mask}:"
        if not e.empty and "edit_em" in e:
            txt += f", editing reaches edit-target EM {e['edit_em'].mean():.1f}/{r.T}"
        summary.append(txt)
    ctx.result.summary["unlearn_vs_edit"] = "; ".join(summary)
    return (f"after {int(df['step'].max())} Adam steps on {r.fraction:.1%} (top/random) or all weights: "
            + "; ".join(parts))


STAGE = Stage("finetune", "Sparse unlearning and editing (Stoehr et al. Fig. 5)", compute, render,
              requires=("memorization",), uses=("perturbation",), skip=needs_both_groups,
              settings=("n_finetune", "finetune_steps", "finetune_fraction", "finetune_lr", "finetune_masks",
                        "batch_size"))
