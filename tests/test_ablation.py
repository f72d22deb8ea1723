"""Neuron selection with partial (NaN) score maps and the README's localize -> select -> ablate composition."""

from __future__ import annotations

import math

import pytest
import torch

from memloc.ablation import ablate, n_selected, select_top_k

torch.set_num_threads(1)
nan = math.nan
#: Measured on the README example: accuracy 1.0 -> 0.86 (7 suffix tokens of 50), random 10%: 1.0.
README_MIN_DROP = 0.1


@pytest.fixture(scope="module")
def memorized(tiny_paragraphs):
    t = tiny_paragraphs.table
    idx = t.index[t["em_ref"] >= 50].tolist()[:1]
    return tiny_paragraphs.tokens[idx]


def _where(mask):
    return {l: mask[l].nonzero().flatten().tolist() for l in range(mask.shape[0]) if mask[l].any()}


def test_select_top_k_without_nan_hand_case():
    s = torch.tensor([[5.0, 1.0, 3.0, 3.0], [0.0, 2.0, 9.0, 1.0]])
    assert _where(select_top_k(s, 0.5)) == {0: [0, 2], 1: [1, 2]}  # tie 3.0/3.0 -> lower index
    assert _where(select_top_k(s, 0.25, per_layer=False)) == {0: [0], 1: [2]}
    assert _where(select_top_k(s, 0.5, exclude_layers=[1])) == {0: [0, 2]}


def test_select_top_k_partial_map_per_layer_hand_case():
    # layer 0 unscored, layer 1 scores 3 of 6 neurons, layer 2 fully scored
    s = torch.tensor([[nan] * 6,
                      [nan, 0.2, nan, 0.9, 0.5, nan],
                      [0.1, 0.6, 0.3, 0.8, 0.0, 0.7]])
    # ratio 0.5: layer 1 -> round(0.5 * 3) = 2 of its scored neurons (0.9 at 3, 0.5 at 4);
    # layer 2 -> round(0.5 * 6) = 3 (0.8, 0.7, 0.6); layer 0 (all NaN) -> nothing
    assert _where(select_top_k(s, 0.5)) == {1: [3, 4], 2: [1, 3, 5]}
    # ratio 0.1: at least one per scored layer
    assert _where(select_top_k(s, 0.1)) == {1: [3], 2: [3]}
    # ratio 1: every scored neuron, never an unscored one
    m = select_top_k(s, 1.0)
    assert torch.equal(m, ~torch.isnan(s))
    # excluding the partially scored layer leaves the full one
    assert _where(select_top_k(s, 0.5, exclude_layers=[2])) == {1: [3, 4]}


def test_select_top_k_partial_map_across_layers_hand_case():
    s = torch.tensor([[nan] * 4,
                      [nan, 0.2, nan, 0.9],
                      [0.1, 0.6, nan, nan]])
    # 4 scored neurons in all; ratio 0.5 -> top round(2) = 2 across layers: 0.9 (1,3), 0.6 (2,1)
    assert _where(select_top_k(s, 0.5, per_layer=False)) == {1: [3], 2: [1]}
    # excluding layer 1 leaves 2 scored neurons: round(0.5 * 2) = 1 -> (2,1)
    assert _where(select_top_k(s, 0.5, per_layer=False, exclude_layers=[1])) == {2: [1]}
    # only unscored layers left: nothing selected
    assert not select_top_k(s, 0.5, per_layer=False, exclude_layers=[1, 2]).any()
    assert not select_top_k(s, 0.5, exclude_layers=[1, 2]).any()


def test_select_top_k_all_nan_and_bad_input():
    with pytest.raises(ValueError, match="NaN everywhere"):
        select_top_k(torch.full((2, 3), nan), 0.5)
    with pytest.raises(ValueError, match="scores"):
        select_top_k(torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="ratio"):
        select_top_k(torch.zeros(2, 3), 1.5)
    assert n_selected(0.05, 64) == 3


def test_readme_composition_with_partial_zero_out_map(tiny, memorized, unchanged):
    """Issue 12 finding 6: ``zero_out(..., layers=[2], neurons=range(64))`` -> select_top_k -> ablate."""
    from memloc.localize import zero_out
    from memloc.metrics import teacher_forced

    x = memorized  # [1, 100]
    scores = zero_out(tiny, x, 50, layers=[2], neurons=range(64), progress_bar=False)
    assert torch.isnan(scores[[0, 1, 3]]).all() and torch.isnan(scores[2, 64:]).all()
    assert torch.isfinite(scores[2, :64]).all()
    mask = select_top_k(scores, 0.05, exclude_layers=[0])
    # round(0.05 * 64) = 3 neurons, the three highest-scored of the 64, all in layer 2
    top3 = torch.argsort(scores[2, :64], descending=True, stable=True)[:3].sort().values.tolist()
    assert _where(mask) == {2: top3}
    with unchanged(tiny):
        with ablate(tiny, mask):
            acc = teacher_forced(tiny, x, 50)["accuracy"]
    assert acc.shape == (1,) and 0 <= float(acc) <= 1


@pytest.mark.slow
def test_readme_headline_example_has_an_effect(tiny, tiny_paragraphs):
    """README Quick start: HARD CONCRETE with its defaults (masks above layer 0) on the first memorized
    paragraph, top 10% per layer above layer 0 dropped: the accuracy falls clearly, unlike for 10%
    random neurons."""
    from memloc.localize import METHODS
    from memloc.metrics import teacher_forced

    t = tiny_paragraphs.table
    x = tiny_paragraphs.tokens[t.index[t["em_ref"] >= 50].tolist()[:1]]
    before = float(teacher_forced(tiny, x, 50)["accuracy"][0])
    scores = METHODS["hard_concrete"](tiny, x, 50, start_layer=1, progress_bar=False)
    with ablate(tiny, select_top_k(scores, 0.1, exclude_layers=[0])):
        after = float(teacher_forced(tiny, x, 50)["accuracy"][0])
    rand = []
    for seed in range(3):
        with ablate(tiny, select_top_k(METHODS["random"](tiny, x, 50, seed=seed), 0.1, exclude_layers=[0])):
            rand.append(float(teacher_forced(tiny, x, 50)["accuracy"][0]))
    assert before == 1.0
    assert after <= before - README_MIN_DROP and after < min(rand) - README_MIN_DROP, (after, rand)
