"""Two-way activation patching (Stoehr A.3): sanity identities, a slow reference, bad inputs, borrowing."""

from __future__ import annotations

import pytest
import torch

from memloc import load_model
from memloc.patching import COMPONENTS, activation_patching

PREFIX = 10
SEQ = 24


@pytest.fixture(scope="module")
def neo(random_model_dir):
    return load_model(random_model_dir("gpt-neo"))


@pytest.fixture(scope="module")
def gpt2(random_model_dir):
    return load_model(random_model_dir("gpt2"))


def make_pairs(model, positions, firsts, seed=0):
    """MP/PMP pairs: equal before the impact token except at ``position``, different after."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    n = len(positions)
    mp = torch.randint(0, V, (n, SEQ), generator=g)
    pmp = mp.clone()
    for i, (p, f) in enumerate(zip(positions, firsts)):
        pmp[i, p] = (mp[i, p] + 1 + torch.randint(0, V - 1, (1,), generator=g)) % V
        t = PREFIX + f
        pmp[i, t:] = (mp[i, t:] + 1 + torch.randint(0, V - 1, (SEQ - t,), generator=g)) % V
    return mp, pmp, torch.tensor(positions), torch.tensor(firsts)


def reference_patch(model, receiver, source, pos, t, hook_name, head):
    """Slow, obvious: full-length runs, replace one activation at ``pos`` with the source run's,
    read the NLL of the receiver's token at ``t`` from the full logits."""
    _, cache = model.run_with_cache(source.unsqueeze(0))
    src = cache[hook_name][0]

    def hook(act, hook):
        act = act.clone()
        if head < 0:
            act[0, pos] = src[pos]
        else:
            act[0, pos, head] = src[pos, head]
        return act

    with torch.no_grad():
        clean = model(receiver.unsqueeze(0))[0, t - 1].log_softmax(-1)[receiver[t]]
        with model.hooks(fwd_hooks=[(hook_name, hook)]):
            patched = model(receiver.unsqueeze(0))[0, t - 1].log_softmax(-1)[receiver[t]]
    return float(-clean), float(-patched)


def test_full_residual_patch_reproduces_other_run(neo, unchanged):
    mp, pmp, pos, first = make_pairs(neo, [2, 9, 5], [3, 0, 7])
    with unchanged(neo):
        df = activation_patching(neo, mp, pmp, pos, first, PREFIX, components=("resid_pre", "resid_post", "mlp_out"),
                                 progress_bar=False)
    n_layers = neo.cfg.n_layers
    assert len(df) == 3 * 2 * n_layers * 3
    full = df[(df.component == "resid_pre") & (df.layer == 0)]
    # resid_pre of layer 0 at the position is everything the other run differs in -> its NLL exactly
    assert torch.allclose(torch.tensor(full.nll_patched.to_numpy()), torch.tensor(full.nll_source.to_numpy()),
                          atol=1e-5)
    # patching the final residual at a position before t-1 only reaches that position's own logits: no effect
    last = df[(df.component.isin(["resid_post", "mlp_out"])) & (df.layer == n_layers - 1)]
    before = last[last.position < last.impact_position - 1]
    assert len(before) > 0 and (before.value.abs() < 1e-6).all()
    # position == t-1 (perturbed token right before the impact token): the final residual decides it
    at = df[(df.component == "resid_post") & (df.layer == n_layers - 1) & (df.position == df.impact_position - 1)]
    assert len(at) == 2
    assert torch.allclose(torch.tensor(at.nll_patched.to_numpy()), torch.tensor(at.nll_source.to_numpy()), atol=1e-5)
    # unpatched NLLs of the two runs: each direction's clean NLL is the other direction's receiving run
    for i in range(3):
        t = PREFIX + int(first[i])
        ref_mp, _ = reference_patch(neo, mp[i], pmp[i], int(pos[i]), t, "blocks.0.hook_resid_pre", -1)
        got = df[(df.id == i) & (df.direction == "pmp_to_mp")].nll_clean.iloc[0]
        assert got == pytest.approx(ref_mp, abs=1e-5)


@pytest.mark.parametrize("kind", ["neo", "gpt2"])
def test_matches_slow_reference(kind, request):
    model = request.getfixturevalue(kind)
    mp, pmp, pos, first = make_pairs(model, [4, 1], [2, 5], seed=1)
    df = activation_patching(model, mp, pmp, pos, first, PREFIX, components=tuple(COMPONENTS), batch_size=7,
                             progress_bar=False)
    n_heads = model.cfg.n_heads
    per_layer = 5 + n_heads
    assert len(df) == 2 * 2 * model.cfg.n_layers * per_layer
    checked = 0
    for _, row in df.sample(n=24, random_state=0).iterrows():
        i = int(row.id)
        receiver, source = (pmp[i], mp[i]) if row.direction == "mp_to_pmp" else (mp[i], pmp[i])
        hook = {"resid_pre": "blocks.{l}.hook_resid_pre", "attn_out": "blocks.{l}.hook_attn_out",
                "mlp_out": "blocks.{l}.hook_mlp_out", "resid_mid": "blocks.{l}.hook_resid_mid",
                "resid_post": "blocks.{l}.hook_resid_post", "z": "blocks.{l}.attn.hook_z"}[row.component].format(l=int(row.layer))
        clean, patched = reference_patch(model, receiver, source, int(pos[i]), int(row.impact_position), hook,
                                         int(row["head"]))
        assert row.nll_clean == pytest.approx(clean, abs=1e-4)
        assert row.nll_patched == pytest.approx(patched, abs=1e-4)
        assert row.value == pytest.approx(patched - clean, abs=1e-4)
        assert row.target_token == int(receiver[int(row.impact_position)])
        checked += 1
    assert checked == 24
    # all heads' z together == attn_out (W_O is linear in z): per-head effects exist and are finite
    assert df[df.component == "z"]["head"].nunique() == n_heads


def test_heads_sum_like_attn_out(neo):
    """Patching every head's z at a layer equals patching that layer's attention output."""
    mp, pmp, pos, first = make_pairs(neo, [3], [4], seed=2)
    i, t = 0, PREFIX + 4
    _, cache = neo.run_with_cache(mp[0:1])
    src = cache["blocks.1.attn.hook_z"][0]

    def all_heads(act, hook):
        act = act.clone()
        act[0, 3] = src[3]
        return act

    with torch.no_grad(), neo.hooks(fwd_hooks=[("blocks.1.attn.hook_z", all_heads)]):
        nll = float(-neo(pmp[0:1])[0, t - 1].log_softmax(-1)[pmp[0, t]])
    df = activation_patching(neo, mp, pmp, pos, first, PREFIX, components=("attn_out",), directions="mp_to_pmp",
                             progress_bar=False)
    assert df[df.layer == 1].nll_patched.iloc[0] == pytest.approx(nll, abs=1e-5)


def test_bad_inputs(neo, unchanged):
    mp, pmp, pos, first = make_pairs(neo, [2, 9], [0, 3])
    T = SEQ - PREFIX
    bad = [
        dict(perturbed=pmp[:, :-1]),
        dict(memorized=mp[:0], perturbed=pmp[:0], position=pos[:0], first_impacted=first[:0]),
        dict(position=torch.tensor([2])),
        dict(position=torch.tensor([2, PREFIX])),
        dict(position=torch.tensor([2.0, 9.0])),
        dict(first_impacted=torch.tensor([0, T])),
        dict(first_impacted=torch.tensor([-1, 3])),
        dict(position=torch.tensor([3, 9])),          # the pair differs at 2, not 3
        dict(components=("resid_pre", "nope")),
        dict(components=()),
        dict(directions=("sideways",)),
        dict(prefix_len=0),
        dict(batch_size=0),
    ]
    base = dict(memorized=mp, perturbed=pmp, position=pos, first_impacted=first, prefix_len=PREFIX)
    with unchanged(neo):
        for override in bad:
            kw = {**base, **override}
            with pytest.raises(ValueError):
                activation_patching(neo, kw.pop("memorized"), kw.pop("perturbed"), kw.pop("position"),
                                    kw.pop("first_impacted"), kw.pop("prefix_len"), progress_bar=False, **kw)
    # the continuation also differing before the impact token is not a single-token perturbation
    pmp2 = pmp.clone()
    pmp2[0, PREFIX + 5] = (pmp2[0, PREFIX + 5] + 1) % neo.cfg.d_vocab
    with pytest.raises(ValueError, match="differ"):
        activation_patching(neo, mp, pmp2, pos, torch.tensor([6, 3]), PREFIX, progress_bar=False)


def test_model_restored_on_exception(neo, unchanged, monkeypatch):
    import memloc.patching as P

    mp, pmp, pos, first = make_pairs(neo, [2], [1])

    def boom(model, *args, **kwargs):
        model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda act, hook: act)   # left behind
        raise RuntimeError("boom")

    monkeypatch.setattr(P, "_patched_nll", boom)
    with unchanged(neo):
        with pytest.raises(RuntimeError, match="boom"):
            activation_patching(neo, mp, pmp, pos, first, PREFIX, progress_bar=False)


@pytest.mark.slow
def test_real_pmps_on_tiny(tiny, tiny_paragraphs, unchanged):
    """Ground truth on the embedded model: with real PMPs (make_pmps), patching the whole residual at
    the perturbed token makes each run predict like the other one, so the receiving run's own
    impact token (the other run's greedy choice is a different token) becomes less likely."""
    from memloc.perturb import make_pmps, perturbation_profile

    table = tiny_paragraphs.table
    ids = table.index[table.em_ref == 50][:3].to_numpy()
    mp = tiny_paragraphs.tokens[ids]
    prefix = tiny_paragraphs.prefix_len
    res = perturbation_profile(tiny, mp, prefix, positions=[46, 47, 48, 49], progress_bar=False)
    pmps = make_pmps(tiny, mp, prefix, result=res, progress_bar=False)
    assert len(pmps) >= 1
    with unchanged(tiny):
        df = activation_patching(tiny, pmps.original, pmps.perturbed, pmps.position, pmps.first_impacted, prefix,
                                 progress_bar=False)
    full = df[(df.component == "resid_pre") & (df.layer == 0)]
    assert torch.allclose(torch.tensor(full.nll_patched.to_numpy()), torch.tensor(full.nll_source.to_numpy()),
                          atol=1e-4)
    assert (full.value > 0).all(), full
    assert len(df) == len(pmps) * 2 * tiny.cfg.n_layers * 3
