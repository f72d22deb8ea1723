"""The method registry: declared records agree with the functions, aliases resolve but are not
iterated, and every hyperparameter handed to a method or a benchmark is checked before any work."""

from __future__ import annotations

import inspect

import pytest
import torch

from memloc.benchmarks import (accepted_hyperparameters, check_method_kwargs, del_benchmark, inj_benchmark,
                               resolve_methods, tune_del, with_defaults)
from memloc.localize import ALIASES, METHODS, Method, canonical_name, get_method


def _signature_defaults(fn) -> dict:
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:3]] == ["model", "tokens", "prefix_len"], fn
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), fn
    return {p.name: p.default for p in params[3:]}


@pytest.mark.parametrize("name", list(METHODS))
def test_record_matches_the_function_signature(name):
    record = METHODS[name]
    assert isinstance(record, Method) and record.name == name
    sig = _signature_defaults(record.fn)
    assert record.accepts == frozenset(sig), name
    assert dict(record.defaults) == sig, name
    assert record.equation and isinstance(record.stochastic, bool)
    assert record.stochastic == ("seed" in record.accepts)


def test_registry_iterates_each_method_once_and_resolves_aliases():
    names = list(METHODS)
    assert len(names) == len(set(names)) == len(METHODS) == len(list(METHODS.items()))
    assert len({id(r.fn) for r in METHODS.values()}) == len(METHODS)  # no function twice (no alias in values)
    assert not set(ALIASES) & set(names)
    assert canonical_name("ig") == "integrated_gradients" and get_method("ig") is METHODS["integrated_gradients"]
    assert "ig" in METHODS and METHODS["ig"] is METHODS["integrated_gradients"]
    with pytest.raises(ValueError, match="unknown localization method 'nope'"):
        get_method("nope")
    with pytest.raises(KeyError):
        METHODS["nope"]
    with pytest.raises(TypeError):
        METHODS["x"] = METHODS["random"]  # read-only


def test_records_are_callable_like_their_functions(tiny):
    x = torch.arange(20)[None]
    torch.testing.assert_close(METHODS["random"](tiny, x, 10, seed=3), METHODS["random"].fn(tiny, x, 10, seed=3))


def test_resolve_methods_canonicalizes_aliases():
    out = resolve_methods(["ig", "random"])
    assert list(out) == ["integrated_gradients", "random"] and out["integrated_gradients"] is METHODS["ig"]
    with pytest.raises(ValueError, match="more than once"):
        resolve_methods(["ig", "integrated_gradients"])
    with pytest.raises(ValueError, match="unknown method names"):
        resolve_methods(["nope"])


def test_check_method_kwargs_lists_the_valid_names():
    fns = resolve_methods(["hard_concrete", "zero_out"])
    with pytest.raises(ValueError, match=r"hard_concrete.*does not take \['steps'\].*'max_steps'"):
        check_method_kwargs({"hard_concrete": {"steps": 200}}, fns)
    assert check_method_kwargs({"hard_concrete": {"max_steps": 200}}, fns) == {"hard_concrete": {"max_steps": 200},
                                                                              "zero_out": {}}
    ig = resolve_methods(["integrated_gradients"])
    assert check_method_kwargs({"ig": {"steps": 4}}, ig) == {"integrated_gradients": {"steps": 4}}

    def own(model, tokens, prefix_len, *, width=1.0):
        return None

    def anything(model, tokens, prefix_len, **kw):
        return None

    with pytest.raises(ValueError, match=r"does not take \['height'\].*\['width'\]"):
        check_method_kwargs({"own": {"height": 1}}, {"own": own})
    assert check_method_kwargs({"any": {"height": 1}}, {"any": anything}) == {"any": {"height": 1}}
    assert accepted_hyperparameters(own) == {"width"} and accepted_hyperparameters(anything) is None
    assert accepted_hyperparameters(METHODS["slimming"].fn) == METHODS["slimming"].accepts
    assert with_defaults(METHODS["random"], {}, seed=5, start_layer=1) == {"seed": 5}
    assert with_defaults(anything, {}, seed=5) == {}


def _no_forward(model):
    calls = []
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("run", ["inj", "del", "tune"])
def test_benchmarks_check_hyperparameters_before_any_work(tiny, run, unchanged):
    tokens = torch.randint(0, 4096, (3, 20), generator=torch.Generator().manual_seed(0))
    calls, handle = _no_forward(tiny)
    try:
        with unchanged(tiny), pytest.raises(ValueError, match=r"does not take \['steps'\].*max_steps"):
            if run == "inj":
                inj_benchmark(tiny, ["hard_concrete"], sequences=["a b c d e f"], method_kwargs={
                    "hard_concrete": {"steps": 200}})
            elif run == "del":
                del_benchmark(tiny, ["slimming"], tokens, 10, method_kwargs={"slimming": {"steps": 200}})
            else:
                tune_del(tiny, "slimming", {"lam": [1.0]}, tokens, 10, base_kwargs={"steps": 5})
        with pytest.raises(ValueError, match=r"does not take \['nope'\]"):
            tune_del(tiny, "slimming", {"nope": [1.0]}, tokens, 10)
    finally:
        handle.remove()
    assert not calls
