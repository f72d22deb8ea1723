"""The claims ledger (memloc.reproduce.claims): each verdict rule on hand-made stage results
(holds / does not hold / not applicable), the CSV round trip and compare_claims."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from memloc.reproduce import claims as C
from memloc.reproduce.stages.contrastive import ContrastiveResult
from memloc.reproduce.stages.finetune import FinetuneResult
from memloc.reproduce.stages.gradients import GradientsResult
from memloc.reproduce.stages.patching import PatchingResult
from memloc.reproduce.stages.perturbation import PerturbationStageResult
from memloc.reproduce.stages.rare_tokens import RareTokensResult


def verdict(results, claim_id, n_layers=4, skipped=None):
    row = C.claims_ledger(results, skipped, n_layers=n_layers).set_index("id").loc[claim_id]
    return row.verdict, row


def perturbation(mp, nmp):
    by_pos = pd.DataFrame({"group": ["memorized"] * 2 + ["non-memorized"] * 2, "position": [0, 1] * 2,
                           "mean": [mp, mp, nmp, nmp]})
    return PerturbationStageResult(None, [], by_pos, torch.zeros(1, 2, dtype=torch.long), None)


def test_perturbation_rule():
    assert verdict({"perturbation": perturbation(3.8, 37.2)}, "perturbation_robust")[0] == C.HOLDS
    assert verdict({"perturbation": perturbation(30.0, 37.2)}, "perturbation_robust")[0] == C.DOES_NOT_HOLD
    v, row = verdict({"perturbation": perturbation(3.0, 0.0)}, "perturbation_robust")
    assert v == C.NOT_APPLICABLE and "NMP" in row.reason
    v, row = verdict({}, "perturbation_robust", skipped={"perturbation": "no memorized paragraphs"})
    assert v == C.NOT_APPLICABLE and row.reason == "the perturbation stage did not run: no memorized paragraphs"


def gradients(mp_shares, nmp_shares, bin_shares=None):
    """Per-layer shares -> a split table (and EM-bin table) with those summed shares."""
    rows = [{"group": g, "layer": l, "value": v} for g, sh in (("MP", mp_shares), ("NMP", nmp_shares))
            for l, v in enumerate(sh)]
    bins = [{"group": b, "layer": l, "value": v} for b, sh in (bin_shares or {}).items() for l, v in enumerate(sh)]
    return GradientsResult(pd.DataFrame(rows), pd.DataFrame(bins, columns=["group", "layer", "value"]), None)


def test_lower_layer_share_rule_uses_shares_not_magnitudes():
    # the embedded model's run in the issue: MP layer-0 share 0.53 vs NMP 0.62 -> does not hold,
    # although NMP gradients are ~10x larger everywhere
    g = gradients([0.53, 0.21, 0.14, 0.12], [6.2, 1.7, 1.2, 0.9])
    v, row = verdict({"gradients": g}, "lower_layer_gradients")
    assert v == C.DOES_NOT_HOLD and "layer 0: 0.53 vs 0.62" in row.statistic
    assert math.isclose(row.value, 0.74 - 0.79, abs_tol=1e-9)
    g = gradients([6, 2, 1, 1], [0.3, 0.2, 0.3, 0.2])  # MP 0.8 of its gradient in L0-L1, NMP 0.5
    assert verdict({"gradients": g}, "lower_layer_gradients")[0] == C.HOLDS
    assert verdict({"gradients": gradients([1, 1], [])}, "lower_layer_gradients")[0] == C.NOT_APPLICABLE


def test_em_bins_smooth_rule():
    mp = nmp = [1, 1, 1, 1]
    smooth = {"0-10": [4, 4, 1, 1], "11-29": [5, 4, 1, 0], "30-49": [6, 3, 1, 0], "50": [7, 2, 1, 0]}
    flat = {b: [0.49, 0.2, 0.16, 0.15] for b in ("0-10", "11-29", "30-49", "50")}
    jumpy = {"0-10": [4, 4, 1, 1], "11-29": [9, 0.5, 0.5, 0], "30-49": [1, 1, 4, 4], "50": [9, 1, 0, 0]}
    assert verdict({"gradients": gradients(mp, nmp, smooth)}, "em_bins_smooth")[0] == C.HOLDS
    v, row = verdict({"gradients": gradients(mp, nmp, flat)}, "em_bins_smooth")
    assert v == C.DOES_NOT_HOLD and "no shift" in row.statistic
    v, row = verdict({"gradients": gradients(mp, nmp, jumpy)}, "em_bins_smooth")
    assert v == C.DOES_NOT_HOLD and "not monotone" in row.statistic
    two = {"0-10": [1, 1, 1, 1], "50": [3, 1, 1, 1]}
    assert verdict({"gradients": gradients(mp, nmp, two)}, "em_bins_smooth")[0] == C.NOT_APPLICABLE


def contrastive(layer, component):
    df = pd.DataFrame({"layer": [layer, 3], "component": [component, "W_in"], "head": [2, -1],
                       "label": [f"{component} H2", "W_in"], "value": [1.0, 0.5]})
    return ContrastiveResult(df)


def test_top_contrastive_rule():
    assert verdict({"contrastive": contrastive(1, "W_V")}, "top_contrastive_low_wv", n_layers=12)[0] == C.HOLDS
    assert verdict({"contrastive": contrastive(9, "W_V")}, "top_contrastive_low_wv", n_layers=12)[0] == \
        C.DOES_NOT_HOLD
    assert verdict({"contrastive": contrastive(0, "W_Q")}, "top_contrastive_low_wv")[0] == C.DOES_NOT_HOLD


def rare(r):
    corr = pd.DataFrame({"layer": [0, 1], "head": [6, 2], "correlation": [-0.3, r]})
    return RareTokensResult(pd.DataFrame(), corr, (1, 2), 10, "counts")


def test_head_rare_token_rule():
    head = SimpleNamespace(layer=1, head=2)
    assert verdict({"head": head, "rare_tokens": rare(-0.97)}, "head_attends_rare_tokens")[0] == C.HOLDS
    v, row = verdict({"head": head, "rare_tokens": rare(-0.2)}, "head_attends_rare_tokens")
    assert v == C.DOES_NOT_HOLD and row.statistic == "memorization head L1H2: r = -0.20"
    v, row = verdict({"rare_tokens": rare(-0.97)}, "head_attends_rare_tokens", skipped={"head": "why"})
    assert v == C.NOT_APPLICABLE and "head stage" in row.reason


def finetune(top_em, random_em, edit_em=None, T=50):
    rows = []
    for mask, em in (("top", top_em), ("random", random_em)):
        rows += [{"step": 0, "split": "memorized", "em": T, "objective": "unlearn", "mask": mask, "edit_em": np.nan},
                 {"step": 10, "split": "memorized", "em": em, "objective": "unlearn", "mask": mask, "edit_em": np.nan}]
        if edit_em is not None:
            rows += [{"step": 0, "split": "memorized", "em": T, "objective": "edit", "mask": mask, "edit_em": 2.0},
                     {"step": 10, "split": "memorized", "em": 10, "objective": "edit", "mask": mask,
                      "edit_em": edit_em}]
    return FinetuneResult(pd.DataFrame(rows), ("top", "random"), 0.001, T)


def test_unlearning_and_editing_rules():
    res = {"finetune": finetune(top_em=2.0, random_em=49.0, edit_em=12.0)}
    assert verdict(res, "sparse_unlearning_beats_random")[0] == C.HOLDS
    assert verdict(res, "editing_harder")[0] == C.HOLDS  # unlearned 96% vs edited 24%
    res = {"finetune": finetune(top_em=40.0, random_em=41.0, edit_em=48.0)}
    assert verdict(res, "sparse_unlearning_beats_random")[0] == C.DOES_NOT_HOLD
    assert verdict(res, "editing_harder")[0] == C.DOES_NOT_HOLD
    v, row = verdict({"finetune": finetune(2.0, 49.0)}, "editing_harder")
    assert v == C.NOT_APPLICABLE and "PMPs" in row.reason


def patching(layers):
    rows = [{"direction": d, "layer": l, "component": "attn_out", "head": -1, "value": 2.0} for d, l in layers.items()]
    rows += [{"direction": d, "layer": 3, "component": "mlp_out", "head": -1, "value": 0.1} for d in layers]
    return PatchingResult(pd.DataFrame(rows), 4)


def test_patching_rule():
    both = {"mp_to_pmp": 1, "pmp_to_mp": 1}
    assert verdict({"patching": patching(both), "contrastive": contrastive(1, "W_V")},
                   "patching_same_low_layer")[0] == C.HOLDS
    assert verdict({"patching": patching({"mp_to_pmp": 1, "pmp_to_mp": 0}), "contrastive": contrastive(1, "W_V")},
                   "patching_same_low_layer")[0] == C.DOES_NOT_HOLD
    # without the contrastive stage the memorization head's layer is the reference
    assert verdict({"patching": patching(both), "head": SimpleNamespace(layer=1, head=0)},
                   "patching_same_low_layer")[0] == C.HOLDS
    assert verdict({"patching": patching(both)}, "patching_same_low_layer")[0] == C.NOT_APPLICABLE


def inj(**recall):
    return SimpleNamespace(recall=lambda: pd.Series(recall, dtype=float).sort_values(ascending=False))


def dele(self_acc, neg_acc):
    cols = {"ΔSelf-Acc %": pd.Series(self_acc, dtype=float), "ΔNeg-Acc %": pd.Series(neg_acc, dtype=float)}
    return SimpleNamespace(column=lambda name, ratio=None: cols[name])


def test_chang_rules():
    paper = inj(hard_concrete=85, slimming=80, zero_out=50, ig=48, activations=30, random=2)
    res = {"inj": paper}
    assert verdict(res, "inj_above_random")[0] == C.HOLDS
    v, row = verdict(res, "inj_ranking")
    assert v == C.HOLDS and row.statistic.startswith("Recall@r x100: hard_concrete 85.0 > slimming 80.0")
    res = {"inj": inj(hard_concrete=40, slimming=80, zero_out=50, activations=30, random=25)}
    assert verdict(res, "inj_above_random")[0] == C.DOES_NOT_HOLD  # activations 30 < 2 x 25
    assert verdict(res, "inj_ranking")[0] == C.DOES_NOT_HOLD  # hard_concrete below zero_out
    assert verdict({"inj": inj(hard_concrete=80, zero_out=50)}, "inj_above_random")[0] == C.NOT_APPLICABLE
    assert verdict({"inj": inj(activations=3, random=1)}, "inj_ranking")[0] == C.NOT_APPLICABLE
    # DEL: Table 3 of GPT2-XL at 0.5 %
    table3 = dele({"hard_concrete": -57.1, "slimming": -57.8, "zero_out": -46.1, "integrated_gradients": -40.8,
                   "activations": -29.5, "random": -0.5},
                  {"hard_concrete": -4.8, "slimming": -6.4, "zero_out": -4.8, "integrated_gradients": -3.4,
                   "activations": -4.7, "random": -0.5})
    res = {"del": table3}
    assert verdict(res, "del_above_random")[0] == C.HOLDS
    assert verdict(res, "del_ranking")[0] == C.HOLDS  # slimming 57.8 vs hard_concrete 57.1: same tier
    v, row = verdict(res, "not_sequence_specific")
    assert v == C.HOLDS and row.statistic.startswith("slimming: ΔNeg-Acc -6.4% vs ΔSelf-Acc -57.8%")
    assert math.isclose(row.value, 6.4 / 57.8)
    specific = dele({"hard_concrete": -50.0, "activations": -60.0, "random": -0.1},
                    {"hard_concrete": -0.5, "activations": -1.0, "random": 0.0})
    assert verdict({"del": specific}, "not_sequence_specific")[0] == C.DOES_NOT_HOLD
    assert verdict({"del": specific}, "del_ranking")[0] == C.DOES_NOT_HOLD
    nothing = dele({"hard_concrete": -0.2, "random": 0.0}, {"hard_concrete": 0.0, "random": 0.0})
    v, row = verdict({"del": nothing}, "not_sequence_specific")
    assert v == C.NOT_APPLICABLE and "forgets" in row.reason
    assert verdict({"del": nothing}, "del_above_random")[0] == C.DOES_NOT_HOLD


def test_every_claim_is_listed_once_and_csv_round_trips(tmp_path):
    ids = [c.id for c in C.CLAIMS]
    assert len(ids) == len(set(ids)) >= 13
    a = C.claims_ledger({"perturbation": perturbation(3.8, 37.2)}, {"del": "not requested"}, n_layers=4)
    assert list(a.id) == ids and set(a.verdict) == {C.HOLDS, C.NOT_APPLICABLE}
    (tmp_path / "a").mkdir()
    C.write_claims(a, tmp_path / "a" / "claims.csv")
    b = a.copy()
    b.loc[0, ["value", "verdict"]] = [0.9, C.DOES_NOT_HOLD]
    C.write_claims(b, tmp_path / "b.csv")
    table = C.compare_claims({"tiny": tmp_path / "a", "other": tmp_path / "b.csv"})
    assert list(table.index) == ids
    assert table.loc["perturbation_robust", "tiny verdict"] == C.HOLDS
    assert table.loc["perturbation_robust", "other verdict"] == C.DOES_NOT_HOLD
    assert math.isclose(table.loc["perturbation_robust", "tiny value"], 3.8 / 37.2, rel_tol=1e-5)
    assert C.compare_claims([tmp_path / "a"]).columns.tolist() == ["paper", "claim", "paper_value", "a value",
                                                                  "a verdict"]
    with pytest.raises(ValueError, match="paths"):
        C.compare_claims([tmp_path / "missing"])
    a.loc[1, ["statistic", "verdict"]] = ["share of max-|grad|", C.HOLDS]
    md = "\n".join(C.claims_markdown(a))
    assert "| share of max-\\|grad\\| |" in md  # a pipe inside a cell is escaped
    assert md.count("\n| ") == len(ids) + 2 and "**not applicable** (the del stage did not run: not requested)" in md
