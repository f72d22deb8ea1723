"""Prefix-token perturbation and PMPs (Stoehr et al. §4, Fig. 3, App. A.2)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from memloc import load_model
from memloc.perturb import (PerturbationResult, em_drop_by_position, make_pmps, perturbation_profile,
                            random_replacements)

PREFIX, SEQ = 10, 18


@pytest.fixture(scope="module")
def neo(random_model_dir):
    return load_model(random_model_dir("gpt-neo"))


def _tokens(model, n=2, seq=SEQ, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _ref_greedy(model, prefix, n_new):
    """One sequence at a time, no KV cache."""
    seq = prefix[None]
    for _ in range(n_new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prefix):]


@torch.no_grad()
def _ref_nll(model, x, prefix_len):
    return F.cross_entropy(model(x[None])[0, prefix_len - 1:-1], x[prefix_len:]).item()


def _em(a, b):
    n = 0
    for u, v in zip(a.tolist(), b.tolist()):
        if u != v:
            break
        n += 1
    return n


def test_random_replacements_seeded_and_never_original():
    orig = torch.tensor([[0, 5, 9], [9, 9, 1]])
    state = torch.get_rng_state()
    a = random_replacements(orig, 200, 10, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "global RNG used"
    assert torch.equal(a, random_replacements(orig, 200, 10, seed=3))
    assert not torch.equal(a, random_replacements(orig, 200, 10, seed=4))
    assert a.shape == (2, 3, 200) and a.min() >= 0 and a.max() < 10
    assert not (a == orig[..., None]).any()
    counts = torch.bincount(a[0, 1], minlength=10)          # every other id occurs
    assert counts[5] == 0 and (counts[torch.arange(10) != 5] > 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        random_replacements(orig, 2, 1)
    with pytest.raises(ValueError, match="n_samples"):
        random_replacements(orig, 0, 10)


def test_profile_matches_one_at_a_time_reference(neo, unchanged):
    x = _tokens(neo)
    positions = [0, 4, PREFIX - 1]
    with unchanged(neo):
        r = perturbation_profile(neo, x, PREFIX, n_samples=2, seed=1, positions=positions, batch_size=5,
                                 progress_bar=False)
    T = SEQ - PREFIX
    assert len(r.samples) == 2 * 3 * 2 and len(r.profile) == 2 * 3
    assert r.generations.shape == (2, 3, 2, T)
    for i in range(2):
        clean = _ref_greedy(neo, x[i, :PREFIX], T)
        assert torch.equal(r.clean_generation[i], clean)
        em_clean = _em(clean, x[i, PREFIX:])
        nll_clean = _ref_nll(neo, x[i], PREFIX)
        for row in r.samples[r.samples.paragraph == i].itertuples():
            assert row.original_token == x[i, row.position] != row.token
            xp = x[i].clone()
            xp[row.position] = row.token
            gen = _ref_greedy(neo, xp[:PREFIX], T)
            assert torch.equal(r.generations[i, positions.index(row.position), row.sample], gen)
            assert row.em == _em(gen, x[i, PREFIX:]) and row.em_clean == em_clean
            assert row.em_drop == em_clean - row.em
            assert row.em_drop_generation == T - _em(gen, clean)
            assert row.first_impacted == _em(gen, clean) and row.changed == (row.first_impacted < T)
            assert row.nll == pytest.approx(_ref_nll(neo, xp, PREFIX), rel=1e-4)
            assert row.nll_change == pytest.approx(row.nll - nll_clean, abs=1e-4)
    prof = r.profile.set_index(["paragraph", "position"])
    agg = r.samples.groupby(["paragraph", "position"]).em_drop
    np.testing.assert_allclose(prof.em_drop_mean, agg.mean())
    np.testing.assert_allclose(prof.em_drop_max, agg.max())


def test_profile_bad_input_and_exception_restores(neo, unchanged):
    x = _tokens(neo)
    with unchanged(neo):
        for kwargs, match in [(dict(n_samples=0), "n_samples"), (dict(seed="a"), "seed"),
                              (dict(positions=[PREFIX]), "positions"), (dict(positions=[1, 1]), "duplicates"),
                              (dict(positions=[]), "positions"), (dict(batch_size=-1), "batch_size"),
                              (dict(vocab_size=10 ** 9), "vocab_size")]:
            with pytest.raises(ValueError, match=match):
                perturbation_profile(neo, x, PREFIX, progress_bar=False, **kwargs)
        with pytest.raises(ValueError, match="prefix_len"):
            perturbation_profile(neo, x, 0, progress_bar=False)
        with pytest.raises(ValueError, match="2-D"):
            perturbation_profile(neo, x[0], PREFIX, progress_bar=False)
        with pytest.raises(ValueError, match="memorized_min_em"):
            make_pmps(neo, x, PREFIX, memorized_min_em=SEQ, progress_bar=False)

        def boom(act, hook):
            raise RuntimeError("boom")

        with neo.hooks(fwd_hooks=[("blocks.0.hook_resid_post", boom)]):
            with pytest.raises(RuntimeError, match="boom"):
                perturbation_profile(neo, x, PREFIX, positions=[0], progress_bar=False)


def test_make_pmps_on_random_model(neo, unchanged):
    x = _tokens(neo, n=3, seed=2)
    T = SEQ - PREFIX
    with unchanged(neo):
        r = perturbation_profile(neo, x, PREFIX, n_samples=2, positions=[2, 6, 9], progress_bar=False)
        p = make_pmps(neo, x, PREFIX, result=r, memorized_min_em=0, drop_unchanged=False)
    assert len(p) == 3 and p.perturbed.shape == p.original.shape == (3, SEQ)
    for k in range(3):
        i = int(p.table.paragraph[k])
        rows = r.samples[r.samples.paragraph == i]
        assert p.em_drop[k] == rows.em_drop.max()
        assert torch.equal(p.original[k], x[i])
        diff = (p.perturbed[k, :PREFIX] != x[i, :PREFIX]).nonzero().flatten().tolist()
        assert diff == [int(p.position[k])] and p.perturbed[k, p.position[k]] == p.token[k]
        assert p.original_token[k] == x[i, p.position[k]]
        gen = _ref_greedy(neo, p.perturbed[k, :PREFIX], T)
        assert torch.equal(p.perturbed[k, PREFIX:], gen)
        assert p.first_impacted[k] == _em(gen, r.clean_generation[i])
    assert (p.table.first_impacted_abs == p.table.first_impacted + PREFIX).all()
    with pytest.raises(ValueError, match="result"):
        make_pmps(neo, x[:2], PREFIX, result=r)


def test_make_pmps_selection_hand_case(neo):
    """Max EM drop wins; ties go to the larger NLL change; unchanged paragraphs are dropped."""
    x = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    T = 3
    rows = []
    # paragraph 0: positions 0..2, one sample; position 1 and 2 tie on EM drop, 2 has the larger NLL change
    for pos, drop, dnll, first in [(0, 1, 0.9, 2), (1, 3, 0.1, 0), (2, 3, 0.5, 1)]:
        rows.append(dict(paragraph=0, position=pos, sample=0, original_token=int(x[0, pos]), token=40 + pos,
                         em_clean=3, em=3 - drop, em_drop=drop, nll_clean=1.0, nll=1.0 + dnll, nll_change=dnll,
                         first_impacted=first, changed=True))
    for pos in range(3):  # paragraph 1: memorized, but nothing changes
        rows.append(dict(paragraph=1, position=pos, sample=0, original_token=int(x[1, pos]), token=50 + pos,
                         em_clean=3, em=3, em_drop=0, nll_clean=1.0, nll=1.0, nll_change=0.0,
                         first_impacted=T, changed=False))
    samples = pd.DataFrame(rows)
    gens = torch.zeros(2, 3, 1, T, dtype=torch.long)
    gens[0, 2, 0] = torch.tensor([4, 30, 31])
    res = PerturbationResult(samples=samples, profile=samples, clean=pd.DataFrame({"paragraph": [0, 1]}),
                             clean_generation=x[:, 3:], generations=gens, replacements=torch.zeros(2, 3, 1, dtype=torch.long),
                             positions=[0, 1, 2], prefix_len=3)
    p = make_pmps(neo, x, 3, result=res)
    assert len(p) == 1 and p.table.paragraph.tolist() == [0]
    assert p.position.tolist() == [2] and p.token.tolist() == [42] and p.first_impacted.tolist() == [1]
    assert p.perturbed.tolist() == [[1, 2, 42, 4, 30, 31]] and p.em_drop.tolist() == [3]
    assert len(make_pmps(neo, x, 3, result=res, drop_unchanged=False)) == 2
    assert len(make_pmps(neo, x, 3, result=res.__class__(**{**res.__dict__, "samples": samples.assign(
        em_clean=2)}))) == 0  # EM 2 < T: not memorized


def test_em_drop_by_position_hand_case():
    prof = pd.DataFrame({"paragraph": [0, 0, 1, 1, 2, 2], "position": [0, 1] * 3,
                         "em_drop_mean": [1.0, 3.0, 3.0, 5.0, 10.0, 0.0]})
    out = em_drop_by_position(prof, {0: "memorized", 1: "memorized", 2: "non-memorized"}, value="em_drop_mean")
    got = out.set_index(["group", "position"])["mean"].to_dict()
    assert got == {("memorized", 0): 2.0, ("memorized", 1): 4.0, ("non-memorized", 0): 10.0,
                   ("non-memorized", 1): 0.0}
    assert out.set_index(["group", "position"]).loc[("memorized", 0), "sem"] == pytest.approx(1.0)
    assert em_drop_by_position(prof, value="em_drop_mean")["group"].unique().tolist() == ["all"]
    with pytest.raises(ValueError, match="groups"):
        em_drop_by_position(prof, {7: "x"}, value="em_drop_mean")
    with pytest.raises(ValueError, match="em_drop_generation_mean"):
        em_drop_by_position(prof)  # default column missing
    with pytest.raises(ValueError, match="profile"):
        em_drop_by_position(prof.drop(columns="position"))


# ------------------------------------------------------------------ embedded model ground truth


def test_tiny_memorized_paragraphs_are_perturbable(tiny, tiny_paragraphs, unchanged):
    """Perturbing single prefix tokens of memorized paragraphs (EM = 50) can destroy the memorized
    continuation; never-seen paragraphs have near-zero EM to begin with, and their continuation
    "slips off" more easily than that of memorized ones (Stoehr §4, Fig. 3 bottom)."""
    t = tiny_paragraphs.table
    mp = np.flatnonzero(t.em_ref.to_numpy() == 50)[:3]
    nmp = np.flatnonzero(t["count"].to_numpy() == 0)[:3]
    tokens = tiny_paragraphs.tokens[torch.as_tensor(np.concatenate([mp, nmp]))]
    positions = [0, 20, 40, 48, 49]
    with unchanged(tiny):
        r = perturbation_profile(tiny, tokens, 50, positions=positions, seed=0, progress_bar=False)
        pmps = make_pmps(tiny, tokens, 50, result=r)
        pmps_early = make_pmps(tiny, tokens, 50, result=r, positions=range(49))
    clean = r.clean.em_clean.to_numpy()
    assert (clean[:3] == 50).all() and (clean[3:] <= 10).all()
    prof = r.profile.assign(group=np.where(r.profile.paragraph < 3, "memorized", "non-memorized"))
    mp_prof = prof[prof.group == "memorized"]
    assert (mp_prof.em_drop_mean >= 0).all()                       # EM 50 cannot rise
    assert (mp_prof.em_drop_mean == mp_prof.em_drop_generation_mean).all()
    assert (mp_prof.groupby("paragraph").em_drop_max.max() > 0).all()
    by_pos = em_drop_by_position(r.profile[r.profile.position < 49], prof.groupby("paragraph").group.first())
    means = by_pos.groupby("group")["mean"].mean()
    assert means["non-memorized"] > means["memorized"], means
    assert len(pmps) == 3 and (pmps.em_drop > 0).all() and set(pmps.table.paragraph) == {0, 1, 2}
    assert ((pmps.first_impacted >= 0) & (pmps.first_impacted < 50)).all()
    assert (pmps_early.position < 49).all() and set(pmps_early.table.paragraph) <= {0, 1, 2}


def test_profile_skips_decoding_reproduced_prefixes_on_tiny(tiny, tiny_paragraphs, unchanged, monkeypatch):
    """Speed path: on memorized paragraphs most perturbed prefixes still reproduce the continuation and
    are not decoded; every generation, EM and impact token still equals full greedy decoding."""
    import memloc.perturb as P
    from memloc.metrics import em_from_generations, greedy_decode

    em = tiny_paragraphs.table["em_ref"].to_numpy()
    x = torch.cat([tiny_paragraphs.tokens[np.flatnonzero(em == 50)[:2]],
                   tiny_paragraphs.tokens[np.flatnonzero(em <= 10)[:1]]])
    positions = [0, 20, 48, 49]
    decoded = []

    def counting(model, prefix, n_new, **kw):
        decoded.append(len(prefix))
        return greedy_decode(model, prefix, n_new, **kw)

    monkeypatch.setattr(P, "greedy_decode", counting)
    with unchanged(tiny):
        r = perturbation_profile(tiny, x, 50, n_samples=2, seed=0, positions=positions, batch_size=8,
                                 progress_bar=False)
    n, T = len(x), 50
    total = n * len(positions) * 2
    assert n <= sum(decoded) - n < total        # the clean decode (n rows) + only part of the perturbed ones
    prefixes = x[:, :50].unsqueeze(1).unsqueeze(1).repeat(1, len(positions), 2, 1)
    for j, p in enumerate(positions):
        prefixes[:, j, :, p] = r.replacements[:, j]
    ref = greedy_decode(tiny, prefixes.reshape(-1, 50), T).view(n, len(positions), 2, T)
    assert torch.equal(r.generations, ref)
    s = r.samples
    ref_em = em_from_generations(ref.reshape(-1, T), x[:, 50:].repeat_interleave(len(positions) * 2, 0))
    assert s["em"].tolist() == ref_em.tolist()
    first = em_from_generations(ref.reshape(-1, T), r.clean_generation.repeat_interleave(len(positions) * 2, 0))
    assert s["first_impacted"].tolist() == first.tolist()
