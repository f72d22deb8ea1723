"""Tests of memloc.heads (Stoehr et al. §6.2-6.3) and memloc.plots.heads (Fig. 6, Fig. 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from memloc import load_model
from memloc import attention, rare_tokens
from memloc import heads as H

PREFIX = 12
SEQ = 16


# --------------------------------------------------------------------------- slow references

def ref_ranks(prefix: torch.Tensor, freq: torch.Tensor, ties: str) -> torch.Tensor:
    """Loop reference: rank 0 = rarest; 'min' = # strictly rarer tokens, 'dense' = # distinct rarer counts."""
    out = torch.zeros_like(prefix)
    for i in range(prefix.shape[0]):
        f = [float(freq[t]) for t in prefix[i]]
        for j, fj in enumerate(f):
            if ties == "min":
                out[i, j] = sum(1 for fk in f if fk < fj)
            else:
                out[i, j] = len({fk for fk in f if fk < fj})
    return out


def ref_rank_attention(att: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    n, L, Hh, P_ = att.shape
    out = torch.zeros(n, L, Hh, P_, dtype=torch.float64)
    for i in range(n):
        for l in range(L):
            for h in range(Hh):
                for j in range(P_):
                    out[i, l, h, int(ranks[i, j])] += float(att[i, l, h, j])
    return out


def ref_correlations(att: torch.Tensor, ranks: torch.Tensor, method: str) -> dict:
    """Per head: correlation between rank and mean-over-paragraphs attention, ranks that occur only."""
    n, L, Hh, P_ = att.shape
    per = ref_rank_attention(att, ranks).mean(0)
    present = sorted({int(r) for r in ranks.flatten()})
    out = {}
    for l in range(L):
        for h in range(Hh):
            x = np.array(present, float)
            y = np.array([float(per[l, h, r]) for r in present])
            if method == "spearman":
                x, y = stats.rankdata(x), stats.rankdata(y)
            out[(l, h)] = float(np.corrcoef(x, y)[0, 1])
    return out


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def small(random_model_dir):
    return load_model(random_model_dir("gpt-neo"))


@pytest.fixture(scope="module")
def small_tokens(small):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, small.cfg.d_vocab, (5, SEQ), generator=g)


# --------------------------------------------------------------------------- first-token attention

@pytest.mark.parametrize("kind", ["gpt-neo", "gpt2", "neox", "llama"])
def test_first_token_attention_matches_cache(random_model_dir, kind):
    model = load_model(random_model_dir(kind))
    tokens = torch.randint(0, model.cfg.d_vocab, (3, SEQ), generator=torch.Generator().manual_seed(1))
    att = H.first_token_attention(model, tokens, PREFIX, batch_size=2, progress_bar=False)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert att.shape == (3, n_layers, n_heads, PREFIX)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)  # full sequence: causality makes the prefix row identical
    for l in range(n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]
        for i in range(3):
            for h in range(n_heads):
                torch.testing.assert_close(att[i, l, h], pattern[i, h, PREFIX - 1, :PREFIX].float(),
                                           atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, n_layers, n_heads), atol=1e-5, rtol=0)
    one = H.first_token_attention(model, tokens, PREFIX, layers=1, progress_bar=False)
    assert one.shape == (3, n_heads, PREFIX)
    torch.testing.assert_close(one, att[:, 1])
    some = H.first_token_attention(model, tokens, PREFIX, layers=[1, 0], progress_bar=False)
    torch.testing.assert_close(some, att[:, [1, 0]])


def test_first_token_attention_frame(small, small_tokens):
    att = H.first_token_attention(small, small_tokens, PREFIX, progress_bar=False)
    df = H.first_token_attention_frame(small, small_tokens, PREFIX, layers=[1], progress_bar=False)
    assert len(df) == 5 * 1 * small.cfg.n_heads * PREFIX
    assert set(df.columns) >= {"paragraph", "layer", "head", "position", "token_id", "token", "attention"}
    for r in df.sample(20, random_state=0).itertuples():
        assert r.attention == pytest.approx(float(att[r.paragraph, 1, r.head, r.position]), abs=1e-7)
        assert r.token_id == int(small_tokens[r.paragraph, r.position])
        assert r.token == small.tokenizer.decode([r.token_id])


# --------------------------------------------------------------------------- ranks and aggregation

def test_ranks_hand_computed_with_ties():
    freq = torch.zeros(10)
    freq[3], freq[5], freq[7], freq[9] = 10, 2, 2, 100
    prefix = torch.tensor([[5, 7, 5, 9, 3]])
    # corpus frequencies per position: 2 2 2 100 10
    assert H.frequency_ranks(prefix, freq).tolist() == [[0, 0, 0, 4, 3]]
    assert H.frequency_ranks(prefix, freq, ties="dense").tolist() == [[0, 0, 0, 2, 1]]
    att = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25]).reshape(1, 1, 1, 5)
    per = H.attention_by_rank(att, H.frequency_ranks(prefix, freq))
    torch.testing.assert_close(per.flatten(), torch.tensor([0.6, 0.0, 0.0, 0.25, 0.15]))
    per_dense = H.attention_by_rank(att, H.frequency_ranks(prefix, freq, ties="dense"))
    torch.testing.assert_close(per_dense.flatten(), torch.tensor([0.6, 0.25, 0.15, 0.0, 0.0]))


@pytest.mark.parametrize("ties", H.TIES)
def test_ranks_and_rank_attention_match_loops(ties):
    g = torch.Generator().manual_seed(2)
    vocab = 30
    freq = torch.randint(0, 8, (vocab,), generator=g)  # many ties
    prefix = torch.randint(0, vocab, (6, 9), generator=g)
    ranks = H.frequency_ranks(prefix, freq, ties=ties)
    assert torch.equal(ranks, ref_ranks(prefix, freq, ties))
    att = torch.rand(6, 2, 3, 9, generator=g)
    torch.testing.assert_close(H.attention_by_rank(att, ranks).double(), ref_rank_attention(att, ranks))


def test_unigram_counts_from_tokens():
    tokens = torch.tensor([[1, 2, 2], [0, 2, 4]])
    assert H.unigram_counts_from_tokens(tokens, 6).tolist() == [1, 1, 3, 0, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        H.unigram_counts_from_tokens(tokens, 4)
    with pytest.raises(ValueError, match="vocab"):
        H.unigram_counts_from_tokens(tokens, 0)


@pytest.mark.parametrize("method", H.CORRELATIONS)
def test_rare_token_attention_and_correlation_match_reference(small, small_tokens, method):
    g = torch.Generator().manual_seed(3)
    freq = torch.randint(0, 5, (small.cfg.d_vocab,), generator=g)
    df = H.rare_token_attention(small, small_tokens, PREFIX, freq, progress_bar=False)
    att = H.first_token_attention(small, small_tokens, PREFIX, progress_bar=False)
    ranks = ref_ranks(small_tokens[:, :PREFIX], freq, "min")
    per = ref_rank_attention(att, ranks).mean(0)
    assert len(df) == small.cfg.n_layers * small.cfg.n_heads * PREFIX
    for r in df.itertuples():
        assert r.attention == pytest.approx(float(per[r.layer, r.head, r.rank]), abs=1e-6)
        assert r.n_tokens == int((ranks == r.rank).sum())
    corr = H.rare_token_correlation(df, method=method)
    ref = ref_correlations(att, ranks, method)
    assert len(corr) == len(ref)
    for r in corr.itertuples():
        assert r.correlation == pytest.approx(ref[(r.layer, r.head)], abs=1e-6)
    # precomputed attention gives the same frame without a forward pass
    again = H.rare_token_attention(small, small_tokens, PREFIX, freq, attention=att, progress_bar=False)
    pd.testing.assert_frame_equal(again, df)


def test_rare_token_attention_on_embedded_model(tiny, tiny_paragraphs, unchanged):
    from memloc import unigram_counts

    ps = tiny_paragraphs
    tokens = ps.tokens[:4]
    freq = unigram_counts("tiny")
    with unchanged(tiny):
        df = H.rare_token_attention(tiny, tokens, ps.prefix_len, freq, layers=[0, 1], batch_size=2, progress_bar=False)
    n_heads = tiny.cfg.n_heads
    assert len(df) == 2 * n_heads * ps.prefix_len
    # each head's per-rank attention sums to 1 (the first decoded token attends only to the prefix)
    np.testing.assert_allclose(df.groupby(["layer", "head"])["attention"].sum(), 1.0, atol=1e-5)
    per_head = df[(df.layer == 0) & (df["head"] == 0)]
    assert per_head["n_tokens"].sum() == 4 * ps.prefix_len
    ranks = ref_ranks(tokens[:, :ps.prefix_len], freq, "min")
    assert per_head.set_index("rank")["n_tokens"].to_dict() == {r: int((ranks == r).sum()) for r in range(50)}


# --------------------------------------------------------------------------- a planted rare-token head

def _planted_setup(model, n, seed):
    """Paragraphs whose prefix position j always holds the token of frequency rank perm[j] (distinct
    frequencies, so no ties), and a hook that makes head L1H2 attend ∝ (PREFIX - rank)."""
    vocab = model.cfg.d_vocab
    freq = torch.arange(vocab) + 1  # id = rarity: lower id = rarer
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(PREFIX, generator=torch.Generator().manual_seed(99))  # rank of position j
    tokens = torch.empty(n, SEQ, dtype=torch.long)
    for i in range(n):
        ids = torch.randperm(vocab, generator=g)[:PREFIX].sort().values  # ascending = rarest first
        tokens[i, :PREFIX] = ids[perm]
        tokens[i, PREFIX:] = torch.randint(0, vocab, (SEQ - PREFIX,), generator=g)
    weights = (PREFIX - perm).float()
    weights = weights / weights.sum()

    def plant(pattern, hook):
        pattern = pattern.clone()
        q = PREFIX - 1
        if pattern.shape[-2] > q:
            pattern[:, 2, q, :] = 0
            pattern[:, 2, q, :PREFIX] = weights.to(pattern)
        return pattern

    return tokens, freq, ("blocks.1.attn.hook_pattern", plant)


def test_planted_rare_token_head_is_found(small, unchanged):
    mp, freq, hook = _planted_setup(small, 4, 0)
    nmp, _, _ = _planted_setup(small, 5, 1)
    with small.hooks(fwd_hooks=[hook]):
        with unchanged(small):
            df = H.rare_token_attention(small, mp, PREFIX, freq, progress_bar=False)
            corr = H.rare_token_correlation(df)
            found = H.find_memorization_heads(small, mp, nmp, PREFIX, frequencies=freq, evidence=["rare"],
                                              progress_bar=False)
    best = corr.sort_values("correlation").iloc[0]
    assert (best["layer"], best["head"]) == (1, 2)
    assert best["correlation"] == pytest.approx(-1.0, abs=1e-5)
    assert (corr["correlation"] > -0.99).sum() == len(corr) - 1
    assert tuple(found.iloc[0][["layer", "head"]]) == (1, 2)
    assert found.iloc[0]["rank_rare"] == 1 and found.iloc[0]["combined_rank"] == 1
    assert found.iloc[0]["rare_corr_mp"] == pytest.approx(-1.0, abs=1e-5)
    assert found.iloc[0]["rare_corr_nmp"] == pytest.approx(-1.0, abs=1e-5)
    assert found["rank_contrastive"].isna().all()
    # rare_mass: attention on ranks < ceil(0.1 * 12) = 2, i.e. (12 + 11) / (12 + ... + 1) for the planted head
    assert found.iloc[0]["rare_mass_mp"] == pytest.approx(23 / 78, abs=1e-5)
    with small.hooks(fwd_hooks=[hook]):
        att = H.first_token_attention(small, nmp, PREFIX, progress_bar=False)
    ranks = ref_ranks(nmp[:, :PREFIX], freq, "min")
    row = found.set_index(["layer", "head"]).loc[(0, 1)]
    assert row["rare_mass_nmp"] == pytest.approx(float((att[:, 0, 1] * (ranks < 2)).sum(-1).mean()), abs=1e-6)
    # without the hook, L1H2 is an ordinary head
    plain = H.rare_token_correlation(H.rare_token_attention(small, mp, PREFIX, freq, progress_bar=False))
    assert plain.set_index(["layer", "head"]).loc[(1, 2), "correlation"] > -0.99


def test_rank_averaging_with_precomputed_evidence(small):
    mp, freq, hook = _planted_setup(small, 3, 2)
    nmp, _, _ = _planted_setup(small, 3, 3)
    L, Hn = small.cfg.n_layers, small.cfg.n_heads
    g = np.random.default_rng(0)
    heads = [(l, h) for l in range(L) for h in range(Hn)]
    cvals = g.permutation(len(heads)).astype(float)
    contrastive = pd.DataFrame([{"layer": l, "component": c, "head": h, "value": v if c == "W_V" else 1e9}
                                for (l, h), v in zip(heads, cvals) for c in ("W_Q", "W_V")]
                               + [{"layer": l, "component": "W_in", "head": -1, "value": 1e9} for l in range(L)])

    def act(values):
        return pd.DataFrame([{"layer": l, "component": comp, "head": h, "position": p,
                              "value": (v if comp == "v" else 1e9) * (1 if p == 3 else 0.5)}
                             for (l, h), v in zip(heads, values) for comp in ("v", "q") for p in range(SEQ)])

    a_mp, a_nmp = g.uniform(1, 2, len(heads)), g.uniform(1, 2, len(heads))
    with small.hooks(fwd_hooks=[hook]):
        out = H.find_memorization_heads(small, mp, nmp, PREFIX, frequencies=freq, contrastive=contrastive,
                                        activation_memorized=act(a_mp), activation_non_memorized=act(a_nmp),
                                        progress_bar=False)
    out = out.set_index(["layer", "head"])
    ratio = a_mp / a_nmp
    ref_rc = stats.rankdata(-cvals)
    ref_ra = stats.rankdata(-ratio)
    ref_rr = stats.rankdata(out.loc[heads, "rare_corr"].to_numpy())
    for k, key in enumerate(heads):
        row = out.loc[key]
        assert row["contrastive_wv"] == cvals[k]
        assert row["activation_ratio"] == pytest.approx(ratio[k])
        assert row["rank_contrastive"] == ref_rc[k] and row["rank_activation"] == ref_ra[k]
        assert row["rank_rare"] == ref_rr[k]
        assert row["score"] == pytest.approx((ref_rc[k] + ref_ra[k] + ref_rr[k]) / 3)
    assert out.loc[(1, 2), "rank_rare"] == 1
    assert list(out["score"]) == sorted(out["score"])  # sorted best first


def test_find_memorization_heads_computes_gradient_evidence(small, unchanged):
    """The contrastive W_V and value-activation evidence come from memloc.contrastive / memloc.gradients."""
    from memloc.contrastive import contrastive_gradients
    from memloc.gradients import activation_gradients

    mp, freq, _ = _planted_setup(small, 2, 4)
    nmp, _, _ = _planted_setup(small, 3, 5)
    with unchanged(small):
        out = H.find_memorization_heads(small, mp, nmp, PREFIX, frequencies=freq, progress_bar=False)
    out = out.set_index(["layer", "head"])
    c = contrastive_gradients(small, mp, nmp, PREFIX, n_nmp_per_batch=3, progress_bar=False)
    c = c[c["component"] == "W_V"].set_index(["layer", "head"])["value"]
    a = {}
    for name, toks in (("mp", mp), ("nmp", nmp)):
        df = activation_gradients(small, toks, PREFIX, components=["v"], progress_bar=False)
        for l in range(small.cfg.n_layers):
            for h in range(small.cfg.n_heads):
                peaks = [df[(df.paragraph == i) & (df.layer == l) & (df["head"] == h) & (df.position < PREFIX)]
                         ["value"].max() for i in range(len(toks))]
                a[name, l, h] = float(np.mean(peaks))
    for (l, h), row in out.iterrows():
        assert row["contrastive_wv"] == pytest.approx(float(c.loc[(l, h)]), rel=1e-5)
        assert row["value_grad_mp"] == pytest.approx(a["mp", l, h], rel=1e-5)
        assert row["activation_ratio"] == pytest.approx(a["mp", l, h] / a["nmp", l, h], rel=1e-5)
    assert out[["rank_contrastive", "rank_activation", "rank_rare"]].notna().all().all()


def test_grouped_query_attention_evidence_per_query_head(random_model_dir, unchanged):
    """Llama-style GQA (2 key/value heads for more query heads): the value-activation and W_V
    evidence exist per key/value head; every query head carries its group's value (no NaN ranks,
    which crashed `memloc reproduce --quick` on SmolLM2 in the head stage)."""
    from memloc.gradients import activation_gradients

    model = load_model(random_model_dir("llama"))
    n_heads, n_kv = int(model.cfg.n_heads), int(model.cfg.n_key_value_heads)
    assert n_kv < n_heads
    rep = n_heads // n_kv
    mp, freq, _ = _planted_setup(model, 2, 4)
    nmp, _, _ = _planted_setup(model, 3, 5)
    with unchanged(model):
        out = H.find_memorization_heads(model, mp, nmp, PREFIX, frequencies=freq, progress_bar=False)
    assert out[["value_grad_mp", "value_grad_nmp", "rank_activation", "rank_contrastive"]].notna().all().all()
    out = out.set_index(["layer", "head"])
    df = activation_gradients(model, mp, PREFIX, components=["v"], progress_bar=False)
    assert int(df["head"].max()) == n_kv - 1  # the gradients exist per key/value head
    for l in range(model.cfg.n_layers):
        for h in range(n_heads):
            g = h // rep
            peaks = [df[(df.paragraph == i) & (df.layer == l) & (df["head"] == g) & (df.position < PREFIX)]
                     ["value"].max() for i in range(len(mp))]
            assert out.loc[(l, h), "value_grad_mp"] == pytest.approx(float(np.mean(peaks)), rel=1e-5)
    expanded = H.query_head_rows(df, model)
    assert sorted(expanded["head"].unique()) == list(range(n_heads)) and len(expanded) == rep * len(df)


# --------------------------------------------------------------------------- bad input, borrowed model

def test_bad_inputs_raise_before_work(small, small_tokens, monkeypatch):
    calls = []
    for module in (H, attention, rare_tokens):  # each module that runs the attention forward
        monkeypatch.setattr(module, "pattern_rows", lambda *a, **k: calls.append(1))
    freq = torch.ones(small.cfg.d_vocab)
    cases = [
        (lambda: H.first_token_attention(small, small_tokens, 0), "prefix_len"),
        (lambda: H.first_token_attention(small, small_tokens, SEQ), "prefix_len"),
        (lambda: H.first_token_attention(small, small_tokens, 1.5), "prefix_len"),
        (lambda: H.first_token_attention(small, small_tokens, PREFIX, layers=small.cfg.n_layers), "layer"),
        (lambda: H.first_token_attention(small, small_tokens, PREFIX, layers=[]), "layer"),
        (lambda: H.first_token_attention(small, small_tokens.float(), PREFIX), "tokens"),
        (lambda: H.first_token_attention(small, small_tokens, PREFIX, batch_size=0), "batch_size"),
        (lambda: H.first_token_attention_frame(small, small_tokens, SEQ + 3), "prefix_len"),
        (lambda: H.rare_token_attention(small, small_tokens, PREFIX, freq[:-1]), "frequencies"),
        (lambda: H.rare_token_attention(small, small_tokens, PREFIX, freq[None]), "frequencies"),
        (lambda: H.rare_token_attention(small, small_tokens, PREFIX, -freq), "frequencies"),
        (lambda: H.rare_token_attention(small, small_tokens, PREFIX, freq, ties="average"), "ties"),
        (lambda: H.rare_token_attention(small, small_tokens, PREFIX, freq, attention=torch.zeros(2, 2)), "attention"),
        (lambda: H.find_memorization_heads(small, small_tokens, small_tokens, PREFIX, frequencies=freq[:5]),
         "frequencies"),
        (lambda: H.find_memorization_heads(small, small_tokens, small_tokens, 0), "prefix_len"),
        (lambda: H.find_memorization_heads(small, small_tokens, small_tokens, PREFIX, evidence=["rare", "x"]),
         "evidence"),
        (lambda: H.find_memorization_heads(small, small_tokens, small_tokens, PREFIX, evidence="rare"), "evidence"),
        (lambda: H.find_memorization_heads(small, small_tokens, small_tokens, PREFIX, method="kendall"), "method"),
        (lambda: H.find_memorization_heads(small, small_tokens, small_tokens, PREFIX,
                                           contrastive=pd.DataFrame({"a": [1]})), "contrastive"),
    ]
    for fn, word in cases:
        with pytest.raises(ValueError, match=word):
            fn()
    assert not calls
    with pytest.raises(ValueError, match="ranks"):
        H.attention_by_rank(torch.zeros(2, 1, 1, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="ties"):
        H.frequency_ranks(torch.zeros(1, 3, dtype=torch.long), freq, ties="average")
    with pytest.raises(ValueError, match="method"):
        H.rare_token_correlation(pd.DataFrame(columns=["layer", "head", "rank", "attention"]), method="kendall")


def test_model_unchanged_also_on_exception(small, small_tokens, unchanged):
    p = next(small.parameters())
    p.requires_grad_(False)
    small.train()
    try:
        freq = torch.arange(small.cfg.d_vocab)
        with unchanged(small):
            H.first_token_attention(small, small_tokens, PREFIX, progress_bar=False)
            H.rare_token_attention(small, small_tokens, PREFIX, freq, layers=0, progress_bar=False)

        def boom(pattern, hook):
            raise RuntimeError("boom")

        with small.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", boom)]):
            with unchanged(small):  # our layer-0 and layer-1 hooks are attached when boom fires
                with pytest.raises(RuntimeError, match="boom"):
                    H.first_token_attention(small, small_tokens, PREFIX, progress_bar=False)
                with pytest.raises(RuntimeError, match="boom"):
                    H.find_memorization_heads(small, small_tokens, small_tokens, PREFIX, frequencies=freq,
                                              evidence=["rare"], progress_bar=False)
    finally:
        p.requires_grad_(True)
        small.eval()


