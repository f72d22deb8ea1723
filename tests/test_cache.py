"""memloc.cache: the one content-addressed cache (reproduce's stage results, the benchmarks' scores).

* structured values (memloc dataclasses of DataFrames, tensors, arrays, tuple-keyed dicts, NaN)
  come back equal, stored as JSON + safetensors + parquet, never pickle;
* what cannot be stored without pickle is not cached (WARNING), a corrupt entry is recomputed;
* addresses change with every part: tensor bytes, dtype and shape, settings, code source.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from memloc.benchmarks import DelResult
from memloc.cache import ContentCache, code_version, digest, model_fingerprint


def test_structured_round_trip_without_pickle(tmp_path):
    cache = ContentCache(tmp_path)
    m = pd.DataFrame([[0.1, 0.2], [0.3, np.nan]], index=pd.Index([3, 7], name="target_id"),
                     columns=pd.Index([3, 7], name="seq_id"))
    rows = pd.DataFrame({"method": ["a", "b"], "ratio": [0.01, 0.02], "x": [1, 2], "ok": [True, False]})
    table = pd.DataFrame({("ΔSelf-Acc %", 0.1): [1.0, 2.0], ("ΔNeg", 0.1): [3.0, 4.0]},
                         index=pd.Index(["hc", "zo"], name="method"))
    value = {"del": DelResult(rows=rows, matrices={("a", 0.01): m}, dist_matrices={("a", 0.01): m * 2},
                              baseline=rows, rand_ppl=float("nan"), ids=[3, 7]),
             "table": table, "array": np.arange(5), "tensor": torch.arange(6).view(2, 3), "tuple": (1, "x"),
             "series": rows["x"], "inf": float("inf"), "none": None}
    assert cache.save("reproduce/x", "key", value)
    hit, back = cache.load("reproduce/x", "key")
    assert hit
    pd.testing.assert_frame_equal(back["table"], table)
    pd.testing.assert_frame_equal(back["del"].matrices[("a", 0.01)], m)
    pd.testing.assert_frame_equal(back["del"].rows, rows)
    pd.testing.assert_frame_equal(back["del"].confusion_long(), value["del"].confusion_long())
    assert isinstance(back["del"], DelResult) and np.isnan(back["del"].rand_ppl) and back["del"].ids == [3, 7]
    assert torch.equal(back["tensor"], value["tensor"]) and np.array_equal(back["array"], value["array"])
    assert back["tuple"] == (1, "x") and back["inf"] == float("inf") and back["none"] is None
    pd.testing.assert_series_equal(back["series"], rows["x"])
    files = sorted(p.name for p in cache.path("reproduce/x", "key").iterdir())
    assert files == [f"frame{i}.parquet" for i in range(6)] + ["manifest.json", "tensors.safetensors"]
    for p in cache.root.rglob("*"):
        if p.is_file():
            assert not p.read_bytes().startswith(b"\x80"), p  # no pickle protocol header anywhere


def test_what_cannot_be_stored_is_recomputed(tmp_path, caplog):
    cache = ContentCache(tmp_path)
    calls = []

    class Foreign:  # not a memloc dataclass: would need pickle
        pass

    def compute():
        calls.append(1)
        return {"x": Foreign()}

    with caplog.at_level(logging.WARNING, logger="memloc.cache"):
        cache.get_or_compute("ns", "k", compute)
        cache.get_or_compute("ns", "k", compute)
    assert len(calls) == 2 and "not caching" in caplog.text and not cache.path("ns", "k").exists()
    # a corrupt entry: recomputed (with a WARNING) and rewritten
    value, hit = cache.get_or_compute("ns", "ok", lambda: {"a": torch.ones(2)})
    assert not hit
    (cache.path("ns", "ok") / "manifest.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memloc.cache"):
        value, hit = cache.get_or_compute("ns", "ok", lambda: {"a": torch.zeros(2)})
    assert not hit and "could not read" in caplog.text
    assert torch.equal(cache.load("ns", "ok")[1]["a"], torch.zeros(2))


def test_addresses_change_with_every_part(tiny):
    x = torch.tensor([1, 2, 3])
    assert digest(x) == digest(x.clone())
    assert len({digest(x), digest(x.int()), digest(x.view(1, 3)), digest(x + 1), digest("a"), digest({"k": 1}),
                digest({"k": 2})}) == 7
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})

    def f():
        return 1

    def g():
        return 2

    assert code_version(f) != code_version(g) and code_version(f) == code_version(f)
    fp = model_fingerprint(tiny)
    assert fp == model_fingerprint(tiny) and len(fp) == 32


def test_score_cache_lives_in_the_one_cache(tiny, tmp_path):
    """memloc.benchmarks._scores keeps its names (score_cache_path, localize_cached, model_fingerprint)
    on the one cache module."""
    from memloc.benchmarks import _scores

    assert _scores.model_fingerprint is model_fingerprint
    x = torch.tensor([[5, 6, 7, 8]])
    path = _scores.score_cache_path(tmp_path, "fp", "hard/concrete", {"lam": 1.0}, x, 2)
    assert path.parent == tmp_path / "hard_concrete" and path.suffix == ".safetensors"
    assert path != _scores.score_cache_path(tmp_path, "fp", "hard/concrete", {"lam": 2.0}, x, 2)
    meta = {"k": "v"}
    ContentCache.save_tensors(path, {"scores": torch.ones(2, 3)}, meta)
    assert torch.equal(ContentCache.load_tensors(path, meta)["scores"], torch.ones(2, 3))
    assert ContentCache.load_tensors(path, {"k": "other"}) is None


def test_reproduce_stage_addresses_chain(tiny, tmp_path):
    """A stage's address covers its settings fields, its code and its inputs' addresses, so an
    upstream change reaches every stage downstream (and only its declared settings matter)."""
    import dataclasses

    from memloc.reproduce import QUICK
    from memloc.reproduce.context import build_context
    from memloc.reproduce.runner import stage_key
    from memloc.reproduce.stages import REGISTRY

    def ctx(settings):
        return build_context(tiny, tmp_path, settings=settings, stages=["memorization"], paragraphs=None,
                             non_memorized_max_em=None, frequencies=None, cache_dir=tmp_path, png=False,
                             model_name="tiny", progress_bar=False, quick=True)

    a, b = ctx(QUICK), ctx(dataclasses.replace(QUICK, inj_n=5))
    mem, patch = REGISTRY["memorization"], REGISTRY["patching"]
    assert stage_key(a, mem, {}) == stage_key(b, mem, {})  # inj_n is not a memorization setting
    assert stage_key(a, mem, {}) != stage_key(ctx(dataclasses.replace(QUICK, n_mp=3)), mem, {})
    assert stage_key(a, patch, {"perturbation": "x"}) != stage_key(a, patch, {"perturbation": "y"})
    assert a.profile.name == "tiny" and a.fingerprint == model_fingerprint(tiny)
