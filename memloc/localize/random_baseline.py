"""RANDOM baseline (Chang et al. §5): random scores, so top-k selects random neurons."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_seed
from ..models import Model
from ._common import prepare_sequence

__all__ = ["random_scores"]


def random_scores(model: Model, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int, *,
                  seed: int = 0) -> Float[Tensor, "layer neuron"]:
    """RANDOM baseline: i.i.d. U(0, 1) scores per neuron from a ``torch.Generator`` seeded with
    ``seed`` (the global RNG is untouched); the input is validated like every method's but not used
    (the authors' code draws ``torch.rand(n_layer, inner_dim)``)."""
    tokens = prepare_sequence(model, tokens, prefix_len)
    check_seed(seed)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.rand(model.cfg.n_layers, model.cfg.d_mlp, generator=gen).to(tokens.device)
