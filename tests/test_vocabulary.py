"""One name for one idea: ``layers`` selects layers (``layer`` is one int), ``non_memorized`` names the NMP set (second
argument, before ``prefix_len``); the old keywords and argument orders still work with a DeprecationWarning."""

from __future__ import annotations

import inspect

import pytest
import torch

from memloc import contrastive, heads
from memloc._deprecation import renamed_kwargs
from memloc.localize import METHODS

RENAMED = [
    (heads.first_token_attention, {"layer": "layers"}),
    (heads.first_token_attention_frame, {"layer": "layers"}),
    (heads.rare_token_attention, {"layer": "layers"}),
    (heads.find_memorization_heads, {"nonmemorized": "non_memorized",
                                     "activation_nonmemorized": "activation_non_memorized"}),
    (contrastive.contrastive_gradients, {"nonmemorized": "non_memorized"}),
    (contrastive.finetune_mask, {"nonmemorized": "non_memorized"}),
    (contrastive.sparse_finetune, {"nonmemorized": "non_memorized"}),
]

PUBLIC = [getattr(m, n) for m in (heads, contrastive) for n in m.__all__ if inspect.isfunction(getattr(m, n))]


@pytest.mark.parametrize("fn,renames", RENAMED, ids=[f.__name__ for f, _ in RENAMED])
def test_new_names_in_signature_old_ones_deprecated(fn, renames):
    params = inspect.signature(fn).parameters
    assert fn.__deprecated_kwargs__ == renames
    for old, new in renames.items():
        assert new in params and old not in params


@pytest.mark.parametrize("fn", PUBLIC + [m.fn for m in METHODS.values()], ids=lambda f: f.__name__)
def test_no_public_function_uses_an_old_name(fn):
    sig = inspect.signature(fn).parameters
    assert not set(sig) & {"nonmemorized", "activation_nonmemorized"}, fn.__name__
    if "layer" in sig:  # `layer` is one layer index; a selection of layers is `layers`
        assert sig["layer"].annotation in (int, "int"), fn.__name__
    names = list(inspect.signature(fn).parameters)
    if "non_memorized" in names and "memorized" in names:
        assert names.index("memorized") + 1 == names.index("non_memorized"), fn.__name__


def test_old_keyword_still_works_with_a_warning(tiny):
    x = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(0))
    new = heads.first_token_attention(tiny, x, 10, layers=1, progress_bar=False)
    with pytest.warns(DeprecationWarning, match=r"first_token_attention\(layer=...\) is deprecated; use layers="):
        old = heads.first_token_attention(tiny, x, 10, layer=1, progress_bar=False)
    torch.testing.assert_close(old, new)
    assert new.shape == (2, 8, 10)
    with pytest.raises(ValueError, match="pass layers= only"):
        heads.first_token_attention(tiny, x, 10, layer=1, layers=1)
    with pytest.warns(DeprecationWarning, match="use non_memorized="):
        mask = contrastive.finetune_mask(tiny, x[:1], nonmemorized=x[1:], prefix_len=10, mask="random",
                                         fraction=0.001)
    assert sum(int(m.sum()) for m in mask.values()) > 0


def test_renamed_kwargs_decorator():
    @renamed_kwargs(old="new")
    def f(a, *, new=1):
        return a + new

    assert f(1, new=2) == 3 and inspect.signature(f).parameters.keys() == {"a", "new"}
    with pytest.warns(DeprecationWarning):
        assert f(1, old=5) == 6


def test_contrastive_loss_old_argument_order_warns(tiny):
    """``contrastive_loss(model, memorized, prefix_len, non_memorized)``, the order before the NMP set moved
    next to the MP set, still works (all positional, or with ``non_memorized=``), with a DeprecationWarning."""
    x = torch.randint(0, 4096, (4, 20), generator=torch.Generator().manual_seed(0))
    assert contrastive.contrastive_loss.__deprecated_order__ == ("model", "memorized", "prefix_len", "non_memorized")
    new = contrastive.contrastive_loss(tiny, x[:2], x[2:], 10)
    for call in (lambda: contrastive.contrastive_loss(tiny, x[:2], 10, x[2:]),
                 lambda: contrastive.contrastive_loss(tiny, x[:2], 10, non_memorized=x[2:])):
        with pytest.warns(DeprecationWarning, match=r"deprecated argument order; use "
                                                    r"contrastive_loss\(model, memorized, non_memorized, prefix_len"):
            old = call()
        torch.testing.assert_close(old, new)
    with pytest.raises(TypeError, match="multiple values for argument 'non_memorized'"):
        contrastive.contrastive_loss(tiny, x[:2], 10, x[2:], non_memorized=x[2:])
