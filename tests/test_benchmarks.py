"""Tests of the INJ and DEL benchmarks (memloc.benchmarks), their CLI and figures.

References are slow, obviously-correct re-implementations kept here: set-based recall, a
per-sequence teacher-forced loop with hand-written ablation hooks, a dynamic-programming
Levenshtein distance and a per-sequence perplexity sum.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from memloc.benchmarks import (del_benchmark, del_table, ffn_value_vectors, inj_benchmark, inj_table, injected,
                               injection_loss, localize_cached, model_fingerprint, recall_at_k, resolve_methods,
                               sample_injection_mask, score_cache_path, with_defaults, with_sequence_seed)
from memloc.data import (load_ecbd, random_sequences, tokenize_texts, tuned_hyperparameters,
                         tuning_dev_ids)
from memloc.models import load_model, neuron_hook_name

pytestmark = pytest.mark.xdist_group("tiny_benchmarks")

SHORT_TEXT = "Gettr (stylized GETTR) is an alt-tech social media platform"


# ----------------------------------------------------------------------------- references

def ref_top(scores: torch.Tensor, k: float, per_layer: bool) -> set:
    """Top-k% neurons as a set of (layer, neuron), by plain sorting (ties: lower index first)."""
    n_layers, d = scores.shape
    out = set()
    if per_layer:
        n = max(1, int(math.floor(k * d + 0.5)))
        for l in range(n_layers):
            ranked = sorted(range(d), key=lambda i: (-float(scores[l, i]), i))
            out |= {(l, i) for i in ranked[:n]}
    else:
        n = max(1, int(math.floor(k * n_layers * d + 0.5)))
        ranked = sorted(((l, i) for l in range(n_layers) for i in range(d)),
                        key=lambda li: (-float(scores[li]), li[0] * d + li[1]))
        out = set(ranked[:n])
    return out


def ref_recall(scores, truth, k, per_layer):
    gold = {(int(l), int(i)) for l, i in truth.nonzero().tolist()}
    return len(gold & ref_top(scores, k, per_layer)) / len(gold)


def lev(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def zero_hooks(mask: torch.Tensor):
    hooks = []
    for l in range(mask.shape[0]):
        idx = [int(i) for i in mask[l].nonzero().flatten()]
        if idx:
            def fn(act, hook, idx=idx):
                act = act.clone()
                for i in idx:
                    act[:, :, i] = 0.0
                return act
            hooks.append((neuron_hook_name(l), fn))
    return hooks


@torch.no_grad()
def ref_scores_of(model, tokens, prefix_len, mask, rand):
    """Per-sequence teacher-forced accuracy, Levenshtein distance, and the random-batch perplexity."""
    hooks = zero_hooks(mask) if mask is not None else []
    tok = model.tokenizer
    accs, dists = [], []
    for x in tokens:
        logits = model.run_with_hooks(x[None], fwd_hooks=hooks)[0]
        pred = logits[prefix_len - 1:-1].argmax(-1)
        true = x[prefix_len:]
        accs.append(sum(int(a) == int(b) for a, b in zip(pred, true)) / len(true))
        dists.append(lev(tok.decode(pred.tolist()), tok.decode(true.tolist())))
    total, count = 0.0, 0
    for x in rand:
        logits = model.run_with_hooks(x[None], fwd_hooks=hooks)[0]
        total += float(F.cross_entropy(logits[:-1], x[1:], reduction="sum"))
        count += len(x) - 1
    return np.array(accs), np.array(dists, dtype=float), math.exp(total / count)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def memorized(tiny_paragraphs):
    """Six paragraphs the embedded model has fully memorized (EM = 50 in the shipped table)."""
    t = tiny_paragraphs.table
    idx = t.index[(t["em_ref"] >= 50)].tolist()[:6]
    assert len(idx) == 6, "the embedded model should memorize at least 6 paragraphs"
    return tiny_paragraphs.tokens[idx], tiny_paragraphs.prefix_len, [int(t.loc[i, "id"]) for i in idx]


def known_neurons(model, tokens, prefix_len):
    """A method that scores neurons 3 > 7 > 11 highest in every layer, plus a target-dependent neuron."""
    s = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp)
    s[:, 3], s[:, 7], s[:, 11] = 3.0, 2.0, 1.0
    s[:, 100 + int(tokens[0, prefix_len]) % 50] = 4.0
    return s


def expected_known_mask(model, x, prefix_len, k, exclude=(0,)):
    n = max(1, int(math.floor(k * model.cfg.d_mlp + 0.5)))
    order = [100 + int(x[prefix_len]) % 50, 3, 7, 11]
    mask = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    for l in range(model.cfg.n_layers):
        if l not in exclude:
            mask[l, order[:n]] = True
    return mask


# ----------------------------------------------------------------------------- recall

def test_recall_hand_case():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0, 0.2],
                           [0.0, 0.7, 0.6, 0.5, 0.3]])
    truth = torch.tensor([[1, 0, 0, 1, 0],
                          [0, 1, 0, 0, 0]], dtype=torch.bool)
    # per layer, k = 40% -> 2 per layer: {0,2} and {1,2}: hits (0,0) and (1,1) of 3
    assert recall_at_k(scores, truth, 0.4) == pytest.approx(2 / 3)
    # across layers, 40% of 10 -> 4: (0,0) .9, (0,2) .8, (1,1) .7, (1,2) .6 -> same hits
    assert recall_at_k(scores, truth, 0.4, per_layer=False) == pytest.approx(2 / 3)
    # across layers, 20% -> 2: (0,0), (0,2): one hit
    assert recall_at_k(scores, truth, 0.2, per_layer=False) == pytest.approx(1 / 3)
    assert recall_at_k(scores, truth, 1.0) == 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(3, 40, generator=g)
        tr = torch.rand(3, 40, generator=g) < 0.1
        tr[0, 0] = True
        for k in (0.05, 0.1, 0.3):
            for per_layer in (True, False):
                assert recall_at_k(s, tr, k, per_layer=per_layer) == pytest.approx(ref_recall(s, tr, k, per_layer))


def test_recall_bad_inputs():
    s = torch.rand(2, 5)
    with pytest.raises(ValueError, match="truth"):
        recall_at_k(s, torch.zeros(2, 4, dtype=torch.bool), 0.2)
    with pytest.raises(ValueError, match="truth"):
        recall_at_k(s, torch.zeros(2, 5, dtype=torch.bool), 0.2)
    with pytest.raises(ValueError, match="ratio"):
        recall_at_k(s, torch.ones(2, 5, dtype=torch.bool), 0.0)


def test_sample_injection_mask():
    m = sample_injection_mask(4, 1024, 0.01, 3)
    assert m.shape == (4, 1024) and m.dtype == torch.bool and int(m.sum()) == 41
    assert torch.equal(m, sample_injection_mask(4, 1024, 0.01, 3))
    assert not torch.equal(m, sample_injection_mask(4, 1024, 0.01, 4))
    assert int(sample_injection_mask(4, 1024, 0.005, 0).sum()) == 20
    # sampled across layers, not a fixed count per layer: over many seeds the per-layer counts vary
    counts = {tuple(sample_injection_mask(4, 1024, 0.01, s).sum(1).tolist()) for s in range(10)}
    assert len(counts) > 1
    for bad in (dict(ratio=0.0), dict(ratio=1.5), dict(seed=-1), dict(seed=1.0)):
        kw = dict(n_layers=4, d_mlp=1024, ratio=0.01, seed=0) | bad
        with pytest.raises(ValueError):
            sample_injection_mask(**kw)


# ----------------------------------------------------------------------------- value vectors

@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_value_vectors_are_the_neurons_out_weights(kind, random_model_dir):
    """Zeroing value vector v^l_j must equal dropping out neuron j of layer l (Chang Eq. 3)."""
    model = load_model(random_model_dir(kind))
    vv = ffn_value_vectors(model)
    assert len(vv) == model.cfg.n_layers
    x = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    l, j = model.cfg.n_layers - 1, 5
    mask = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    mask[l, j] = True
    with torch.no_grad():
        ablated = model.run_with_hooks(x, fwd_hooks=zero_hooks(mask))
        base = model(x)
        v = vv[l]
        saved = v.vector(j).clone()
        v.vector(j).zero_()
        try:
            zeroed = model(x)
        finally:
            v.vector(j).copy_(saved)
    assert not torch.allclose(base, ablated)
    torch.testing.assert_close(zeroed, ablated, rtol=1e-5, atol=1e-5)
    if kind == "gpt2":
        assert v.neuron_axis == 0
    else:
        assert v.neuron_axis == 1


# ----------------------------------------------------------------------------- injection

def test_injection_changes_only_sampled_rows_and_is_undone(tiny, unchanged):
    x = tokenize_texts(tiny, [SHORT_TEXT], max_len=16)[0][None]
    mask = sample_injection_mask(4, 1024, 0.01, 0)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    vv = {v.name: v for v in ffn_value_vectors(tiny)}
    with unchanged(tiny):
        with injected(tiny, x, mask, max_steps=300) as res:
            assert res.converged and res.final_loss < 0.05 and 0 < res.steps <= 300
            with torch.no_grad():
                assert float(injection_loss(tiny, x)) == pytest.approx(res.final_loss, rel=1e-4, abs=1e-6)
            for n, p in tiny.named_parameters():
                if n not in vv:
                    assert torch.equal(p, before[n]), f"{n} changed during injection"
                    continue
                v = vv[n]
                rows = mask[v.layer]
                changed = (p != before[n]).any(dim=1 - v.neuron_axis)
                assert not changed[~rows].any(), f"{n}: value vectors outside the mask changed"
                assert changed[rows].all(), f"{n}: some sampled value vectors did not change"
        assert res.n_injected == 41
    # the loss curve starts high: the sequence was not known before
    assert res.losses[0] > 1.0


def test_injection_restores_on_exception(tiny, unchanged):
    x = tokenize_texts(tiny, [SHORT_TEXT], max_len=8)[0][None]
    mask = sample_injection_mask(4, 1024, 0.01, 1)
    with unchanged(tiny):
        with pytest.raises(RuntimeError, match="boom"):
            with injected(tiny, x, mask, max_steps=3):
                raise RuntimeError("boom")


def test_injection_bad_inputs(tiny, unchanged):
    x = tokenize_texts(tiny, [SHORT_TEXT], max_len=8)[0][None]
    good = sample_injection_mask(4, 1024, 0.01, 0)
    with unchanged(tiny):
        for kw in (dict(mask=good[:2]), dict(mask=good.float()), dict(mask=torch.zeros_like(good)),
                   dict(tokens=x[0]), dict(tokens=torch.cat([x, x])), dict(tokens=x[:, :1]),
                   dict(lr=0.0), dict(max_steps=0), dict(target_loss=-1.0)):
            args = dict(tokens=x, mask=good) | kw
            extra = {k: v for k, v in args.items() if k not in ("tokens", "mask")}
            with pytest.raises(ValueError):
                with injected(tiny, args["tokens"], args["mask"], **extra):
                    pass


# ----------------------------------------------------------------------------- INJ benchmark

def _oracle_factory(model):
    """A method that knows the pre-injection W_out and scores each neuron by how much its value
    vector moved: it must recall every injected neuron."""
    orig = {v.layer: v.param.detach().clone() for v in ffn_value_vectors(model)}

    def oracle(model, tokens, prefix_len):
        assert prefix_len == 1 and tokens.shape[0] == 1
        out = []
        for v in ffn_value_vectors(model):
            diff = (v.param.detach() - orig[v.layer]).abs().sum(dim=1 - v.neuron_axis)
            out.append(diff)
        return torch.stack(out).float()

    return oracle


def _random_method(model, tokens, prefix_len, seed=0):
    g = torch.Generator().manual_seed(seed + int(tokens.sum()))
    return torch.rand(model.cfg.n_layers, model.cfg.d_mlp, generator=g)


def test_inj_benchmark_oracle_and_random(tiny, unchanged, tmp_path):
    texts = [SHORT_TEXT, "The Delta variant is a variant of SARS-CoV-2"]
    calls = []

    def counting_random(model, tokens, prefix_len, seed=0):
        calls.append(1)
        return _random_method(model, tokens, prefix_len, seed)

    with unchanged(tiny):
        df = inj_benchmark(tiny, {"oracle": _oracle_factory(tiny), "random": counting_random}, sequences=texts,
                           ratios=(0.01,), max_len=12, progress_bar=False, cache_dir=tmp_path)
    assert set(df.columns) >= {"seq_id", "method", "ratio", "k", "selection", "recall", "n_injected", "inj_steps",
                               "inj_final_loss", "inj_converged"}
    assert len(df) == 2 * 2 * 3 * 2
    assert (df["n_injected"] == 41).all() and df["inj_converged"].all() and (df["inj_final_loss"] < 0.05).all()
    orc = df[df["method"] == "oracle"]
    # across layers, the top 41 neurons by movement are exactly the injected 41
    assert (orc[(orc["selection"] == "across_layers") & (orc["k"] == pytest.approx(0.01))]["recall"] == 1.0).all()
    assert (orc["recall"][orc["k"] >= 0.05 - 1e-9] == 1.0).all()
    rnd = df[df["method"] == "random"]
    assert rnd["recall"].mean() < 0.2
    # the table: rows (ratio, method), columns R@1r, R@2r, R@5r = mean recall x 100
    t = inj_table(df)
    assert list(t.columns) == ["R@1r", "R@2r", "R@5r", "n_seq"]
    assert t.loc[(0.01, "oracle"), "R@5r"] == 100.0
    sel = df[(df["method"] == "random") & (df["selection"] == "per_layer") & (df["k_multiple"] == 2)]
    assert t.loc[(0.01, "random"), "R@2r"] == pytest.approx(sel["recall"].mean() * 100)
    # scores were cached per injected model: a second run reads them back
    n_calls = len(calls)
    df2 = inj_benchmark(tiny, {"oracle": _oracle_factory(tiny), "random": counting_random}, sequences=texts,
                        ratios=(0.01,), max_len=12, progress_bar=False, cache_dir=tmp_path)
    assert len(calls) == n_calls == 2
    pd.testing.assert_frame_equal(df, df2)


def test_inj_benchmark_restores_model_when_a_method_fails(tiny, unchanged):
    def boom(model, tokens, prefix_len):
        raise RuntimeError("method failed")

    with unchanged(tiny):
        with pytest.raises(RuntimeError, match="method failed"):
            inj_benchmark(tiny, {"boom": boom}, sequences=[SHORT_TEXT], ratios=(0.01,), max_len=6, max_steps=2,
                          progress_bar=False)


def test_inj_benchmark_bad_inputs(tiny, unchanged):
    m = {"random": _random_method}
    with unchanged(tiny):
        for kw in (dict(methods={}), dict(methods=["no_such_method"]), dict(methods={"x": 3}),
                   dict(ratios=()), dict(ratios=(0.0,)), dict(ratios=(0.5,)), dict(k_multiples=(0,)),
                   dict(sequences=[]), dict(sequences=["a", torch.tensor([1, 2])]), dict(n=0),
                   dict(method_kwargs={"other": {}}), dict(max_len=0)):
            args = dict(methods=m, sequences=[SHORT_TEXT], ratios=(0.01,), progress_bar=False) | kw
            with pytest.raises(ValueError):
                inj_benchmark(tiny, **args)


def test_wrong_score_shape_is_a_value_error(tiny, unchanged):
    with unchanged(tiny):
        with pytest.raises(ValueError, match="shape"):
            inj_benchmark(tiny, {"bad": lambda m, t, p: torch.zeros(3, 3)}, sequences=[SHORT_TEXT], ratios=(0.01,),
                          max_len=6, max_steps=1, progress_bar=False)


# ----------------------------------------------------------------------------- score cache

def test_score_cache_round_trip(tiny, tmp_path):
    calls = []

    def method(model, tokens, prefix_len, scale=1.0):
        calls.append(scale)
        return torch.arange(model.cfg.n_layers * model.cfg.d_mlp, dtype=torch.float32).view(
            model.cfg.n_layers, -1) * scale + float(tokens.sum())

    x = torch.tensor([[5, 6, 7, 8, 9]])
    a = localize_cached(tiny, "m", method, x, 2, {"scale": 2.0}, cache_dir=tmp_path)
    path = score_cache_path(tmp_path, model_fingerprint(tiny), "m", {"scale": 2.0}, x, 2)
    assert path.exists() and len(calls) == 1
    b = localize_cached(tiny, "m", method, x, 2, {"scale": 2.0}, cache_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(a, b)
    localize_cached(tiny, "m", method, x, 2, {"scale": 3.0}, cache_dir=tmp_path)  # other kwargs
    localize_cached(tiny, "m", method, x, 3, {"scale": 2.0}, cache_dir=tmp_path)  # other prefix
    localize_cached(tiny, "m", method, x + 1, 2, {"scale": 2.0}, cache_dir=tmp_path)  # other sequence
    localize_cached(tiny, "m2", method, x, 2, {"scale": 2.0}, cache_dir=tmp_path)  # other method
    assert len(calls) == 5
    # another model (other weights) gets its own entry
    fp = model_fingerprint(tiny)
    with torch.no_grad():
        p = next(tiny.parameters())
        saved = p.detach().clone()
        p[0, 0] += 1.0
        try:
            assert model_fingerprint(tiny) != fp
            localize_cached(tiny, "m", method, x, 2, {"scale": 2.0}, cache_dir=tmp_path)
        finally:
            p.copy_(saved)
    assert len(calls) == 6 and model_fingerprint(tiny) == fp
    # a corrupt file is recomputed, not trusted
    path.write_bytes(b"garbage")
    c = localize_cached(tiny, "m", method, x, 2, {"scale": 2.0}, cache_dir=tmp_path)
    assert len(calls) == 7 and torch.equal(a, c)


# ----------------------------------------------------------------------------- DEL benchmark

def test_del_hand_cases_against_reference(tiny, memorized, unchanged):
    tokens, prefix_len, ids = memorized
    rand = random_sequences("tiny")[:4]
    with unchanged(tiny):
        res = del_benchmark(tiny, {"known": known_neurons}, tokens, prefix_len, ids=ids, targets=[0, 2, 5],
                            ratios=(0.0, 0.002), random_tokens=rand, batch_size=4, progress_bar=False)
    rows = res.rows
    assert list(rows.columns[:8]) == ["method", "ratio", "target_id", "d_self_acc", "d_self_dist", "d_neg_acc",
                                      "d_neg_dist", "d_rand_ppl"]
    # ratio 0 drops nothing: every delta is exactly zero
    zero = rows[rows["ratio"] == 0.0]
    assert (zero[["d_self_acc", "d_self_dist", "d_neg_acc", "d_neg_dist", "d_rand_ppl"]] == 0).all().all()
    assert (zero["n_dropped"] == 0).all()
    # baseline vs. reference
    acc0, dist0, ppl0 = ref_scores_of(tiny, tokens, prefix_len, None, rand)
    np.testing.assert_allclose(res.baseline["accuracy"], acc0)
    np.testing.assert_allclose(res.baseline["distance"], dist0)
    assert res.rand_ppl == pytest.approx(ppl0, rel=1e-4)
    assert (acc0 == 1.0).all(), "memorized paragraphs have teacher-forced accuracy 1"
    # the known neurons: 2 per layer, layers 1..3 (bottom layer excluded)
    for t in (0, 2, 5):
        mask = expected_known_mask(tiny, tokens[t], prefix_len, 0.002)
        acc, dist, ppl = ref_scores_of(tiny, tokens, prefix_len, mask, rand)
        r = rows[(rows["ratio"] == 0.002) & (rows["target_id"] == ids[t])].iloc[0]
        neg = [i for i in range(len(tokens)) if i != t]
        assert r["n_dropped"] == 6
        assert r["d_self_acc"] == pytest.approx(acc[t] - acc0[t], abs=1e-9)
        assert r["d_self_dist"] == pytest.approx(dist[t] - dist0[t])
        assert r["d_neg_acc"] == pytest.approx((acc[neg] - acc0[neg]).mean(), abs=1e-9)
        assert r["d_neg_dist"] == pytest.approx((dist[neg] - dist0[neg]).mean())
        assert r["d_rand_ppl"] == pytest.approx(ppl - ppl0, rel=1e-3, abs=1e-4)
        np.testing.assert_allclose(res.matrices[("known", 0.002)].loc[ids[t]].to_numpy(), acc - acc0, atol=1e-9)
    # confusion matrix: targets x sequences, diagonal = Self, off-diagonal mean = Neg
    m = res.matrices[("known", 0.002)]
    assert m.shape == (3, 6) and list(m.index) == [ids[0], ids[2], ids[5]] and list(m.columns) == ids
    sub = rows[rows["ratio"] == 0.002].set_index("target_id")
    for tid in m.index:
        assert m.loc[tid, tid] == pytest.approx(sub.loc[tid, "d_self_acc"])
        assert m.loc[tid].drop(tid).mean() == pytest.approx(sub.loc[tid, "d_neg_acc"])
        assert res.dist_matrices[("known", 0.002)].loc[tid, tid] == pytest.approx(sub.loc[tid, "d_self_dist"])
    long = res.confusion_long()
    assert len(long) == 2 * 3 * 6 and set(long.columns) == {"method", "ratio", "target_id", "seq_id", "d_acc", "d_dist"}
    # the table: means over targets, accuracies in %
    t = del_table(res)
    assert t.loc["known", ("ΔSelf-Acc %", 0.002)] == pytest.approx(sub["d_self_acc"].mean() * 100)
    assert t.loc["known", ("ΔNeg-Dist", 0.002)] == pytest.approx(sub["d_neg_dist"].mean())


def test_memorized_set_is_full_exact_match(tiny, tiny_paragraphs):
    from memloc.benchmarks import memorized_set
    from memloc.metrics import exact_match

    tokens, prefix_len, table = memorized_set(tiny, "tiny", n=3)
    assert tokens.shape == (3, 100) and prefix_len == 50 and (table["em"] == 50).all()
    assert (exact_match(tiny, tokens, prefix_len) == 50).all()
    ref = tiny_paragraphs.table
    assert table["id"].tolist() == ref.loc[ref["em_ref"] >= 50, "id"].tolist()[:3]
    with pytest.raises(ValueError, match="min_em"):
        memorized_set(tiny, "tiny", min_em=51)


def test_default_del_set_leaves_out_the_dev_paragraphs(tiny, tiny_paragraphs):
    # Chang A.7: the 5 dev sequences tune the hyperparameters, the rest is the test set
    ref = tiny_paragraphs.table
    mem = ref.loc[ref["em_ref"] >= 50, "id"].tolist()
    dev = tuning_dev_ids("tiny")
    assert set(dev) <= set(mem)
    res = del_benchmark(tiny, {"random": _random_method}, n_targets=1, ratios=(0.0,), n_random=2,
                        progress_bar=False)
    assert list(res.ids) == [i for i in mem if i not in dev]


def test_del_exclude_layers_and_mean_mode(tiny, memorized, unchanged):
    tokens, prefix_len, ids = memorized

    def bottom_heavy(model, tokens, prefix_len):
        s = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp)
        s[0] = 10.0  # layer 0 scores highest everywhere: must still never be dropped
        s[:, 17] += 1.0
        return s

    rand = random_sequences("tiny")[:4]
    with unchanged(tiny):
        res = del_benchmark(tiny, {"b": bottom_heavy}, tokens[:3], prefix_len, targets=[1], ratios=(0.001,),
                            random_tokens=rand, progress_bar=False, exclude_layers=(0, 2))
        res_mean = del_benchmark(tiny, {"b": bottom_heavy}, tokens[:3], prefix_len, targets=[1], ratios=(0.001,),
                                 random_tokens=rand, progress_bar=False, mode="mean")
    assert res.rows["n_dropped"].tolist() == [2]
    mask = torch.zeros(4, 1024, dtype=torch.bool)
    mask[[1, 3], 17] = True
    acc0, _, _ = ref_scores_of(tiny, tokens[:3], prefix_len, None, rand[:1])
    acc, _, _ = ref_scores_of(tiny, tokens[:3], prefix_len, mask, rand[:1])
    assert res.rows["d_self_acc"].iloc[0] == pytest.approx(acc[1] - acc0[1], abs=1e-9)
    assert res_mean.rows["n_dropped"].tolist() == [3]


def test_del_trains_masks_above_the_excluded_layers(tiny, memorized, unchanged):
    """Mask methods get start_layer = the first non-excluded layer (the authors' DEL setting)
    unless the caller sets it; methods without the keyword get nothing extra."""
    tokens, prefix_len, _ = memorized
    seen = []

    def masked(model, tokens, prefix_len, *, start_layer=0, seed=0):
        seen.append((start_layer, seed))
        return torch.rand(model.cfg.n_layers, model.cfg.d_mlp, generator=torch.Generator().manual_seed(seed))

    def plain(model, tokens, prefix_len):
        return torch.zeros(model.cfg.n_layers, model.cfg.d_mlp)

    rand = random_sequences("tiny")[:2]
    kw = dict(targets=[1], ratios=(0.001,), random_tokens=rand, progress_bar=False)
    with unchanged(tiny):
        del_benchmark(tiny, {"m": masked, "p": plain}, tokens[:3], prefix_len, **kw)
        del_benchmark(tiny, {"m": masked}, tokens[:3], prefix_len, exclude_layers=(1, 0), **kw)
        del_benchmark(tiny, {"m": masked}, tokens[:3], prefix_len, exclude_layers=(2,), **kw)
        del_benchmark(tiny, {"m": masked}, tokens[:3], prefix_len, method_kwargs={"m": {"start_layer": 3}}, **kw)
    assert seen == [(1, 1), (2, 1), (0, 1), (3, 1)]


def test_del_restores_model_when_a_method_fails(tiny, memorized, unchanged):
    tokens, prefix_len, _ = memorized
    n = []

    def fails_second_time(model, tokens, prefix_len):
        n.append(1)
        if len(n) > 1:
            raise RuntimeError("method failed")
        return known_neurons(model, tokens, prefix_len)

    with unchanged(tiny):
        with pytest.raises(RuntimeError, match="method failed"):
            del_benchmark(tiny, {"f": fails_second_time}, tokens[:3], prefix_len, ratios=(0.01,),
                          random_tokens=random_sequences("tiny")[:2], progress_bar=False)


def test_del_bad_inputs(tiny, memorized, unchanged):
    tokens, prefix_len, _ = memorized
    m = {"known": known_neurons}
    with unchanged(tiny):
        for kw in (dict(methods={}), dict(methods=["no_such_method"]), dict(ratios=(-0.1,)), dict(ratios=(1.5,)),
                   dict(ratios=()), dict(tokens=tokens[0]), dict(tokens=tokens[:1]), dict(prefix_len=None),
                   dict(prefix_len=100), dict(targets=[7]), dict(targets=[]), dict(exclude_layers=(4,)),
                   dict(exclude_layers=(0, 1, 2, 3)), dict(mode="median"), dict(ids=[1, 1, 2, 3, 4, 5]),
                   dict(batch_size=0), dict(method_kwargs={"known": 3}), dict(n_targets=0),
                   dict(tokens=tokens.float())):
            args = dict(methods=m, tokens=tokens, prefix_len=prefix_len, ratios=(0.01,), progress_bar=False,
                        random_tokens=random_sequences("tiny")[:2]) | kw
            with pytest.raises(ValueError):
                del_benchmark(tiny, **args)


def test_resolve_methods():
    f = lambda m, t, p: None  # noqa: E731
    assert resolve_methods({"a": f}) == {"a": f}
    with pytest.raises(ValueError):
        resolve_methods([])
    with pytest.raises(ValueError):
        resolve_methods(3)


def test_with_sequence_seed():
    def seeded(model, tokens, prefix_len, *, seed=0, steps=3):
        return None

    def unseeded(model, tokens, prefix_len, steps=3):
        return None

    assert with_sequence_seed(seeded, {"steps": 2}, 7) == {"steps": 2, "seed": 7}
    assert with_sequence_seed(seeded, {"seed": 1}, 7) == {"seed": 1}
    assert with_sequence_seed(unseeded, {}, 7) == {}
    assert with_defaults(seeded, {"seed": 1}, seed=7, steps=5, lam=2.0) == {"seed": 1, "steps": 5}


# ----------------------------------------------------------------------------- CLI

def test_cli_bench_del_and_inj(tmp_path, capsys):
    from memloc.cli import main

    out = tmp_path / "del.json"
    assert main(["-q", "bench", "del", "--methods", "activations,random", "--n", "2", "--set-size", "5", "--n-random", "4",
                 "--ratio", "0.01", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "del" and len(data["rows"]) == 2 * 2
    assert {"method", "ratio", "target_id", "d_self_acc", "d_rand_ppl"} <= set(data["rows"][0])
    assert "ΔSelf-Acc" in capsys.readouterr().out
    out = tmp_path / "inj.json"
    assert main(["-q", "bench", "inj", "--methods", "activations", "random", "--n", "1", "--ratio", "0.01",
                 "--json", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 * 3 * 2 and "R@1r" in capsys.readouterr().out
    assert any((tmp_path / "cache").rglob("*.safetensors"))
    assert main(["-q", "bench", "del", "--methods", "nope", "--n", "1"]) == 2


# ----------------------------------------------------------------------------- acceptance (real methods)

PAPER_METHODS = ["hard_concrete", "slimming", "zero_out", "integrated_gradients", "activations", "random"]
#: Cheaper than the defaults (5000 mask-training steps) but the same objective and learning rate.
CHEAP = {"hard_concrete": {"max_steps": 300, "progress_bar": False},
         "slimming": {"max_steps": 300, "progress_bar": False},
         "zero_out": {"progress_bar": False}, "integrated_gradients": {"progress_bar": False}}


@pytest.fixture(scope="module")
def inj_real(tiny):
    """INJ with the real methods on 5 ECBD definitions (first 32 tokens), ratio 1% (41 neurons)."""
    return inj_benchmark(tiny, PAPER_METHODS, n=5, ratios=(0.01,), max_len=32, method_kwargs=CHEAP,
                         progress_bar=False)


@pytest.mark.slow
def test_inj_real_methods_far_above_random(inj_real):
    assert inj_real["inj_converged"].all()
    t = inj_table(inj_real)
    assert t.loc[(0.01, "random"), "R@5r"] == pytest.approx(5.0, abs=4.0)  # RANDOM recalls about k
    for m in PAPER_METHODS[:-1]:
        assert t.loc[(0.01, m), "R@2r"] > 5 * t.loc[(0.01, "random"), "R@2r"], t


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "On the 4-layer embedded model, injecting a sequence into 41 value vectors inflates their norms "
    "~10x (0.46 -> 4-6, every injected vector larger than every other), so norm-weighted ACTIVATIONS "
    "and ZERO-OUT recall ~100% and the paper's ranking (pruning methods first) does not appear; see "
    "test_injection_inflates_value_vector_norms"))
def test_inj_reproduces_the_paper_ranking(inj_real):
    """Chang et al. Table 2's ranking: pruning-based > IG, ZERO-OUT > ACTIVATIONS > RANDOM."""
    r = inj_table(inj_real).loc[0.01, "R@2r"]
    for strong in ("hard_concrete", "slimming"):
        for mid in ("integrated_gradients", "zero_out"):
            assert r[strong] > r[mid]
    for mid in ("integrated_gradients", "zero_out"):
        assert r[mid] > r["activations"]


def test_injection_inflates_value_vector_norms(tiny):
    """Why INJ is easy on the embedded model: after injection every injected value vector is
    longer than every untouched one, so ||v|| alone recalls all injected neurons."""
    x = tokenize_texts(tiny, load_ecbd()[:1], max_len=32)[0][None]
    mask = sample_injection_mask(4, 1024, 0.01, 0)

    def norms():
        return torch.stack([v.param.detach().norm(dim=1 - v.neuron_axis) for v in ffn_value_vectors(tiny)])

    before = norms()
    with injected(tiny, x, mask) as res:
        after = norms()
    assert res.converged
    assert after[mask].min() > 3 * before[mask].max()
    assert after[mask].min() > after[~mask].max()
    assert recall_at_k(after, mask, 0.01, per_layer=False) == 1.0


@pytest.mark.slow
def test_del_every_method_beats_random_five_times(tiny, tiny_paragraphs):
    t = tiny_paragraphs.table
    idx = t.index[t["em_ref"] >= 50].tolist()
    tokens = tiny_paragraphs.tokens[idx[:16]]
    # the paper's protocol: mask-method hyperparameters selected per model on 5 dev sequences
    # (A.7; memloc/assets/tiny/hyperparameters.json, ids disjoint from these 16)
    assert not set(t.loc[idx[:16], "id"]) & set(tuning_dev_ids("tiny"))
    kwargs = {m: {**kw, **tuned_hyperparameters("tiny").get(m, {})} for m, kw in CHEAP.items()}
    res = del_benchmark(tiny, PAPER_METHODS, tokens, 50, targets=list(range(4)), ratios=(0.1,),
                        method_kwargs=kwargs, random_tokens=random_sequences("tiny")[:8], progress_bar=False)
    self_acc = res.rows.groupby("method")["d_self_acc"].mean()
    for m in PAPER_METHODS[:-1]:
        assert self_acc[m] < 0 and abs(self_acc[m]) >= 5 * abs(self_acc["random"]), self_acc


def test_del_fast_measurement_equals_full_forwards(tiny, memorized, unchanged):
    """Speed path of DEL: batched dropout measurement from the cached layer-1 input (and ZERO-OUT / IG
    scoring only the non-excluded layers) gives the rows of full forwards under ``ablate``."""
    from memloc.localize import METHODS

    tokens, prefix_len, ids = memorized
    rand = random_sequences("tiny")[:3]
    methods = {"known": known_neurons, "zero_out": METHODS["zero_out"]}
    kw = dict(ids=ids, targets=[0, 3], ratios=(0.0, 0.002, 0.05), random_tokens=rand, batch_size=4,
              method_kwargs={"zero_out": {"progress_bar": False, "neurons": range(0, 1024, 32)}}, progress_bar=False)
    with unchanged(tiny):
        fast = del_benchmark(tiny, methods, tokens, prefix_len, **kw)
        slow = del_benchmark(tiny, methods, tokens, prefix_len, fast=False, **kw)
        kw["method_kwargs"] = None
        mean = del_benchmark(tiny, {"known": known_neurons}, tokens, prefix_len, mode="mean", **kw)
        mean_slow = del_benchmark(tiny, {"known": known_neurons}, tokens, prefix_len, mode="mean", fast=False, **kw)
    for a, b in ((fast, slow), (mean, mean_slow)):
        pd.testing.assert_frame_equal(a.rows, b.rows, rtol=1e-4, atol=1e-6)
        for key in a.matrices:
            pd.testing.assert_frame_equal(a.matrices[key], b.matrices[key], atol=1e-9)
    moved = fast.rows[fast.rows["ratio"] > 0]
    assert (moved["d_rand_ppl"].abs() > 1e-4).any() and (mean.rows["d_rand_ppl"].abs() > 0).any()  # not trivial
    # ZERO-OUT scored layers 1..3 only, and selected what the all-layer scores select
    z_all = METHODS["zero_out"](tiny, tokens[:1], prefix_len, progress_bar=False, neurons=range(0, 1024, 32))
    z_sub = METHODS["zero_out"](tiny, tokens[:1], prefix_len, progress_bar=False, neurons=range(0, 1024, 32),
                                layers=[1, 2, 3])
    assert torch.isnan(z_sub[0]).all()
    from memloc.ablation import select_top_k
    a = select_top_k(torch.nan_to_num(z_all, nan=float("-inf")), 0.05, exclude_layers=[0])
    b = select_top_k(torch.nan_to_num(z_sub, nan=float("-inf")), 0.05, exclude_layers=[0])
    assert torch.equal(a, b)
