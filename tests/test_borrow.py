"""memloc.borrow.borrowed: the model comes back exactly as it was lent - flags, requires_grad,
weights, and the very hook functions the caller had attached (temporary, permanent, inside an open
``model.hooks()`` context), also when an exception escapes."""

from __future__ import annotations

import pytest
import torch

from memloc.borrow import borrowed, trainable_only

from .conftest import assert_same_state, model_state

MLP0, RESID0, RESID1 = "blocks.0.mlp.hook_post", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"


def _counter(calls: list, tag: str):
    def hook(act, hook):
        calls.append(tag)
    return hook


def _handle_ids(model) -> dict:
    return {(name, d): [id(h) for h in hs]
            for d in ("fwd", "bwd")
            for name, hs in model.list_hooks(dir=d, including_permanent=True).items()}


@pytest.fixture
def hooked(tiny):
    """The embedded model with the caller's own hooks: a temporary and a permanent one on the same
    hook point, and a backward hook; all removed again after the test."""
    calls: list = []
    hp = tiny.hook_dict[MLP0]
    hp.add_hook(_counter(calls, "user-temp"))
    tiny.add_perma_hook(MLP0, _counter(calls, "user-perma"))
    tiny.hook_dict[RESID1].add_hook(_counter(calls, "user-bwd"), dir="bwd")
    try:
        yield tiny, calls
    finally:
        tiny.reset_hooks(including_permanent=True)


def _add_everything(model, calls):
    """What a careless function might leave behind: hooks on points the caller uses and on fresh ones,
    temporary and permanent, forward and backward."""
    model.hook_dict[MLP0].add_hook(_counter(calls, "added-temp"))
    model.add_perma_hook(MLP0, _counter(calls, "added-perma"))
    model.hook_dict[RESID0].add_hook(_counter(calls, "added-fresh"))
    model.add_perma_hook(RESID0, _counter(calls, "added-fresh-perma"))
    model.hook_dict[RESID1].add_hook(_counter(calls, "added-bwd"), dir="bwd")


def _fire(model, calls):
    calls.clear()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.enable_grad():
        emb = model.embed.W_E.requires_grad
        model.embed.W_E.requires_grad_(True)
        try:
            model(x).sum().backward()
        finally:
            model.embed.W_E.requires_grad_(emb)
            model.zero_grad(set_to_none=True)
    return sorted(set(calls))


def test_hooks_added_inside_are_removed_callers_hooks_kept(hooked):
    model, calls = hooked
    before_ids, before = _handle_ids(model), model_state(model)
    assert _fire(model, calls) == ["user-bwd", "user-perma", "user-temp"]
    with borrowed(model):
        _add_everything(model, calls)
        assert "added-fresh-perma" in _fire(model, calls)
    assert _handle_ids(model) == before_ids, "the caller's own hook handles must come back, in order"
    assert_same_state(model, before)
    assert _fire(model, calls) == ["user-bwd", "user-perma", "user-temp"]


def test_hooks_removed_on_exception(hooked):
    model, calls = hooked
    before_ids = _handle_ids(model)
    with pytest.raises(RuntimeError, match="boom"), borrowed(model):
        _add_everything(model, calls)
        raise RuntimeError("boom")
    assert _handle_ids(model) == before_ids
    assert _fire(model, calls) == ["user-bwd", "user-perma", "user-temp"]


def test_inside_an_open_hooks_context_and_nested(hooked):
    """The caller may lend the model from inside its own ``model.hooks()`` block; memloc functions nest."""
    model, calls = hooked
    with model.hooks(fwd_hooks=[(RESID0, _counter(calls, "ctx"))]):
        before_ids = _handle_ids(model)
        with borrowed(model):
            with borrowed(model):
                _add_everything(model, calls)
            assert _handle_ids(model) == before_ids
            with model.hooks(fwd_hooks=[(MLP0, _counter(calls, "inner-ctx"))]):
                model.add_perma_hook(MLP0, _counter(calls, "inner-perma"))
        assert _handle_ids(model) == before_ids
        assert _fire(model, calls) == ["ctx", "user-bwd", "user-perma", "user-temp"]
    assert _fire(model, calls) == ["user-bwd", "user-perma", "user-temp"]


def test_flags_requires_grad_and_weights(tiny):
    params = dict(tiny.named_parameters())
    name = "blocks.0.mlp.out.weight" if "blocks.0.mlp.out.weight" in params else next(iter(params))
    other = next(n for n in params if n != name)
    before = model_state(tiny)
    with borrowed(tiny, restore_weights=[name]):
        tiny.train()
        for p in tiny.parameters():
            p.requires_grad_(not p.requires_grad)
        with torch.no_grad():
            params[name].add_(1.0)
        params[name].grad = torch.ones_like(params[name])
    assert_same_state(tiny, before)
    # without a snapshot, weight edits stay (that is the caller's choice) but flags come back
    with torch.no_grad():
        saved = params[other].detach().clone()
        with borrowed(tiny):
            params[other].add_(1.0)
        assert not torch.equal(params[other], saved)
        params[other].copy_(saved)
    with pytest.raises(RuntimeError, match="boom"), borrowed(tiny, restore_weights=True):
        tiny.train()
        with torch.no_grad():
            for p in tiny.parameters():
                p.mul_(0)
        raise RuntimeError("boom")
    assert_same_state(tiny, before)


def test_trainable_only(tiny):
    names = [n for n, _ in tiny.named_parameters()][:2]
    before = model_state(tiny)
    with borrowed(tiny):
        trainable_only(tiny, names)
        assert [n for n, p in tiny.named_parameters() if p.requires_grad] == names
        trainable_only(tiny)
        assert not any(p.requires_grad for p in tiny.parameters())
    assert_same_state(tiny, before)
