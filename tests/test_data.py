"""Bundled data sets load with the documented shapes; bad requests fail clearly."""

from __future__ import annotations

import pytest
import torch

from memloc import data
from memloc.localize import DEFAULT_STOP_MASK_MEAN


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


def test_tuned_hyperparameters_are_the_dev_grid_minimum(tiny_paragraphs):
    import inspect
    import json

    from memloc import localize
    from memloc.reproduce import Settings

    tuned = data.tuned_hyperparameters("tiny")
    assert set(tuned) == {"slimming", "hard_concrete"}
    raw = json.loads((data._ASSETS / "tiny" / "hyperparameters.json").read_text())
    for method, kwargs in tuned.items():
        # every stored kwarg is a real argument of the method
        params = inspect.signature(getattr(localize, method)).parameters
        assert set(kwargs) <= set(params), (method, kwargs)
        # the selection is the grid point with the lowest mean ΔSelf-Acc (Chang A.7)
        grid = raw["grid"][method]
        best = min(grid, key=lambda row: row["rank"])
        assert best["d_self_acc"] == min(row["d_self_acc"] for row in grid) < 0
        assert all(abs(best[k] - v) < 1e-5 for k, v in kwargs.items() if k not in ("lam_scale", "stop_mem_margin", "stop_mask_mean"))
        # the stored lam is on the mean over the masked neurons (the authors' parameterization),
        # selected under the authors' stop criterion
        assert kwargs["lam_scale"] == "mean" and kwargs["stop_mem_margin"] is None and kwargs["stop_mask_mean"] is None
    # the dev paragraphs are memorized paragraphs of the embedded set (reproduce leaves them out
    # of its DEL set: tests/test_reproduce.py)
    table = tiny_paragraphs.table
    assert data.tuning_dev_ids("tiny") == raw["dev_ids"]
    assert set(raw["dev_ids"]) <= set(table.loc[table["em_ref"] == 50, "id"])
    # reproduce's settings take the tuned values, and an explicit step cap overrides the tuned one
    kw = Settings().method_kwargs(tuned)
    assert kw["hard_concrete"]["lam"] == tuned["hard_concrete"]["lam"]
    assert kw["hard_concrete"]["max_steps"] == tuned["hard_concrete"]["max_steps"]
    assert Settings(mask_steps=7).method_kwargs(tuned)["slimming"]["max_steps"] == 7
    assert Settings().method_kwargs()["slimming"] == {"max_steps": 200, "progress_bar": False, "stop_mask_mean": 0.4}
    # the library's stop rule on top of the tuned values (the tuned record itself has stop_mask_mean=None);
    # None gives the selection's criterion back
    assert kw["hard_concrete"]["stop_mask_mean"] == kw["slimming"]["stop_mask_mean"] == DEFAULT_STOP_MASK_MEAN
    assert Settings(stop_mask_mean=None).method_kwargs(tuned)["hard_concrete"] == {**tuned["hard_concrete"],
                                                                                  "progress_bar": False}
    with pytest.raises(ValueError, match="name"):
        data.tuned_hyperparameters("gpt-neo-125m")
