"""Contrastive unlearning / editing (Stoehr et al. §5.2-5.3): the public face of three modules.

* the objectives CO↓ (Stoehr Eq. 3) and CO↔ (Stoehr Eq. 4) and the weights they touch:
  :mod:`memloc.contrastive_objective` (:func:`contrastive_loss`, :func:`reference_logits`,
  :func:`continuation_logits`, :func:`eligible_parameters`);
* their gradient attribution per layer × component × head (Stoehr §5.2, Eq. 2, Fig. 4 bottom):
  here (:func:`contrastive_gradients`, :func:`top_components`);
* sparse fine-tuning on them (Stoehr §5.3, Fig. 5): :mod:`memloc.finetune`
  (:func:`finetune_mask`, :func:`sparse_finetune`).

Every name keeps working as ``memloc.contrastive.<name>``.  The definitions of the objectives,
of the eligible weights and of the KL term are in :mod:`memloc.contrastive_objective`'s docstring.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_choice, check_positive_int, check_seed
from ._deprecation import renamed_kwargs
from ._progress import progress
from .borrow import borrowed
from .contrastive_objective import (OBJECTIVES, check_objective_targets, check_contrastive_sets, continuation_logits,
                                    contrastive_loss, eligible_parameters, reference_logits)
from .finetune import MASKS, finetune_mask, sparse_finetune
from .gradients import parameter_components
from .models import Model
from .placement import require_resident_weights

__all__ = [
    "OBJECTIVES", "MASKS", "eligible_parameters", "continuation_logits", "reference_logits", "contrastive_loss",
    "contrastive_gradients", "top_components", "finetune_mask", "sparse_finetune",
]

POOLINGS = ("max", "sum", "mean")


# ----------------------------------------------------------------------------------------------
# gradient attribution (Fig. 4 bottom)
# ----------------------------------------------------------------------------------------------

def _pool_components(model: Model, grads: dict[str, Tensor], pooling: str) -> pd.DataFrame:
    """Pool per-weight |gradients| per layer × component × head (Stoehr Eq. 2 for ``"max"``), with the
    per-architecture parameter → (layer, component, head, block) mapping of
    :func:`memloc.gradients.parameter_components`."""
    rows = []
    for c in parameter_components(model):
        a = c.block(grads[c.name]).detach().abs().float()
        value = a.max() if pooling == "max" else (a.sum() if pooling == "sum" else a.mean())
        rows.append({"layer": c.layer, "component": c.component, "head": c.head, "label": c.label,
                     "value": float(value)})
    return pd.DataFrame(rows)


@renamed_kwargs(nonmemorized="non_memorized")
def contrastive_gradients(model: Model, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "N seq"],
                          prefix_len: int, *, objective: Literal["unlearn", "edit"] = "unlearn",
                          n_nmp_per_batch: int = 8, seed: int = 0, pooling: Literal["max", "sum", "mean"] = "max",
                          aggregate: Literal["gradient", "score"] = "gradient",
                          edit_targets: Int[Tensor, "n T_or_seq"] | None = None,
                          progress_bar: bool = True) -> pd.DataFrame:
    """Contrastive parameter-gradient attribution per layer × component × head (Stoehr §5.2, Fig. 4 bottom).

    For every MP ``x_n^M`` a batch of ``n_nmp_per_batch`` NMPs is drawn at random (seeded
    ``torch.Generator``, without replacement within a batch) and the gradient of CO (Eq. 3, or
    Eq. 4 for ``objective="edit"``) w.r.t. the eligible weights (:func:`eligible_parameters`) is
    taken at the current weights θ₀.  The paper "aggregate[s] all gradient computations":

    * ``aggregate="gradient"`` (default): the signed gradients are averaged over the MPs (as
      gradient accumulation would), then ``|grad|`` is pooled per block — the same convention as
      :func:`memloc.gradients.parameter_gradients` (Fig. 4 top), so the two are comparable;
    * ``aggregate="score"``: each MP's gradient is pooled on its own and the scores are averaged.

    Pooling per block is Stoehr Eq. 2 for ``pooling="max"`` (``"sum"``/``"mean"`` of |grad| also
    available).  Since the KL term's gradient vanishes at θ₀, the result equals the attribution
    of ∓NLL(MP) (Eq. 1) — the NMP batches do not change it (they do once the weights move).

    Returns a DataFrame with columns ``layer, component, head, label, value`` (component ∈ W_Q,
    W_K, W_V, W_O, W_in, W_out[, W_gate]; head = -1 for MLP blocks), one row per block.  See
    :func:`top_components` for the most salient blocks.  ``.grad`` is never touched.
    """
    require_resident_weights(model, "contrastive_gradients")
    mp, nmp = check_contrastive_sets(model, memorized, non_memorized, prefix_len)
    edit_seq = check_objective_targets(model, objective, mp, edit_targets, prefix_len)
    check_positive_int(n_nmp_per_batch, "n_nmp_per_batch")
    if n_nmp_per_batch > len(nmp):
        raise ValueError(f"n_nmp_per_batch={n_nmp_per_batch} exceeds the {len(nmp)} NMPs given")
    check_choice(pooling, "pooling", POOLINGS)
    check_choice(aggregate, "aggregate", ("gradient", "score"))
    check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with borrowed(model):
        names = eligible_parameters(model)
        params = dict(model.named_parameters())
        for n in names:
            params[n].requires_grad_(True)
        total: pd.DataFrame | None = None
        grad_sum: dict[str, Tensor] = {}
        for i in progress(range(len(mp)), enabled=progress_bar, desc="contrastive gradients", total=len(mp)):
            batch = nmp[torch.randperm(len(nmp), generator=gen)[:n_nmp_per_batch].to(nmp.device)]
            targets = None if edit_seq is None else edit_seq[i:i + 1]
            loss = contrastive_loss(model, mp[i:i + 1], batch, prefix_len, objective=objective, edit_targets=targets)
            grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
            if aggregate == "gradient":
                for n, g in grads.items():
                    grad_sum[n] = grad_sum[n] + g if n in grad_sum else g.clone()
                continue
            pooled = _pool_components(model, grads, pooling)
            if total is None:
                total = pooled.copy()
            else:
                total["value"] = total["value"].to_numpy() + pooled["value"].to_numpy()
        if aggregate == "gradient":
            return _pool_components(model, {n: g / len(mp) for n, g in grad_sum.items()}, pooling)
        assert total is not None
        total["value"] = total["value"] / len(mp)
        return total.reset_index(drop=True)


def top_components(scores: pd.DataFrame, k: int = 1) -> pd.DataFrame:
    """The ``k`` blocks with the largest attribution ``value`` (e.g. the paper's L1 W_V head 2)."""
    if not isinstance(scores, pd.DataFrame) or not {"layer", "component", "head", "value"} <= set(scores.columns):
        raise ValueError("scores must be a DataFrame with columns layer, component, head, value "
                         "(from contrastive_gradients)")
    check_positive_int(k, "k")
    return scores.sort_values("value", ascending=False, kind="stable").head(k).reset_index(drop=True)

