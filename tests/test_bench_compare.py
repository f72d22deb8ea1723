"""``memloc bench del --compare-tuned``: library defaults and the dev-set selection as rows of one table."""

from __future__ import annotations

import functools
import json

import pytest
import torch

torch.set_num_threads(1)


def test_cli_bench_del_compare_tuned(tmp_path, capsys, monkeypatch):
    from memloc import localize
    from memloc.cli import main
    from memloc.data import tuned_hyperparameters

    calls: list[dict] = []
    real = localize.METHODS["hard_concrete"]
    real_fn = real.fn

    @functools.wraps(real_fn)
    def spy(model, tokens, prefix_len, **kw):
        calls.append(dict(kw))
        return real_fn(model, tokens, prefix_len, **kw)

    import dataclasses

    # the registry is read-only for users; the test swaps the record's function for a spy
    monkeypatch.setitem(localize.METHODS._methods, "hard_concrete", dataclasses.replace(real, fn=spy))
    out = tmp_path / "del.json"
    assert main(["-q", "bench", "del", "--methods", "hard_concrete,random", "--compare-tuned", "--n", "1",
                 "--set-size", "3", "--n-random", "2", "--ratio", "0.1", "--json", str(out),
                 "--method-kwargs", '{"hard_concrete": {"max_steps": 3, "progress_bar": false}}']) == 0
    data = json.loads(out.read_text())
    methods = [r["method"] for r in data["table"]]
    assert methods == ["hard_concrete", "hard_concrete (tuned)", "random"]
    assert len(data["rows"]) == 3
    # plain row: memloc's defaults (only the user's cap); tuned row: the dev-set selection in the
    # authors' parameterization, under the user's cap
    tuned = tuned_hyperparameters("tiny")["hard_concrete"]
    assert len(calls) == 2
    plain, tuned_call = calls
    # (the benchmarks fill in every declared default, so the score-cache key names them all)
    assert plain["lam"] == localize.DEFAULT_LAM and plain["lam_scale"] == "per_neuron" and plain["max_steps"] == 3
    assert plain["stop_mem_margin"] == 0.5 and plain["stop_mask_mean"] == localize.DEFAULT_STOP_MASK_MEAN
    assert tuned_call["lam"] == tuned["lam"] == 30.0 and tuned_call["lam_scale"] == "mean"
    assert tuned_call["beta"] == pytest.approx(1 / 3) and tuned_call["max_steps"] == 3
    assert tuned_call["stop_mem_margin"] is None  # selected under the authors' stop criterion
    assert tuned_call["stop_mask_mean"] is None
    assert plain["start_layer"] == tuned_call["start_layer"] == 1  # the DEL setting (A.8)
    printed = capsys.readouterr().out
    assert "hard_concrete (tuned)" in printed


def test_cli_bench_compare_tuned_bad_combination():
    from memloc.cli import main

    # argparse-level errors return 2 through main's ValueError handling
    assert main(["-q", "bench", "del", "--compare-tuned", "--authors-defaults", "--n", "1"]) == 2


def test_user_lam_drops_the_tuned_scale():
    from memloc.commands.bench import _merge

    tuned = {"lam": 30.0, "lam_scale": "mean", "max_steps": 300}
    assert _merge(tuned, None) == tuned
    assert _merge(tuned, {"lam": 0.01}) == {"lam": 0.01, "max_steps": 300}  # per-neuron, memloc's scale
    assert _merge(tuned, {"lam": 10.0, "lam_scale": "mean"}) == {"lam": 10.0, "lam_scale": "mean", "max_steps": 300}
    assert _merge(tuned, {"max_steps": 5}) == {"lam": 30.0, "lam_scale": "mean", "max_steps": 5}
