"""``perturbation``: prefix-token perturbation of one MP (Stoehr Fig. 3 top) and MP vs NMP per
position (Fig. 3 bottom); builds the perturbed memorized paragraphs (PMPs) that fine-tuning
(editing) and activation patching use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..context import RunContext
from ..runner import Inputs, Stage
from .memorization import needs_a_group


@dataclass(frozen=True)
class PerturbationStageResult:
    """Attributes:
        profile: the :class:`memloc.perturb.PerturbationResult` of the MPs then the NMPs.
        labels: ``memorized`` / ``non-memorized`` per perturbed paragraph.
        by_position: mean EM drop per (group, position) (:func:`memloc.perturb.em_drop_by_position`).
        tokens: Int[Tensor, "n seq"] the perturbed paragraphs; ``first_mp_id`` the id of the MP of Fig. 3 top.
        pmps: the PMPs (:class:`memloc.perturb.PMPSet`), or None without MPs.
    """

    profile: Any
    labels: list
    by_position: pd.DataFrame
    tokens: Tensor
    first_mp_id: int | None
    pmps: Any = None

    @property
    def n_mp(self) -> int:
        return self.labels.count("memorized")


def _slice_result(res: Any, n: int) -> Any:
    """The PerturbationResult restricted to its first ``n`` paragraphs (the MPs)."""
    keep = lambda df: df[df["paragraph"] < n].reset_index(drop=True)  # noqa: E731
    return dataclasses.replace(res, samples=keep(res.samples), profile=keep(res.profile), clean=keep(res.clean),
                               clean_generation=res.clean_generation[:n], generations=res.generations[:n],
                               replacements=res.replacements[:n])


def compute(ctx: RunContext, inputs: Inputs) -> PerturbationStageResult:
    from ...perturb import em_drop_by_position, make_pmps, perturbation_profile

    s, mem = ctx.settings, inputs["memorization"]
    mp, nmp = mem.mp_rows[:s.n_perturb], mem.nmp_rows[:s.n_perturb]
    x = ctx.device_tokens(mem.tokens[torch.as_tensor(np.concatenate([mp, nmp]), dtype=torch.long)])
    res = perturbation_profile(ctx.model, x, mem.prefix_len, n_samples=s.perturb_samples, seed=0,
                               batch_size=s.batch_size, progress_bar=ctx.progress_bar)
    labels = ["memorized"] * len(mp) + ["non-memorized"] * len(nmp)
    pmps = None
    if len(mp):
        pmps = make_pmps(ctx.model, x[:len(mp)], mem.prefix_len, result=_slice_result(res, len(mp)),
                         progress_bar=False)
    return PerturbationStageResult(res, labels, em_drop_by_position(res.profile, labels), x.cpu(),
                                   int(mem.table.iloc[mp[0]]["id"]) if len(mp) else None, pmps)


def render(ctx: RunContext, r: PerturbationStageResult) -> str:
    from ...plots import perturbation_bars, perturbation_by_position, token_labels

    prof = r.profile.profile
    ctx.table("perturbation", prof.assign(group=prof["paragraph"].map(dict(enumerate(r.labels)))),
              "perturbation_profile")
    ctx.table("perturbation", r.by_position, "perturbation_by_position")
    ctx.fig("perturbation", perturbation_by_position(
        r.by_position, title="EM drop per perturbed prefix position, MP vs NMP (Stoehr Fig. 3 bottom)<br><sup>"
                             "EM against the model's own unperturbed continuation</sup>"), "fig3_perturbation_mp_vs_nmp")
    mean = r.by_position.groupby("group")["mean"].mean()
    msg = "mean EM drop per single-token perturbation: " + ", ".join(f"{g} {v:.1f}" for g, v in mean.items())
    if not r.n_mp:
        return msg
    prefix_len = r.profile.prefix_len
    prof0 = prof[prof["paragraph"] == 0]
    ids = r.tokens[0, :prefix_len].tolist()
    lab = token_labels(ctx.model, ids) if getattr(ctx.model, "tokenizer", None) is not None else None
    ctx.fig("perturbation", perturbation_bars(
        prof0, lab, title=f"Perturbing each prefix token of MP {r.first_mp_id} (Stoehr Fig. 3 top)"),
        "fig3_perturbation_one_mp")
    top = prof0.sort_values("em_drop_mean", ascending=False).iloc[0]
    tok = repr(lab[int(top.position)]) if lab else f"id {int(top.original_token)}"
    msg += (f"; in MP {r.first_mp_id} the most disruptive prefix token is position {int(top.position)} ({tok}, EM "
            f"drop {top.em_drop_mean:.0f}), and {(prof0.em_drop_mean > 0).sum()} of {len(prof0)} positions change "
            "the continuation")
    if r.pmps is not None and len(r.pmps):
        ctx.table("perturbation", r.pmps.table, "pmps")
        msg += f"; {len(r.pmps)} PMPs built (mean EM drop {r.pmps.em_drop.float().mean():.1f})"
    return msg


STAGE = Stage("perturbation", "Prefix-token perturbation (Stoehr et al. Fig. 3)", compute, render,
              requires=("memorization",), skip=needs_a_group, settings=("n_perturb", "perturb_samples", "batch_size"))
