"""Bundled data sets load with the documented shapes; bad requests fail clearly."""

from __future__ import annotations

import pytest
import torch

from memloc import data


def test_tiny_paragraph_set(tiny_paragraphs):
    ps = tiny_paragraphs
    assert ps.tokens.shape == (600, 100) and ps.tokens.dtype == torch.long and ps.prefix_len == 50
    assert int(ps.tokens.max()) < 4096
    seen = ps.table["seen"]
    assert seen.sum() == 300 and (ps.table.loc[seen, "count"] >= 1).all() and (ps.table.loc[~seen, "count"] == 0).all()
    assert ps.table["count"].max() <= 200
    sub = ps.subset(ps.table["seen"])
    assert len(sub) == 300 and torch.equal(sub.tokens, ps.tokens[seen.to_numpy()])


def test_unigram_and_random_sequences():
    counts = data.unigram_counts("tiny")
    assert counts.shape == (4096,) and counts.sum() > 1_000_000
    rand = data.random_sequences("tiny")
    assert rand.ndim == 2 and rand.shape[1] == 100 and len(rand) >= 128


def test_gpt_neo_sets():
    em50 = data.load_paragraphs("gpt-neo-125m")
    assert em50.tokens.shape == (442, 100) and em50.tokenizer == "gpt2"
    assert {"count", "em_ref", "text"} <= set(em50.table.columns)
    assert (em50.table["em_ref"] == 50).all()
    assert data.load_paragraphs("gpt-neo-125m-em30-49").tokens.shape == (141, 100)
    assert data.load_paragraphs("gpt-neo-125m-em11-29").tokens.shape == (436, 100)
    pert = data.load_paragraphs("gpt-neo-125m-perturbed")
    assert pert.tokens.shape == pert.perturbed.shape == (90, 100)


def test_ecbd():
    defs = data.load_ecbd()
    assert len(defs) == 156 and all(isinstance(d, str) and d for d in defs)


def test_tokenize_texts(tiny):
    ids = data.tokenize_texts(tiny, ["Hello world.", "The quick brown fox jumps."])
    assert [t.dtype for t in ids] == [torch.long, torch.long]
    assert tiny.tokenizer.decode(ids[1].tolist()) == "The quick brown fox jumps."
    with pytest.raises(ValueError, match="empty"):
        data.tokenize_texts(tiny, [])
    with pytest.raises(ValueError, match="texts\\[0\\]"):
        data.tokenize_texts(tiny, ["a"], min_len=5)


def test_bad_names():
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_paragraphs("pile")
    with pytest.raises(ValueError, match="which"):
        data.load_ecbd("2030")
    with pytest.raises(ValueError, match="mask has"):
        data.load_paragraphs("gpt-neo-125m-em30-49").subset(torch.ones(3, dtype=torch.bool))


def test_cli_memorization(tmp_path, monkeypatch):
    import json

    from memloc.cli import main
    from memloc.commands import memorization as cmd

    # a small slice of the set keeps this fast; the command's own loading is exercised
    real = data.load_paragraphs
    monkeypatch.setattr(data, "load_paragraphs", lambda name="tiny": real(name).subset(list(range(0, 600, 50))))
    out = tmp_path / "m.json"
    assert main(["-q", "memorization", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"]["n"] == 12 and len(res["rows"]) == 12
    s = res["summary"]
    assert s["memorized"] + s["non_memorized"] + s["partial"] == 12
    assert cmd  # module importable
