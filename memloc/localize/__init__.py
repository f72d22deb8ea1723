"""Neuron-localization methods of Chang et al. 2024 (§4): each is a function
``(model, tokens, prefix_len, **hyperparameters) -> Float[Tensor, "layer neuron"]`` of attribution
scores over the FFN neurons ``blocks.{l}.mlp.hook_post`` for one sequence (``[seq]`` or
``[1, seq]``); the suffix is ``tokens[prefix_len:]``.  Select neurons with
:func:`memloc.ablation.select_top_k`.

``METHODS`` is the registry: it maps each canonical name to a :class:`Method` record (the
function, the paper equation, whether it is stochastic, the hyperparameters it accepts and their
defaults), declared below per method.  Records are callable like their function
(``METHODS["hard_concrete"](model, x, 50)``).  Iterating ``METHODS`` yields every method once;
aliases (``"ig"``) are looked up with :func:`get_method` / :func:`canonical_name` (and
``METHODS["ig"]``) but never iterated.

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

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from jaxtyping import Float, Int
from torch import Tensor

from ..models import Model
from .activations import activations
from .attribution_patching import attribution_patching
from .hard_concrete import hard_concrete, hard_concrete_mask, l0_regularizer
from .integrated_gradients import integrated_gradients
from .random_baseline import random_scores
from .slimming import l1_regularizer, slimming
from .zero_out import zero_out
from ._masks import AUTHORS_SETTINGS, DEFAULT_LAM, DEFAULT_STOP_MASK_MEAN

__all__ = ["METHODS", "ALIASES", "Method", "MethodRegistry", "get_method", "canonical_name",
           "activations", "integrated_gradients", "zero_out", "slimming", "hard_concrete",
           "random_scores", "attribution_patching", "hard_concrete_mask", "l0_regularizer", "l1_regularizer",
           "AUTHORS_SETTINGS", "DEFAULT_LAM", "DEFAULT_STOP_MASK_MEAN"]


@dataclass(frozen=True)
class Method:
    """One localization method of the registry.

    Attributes:
        name: canonical name (the key in :data:`METHODS`).
        fn: ``fn(model, tokens, prefix_len, **hyperparameters) -> Float[Tensor, "layer neuron"]``.
        equation: the paper equation(s) it implements.
        stochastic: whether its scores depend on a ``seed`` hyperparameter (the benchmarks then
            seed it per sequence).
        defaults: every keyword hyperparameter it accepts, with its default value; declared here,
            not discovered (``tests/test_registry.py`` checks them against ``fn``).
    """

    name: str
    fn: Callable[..., Any]
    equation: str
    stochastic: bool
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def accepts(self) -> frozenset[str]:
        """Names of the keyword hyperparameters ``fn`` accepts."""
        return frozenset(self.defaults)

    def __call__(self, model: Model, tokens: Int[Tensor, "1 seq"] | Int[Tensor, "seq"], prefix_len: int,
                 **hyperparameters: Any) -> Float[Tensor, "layer neuron"]:
        """``fn(model, tokens, prefix_len, **hyperparameters)``."""
        return self.fn(model, tokens, prefix_len, **hyperparameters)


class MethodRegistry(Mapping[str, Method]):
    """Canonical name -> :class:`Method`.  Iteration, ``len`` and ``items()`` cover each method
    once; ``registry[alias]`` and ``alias in registry`` also resolve :data:`ALIASES`."""

    def __init__(self, methods: list[Method], aliases: Mapping[str, str]):
        self._methods = {m.name: m for m in methods}
        bad = {a: c for a, c in aliases.items() if c not in self._methods or a in self._methods}
        if bad:
            raise ValueError(f"aliases {bad} must map new names to registered methods")
        self.aliases = MappingProxyType(dict(aliases))

    def canonical(self, name: str) -> str:
        if not isinstance(name, str):
            raise ValueError(f"a method name must be a str, got {type(name).__name__}")
        name = self.aliases.get(name, name)
        if name not in self._methods:
            raise ValueError(f"unknown localization method {name!r}; expected one of {list(self._methods)} "
                             f"(aliases: {dict(self.aliases)})")
        return name

    def __getitem__(self, name: str) -> Method:
        if not isinstance(name, str) or self.aliases.get(name, name) not in self._methods:
            raise KeyError(name)
        return self._methods[self.aliases.get(name, name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.aliases.get(name, name) in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"MethodRegistry({list(self._methods)}, aliases={dict(self.aliases)})"


# Each record declares the method's hyperparameters and defaults explicitly (keep them in step
# with the function signature; tests/test_registry.py compares the two).
_MASK_DEFAULTS = dict(lam=DEFAULT_LAM, lam_scale="per_neuron", lr=1e-2, max_steps=500, stop_loss=0.1,
                      stop_mask_mean=DEFAULT_STOP_MASK_MEAN, stop_mem_margin=0.5, check_every=10, start_layer=0,
                      progress_bar=True, history=None)

#: Alias -> canonical method name.
ALIASES: Mapping[str, str] = {"ig": "integrated_gradients"}

#: The method registry (see :class:`MethodRegistry`).
METHODS = MethodRegistry([
    Method("activations", activations, "Chang et al. Eq. 8", stochastic=False,
           defaults=dict(reduce="mean_abs")),
    Method("integrated_gradients", integrated_gradients, "Chang et al. Eq. 14-16 (A.2)", stochastic=False,
           defaults=dict(steps=20, batch_size=None, layers=None, positions=None, implementation="auto",
                         progress_bar=True)),
    Method("zero_out", zero_out, "Chang et al. Eq. 7", stochastic=False,
           defaults=dict(batch_size=64, layers=None, neurons=None, compute_dtype=None, progress_bar=True)),
    Method("slimming", slimming, "Chang et al. Eq. 9 (A.3)", stochastic=False,
           defaults=dict(_MASK_DEFAULTS)),
    Method("hard_concrete", hard_concrete, "Chang et al. Eq. 10-12, 17 (A.4)", stochastic=True,
           defaults=dict(_MASK_DEFAULTS, beta=2 / 3, mask_init=0.5, seed=0)),
    Method("random", random_scores, "Chang et al. §4 RANDOM baseline", stochastic=True,
           defaults=dict(seed=0)),
    Method("attribution_patching", attribution_patching, "first-order estimate of Chang et al. Eq. 7",
           stochastic=False, defaults={}),
], ALIASES)


def canonical_name(name: str) -> str:
    """The canonical registry name of ``name`` (resolving aliases such as ``"ig"``); ValueError if unknown."""
    return METHODS.canonical(name)


def get_method(name: str) -> Method:
    """The :class:`Method` record of ``name`` (canonical or alias); ValueError if unknown."""
    return METHODS[canonical_name(name)]
