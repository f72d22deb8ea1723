"""tune_del (Chang et al. A.7 dev-set selection) against a direct ablate + teacher-forced reference."""

from __future__ import annotations

import pytest
import torch

from memloc.ablation import ablate
from memloc.benchmarks import tune_del
from memloc.data import random_sequences
from memloc.metrics import teacher_forced


def block(model, tokens, prefix_len, *, start=0, width=1.0, progress_bar=True):
    """Scores whose top 10% per layer is the contiguous block start..start+102 (width scales them)."""
    base = -torch.arange(model.cfg.d_mlp, dtype=torch.float32) * width
    return torch.roll(base, start).expand(model.cfg.n_layers, -1).clone()


@pytest.fixture(scope="module")
def dev(tiny_paragraphs):
    t = tiny_paragraphs.table
    idx = t.index[t["em_ref"] >= 50].tolist()[:3]
    return tiny_paragraphs.tokens[idx], tiny_paragraphs.prefix_len


def reference_d_self_acc(model, tokens, prefix_len, start):
    acc0 = teacher_forced(model, tokens, prefix_len)["accuracy"]
    mask = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    k = round(0.1 * model.cfg.d_mlp)
    mask[1:, (torch.arange(k) + start) % model.cfg.d_mlp] = True  # bottom layer excluded
    with ablate(model, mask):
        acc = teacher_forced(model, tokens, prefix_len)["accuracy"]
    return float((acc - acc0).mean())  # the mask does not depend on the target: mean of the diagonal


def test_tune_del_matches_reference_and_picks_the_most_forgetting_point(tiny, dev, unchanged):
    tokens, p = dev
    grid = {"start": [0, 300, 700], "width": [1.0, 2.0]}
    with unchanged(tiny):
        res = tune_del(tiny, {"block": block}, grid, tokens, p, ratio=0.1,
                       random_tokens=random_sequences("tiny")[:2], progress_bar=False)
    assert res.method == "block"
    assert res.table[["start", "width"]].values.tolist() == [[0, 1.0], [0, 2.0], [300, 1.0], [300, 2.0],
                                                             [700, 1.0], [700, 2.0]]
    ref = {s: reference_d_self_acc(tiny, tokens, p, s) for s in grid["start"]}
    for _, row in res.table.iterrows():
        assert row["d_self_acc"] == pytest.approx(ref[int(row["start"])], abs=1e-9)
    best_start = min(ref, key=lambda s: (ref[s], grid["start"].index(s)))
    assert ref[best_start] < 0, "dropping 10% of the neurons per layer forgets something"
    assert res.best == {"start": best_start, "width": 1.0}  # width ties: the earlier grid point wins
    assert sorted(res.table["rank"]) == list(range(1, 7))
    assert res.table.loc[res.table["rank"] == 1, "start"].item() == best_start


def test_tune_del_bad_input(tiny, dev, unchanged):
    tokens, p = dev
    cases = [
        (dict(grid={"nope": [1]}), "nope"),
        (dict(grid={"start": []}), "non-empty list"),
        (dict(grid={}), "non-empty dict"),
        (dict(grid={"start": [0]}, base_kwargs={"start": 1}), "both set"),
        (dict(grid={"start": [0]}, ratio=0.0), "ratio"),
        (dict(grid={"start": [0]}, tokens=tokens[:1]), "at least 2"),
        (dict(grid={"start": [0]}, prefix_len=tokens.shape[1]), "prefix_len"),
    ]
    with unchanged(tiny):
        for extra, match in cases:
            kw = dict(tokens=tokens, prefix_len=p, grid={"start": [0]})
            kw.update(extra)
            with pytest.raises(ValueError, match=match):
                tune_del(tiny, {"block": block}, progress_bar=False, **kw)
        with pytest.raises(ValueError, match="exactly one"):
            tune_del(tiny, {"a": block, "b": block}, {"start": [0]}, tokens, p, progress_bar=False)


def test_tune_del_restores_the_model_when_a_method_fails(tiny, dev, unchanged):
    tokens, p = dev

    def failing(model, tokens, prefix_len, *, start=0):
        model.train()
        next(model.parameters()).requires_grad_(False)
        model.blocks[0].mlp.hook_post.add_hook(lambda act, hook: act)
        raise RuntimeError("method failed")

    with unchanged(tiny):
        with pytest.raises(RuntimeError, match="method failed"):
            tune_del(tiny, {"failing": failing}, {"start": [0, 1]}, tokens, p, progress_bar=False)
