"""Dev-set hyperparameter selection for the localization methods (Chang et al. A.7).

The paper samples 5 sequences of each memorized set as a dev set and picks, per LLM, the
hyperparameters of each method (λ, learning rate and number of steps of SLIMMING and HARD
CONCRETE, β and the mask initialization of HARD CONCRETE, IG steps) by their dev-set
performance, noting that SLIMMING and HARD CONCRETE are sensitive to them.  :func:`tune_del`
does this with the DEL criterion: each grid point runs :func:`~memloc.benchmarks.del_benchmark`
on the dev set and the point with the largest mean forgetting of the target (most negative
ΔSelf-Acc) wins.

The authors' λ is per *mean* neuron (the L1 / L0 terms are averaged over all masked neurons),
so the same λ pushes each neuron of a small model far harder than one of GPT2-XL (3 072 masked
neurons in the embedded model vs 301 k): their λ = 1000 collapses every mask of the embedded
model within a few hundred steps, whatever the memorization loss says.  Tune per model.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from jaxtyping import Int
from torch import Tensor

from .._checks import check_tokens
from .._progress import progress
from ..models import Model
from ._scores import check_method_kwargs, resolve_methods, with_defaults
from .dele import del_benchmark

__all__ = ["TuningResult", "tune_del"]


@dataclass
class TuningResult:
    """The outcome of :func:`tune_del`.

    Attributes:
        method: the method's name.
        best: the selected hyperparameters (``base_kwargs`` plus the winning grid point).
        table: one row per grid point, in grid order: the grid's columns, ``d_self_acc`` and
            ``d_neg_acc`` (mean over the dev targets, fractions), ``seconds`` and ``rank``
            (1 = selected).
    """

    method: str
    best: dict
    table: pd.DataFrame


def _check_grid(grid: Any, name: str, fn: Callable, base: Mapping[str, Any]) -> list[dict]:
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"grid must be a non-empty dict {{hyperparameter: [values]}}, got {grid!r}")
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    # every grid key and base_kwargs key must be a hyperparameter of the method (before any work)
    check_method_kwargs({name: {**base, **{k: v[0] for k, v in grid.items()}}}, {name: fn})
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def tune_del(model: Model, method: str | Mapping[str, Callable], grid: Mapping[str, Sequence],
             tokens: Int[Tensor, "n seq"], prefix_len: int, *, ratio: float = 0.1,
             base_kwargs: Mapping[str, Any] | None = None, exclude_layers: Sequence[int] = (0,),
             random_tokens: Int[Tensor, "m seq"] | None = None, batch_size: int = 64,
             progress_bar: bool = True) -> TuningResult:
    """Grid-search one method's hyperparameters on a dev set of memorized sequences (Chang et al.
    A.7) by the DEL criterion: mean ΔSelf-Acc (Eq. 5) when the method's top ``ratio`` neurons
    per layer are dropped (bottom layer excluded, A.8).

    Every dev sequence is a target once; the other dev sequences are its negatives, so the
    table also shows ΔNeg-Acc.  Ties on ΔSelf-Acc go to the less collateral damage (higher
    ΔNeg-Acc), then to the earlier grid point.

    Args:
        model: TransformerBridge (borrowed: restored exactly, also on exceptions).
        method: a name in ``memloc.localize.METHODS`` or ``{name: fn}`` with one entry.
        grid: ``{hyperparameter: [values]}``; every combination is tried.
        tokens: the dev set [n >= 2, seq] (keep it disjoint from the sequences you evaluate).
        prefix_len: prefix length of ``tokens``.
        ratio: fraction of neurons dropped per layer.
        base_kwargs: hyperparameters shared by every grid point (e.g. ``max_steps``).
        exclude_layers, random_tokens, batch_size: as in :func:`~memloc.benchmarks.del_benchmark`.
        progress_bar: a progress bar over the grid points.

    Returns:
        :class:`TuningResult` with the selected hyperparameters and the whole grid.
    """
    fns = resolve_methods([method] if isinstance(method, str) else method)
    if len(fns) != 1:
        raise ValueError(f"method must name exactly one method, got {list(fns)}")
    (name, fn), = fns.items()
    if base_kwargs is not None and not isinstance(base_kwargs, Mapping):
        raise ValueError(f"base_kwargs must be a dict of hyperparameters, got {type(base_kwargs).__name__}")
    base = dict(base_kwargs or {})
    points = _check_grid(grid, name, fn, base)
    clash = sorted(set(base) & set(grid))
    if clash:
        raise ValueError(f"base_kwargs and grid both set {clash}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
    tokens = check_tokens(model, tokens, prefix_len)
    if len(tokens) < 2:
        raise ValueError(f"tokens must hold at least 2 dev sequences, got {len(tokens)}")
    rows = []
    for point in progress(points, enabled=progress_bar, desc=f"tune {name}"):
        t0 = time.perf_counter()
        kwargs = with_defaults(fn, {**base, **point}, progress_bar=False)
        # ΔRand-PPL does not enter the selection: 8 random sequences keep each point cheap
        res = del_benchmark(model, {name: fn}, tokens, prefix_len, ratios=[ratio], method_kwargs={name: kwargs},
                            exclude_layers=exclude_layers, random_tokens=random_tokens, n_random=8,
                            batch_size=batch_size, progress_bar=False)
        rows.append({**point, "d_self_acc": float(res.rows["d_self_acc"].mean()),
                     "d_neg_acc": float(res.rows["d_neg_acc"].mean()), "seconds": time.perf_counter() - t0})
    table = pd.DataFrame(rows)
    order = table.assign(_i=range(len(table))).sort_values(["d_self_acc", "d_neg_acc", "_i"],
                                                           ascending=[True, False, True]).index
    table["rank"] = 0
    table.loc[order, "rank"] = range(1, len(table) + 1)
    return TuningResult(name, {**base, **points[order[0]]}, table)
