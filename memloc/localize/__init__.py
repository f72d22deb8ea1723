"""Neuron-localization methods of Chang et al. 2024 (§4): each is a function
``(model, tokens, prefix_len, **hyperparameters) -> Float[Tensor, "layer neuron"]`` of attribution
scores over the FFN neurons ``blocks.{l}.mlp.hook_post`` for one sequence (``[seq]`` or
``[1, seq]``); the suffix is ``tokens[prefix_len:]``.  Select neurons with
:func:`memloc.ablation.select_top_k`.

``METHODS`` maps names to the functions so benchmarks can iterate over them.

Defaults follow the paper and, where A.7 gives no numbers, the authors' released code
(terarachang/MemPi): IG 20 Riemann steps; SLIMMING and HARD CONCRETE Adam lr 1e-2, early stop
once the (normalized) sparsity term < 0.1; HARD CONCRETE beta 2/3, initial mask 0.5,
(gamma, zeta) = (-0.1, 1.1).  Departures, so that the defaults transfer across model sizes
(``memloc.localize._masks``): the sparsity weight is per neuron (``DEFAULT_LAM`` = the authors'
lambda 1000 on GPT2-XL's 300,800 masked neurons, 1000 / 300,800 = 3.3245e-3), the early stop also
requires the memorization loss near its clean value, and the step cap is 500 (theirs: 5000).
``AUTHORS_SETTINGS`` restores the authors' settings (lambda 1000 on the mean, stop on sparsity
alone, 5000 steps).

Note: the functions shadow their submodules' names (``memloc.localize.zero_out`` is the function);
reach a submodule through ``sys.modules["memloc.localize.zero_out"]`` if needed.
"""

from __future__ import annotations

from typing import Callable

from .activations import activations
from .attribution_patching import attribution_patching
from .hard_concrete import hard_concrete, hard_concrete_mask, l0_regularizer
from .integrated_gradients import integrated_gradients
from .random_baseline import random_scores
from .slimming import l1_regularizer, slimming
from .zero_out import zero_out
from ._masks import AUTHORS_SETTINGS, DEFAULT_LAM

__all__ = ["METHODS", "activations", "integrated_gradients", "zero_out", "slimming", "hard_concrete",
           "random_scores", "attribution_patching", "hard_concrete_mask", "l0_regularizer", "l1_regularizer",
           "AUTHORS_SETTINGS", "DEFAULT_LAM"]

#: Method name -> localization function (``"ig"`` is an alias of ``"integrated_gradients"``).
METHODS: dict[str, Callable] = {
    "activations": activations,
    "integrated_gradients": integrated_gradients,
    "ig": integrated_gradients,
    "zero_out": zero_out,
    "slimming": slimming,
    "hard_concrete": hard_concrete,
    "random": random_scores,
    "attribution_patching": attribution_patching,
}
