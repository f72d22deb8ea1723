"""Shared machinery of the benchmarks: resolving localization methods and caching their scores.

A localization method is a callable ``(model, tokens [1, seq], prefix_len, **hyperparameters)
-> Float[Tensor, "layer neuron"]`` (see :mod:`memloc.localize`).  Attribution scores can take
minutes per sequence (HARD CONCRETE, IG, ZERO-OUT), so :func:`localize_cached` stores them as
safetensors keyed by (model fingerprint, method, hyperparameters, sequence, prefix length) in the
one content-addressed cache of :mod:`memloc.cache` (``model_fingerprint`` is re-exported from there).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..cache import ContentCache, digest, model_fingerprint
from ..cache import tensor_bytes as _tensor_bytes  # noqa: F401  (the old private name)
from ..models import Model

logger = logging.getLogger(__name__)

__all__ = ["resolve_methods", "check_method_kwargs", "accepted_hyperparameters", "model_fingerprint", "localize_cached", "score_cache_path",
           "with_sequence_seed", "with_defaults", "cached_scores", "store_scores"]

#: The paper's method order (Chang et al. Tables 2 and 3), used when sorting tables.
PAPER_ORDER = ("hard_concrete", "slimming", "zero_out", "integrated_gradients", "activations",
               "attribution_patching", "random")


def resolve_methods(methods: Mapping[str, Callable] | Sequence[str] | str) -> dict[str, Callable]:
    """Turn ``methods`` into an ordered ``{name: callable}`` dict.

    Names are looked up in the registry ``memloc.localize.METHODS`` (imported lazily, only when a
    name has to be resolved): aliases become canonical names (``"ig"`` -> ``"integrated_gradients"``)
    and the values are the :class:`~memloc.localize.Method` records.  A mapping passes through after
    checking that its values are callable.
    """
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if isinstance(methods, Mapping):
        out = dict(methods)
    elif isinstance(methods, Sequence):
        names = list(methods)
        if any(not isinstance(n, str) for n in names):
            raise ValueError(f"methods must be a dict name -> callable or a list of method names, got {methods!r}")
        out = {}
        if names:
            try:
                from ..localize import METHODS
            except ImportError as exc:  # the registry is not there: say which names were asked for
                raise ValueError(f"methods {names} need memloc.localize.METHODS, which could not be imported "
                                 f"({exc}); pass a dict name -> callable instead") from exc
            unknown = [n for n in names if n not in METHODS]
            if unknown:
                raise ValueError(f"methods: unknown method names {unknown}; expected some of {list(METHODS)} "
                                 f"(aliases: {dict(METHODS.aliases)})")
            canonical = [METHODS.canonical(n) for n in names]
            dup = sorted({n for n in canonical if canonical.count(n) > 1})
            if dup:
                raise ValueError(f"methods: {names} names {dup} more than once (aliases included)")
            out = {n: METHODS[n] for n in canonical}
    else:
        raise ValueError(f"methods must be a dict name -> callable or a list of method names, got "
                         f"{type(methods).__name__}")
    if not out:
        raise ValueError("methods is empty; pass at least one localization method")
    bad = [n for n, f in out.items() if not callable(f) or not isinstance(n, str)]
    if bad:
        raise ValueError(f"methods: entries {bad} are not (str name -> callable)")
    return out


def accepted_hyperparameters(fn: Callable) -> frozenset[str] | None:
    """The keyword hyperparameters a localization method accepts, or None if it takes any.

    A registry record (:class:`memloc.localize.Method`), or a function registered in it, answers
    from its declaration; any other callable (a user's own method) from its signature: its
    keyword parameters after ``(model, tokens, prefix_len)``, or None with ``**kwargs`` or when
    the signature cannot be read.
    """
    from ..localize import METHODS, Method

    if isinstance(fn, Method):
        return fn.accepts
    for record in METHODS.values():
        if fn is record.fn:
            return record.accepts
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    skip = {p.name for p in positional[:3]}  # model, tokens, prefix_len
    return frozenset(p.name for p in params if p.name not in skip and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def check_method_kwargs(method_kwargs: Mapping[str, Mapping] | None, methods: Mapping[str, Callable]) -> dict[str, dict]:
    """Validate per-method hyperparameters ``{method name: {kwarg: value}}`` before any work.

    Every method name must be one of ``methods`` (an alias such as ``"ig"`` counts as its canonical
    name) and every hyperparameter one the method accepts (:func:`accepted_hyperparameters`);
    otherwise a ValueError lists the valid names.  Returns ``{name: dict}`` for every method.
    """
    if method_kwargs is None:
        return {n: {} for n in methods}
    if not isinstance(method_kwargs, Mapping):
        raise ValueError(f"method_kwargs must be a dict method name -> dict of hyperparameters, got "
                         f"{type(method_kwargs).__name__}")
    from ..localize import METHODS

    given: dict[str, Any] = {}
    for key, kw in method_kwargs.items():
        name = key
        if key not in methods and isinstance(key, str) and key in METHODS and METHODS.canonical(key) in methods:
            name = METHODS.canonical(key)  # an alias of a method that is run
        if name in given:
            raise ValueError(f"method_kwargs sets method {name!r} twice (through an alias)")
        given[name] = kw
    unknown = [n for n in given if n not in methods]
    if unknown:
        raise ValueError(f"method_kwargs names methods {unknown} that are not among methods {list(methods)}")
    out = {}
    for n in methods:
        kw = given.get(n, {}) or {}
        if not isinstance(kw, Mapping):
            raise ValueError(f"method_kwargs[{n!r}] must be a dict of hyperparameters, got {type(kw).__name__}")
        accepted = accepted_hyperparameters(methods[n])
        if accepted is not None:
            bad = sorted(str(k) for k in kw if k not in accepted)
            if bad:
                raise ValueError(f"method_kwargs[{n!r}]: method {n!r} does not take {bad}; its hyperparameters "
                                 f"are {sorted(accepted)}")
        out[n] = dict(kw)
    return out


#: Hyperparameters that do not change a method's scores (not filled in from the declared defaults).
_NOT_SCORE_AFFECTING = frozenset({"progress_bar", "history"})


def with_defaults(fn: Callable, kwargs: Mapping, **defaults: Any) -> dict:
    """``kwargs`` plus each of ``defaults`` that ``fn`` accepts as a keyword
    (:func:`accepted_hyperparameters`; a method taking ``**kwargs`` gets none of them) and
    ``kwargs`` does not set (an explicit value in ``kwargs`` always wins).

    For a registered method the declared defaults of its record (:data:`memloc.localize.METHODS`)
    are filled in as well, so the benchmarks' score-cache keys name every hyperparameter a call runs
    with: a change of a library default (e.g. SLIMMING's per-neuron λ) is a new cache entry, never
    a stale hit."""
    from ..localize import METHODS, Method

    record = fn if isinstance(fn, Method) else next((r for r in METHODS.values() if fn is r.fn), None)
    declared = {} if record is None else {k: v for k, v in record.defaults.items()
                                          if k not in _NOT_SCORE_AFFECTING}
    accepted = accepted_hyperparameters(fn)
    if accepted is None:
        return dict(kwargs)
    given = {key: value for key, value in defaults.items() if key in accepted}
    return {**declared, **given, **kwargs}  # explicit kwargs win over the given defaults over declared ones


def with_sequence_seed(fn: Callable, kwargs: Mapping, index: int) -> dict:
    """``kwargs`` plus ``seed=index`` if ``fn`` takes a ``seed`` keyword and ``kwargs`` sets none.

    The benchmarks call this per sequence so that RANDOM draws a fresh random neuron set for
    every sequence (as in Chang et al.), and stochastic methods (HARD CONCRETE) are
    reproducible per sequence; an explicit ``seed`` in ``method_kwargs`` is used for every
    sequence instead.
    """
    return with_defaults(fn, kwargs, seed=int(index))


def _kwargs_json(kwargs: Mapping) -> str:
    return json.dumps(dict(kwargs), sort_keys=True, default=repr)


def score_cache_path(cache_dir: str | Path, fingerprint: str, method: str, kwargs: Mapping,
                     tokens: Int[Tensor, "1 seq"], prefix_len: int) -> Path:
    """Where the scores of one (model, method, hyperparameters, sequence, prefix) live:
    ``cache_dir/<method>/<digest>.safetensors`` in the one content-addressed cache
    (:class:`memloc.cache.ContentCache`)."""
    key = digest(fingerprint, method, _kwargs_json(kwargs), str(int(prefix_len)), tokens.long())
    return ContentCache(cache_dir).path(method.replace("/", "_"), key, ".safetensors")


def _check_scores(scores: Any, method: str, model: Model) -> Tensor:
    shape = (int(model.cfg.n_layers), int(model.cfg.d_mlp))
    if not isinstance(scores, Tensor) or tuple(scores.shape) != shape or not scores.dtype.is_floating_point:
        raise ValueError(f"method {method!r} returned {type(scores).__name__} {tuple(getattr(scores, 'shape', ()))}; "
                         f"expected a float tensor of shape {shape} [layer, neuron]")
    if torch.isnan(scores).all():
        raise ValueError(f"method {method!r} returned only NaN scores")
    # methods may leave unscored layers/neurons NaN (e.g. zero_out(layers=...)): never select them
    return torch.nan_to_num(scores.detach().float(), nan=float("-inf"))


def localize_cached(model: Model, method: str, fn: Callable, tokens: Int[Tensor, "1 seq"], prefix_len: int,
                    kwargs: Mapping | None = None, *, cache_dir: str | Path | None = None,
                    fingerprint: str | None = None) -> Float[Tensor, "layer neuron"]:
    """Scores of ``fn(model, tokens, prefix_len, **kwargs)``, read from / written to ``cache_dir``.

    The cache key is (``fingerprint`` or :func:`model_fingerprint`, ``method``, ``kwargs``,
    ``tokens``, ``prefix_len``); the file also records them as metadata, which is checked on
    read.  Returns float32 scores on the CPU.
    """
    kwargs = dict(kwargs or {})
    path = meta = None
    if cache_dir is not None:
        fingerprint = fingerprint or model_fingerprint(model)
        path = score_cache_path(cache_dir, fingerprint, method, kwargs, tokens, prefix_len)
        meta = {"fingerprint": fingerprint, "method": method, "kwargs": _kwargs_json(kwargs),
                "prefix_len": str(int(prefix_len)), "tokens": digest(tokens.long())}
        stored = ContentCache.load_tensors(path, meta)
        if stored is not None and "scores" in stored:
            return stored["scores"]
    scores = _check_scores(fn(model, tokens, prefix_len, **kwargs), method, model).detach().float().cpu()
    if path is not None:
        ContentCache.save_tensors(path, {"scores": scores}, meta)
    return scores


class _NotCached(Exception):
    pass


def _not_cached(*args: Any, **kwargs: Any) -> Tensor:
    raise _NotCached


def cached_scores(model: Model, name: str, x: Tensor, prefix_len: int, kw: Mapping, cache_dir: str | Path | None,
                  fingerprint: str | None) -> Tensor | None:
    """The scores of (model, method, hyperparameters, sequence) from the score cache, or None."""
    if cache_dir is None or not score_cache_path(cache_dir, fingerprint, name, kw, x, prefix_len).exists():
        return None
    try:
        return localize_cached(model, name, _not_cached, x, prefix_len, kw, cache_dir=cache_dir,
                               fingerprint=fingerprint)
    except _NotCached:
        return None


def store_scores(model: Model, name: str, x: Tensor, prefix_len: int, kw: Mapping, scores: Tensor,
                 cache_dir: str | Path | None, fingerprint: str | None) -> Tensor:
    """Write scores computed elsewhere (a worker) into the score cache, exactly as a serial run would."""
    if cache_dir is None:
        return scores
    return localize_cached(model, name, lambda *a, **k: scores, x, prefix_len, kw, cache_dir=cache_dir,
                           fingerprint=fingerprint)
