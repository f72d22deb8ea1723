"""Shared fixtures: the embedded model, random-weight models of real architectures, and a check
that a function handed the model back exactly as it found it."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MEMLOC_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

#: Runtime type and shape checks: every function and dataclass of the memloc package runs under
#: ``@jaxtyped(typechecker=beartype)`` (jaxtyping's import hook, installed before memloc is
#: imported), so annotations such as ``Float[Tensor, "layer neuron"]`` are checked on every call of
#: the test suite.  ``MEMLOC_TYPECHECK=0`` turns them off (e.g. to time the suite without them).
TYPECHECK = os.environ.get("MEMLOC_TYPECHECK", "1") != "0"
if TYPECHECK:
    import jaxtyping

    jaxtyping.install_import_hook("memloc", "tests._typecheck.typechecker")

    _raises = pytest.raises

    def _raises_unchecked(expected, *args, **kwargs):
        """``pytest.raises(ValueError, ...)`` blocks test memloc's own validation (bad input ->
        ValueError naming the argument, before any work): run them with the runtime checks off, so
        that the type checker does not pre-empt the library with a TypeCheckError.  Every other
        block (and all the rest of every test) keeps the checks."""
        types = expected if isinstance(expected, tuple) else (expected,)
        if not any(isinstance(t, type) and issubclass(t, ValueError) for t in types):
            return _raises(expected, *args, **kwargs)
        from contextlib import contextmanager

        @contextmanager
        def unchecked():
            old = jaxtyping.config.jaxtyping_disable
            jaxtyping.config.update("jaxtyping_disable", True)
            try:
                yield
            finally:
                jaxtyping.config.update("jaxtyping_disable", old)

        if args:  # the legacy call form pytest.raises(E, func, *args)
            with unchecked():
                return _raises(expected, *args, **kwargs)

        @contextmanager
        def checked_off():
            with unchecked(), _raises(expected, **kwargs) as info:
                yield info

        return checked_off()

    pytest.raises = _raises_unchecked

from memloc import load_model  # noqa: E402

from .factories import build_random_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The embedded model (shared: tests must leave it as they found it)."""
    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_paragraphs():
    from memloc import load_paragraphs

    return load_paragraphs("tiny")


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """Factory: directory of a random-weight model of a given kind (built once per session)."""
    built = {}

    def make(kind: str):
        if kind not in built:
            built[kind] = build_random_model(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return make


def model_state(model) -> dict:
    """Everything a borrowed model must get back: weights, requires_grad, train flags, hooks."""
    return {
        # an offloaded weight (device_map) stays on meta: its placement, shape and dtype are what it has
        "weights": {n: (p.detach().clone() if p.device.type != "meta" else (p.device, p.shape, p.dtype))
                    for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(hp.fwd_hooks), len(hp.bwd_hooks)) for n, hp in model.hook_dict.items()},
        "grads": {n: p.grad is None for n, p in model.named_parameters()},
    }


def assert_same_state(model, before: dict) -> None:
    after = model_state(model)
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["hooks"] == before["hooks"], "hooks left behind"
    assert after["grads"] == before["grads"], ".grad left behind"
    for n, w in before["weights"].items():
        a = after["weights"][n]
        assert (a == w) if isinstance(w, tuple) else (isinstance(a, torch.Tensor) and torch.equal(a, w)), \
            f"weight {n} changed"


@pytest.fixture
def unchanged():
    """Use as ``with unchanged(model): ...``: asserts the model is exactly restored afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def check(model):
        before = model_state(model)
        try:
            yield
        finally:
            assert_same_state(model, before)

    return check
