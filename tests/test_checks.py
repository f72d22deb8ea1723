"""memloc._checks: every validation helper raises a ValueError that names the argument, and returns
the normalized value otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memloc import _checks


#: The embedded model's sizes, which the boundary cases below are written for (checked in each test).
D_VOCAB, N_CTX, N_LAYERS = 4096, 128, 4


@pytest.fixture
def M(tiny):
    """The embedded model (the checks read its ``cfg`` and a parameter's device)."""
    assert (tiny.cfg.d_vocab, tiny.cfg.n_ctx, tiny.cfg.n_layers) == (D_VOCAB, N_CTX, N_LAYERS)
    return tiny


def test_check_tokens_normalizes(M):
    out = _checks.check_tokens(M, [[1, 2, 3]], 1)
    assert out.dtype == torch.long and out.tolist() == [[1, 2, 3]]
    assert _checks.check_tokens(M, torch.tensor([[0, D_VOCAB - 1]], dtype=torch.int32)).dtype == torch.long


@pytest.mark.parametrize("tokens,prefix_len,match", [
    ("abc", None, "tokens must be a 2-D integer torch.Tensor"),
    (torch.zeros(1, 3), None, "integer token ids"),
    (torch.zeros(3, dtype=torch.long), None, "2-D"),
    (torch.zeros(0, 3, dtype=torch.long), None, "empty batch"),
    (torch.zeros(1, 0, dtype=torch.long), None, "zero-length"),
    (torch.tensor([[1, D_VOCAB]]), None, "outside the vocabulary"),
    (torch.tensor([[-1, 1]]), None, "outside the vocabulary"),
    (torch.zeros(1, N_CTX + 1, dtype=torch.long), None, "longer than the model's context"),
    (torch.zeros(1, 4, dtype=torch.long), 4, "prefix_len must be in 1..3"),
    (torch.zeros(1, 4, dtype=torch.long), 0, "prefix_len must be in 1..3"),
    (torch.zeros(1, 4, dtype=torch.long), 1.0, "prefix_len must be an int"),
    (torch.zeros(1, 4, dtype=torch.long), True, "prefix_len must be an int"),
])
def test_check_tokens_rejects(M, tokens, prefix_len, match):
    with pytest.raises(ValueError, match=match):
        _checks.check_tokens(M, tokens, prefix_len)


def test_scalars(M):
    assert _checks.check_positive_int(3, "n") == 3
    assert _checks.check_fraction(1, "f") == 1.0 and _checks.check_fraction(0, "f", allow_zero=True) == 0.0
    assert _checks.check_float(2, "lr") == 2.0 and _checks.check_float(0, "lam", positive=False) == 0.0
    assert _checks.check_seed(-3) == -3 and _checks.check_seed(0, non_negative=True) == 0
    assert _checks.check_choice("a", "x", ("a", "b")) == "a"
    assert _checks.check_start_layer(M, N_LAYERS - 1) == N_LAYERS - 1
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="n must be a positive int"):
            _checks.check_positive_int(bad, "n")
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"f must be a fraction in \(0, 1\]"):
            _checks.check_fraction(bad, "f")
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="lr must be a positive number"):
            _checks.check_float(bad, "lr")
    with pytest.raises(ValueError, match="lam must be a non-negative number"):
        _checks.check_float(-1e-9, "lam", positive=False)
    for bad in (1.0, True, None):
        with pytest.raises(ValueError, match="seed must be an int"):
            _checks.check_seed(bad)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        _checks.check_seed(-1, non_negative=True)
    with pytest.raises(ValueError, match="x must be one of"):
        _checks.check_choice("c", "x", ("a", "b"))
    for bad in (N_LAYERS, -1, True, 1.0):
        with pytest.raises(ValueError, match=rf"start_layer must be an int in 0..{N_LAYERS - 1}"):
            _checks.check_start_layer(M, bad)


def test_check_layers(M):
    assert _checks.check_layers(M, None) == list(range(N_LAYERS))
    assert _checks.check_layers(M, 1) == [1]
    assert _checks.check_layers(M, np.int64(2)) == [2]
    assert _checks.check_layers(M, (2, 0)) == [2, 0]
    assert _checks.check_layers(M, torch.tensor([1, 2])) == [1, 2]
    for bad in (N_LAYERS, -1, [0, N_LAYERS], [True], [1.0], "1", 1.5):
        with pytest.raises(ValueError,
                           match=rf"layer must be None, an int or a sequence of distinct ints in 0..{N_LAYERS - 1}"):
            _checks.check_layers(M, bad, "layer")
    with pytest.raises(ValueError, match="layers must name at least one layer"):
        _checks.check_layers(M, [])
    with pytest.raises(ValueError, match="layers repeats a layer"):
        _checks.check_layers(M, [1, 1])
