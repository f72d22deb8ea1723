"""Memorization metrics against slow references, hand cases and bad input."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from rapidfuzz.distance import Levenshtein

from memloc import metrics


def slow_greedy(model, prefix, n_new):
    """One sequence at a time, full forward every step (no cache, no batching)."""
    out = []
    for row in prefix:
        seq = row[None]
        for _ in range(n_new):
            with torch.no_grad():
                nxt = model(seq)[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        out.append(seq[0, prefix.shape[1]:])
    return torch.stack(out)


def slow_em(generated, target):
    ems = []
    for g, t in zip(generated.tolist(), target.tolist()):
        n = 0
        for a, b in zip(g, t):
            if a != b:
                break
            n += 1
        ems.append(n)
    return ems


def test_batched_greedy_equals_one_at_a_time(tiny, tiny_paragraphs):
    tokens = tiny_paragraphs.tokens[:6]
    batched = metrics.greedy_decode(tiny, tokens[:, :50], 50, batch_size=4)
    nocache = metrics.greedy_decode(tiny, tokens[:, :50], 50, batch_size=6, use_cache=False)
    reference = slow_greedy(tiny, tokens[:, :50], 50)
    assert torch.equal(batched, reference)
    assert torch.equal(nocache, reference)


def test_em_hand_case():
    gen = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [9, 2, 3, 4], [1, 2, 3, 4]])
    tgt = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5]])
    assert metrics.em_from_generations(gen, tgt).tolist() == [4, 1, 0, 3]


def test_exact_match_matches_reference(tiny, tiny_paragraphs):
    tokens = tiny_paragraphs.tokens[::60][:8]
    em = metrics.exact_match(tiny, tokens, 50)
    assert em.tolist() == slow_em(slow_greedy(tiny, tokens[:, :50], 50), tokens[:, 50:])


def test_teacher_forced_stats_match_reference(tiny, tiny_paragraphs):
    tokens = tiny_paragraphs.tokens[:5]
    tf = metrics.teacher_forced(tiny, tokens, 50, batch_size=2)
    for i in range(5):
        with torch.no_grad():
            logits = tiny(tokens[i:i + 1])[0]
        logp = torch.log_softmax(logits, -1)
        nll = -sum(logp[t - 1, tokens[i, t]].item() for t in range(50, 100)) / 50
        acc = sum(int(logits[t - 1].argmax() == tokens[i, t]) for t in range(50, 100)) / 50
        assert tf["nll"][i].item() == pytest.approx(nll, abs=1e-4)
        assert tf["accuracy"][i].item() == pytest.approx(acc)


def test_levenshtein_matches_reference(tiny, tiny_paragraphs):
    tokens = tiny_paragraphs.tokens[295:300]
    tok = tiny.tokenizer
    tf = metrics.teacher_forced(tiny, tokens, 50)
    greedy = metrics.greedy_continuation(tiny, tokens, 50)
    d_tf = metrics.levenshtein_distance(tiny, tokens, 50, decoding="teacher_forced")
    d_gr = metrics.levenshtein_distance(tiny, tokens, 50, decoding="greedy")
    for i in range(5):
        true = tok.decode(tokens[i, 50:].tolist())
        assert d_tf[i] == Levenshtein.distance(tok.decode(tf["argmax"][i].tolist()), true)
        assert d_gr[i] == Levenshtein.distance(tok.decode(greedy[i].tolist()), true)
    assert metrics.char_distances(tiny, tokens[:, 50:], tokens[:, 50:]).tolist() == [0] * 5


def test_perplexity_matches_reference(tiny, tiny_paragraphs):
    tokens = tiny_paragraphs.tokens[:3, :40]
    with torch.no_grad():
        logits = tiny(tokens)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert metrics.perplexity(tiny, tokens, batch_size=2) == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_memorization_frame_and_split(tiny, tiny_paragraphs):
    tokens = tiny_paragraphs.tokens[:10]
    df = metrics.memorization(tiny, tokens, 50, counts=tiny_paragraphs.table["count"][:10].to_numpy())
    assert list(df["id"]) == list(range(10))
    assert {"em", "nll", "accuracy", "lev_tf", "lev_greedy", "count"} <= set(df.columns)
    assert df["em"].between(0, 50).all()
    split = metrics.split_memorization(pd.DataFrame({"em": [50, 49, 11, 10, 0]}))
    assert split.tolist() == ["memorized", "partial", "partial", "non-memorized", "non-memorized"]
    split = metrics.split_memorization(pd.DataFrame({"em": [45, 30, 5]}), memorized_min_em=40, non_memorized_max_em=5)
    assert split.tolist() == ["memorized", "partial", "non-memorized"]
    with pytest.raises(ValueError, match="non_memorized_max_em"):
        metrics.split_memorization(df, memorized_min_em=5, non_memorized_max_em=10)


def test_ngram_jaccard_hand_case():
    a = [1, 2, 3, 4, 5, 6]          # 5-grams: (1..5), (2..6)
    b = [1, 2, 3, 4, 5, 7]          # 5-grams: (1..5), (2,3,4,5,7)
    assert metrics.ngram_jaccard(a, b, 5) == pytest.approx(1 / 3)
    assert metrics.ngram_jaccard(a, a, 5) == 1.0


def test_discover_memorized_filters(tiny, tiny_paragraphs):
    df_ref = tiny_paragraphs.table
    mem = df_ref.index[df_ref["em_ref"] == 50][:4].tolist()
    unseen = df_ref.index[df_ref["count"] == 0][:3].tolist()
    tokens = tiny_paragraphs.tokens[mem + unseen]
    # a near-duplicate of the first memorized paragraph: same except the last token
    dup = tokens[0].clone()
    dup[-1] = (dup[-1] + 1) % 4096
    tokens = torch.cat([tokens, dup[None]])
    kept = metrics.discover_memorized(tiny, tokens, 50)
    ids = kept["id"].tolist()
    assert all(i < 4 or i == 7 for i in ids), "never-seen paragraphs must be filtered out"
    assert not (0 in ids and 7 in ids), "near-duplicates must be collapsed to one"
    assert (kept["accuracy"] >= 0.9).all() and (kept["lev_greedy"] <= 20).all()
    assert (kept["n_distinct_suffix"] >= 16).all()


@pytest.mark.parametrize("bad,prefix,match", [
    (torch.zeros(0, 10, dtype=torch.long), 5, "empty batch"),
    (torch.zeros(10, dtype=torch.long), 5, "2-D"),
    (torch.zeros(2, 3, 4, dtype=torch.long), 2, "2-D"),
    (torch.zeros(2, 10), 5, "integer"),
    (torch.full((2, 10), 4096), 5, "vocabulary"),
    (torch.full((2, 10), -1), 5, "vocabulary"),
    (torch.zeros(2, 129, dtype=torch.long), 5, "context"),
    (torch.zeros(2, 10, dtype=torch.long), 0, "prefix_len"),
    (torch.zeros(2, 10, dtype=torch.long), 10, "prefix_len"),
    (torch.zeros(2, 10, dtype=torch.long), -3, "prefix_len"),
    (torch.zeros(2, 10, dtype=torch.long), 2.5, "prefix_len"),
])
def test_bad_input(tiny, bad, prefix, match):
    for fn in (metrics.exact_match, metrics.continuation_nll, metrics.teacher_forced_accuracy, metrics.memorization):
        with pytest.raises(ValueError, match=match):
            fn(tiny, bad, prefix)


def test_greedy_decode_bad_lengths(tiny):
    with pytest.raises(ValueError, match="n_ctx"):
        metrics.greedy_decode(tiny, torch.zeros(1, 100, dtype=torch.long), 50)
    with pytest.raises(ValueError, match="n_new"):
        metrics.greedy_decode(tiny, torch.zeros(1, 10, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="decoding"):
        metrics.levenshtein_distance(tiny, torch.zeros(1, 10, dtype=torch.long), 5, decoding="beam")


def test_metrics_leave_model_unchanged(tiny, tiny_paragraphs, unchanged):
    with unchanged(tiny):
        metrics.memorization(tiny, tiny_paragraphs.tokens[:3], 50)


def test_exact_match_teacher_forced_equals_greedy_em(tiny, tiny_paragraphs):
    """Speed path: EM read off one teacher-forced pass equals the greedy EM (MPs, NMPs, partials),
    also against a continuation that is not the true one (the model's own greedy continuation of
    another prefix)."""
    tokens = tiny_paragraphs.tokens[::12][:48]
    greedy = metrics.greedy_continuation(tiny, tokens, 50)
    em_greedy = metrics.em_from_generations(greedy, tokens[:, 50:])
    em_tf = metrics.exact_match_teacher_forced(tiny, tokens, 50, batch_size=16)
    assert torch.equal(em_tf, em_greedy)
    assert {0, 50} <= set(em_tf.tolist()) and len(set(em_tf.tolist())) > 3   # a mixed set
    other = torch.cat([tokens[:, :50], greedy.roll(1, dims=0)], dim=1)     # prefix i + continuation of i-1
    assert torch.equal(metrics.exact_match_teacher_forced(tiny, other, 50),
                       metrics.em_from_generations(greedy, greedy.roll(1, dims=0)))
    assert torch.equal(metrics.teacher_forced(tiny, tokens, 50)["em"], em_tf)


def test_memorization_decodes_only_unreproduced_rows(tiny, tiny_paragraphs, monkeypatch):
    """memorization() skips greedy decoding where the continuation is reproduced (EM = T) and its
    em / lev_greedy equal the full greedy reference."""
    tokens = tiny_paragraphs.tokens[::25][:24]
    decoded = []
    real = metrics.greedy_continuation

    def counting(model, x, prefix_len, **kw):
        decoded.append(len(x))
        return real(model, x, prefix_len, **kw)

    monkeypatch.setattr(metrics, "greedy_continuation", counting)
    df = metrics.memorization(tiny, tokens, 50, progress_bar=False)
    monkeypatch.setattr(metrics, "greedy_continuation", real)
    gen = real(tiny, tokens, 50)
    assert df["em"].tolist() == metrics.em_from_generations(gen, tokens[:, 50:]).tolist()
    assert df["lev_greedy"].tolist() == metrics.char_distances(tiny, gen, tokens[:, 50:]).tolist()
    n_full = int((df["em"] == 50).sum())
    assert n_full > 0 and sum(decoded) == len(tokens) - n_full


def test_suffix_nll_hand_case():
    """Chang Eq. 6 by hand: -log softmax of the target, averaged over the suffix; half logits upcast."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]],
                           [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    targets = torch.tensor([[0, 2]])  # one row broadcasts over the batch
    lse = lambda row: math.log(sum(math.exp(v) for v in row))  # noqa: E731
    want = torch.tensor([((lse([2, 0, 0]) - 2) + (lse([0, 1, 3]) - 3)) / 2, math.log(3)])
    assert torch.allclose(metrics.suffix_nll(logits, targets), want, atol=1e-6)
    per_token = metrics.suffix_nll(logits, targets, per_token=True)
    assert per_token.shape == (2, 2) and torch.allclose(per_token.mean(1), want, atol=1e-6)
    half = metrics.suffix_nll(logits.bfloat16(), targets)
    assert half.dtype == torch.float32 and torch.allclose(half, want, atol=3e-2)


def test_token_nll_equals_cross_entropy_over_the_class_dimension():
    """token_nll (rows of [batch * T, vocab]) gives F.cross_entropy's values and gradients on the
    [batch, vocab, T] layout it replaces (slower there, see its docstring)."""
    from memloc.metrics import token_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    ref = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    out = token_nll(logits, targets)
    torch.testing.assert_close(out, ref)
    (g_out,) = torch.autograd.grad(out.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_out, g_ref)
    # hand-computed: uniform logits give log(vocab) for every token
    torch.testing.assert_close(token_nll(torch.zeros(1, 2, 4), torch.tensor([[0, 3]])), torch.full((1, 2), math.log(4)))
