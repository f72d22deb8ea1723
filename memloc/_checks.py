"""Input validation shared by every public function: clear ValueErrors before any work."""

from __future__ import annotations

import math

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .models import Model


def check_tokens(model: Model, tokens: Any, prefix_len: int | None = None, *, name: str = "tokens",
                 device: str | torch.device | None = None) -> Tensor:
    """Validate a [batch, seq] token tensor for ``model`` and return it as int64 on the model's device.

    Raises ValueError for: non-tensors, non-integer dtypes, non-2D shapes, empty batches,
    ids outside the vocabulary, sequences longer than the context, and a ``prefix_len``
    that is not in 1..seq-1.
    """
    if isinstance(tokens, (list, tuple)):
        try:
            tokens = torch.tensor(tokens)
        except Exception as exc:
            raise ValueError(f"{name} must be a 2-D integer tensor [batch, seq]; could not convert: {exc}") from exc
    if not isinstance(tokens, Tensor):
        raise ValueError(f"{name} must be a 2-D integer torch.Tensor [batch, seq], got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(tokens.shape)}); pass at least one sequence")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} has zero-length sequences")
    d_vocab, n_ctx = int(model.cfg.d_vocab), int(model.cfg.n_ctx)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {d_vocab}): min {lo}, max {hi}")
    if tokens.shape[1] > n_ctx:
        raise ValueError(f"{name} has sequences of length {tokens.shape[1]}, longer than the model's "
                         f"context n_ctx={n_ctx}")
    if prefix_len is not None:
        check_prefix_len(prefix_len, tokens.shape[1])
    dev = device if device is not None else next(model.parameters()).device
    return tokens.to(device=dev, dtype=torch.long)


def check_prefix_len(prefix_len: Any, seq_len: int) -> int:
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise ValueError(f"prefix_len must be an int, got {type(prefix_len).__name__}")
    if not 0 < prefix_len < seq_len:
        raise ValueError(f"prefix_len must be in 1..{seq_len - 1} for sequences of length {seq_len}, "
                         f"got {prefix_len}")
    return prefix_len


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_fraction(value: Any, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0 <= value <= 1 if allow_zero else 0 < value <= 1)
    if not ok:
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a fraction in {rng}, got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_float(value: Any, name: str, *, positive: bool = True) -> float:
    """A real number that is > 0 (``positive=True``) or >= 0; returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0) or value < 0:
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def check_seed(value: Any, name: str = "seed", *, non_negative: bool = False) -> int:
    """A random seed: an int (``non_negative=True``: >= 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or (non_negative and value < 0):
        raise ValueError(f"{name} must be {'a non-negative' if non_negative else 'an'} int, got {value!r}")
    return value


def check_start_layer(model: Model, start_layer: Any) -> int:
    """A layer index in ``0..n_layers-1`` (the first layer a method masks or scores)."""
    n = model.cfg.n_layers
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < n:
        raise ValueError(f"start_layer must be an int in 0..{n - 1}, got {start_layer!r}")
    return start_layer


def check_layers(model: Model, layers: Any, name: str = "layers") -> list[int]:
    """Layers to work on: ``None`` (all), one int, or a non-empty sequence of distinct ints in
    ``0..n_layers-1``; returned as a list of ints in the order given."""
    n_layers = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n_layers))
    expected = f"{name} must be None, an int or a sequence of distinct ints in 0..{n_layers - 1}, got {layers!r}"
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    if isinstance(layers, Tensor):
        layers = layers.tolist()
    items = [layers] if is_int(layers) else layers
    if isinstance(items, (str, bytes)):
        raise ValueError(expected)
    try:
        items = list(items)
    except TypeError:
        raise ValueError(expected) from None
    if not items:
        raise ValueError(f"{name} must name at least one layer, got an empty sequence")
    if any(not is_int(li) or not 0 <= int(li) < n_layers for li in items):
        raise ValueError(expected)
    out = [int(li) for li in items]
    if len(set(out)) != len(out):
        raise ValueError(f"{name} repeats a layer: {layers!r}")
    return out


def check_number(value: Any, name: str, lo: float, hi: float = math.inf, *, lo_open: bool = False,
            hi_open: bool = False, what: str = "") -> float:
    """``value`` as a float if it is a finite number in the interval [lo, hi] (open ends with
    ``lo_open`` / ``hi_open``); otherwise a ValueError naming ``name``, the interval and ``what``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {rng}{what}, got {value!r}")
    return float(value)


def check_frequencies(frequencies: Any, d_vocab: int) -> Tensor:
    """Corpus unigram counts (Stoehr §6.3) as a float64 CPU tensor of length ``d_vocab``; ValueError otherwise."""
    if frequencies is None:
        raise ValueError("frequencies must be a 1-D table of corpus unigram counts, got None")
    if not isinstance(frequencies, Tensor):
        try:
            frequencies = torch.as_tensor(np.array(frequencies))
        except Exception as exc:
            raise ValueError(f"frequencies must be a 1-D numeric table of length {d_vocab}: {exc}") from exc
    if frequencies.dtype == torch.bool or frequencies.dtype.is_complex:
        raise ValueError(f"frequencies must be numeric counts, got dtype {frequencies.dtype}")
    if frequencies.ndim != 1 or frequencies.shape[0] != d_vocab:
        raise ValueError(f"frequencies must be a 1-D table with one count per vocabulary entry "
                         f"(length {d_vocab}), got shape {tuple(frequencies.shape)}")
    freq = frequencies.detach().double().cpu()
    if not torch.isfinite(freq).all() or bool((freq < 0).any()):
        raise ValueError("frequencies must be finite and non-negative")
    return freq
