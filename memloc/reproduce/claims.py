"""The claims ledger: each headline claim of both papers, the statistic measured in this run, the
paper's value and a verdict computed by an explicit rule (never written by hand).

Verdicts: ``holds``, ``does not hold``, or ``not applicable`` (with the reason: a stage did not
run, or the run lacks what the claim compares, e.g. no RANDOM baseline).  Each rule's thresholds
are the module constants below; :data:`CLAIMS` lists the claims with their rules in words.
:func:`claims_ledger` evaluates them on stage results, :func:`write_claims` writes ``claims.csv``
and :func:`compare_claims` puts several runs' ledgers side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ._format import fmt_head, ranking

__all__ = ["Claim", "Measurement", "NotApplicable", "CLAIMS", "claims_ledger", "write_claims", "claims_markdown",
           "compare_claims", "HOLDS", "DOES_NOT_HOLD", "NOT_APPLICABLE"]

HOLDS, DOES_NOT_HOLD, NOT_APPLICABLE = "holds", "does not hold", "not applicable"

#: MPs are "more robust" when their mean EM drop per perturbed token is at most this share of the NMPs'.
ROBUST_RATIO = 0.5
#: "Relatively more gradient in lower layers": the MP share of the lower half of the layers exceeds the
#: NMP share by at least this much (shares of each group's summed max-|grad| score).
SHARE_MARGIN = 0.02
#: "Smooth shift across EM bins": the lower-half share moves monotonically with EM (reversals up to
#: SMOOTH_TOLERANCE allowed) and by at least MIN_SHIFT from the lowest to the highest bin.
SMOOTH_TOLERANCE, MIN_SHIFT = 0.01, 0.02
#: The memorization head "attends to rare tokens": Pearson r(attention, frequency rank) at most this
#: (a uniform head scores about -0.17 on the embedded model, see memloc.heads.rare_token_correlation).
RARE_R = -0.5
#: Top-k unlearning "beats" random: its MP EM drop exceeds random's by at least this share of T.
UNLEARN_MARGIN = 0.05
#: Editing is "harder": edit-target EM / T is below unlearning's (1 - MP EM / T) by at least this.
EDIT_MARGIN = 0.05
#: "Far above RANDOM": at least FAR_FACTOR times RANDOM's effect and at least the margin above it
#: (INJ: Recall x100 points; DEL: ΔSelf-Acc percentage points).
FAR_FACTOR, INJ_FAR_MARGIN, DEL_FAR_MARGIN = 2.0, 10.0, 5.0
#: Ranking tiers of Chang et al. (Tables 2 and 3): a higher tier's every method is at least as good
#: as a lower tier's every method, up to RANK_TOLERANCE points.
TIERS = (("hard_concrete", "slimming"), ("zero_out", "integrated_gradients"), ("activations",))
RANK_TOLERANCE = 1.0
#: "Not sequence-specific": the best DEL method's ΔNeg-Acc is at least this share of its ΔSelf-Acc
#: (the paper: 0.08 on GPT2-XL to 0.25 on Pythia 6.9B at 0.5 %); not applicable when |ΔSelf-Acc| < 1 point.
NEG_SHARE = 0.05

_ALIASES = {"ig": "integrated_gradients"}


class NotApplicable(Exception):
    """Raised by a claim's evaluation when the run cannot test it (the message is the reason)."""


@dataclass(frozen=True)
class Measurement:
    """What a claim's evaluation measured: ``statistic`` in words with its numbers, ``value`` the
    headline number (for comparing models), ``holds`` the verdict of the rule."""

    statistic: str
    value: float | int
    holds: bool | np.bool_

    def __post_init__(self) -> None:  # plain Python types whatever the rule computed with
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "holds", bool(self.holds))


@dataclass(frozen=True)
class Claim:
    """One headline claim: ``needs`` the stages whose results ``evaluate(results, n_layers)`` reads."""

    id: str
    paper: str
    text: str
    paper_value: str
    rule: str
    needs: tuple[str, ...]
    evaluate: Callable[[Mapping[str, Any], int], Measurement]


def _lower(n_layers: int) -> list[int]:
    """The lower half of the layers (at least layer 0)."""
    return list(range(max(1, n_layers // 2)))


# ------------------------------------------------------------------------------------ Stoehr et al.

def _perturbation(res: Mapping[str, Any], n_layers: int) -> Measurement:
    mean = res["perturbation"].by_position.groupby("group")["mean"].mean()
    if not {"memorized", "non-memorized"} <= set(mean.index):
        raise NotApplicable("needs both MPs and NMPs among the perturbed paragraphs")
    mp, nmp = float(mean["memorized"]), float(mean["non-memorized"])
    if nmp <= 0:
        raise NotApplicable("no perturbation changes an NMP continuation")
    return Measurement(f"mean EM drop per perturbed prefix token: MP {mp:.1f} vs NMP {nmp:.1f}", mp / nmp,
                       mp <= ROBUST_RATIO * nmp)


def _share_frame(df: pd.DataFrame, n_layers: int) -> pd.Series:
    lay = df.groupby(["group", "layer"])["value"].sum().unstack("layer")
    shares = lay.div(lay.sum(axis=1), axis=0)
    return shares[[c for c in shares.columns if c in _lower(n_layers)]].sum(axis=1)


def _lower_layer_share(res: Mapping[str, Any], n_layers: int) -> Measurement:
    g = res["gradients"]
    if not {"MP", "NMP"} <= set(g.split["group"]):
        raise NotApplicable("needs both MPs and NMPs")
    lower = _share_frame(g.split, n_layers)
    layer0 = g.layer_shares()[0]
    span = f"L0–L{_lower(n_layers)[-1]}" if len(_lower(n_layers)) > 1 else "L0"
    diff = float(lower["MP"] - lower["NMP"])
    return Measurement(f"share of the summed max-|grad| in {span}: MP {lower['MP']:.2f} vs NMP {lower['NMP']:.2f} "
                       f"(layer 0: {layer0['MP']:.2f} vs {layer0['NMP']:.2f})", diff, diff >= SHARE_MARGIN)


def _em_bins_smooth(res: Mapping[str, Any], n_layers: int) -> Measurement:
    g = res["gradients"]
    order = g.bin_order()
    if len(order) < 3:
        raise NotApplicable(f"needs at least 3 EM bins, the run has {len(order)}")
    seq = _share_frame(g.bins, n_layers).reindex(order).to_numpy()
    shift = float(seq[-1] - seq[0])
    steps = np.diff(seq) * (1 if shift >= 0 else -1)
    monotone = bool((steps >= -SMOOTH_TOLERANCE).all())
    text = "lower-half share of summed |grad| by EM bin: " + ", ".join(f"{b} {v:.2f}" for b, v in zip(order, seq))
    return Measurement(text + ("" if monotone else " (not monotone)") + ("" if abs(shift) >= MIN_SHIFT else
                                                                           " (no shift)"),
                       shift, monotone and abs(shift) >= MIN_SHIFT)


def _top_contrastive(res: Mapping[str, Any], n_layers: int) -> Measurement:
    from .stages.contrastive import component_name

    top = res["contrastive"].top(1).iloc[0]
    layer = int(top.layer)
    return Measurement(f"top component: {component_name(top)}", float(layer),
                       top.component == "W_V" and layer in _lower(n_layers))


def _rare_head(res: Mapping[str, Any], n_layers: int) -> Measurement:
    head, rare = res["head"], res["rare_tokens"]
    r = rare.correlation_of(head.layer, head.head)
    return Measurement(f"memorization head {fmt_head(head.layer, head.head)}: r = {r:.2f}", r, r <= RARE_R)


def _unlearning(res: Mapping[str, Any], n_layers: int) -> Measurement:
    f = res["finetune"]
    if not {"top", "random"} <= set(f.masks):
        raise NotApplicable("needs the top and random masks")
    em0 = f.first("unlearn", "top")["em"].mean()
    top, rnd = f.final("unlearn", "top")["em"].mean(), f.final("unlearn", "random")["em"].mean()
    gain = float((em0 - top) - (em0 - rnd))
    return Measurement(f"MP EM after unlearning {f.fraction:.1%} of the weights: top {em0:.0f}→{top:.1f}, random "
                       f"{em0:.0f}→{rnd:.1f}", gain, gain >= UNLEARN_MARGIN * f.T)


def _editing(res: Mapping[str, Any], n_layers: int) -> Measurement:
    f = res["finetune"]
    e = f.final("edit", "top")
    if e.empty or "edit_em" not in e or e["edit_em"].isna().all():
        raise NotApplicable("no PMPs to edit into (the perturbation stage built none)")
    unlearned = 1 - f.final("unlearn", "top")["em"].mean() / f.T
    edited = e["edit_em"].mean() / f.T
    return Measurement(f"top mask: unlearning removes {unlearned:.0%} of the MP continuation, editing reaches "
                       f"{edited:.0%} of the edit target", float(unlearned - edited), edited <= unlearned - EDIT_MARGIN)


def _patching(res: Mapping[str, Any], n_layers: int) -> Measurement:
    if "contrastive" in res:
        ref, name = int(res["contrastive"].top(1).iloc[0].layer), "the top contrastive component"
    elif "head" in res:
        ref, name = res["head"].layer, "the memorization head"
    else:
        raise NotApplicable("needs the contrastive or head stage for the layer to compare with")
    top = res["patching"].top()
    sites = "; ".join(f"{d}: L{layer} {comp}{'' if head < 0 else f' H{head}'}"
                      for d, (layer, comp, head, _) in top.items())
    same = all(layer == ref for layer, _, _, _ in top.values())
    return Measurement(f"strongest patching sites {sites}; {name} is in L{ref}", float(ref),
                       same and ref in _lower(n_layers))


# ------------------------------------------------------------------------------------ Chang et al.

def _canonical(s: pd.Series) -> pd.Series:
    return s.rename(index=lambda m: _ALIASES.get(str(m), str(m)))


def _inj_recall(res: Mapping[str, Any]) -> pd.Series:
    return _canonical(res["inj"].recall())


def _del_effect(res: Mapping[str, Any]) -> pd.Series:
    return -_canonical(res["del"].column("ΔSelf-Acc %"))  # forgetting, in points (larger = stronger)


def _far_above(values: pd.Series, margin: float, what: str) -> Measurement:
    if "random" not in values.index or len(values) < 2:
        raise NotApplicable("needs RANDOM and at least one method")
    base = float(values["random"])
    others = values.drop("random")
    worst = others.idxmin()
    ok = bool((others >= max(FAR_FACTOR * base, base + margin)).all())
    return Measurement(f"{what}: weakest method {worst} {others[worst]:.1f} vs RANDOM {base:.1f}",
                       float(others[worst] - base), ok)


def _tiers(values: pd.Series, what: str) -> Measurement:
    present = [[m for m in tier if m in values.index] for tier in TIERS]
    present = [t for t in present if t]
    if len(present) < 2:
        raise NotApplicable("needs methods from at least two tiers (HARD CONCRETE/SLIMMING, ZERO-OUT/IG, ACTIVATIONS)")
    gaps = [float(values[hi].min() - values[lo].max()) for hi, lo in zip(present, present[1:])]
    shown = values[[m for t in present for m in t]]
    return Measurement(f"{what}: " + ranking(shown, ascending=False, fmt="{:.1f}"), min(gaps),
                       min(gaps) >= -RANK_TOLERANCE)


def _neg_share(res: Mapping[str, Any], n_layers: int) -> Measurement:
    d = res["del"]
    self_acc = _canonical(d.column("ΔSelf-Acc %")).drop("random", errors="ignore")
    neg = _canonical(d.column("ΔNeg-Acc %"))
    best = self_acc.idxmin()
    if abs(self_acc[best]) < 1.0:
        raise NotApplicable(f"no method's dropout forgets the targets (best ΔSelf-Acc {self_acc[best]:+.1f}%)")
    share = float(neg[best] / self_acc[best])
    return Measurement(f"{best}: ΔNeg-Acc {neg[best]:+.1f}% vs ΔSelf-Acc {self_acc[best]:+.1f}% (ratio {share:.2f})",
                       share, share >= NEG_SHARE)


STOEHR, CHANG = "Stoehr et al. 2024", "Chang et al. 2024"

#: The ledger's claims, in report order.
CLAIMS: tuple[Claim, ...] = (
    Claim("perturbation_robust", STOEHR, "MPs are more robust to single-token prefix perturbation than NMPs (§4)",
          "MP continuations change far less (Fig. 3)", f"MP mean EM drop <= {ROBUST_RATIO} x the NMP mean",
          ("perturbation",), _perturbation),
    Claim("lower_layer_gradients", STOEHR, "MPs carry relatively more parameter gradient in lower layers (§5)",
          "MPs more in lower layers, NMPs in higher (Fig. 4)",
          f"MP share of the lower half of the layers >= NMP share + {SHARE_MARGIN}", ("gradients",),
          _lower_layer_share),
    Claim("em_bins_smooth", STOEHR, "The gradient pattern shifts smoothly across EM bins (Fig. 9)",
          "smooth change from NMP to MP", f"lower-half share monotone in EM (±{SMOOTH_TOLERANCE}) and moves >= "
          f"{MIN_SHIFT}", ("gradients",), _em_bins_smooth),
    Claim("top_contrastive_low_wv", STOEHR, "The top contrastive component is a low-layer value matrix W_V (§5.2)",
          "L1 W_V head 2 (of 12 layers)", "top component is W_V in the lower half of the layers", ("contrastive",),
          _top_contrastive),
    Claim("head_attends_rare_tokens", STOEHR, "The memorization head attends to rare tokens (§6.3, Fig. 7)",
          "r = -0.97 (L1H2)", f"Pearson r(attention, frequency rank) of the head <= {RARE_R}",
          ("head", "rare_tokens"), _rare_head),
    Claim("sparse_unlearning_beats_random", STOEHR, "Unlearning the top-0.1% gradient weights beats random 0.1% "
          "(§5.3)", "top: MP EM 50 → ~0; random: no unlearning (Fig. 5 top)",
          f"top's MP EM drop >= random's + {UNLEARN_MARGIN} T", ("finetune",), _unlearning),
    Claim("editing_harder", STOEHR, "Editing MPs into PMPs is harder than unlearning them (§5.3)",
          "editing only partly succeeds (Fig. 5 bottom)", f"edit-target EM/T <= unlearned share - {EDIT_MARGIN}",
          ("finetune",), _editing),
    Claim("patching_same_low_layer", STOEHR, "Activation patching points at the same low layer (A.3, Fig. 11)",
          "layer 1, as the gradients", "every direction's strongest site is in the layer of the top contrastive "
          "component (else the head), in the lower half", ("patching",), _patching),
    Claim("inj_above_random", CHANG, "Every method is far above RANDOM on INJ (§5.1)", "all five ≫ RANDOM (Table 2)",
          f"each method's Recall >= max({FAR_FACTOR:g} x RANDOM, RANDOM + {INJ_FAR_MARGIN:g})", ("inj",),
          lambda res, n: _far_above(_inj_recall(res), INJ_FAR_MARGIN, "Recall@r x100")),
    Claim("del_above_random", CHANG, "Every method is far above RANDOM on DEL (§5.2)",
          "all five ≫ RANDOM (RANDOM ΔSelf-Acc -0.1 to -0.5%)",
          f"each method's -ΔSelf-Acc >= max({FAR_FACTOR:g} x RANDOM's, RANDOM's + {DEL_FAR_MARGIN:g} points)",
          ("del",), lambda res, n: _far_above(_del_effect(res), DEL_FAR_MARGIN, "-ΔSelf-Acc %")),
    Claim("inj_ranking", CHANG, "INJ ranking: HARD CONCRETE, SLIMMING > ZERO-OUT, IG > ACTIVATIONS (§5.1)",
          "HC 80+ Recall@0.5% on 3 of 4 LLMs; pruning methods best (Table 2)",
          f"every method of a higher tier >= every method of a lower tier - {RANK_TOLERANCE:g}", ("inj",),
          lambda res, n: _tiers(_inj_recall(res), "Recall@r x100")),
    Claim("del_ranking", CHANG, "DEL ΔSelf-Acc ranking: HARD CONCRETE, SLIMMING > ZERO-OUT, IG > ACTIVATIONS (§5.2)",
          "GPT2-XL 0.5%: -57.1, -57.8, -46.1, -40.8, -29.5 (Table 3)",
          f"every method of a higher tier forgets >= every method of a lower tier - {RANK_TOLERANCE:g} points",
          ("del",), lambda res, n: _tiers(_del_effect(res), "-ΔSelf-Acc %")),
    Claim("not_sequence_specific", CHANG, "Located neurons are not specific to one sequence (§5.2)",
          "ΔNeg/ΔSelf 0.08 (GPT2-XL) to 0.25 (Pythia 6.9B), HARD CONCRETE 0.5%",
          f"best method's ΔNeg-Acc / ΔSelf-Acc >= {NEG_SHARE}", ("del",), _neg_share),
)


def _evaluate(claim: Claim, results: Mapping[str, Any], skipped: Mapping[str, str], n_layers: int) -> dict:
    row = {"id": claim.id, "paper": claim.paper, "claim": claim.text, "paper_value": claim.paper_value,
           "rule": claim.rule, "statistic": "", "value": math.nan, "verdict": NOT_APPLICABLE, "reason": ""}
    missing = [s for s in claim.needs if s not in results]
    if missing:
        row["reason"] = f"the {missing[0]} stage did not run" + (f": {skipped[missing[0]]}" if missing[0] in skipped
                                                                  else "")
        return row
    try:
        m = claim.evaluate(results, n_layers)
    except NotApplicable as exc:
        row["reason"] = str(exc)
        return row
    row.update(statistic=m.statistic, value=m.value, verdict=HOLDS if m.holds else DOES_NOT_HOLD)
    return row


def claims_ledger(results: Mapping[str, Any], skipped: Mapping[str, str] | None = None, *,
                  n_layers: int) -> pd.DataFrame:
    """Evaluate :data:`CLAIMS` on stage results (``ReproduceResult.results``): one row per claim with
    ``id, paper, claim, paper_value, rule, statistic, value, verdict, reason``."""
    return pd.DataFrame([_evaluate(c, results, skipped or {}, n_layers) for c in CLAIMS])


def claims_markdown(ledger: pd.DataFrame) -> list[str]:
    """The ledger as the table that opens REPORT.md."""
    lines = ["## Claims ledger", "", "Each verdict is computed from this run's stage results by the rule in "
             "`claims.csv` (thresholds: `memloc.reproduce.claims`).", "",
             "| paper | claim | measured here | paper | verdict |", "| --- | --- | --- | --- | --- |"]
    def cell(text: str) -> str:  # a "|" inside a cell (|grad|) would split it
        return str(text).replace("|", "\\|")

    for r in ledger.itertuples():
        verdict = f"**{r.verdict}**" + (f" ({cell(r.reason)})" if r.reason else "")
        lines.append(f"| {r.paper.split(' ')[0]} | {cell(r.claim)} | {cell(r.statistic) if r.statistic else '—'} | "
                     f"{cell(r.paper_value)} | {verdict} |")
    return lines + [""]


def write_claims(ledger: pd.DataFrame, path: str | Path) -> Path:
    """Write the ledger as CSV (byte-stable float format)."""
    from .settings import CSV_FLOAT_FORMAT

    path = Path(path)
    ledger.to_csv(path, index=False, float_format=CSV_FLOAT_FORMAT)
    return path


def compare_claims(paths: Sequence[str | Path] | Mapping[str, str | Path]) -> pd.DataFrame:
    """Several runs' ledgers in one table: one row per claim, ``<run> value`` and ``<run> verdict``
    columns per run.  ``paths``: ``claims.csv`` files or the output directories holding them, as a
    list (runs named by their directory) or a mapping run name -> path."""
    items = paths.items() if isinstance(paths, Mapping) else [(None, p) for p in paths]
    if not items:
        raise ValueError("paths is empty; pass claims.csv files or reproduce output directories")
    out, order = None, []
    for name, p in items:
        p = Path(p)
        p = p / "claims.csv" if p.is_dir() else p
        if not p.exists():
            raise ValueError(f"paths: {p} does not exist (expected a claims.csv or a directory with one)")
        name = name or p.parent.name
        df = pd.read_csv(p, keep_default_na=False, na_values=[""])
        part = df.set_index("id")[["value", "verdict"]].rename(columns=lambda c: f"{name} {c}")
        base = df.set_index("id")[["paper", "claim", "paper_value"]]
        order += [i for i in df["id"] if i not in order]
        out = base.join(part) if out is None else out.combine_first(base).join(part, how="outer")
    return out.reindex(order)
