"""Sparse unlearning and editing: fine-tuning a masked subset of weights on the contrastive
objective (Stoehr et al. §5.3, Fig. 5).

:func:`finetune_mask` chooses the weights (top-|∂CO/∂θ| at θ₀, random, or all eligible weights of
:func:`memloc.contrastive_objective.eligible_parameters`); :func:`sparse_finetune` trains them with
Adam on CO↓ (Stoehr Eq. 3) or CO↔ (Stoehr Eq. 4) and reports EM and NLL of the memorized and
non-memorized paragraphs along the way.  The objective itself lives in
:mod:`memloc.contrastive_objective`; :mod:`memloc.contrastive` re-exports both.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ._checks import check_choice, check_fraction, check_positive_int, check_seed
from ._deprecation import renamed_kwargs
from ._progress import progress
from .borrow import borrowed, trainable_only
from .contrastive_objective import (check_objective_targets, check_contrastive_sets, contrastive_loss_from_logits,
                                    contrastive_loss, eligible_parameters, reference_logits)
from .metrics import em_from_generations, greedy_continuation, teacher_forced, token_nll
from .models import Model
from .placement import require_resident_weights

logger = logging.getLogger(__name__)

__all__ = ["MASKS", "finetune_mask", "sparse_finetune"]

MASKS = ("top", "random", "all")


def _mask_from_scores(scores: dict[str, Tensor], mask: str, fraction: float, seed: int) -> dict[str, Tensor]:
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    n_total = sum(sizes)
    if mask == "all":
        return {n: torch.ones_like(scores[n], dtype=torch.bool) for n in names}
    k = max(1, int(np.floor(fraction * n_total + 0.5)))
    device = scores[names[0]].device
    if mask == "top":
        flat = torch.cat([scores[n].detach().abs().flatten().float() for n in names])
        idx = torch.topk(flat, k, sorted=False).indices
    else:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n_total, generator=gen)[:k].to(device)
    sel = torch.zeros(n_total, dtype=torch.bool, device=device)
    sel[idx] = True
    out, start = {}, 0
    for n, size in zip(names, sizes):
        out[n] = sel[start:start + size].view_as(scores[n])
        start += size
    return out


def _co_gradients(model: Model, names: list[str], mp: Tensor, nmp: Tensor, prefix_len: int, objective: str,
                  edit_seq: Tensor | None, ref: Tensor) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    loss = contrastive_loss(model, mp, nmp, prefix_len, objective=objective,
                            edit_targets=None if edit_seq is None else edit_seq, reference_logits=ref)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return dict(zip(names, grads))


def _check_finetune_args(model, memorized, non_memorized, prefix_len, objective, mask, fraction, seed, edit_targets):
    mp, nmp = check_contrastive_sets(model, memorized, non_memorized, prefix_len)
    edit_seq = check_objective_targets(model, objective, mp, edit_targets, prefix_len)
    check_choice(mask, "mask", MASKS)
    check_fraction(fraction, "fraction")
    check_seed(seed)
    return mp, nmp, edit_seq


@renamed_kwargs(nonmemorized="non_memorized")
def finetune_mask(model: Model, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "N seq"],
                  prefix_len: int, *, objective: Literal["unlearn", "edit"] = "unlearn",
                  mask: Literal["top", "random", "all"] = "top", fraction: float = 0.001, seed: int = 0,
                  edit_targets: Int[Tensor, "n T_or_seq"] | None = None) -> dict[str, Bool[Tensor, "..."]]:
    """Which weights sparse fine-tuning may change (Stoehr §5.3), per eligible parameter name.

    ``"top"``: the ``round(fraction × n_eligible)`` weights with the largest ``|∂CO/∂θ|`` at the
    current weights, chosen jointly over all eligible weights (one global top-k, not per
    layer or per component; CO over the whole MP set and NMP set); ``"random"``: as many weights
    drawn uniformly at random (``seed``); ``"all"``: every eligible weight.
    """
    require_resident_weights(model, "finetune_mask")
    mp, nmp, edit_seq = _check_finetune_args(model, memorized, non_memorized, prefix_len, objective, mask, fraction,
                                             seed, edit_targets)
    with borrowed(model):
        names = eligible_parameters(model)
        params = dict(model.named_parameters())
        if mask != "top":
            return _mask_from_scores({n: params[n].detach() for n in names}, mask, fraction, seed)
        for n in names:
            params[n].requires_grad_(True)
        ref = reference_logits(model, nmp, prefix_len, batch_size=len(nmp))  # θ₀ logits, one batch
        grads = _co_gradients(model, names, mp, nmp, prefix_len, objective, edit_seq, ref)
        return _mask_from_scores(grads, mask, fraction, seed)


def _batched(fn: Any, model: Model, seqs: list[Tensor], prefix_len: int, batch_size: int) -> list[Tensor]:
    """Run ``fn(model, tokens, prefix_len)`` once on all ``seqs`` concatenated (when their lengths
    agree) and split the result back."""
    if len({s.shape[1] for s in seqs}) == 1:
        out = fn(torch.cat(seqs), prefix_len, batch_size)
        return list(torch.split(out, [len(s) for s in seqs]))
    return [fn(s, prefix_len, batch_size) for s in seqs]


def _eval_inputs(mp: Tensor, nmp: Tensor, prefix_len: int, nmp_ref: Tensor, edit_seq: Tensor | None) -> list[Tensor]:
    """The teacher-forced inputs of :func:`_evaluate`: MPs, NMP prefix + original continuation, edit sequences."""
    nmp_seq = torch.cat([nmp[:, :prefix_len], nmp_ref.to(nmp.device)], dim=1)
    return [mp, nmp_seq] + ([edit_seq] if edit_seq is not None else [])


def _tf_partial(fwd: Any, tokens: Tensor, prefix_len: int, batch_size: int) -> dict[str, Tensor]:
    """``teacher_forced`` statistics (nll, em) from a partial forward over ``tokens`` (same rows)."""
    target = tokens[:, prefix_len:]
    nll, argmax = [], []
    for i in range(0, len(tokens), batch_size):
        logits = fwd(fwd.resid[i:i + batch_size]).float()
        nll.append(token_nll(logits, target[i:i + batch_size]).mean(1).cpu())
        argmax.append(logits.argmax(-1).cpu())
    return {"nll": torch.cat(nll), "em": em_from_generations(torch.cat(argmax), target)}


def _evaluate(model: Model, step: int, mp: Tensor, nmp: Tensor, prefix_len: int, nmp_ref: Tensor,
              edit_seq: Tensor | None, batch_size: int, em_via: str = "teacher_forced",
              fwd: Any = None) -> list[dict]:
    """Per-paragraph EM and NLL at one step: MPs against their true continuation, NMPs against the
    model's original greedy continuation ``nmp_ref``, edit targets (if any) against theirs.

    ``em_via="teacher_forced"`` reads every EM off the one teacher-forced pass that also gives
    the NLLs (:func:`memloc.metrics.exact_match_teacher_forced`: the greedy continuation of a
    prefix matches a reference continuation exactly as far as the teacher-forced argmax on
    prefix + reference does); ``"greedy"`` decodes T tokens per prefix (the slow reference).
    ``fwd``: a :func:`memloc.localize._common.partial_forward` over ``torch.cat`` of these inputs
    (built once per run: the embeddings are not trained, so the input of block 0 never changes)."""
    same_prefix = edit_seq is not None and torch.equal(edit_seq[:, :prefix_len], mp[:, :prefix_len])
    nll_in = _eval_inputs(mp, nmp, prefix_len, nmp_ref, edit_seq)
    tf = lambda x, p, b: teacher_forced(model, x, p, batch_size=b)  # noqa: E731
    with torch.no_grad():
        if fwd is not None:
            out = _tf_partial(fwd, torch.cat(nll_in), prefix_len, batch_size)
            sizes = [len(x) for x in nll_in]
            parts = [{k: v for k, v in zip(out, vals)} for vals in zip(*(torch.split(v, sizes) for v in out.values()))]
        elif len({x.shape[1] for x in nll_in}) == 1:
            out = tf(torch.cat(nll_in), prefix_len, batch_size)
            sizes = [len(x) for x in nll_in]
            parts = [{k: v for k, v in zip(out, vals)} for vals in zip(*(torch.split(v, sizes) for v in out.values()))]
        else:
            parts = [tf(x, prefix_len, batch_size) for x in nll_in]
        nlls = [p["nll"] for p in parts]
        if em_via == "teacher_forced":
            ems = [p["em"] for p in parts]
        else:
            greedy = lambda x, p, b: greedy_continuation(model, x, p, batch_size=b)  # noqa: E731
            gen_in = [mp, nmp] + ([edit_seq] if edit_seq is not None and not same_prefix else [])
            gens = _batched(greedy, model, gen_in, prefix_len, batch_size)
            ems = [em_from_generations(gens[0], mp[:, prefix_len:]), em_from_generations(gens[1], nmp_ref)]
            if edit_seq is not None:
                # EM of the model's continuation of the edit prefix (the MP prefix for [n, T] targets)
                ems.append(em_from_generations(gens[0] if same_prefix else gens[2], edit_seq[:, prefix_len:]))
    mp_em, nmp_em = ems[0], ems[1]
    rows = []
    for i in range(len(mp)):
        row = {"step": step, "split": "memorized", "id": i, "em": int(mp_em[i]), "nll": float(nlls[0][i])}
        if edit_seq is not None:
            row.update(edit_em=int(ems[2][i]), edit_nll=float(nlls[2][i]))
        rows.append(row)
    for i in range(len(nmp)):
        rows.append({"step": step, "split": "non-memorized", "id": i, "em": int(nmp_em[i]), "nll": float(nlls[1][i])})
    return rows


@renamed_kwargs(nonmemorized="non_memorized")
def sparse_finetune(model: Model, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "N seq"], prefix_len: int,
                    *, objective: Literal["unlearn", "edit"] = "unlearn", mask: Literal["top", "random", "all"] = "top",
                    fraction: float = 0.001, steps: int = 10, lr: float = 1e-3, seed: int = 0,
                    edit_targets: Int[Tensor, "n T_or_seq"] | None = None, n_nmp_per_batch: int | None = None,
                    batch_size: int = 64, eval_every: int = 1, return_state: bool = False,
                    non_memorized_continuation: Int[Tensor, "N T"] | None = None,
                    em_via: Literal["teacher_forced", "greedy"] = "teacher_forced",
                    progress_bar: bool = True) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, Any]]:
    """Sparse unlearning / editing by fine-tuning on the contrastive objective (Stoehr §5.3, Fig. 5).

    The mask (:func:`finetune_mask`: top-``fraction`` |∂CO/∂θ| weights jointly over all eligible
    weights, a seeded random ``fraction``, or all eligible weights) is computed once at θ₀ and
    kept fixed; then ``steps`` Adam steps (no weight decay, so unmasked weights — whose gradient is
    zeroed — stay exactly unchanged) minimise CO↓ (Eq. 3, ``objective="unlearn"``) or CO↔ (Eq. 4,
    ``objective="edit"``, with ``edit_targets`` as in :func:`contrastive_loss`).  Each step uses
    all MPs and either all NMPs or a fresh random batch of ``n_nmp_per_batch`` NMPs for the KL
    term (whose θ₀ reference is computed once before training).  The paper gives no learning
    rate; ``lr`` defaults to 1e-3.  The model stays in eval mode (no dropout).

    The model is borrowed: all weights are snapshotted and restored afterwards, also on
    exceptions, so it is bit-identical on return.

    Returns a tidy DataFrame, one row per (step 0..steps, paragraph): ``step``, ``split``
    ("memorized"/"non-memorized"), ``id`` (row in its input), ``em`` (MPs: against their true
    continuation; NMPs: against the model's original greedy continuation computed at θ₀),
    ``nll`` (mean NLL of that same reference continuation; rows for step 0, every ``eval_every``-th
    step and the last step), for editing ``edit_em``/``edit_nll``
    (MPs: against the edit target), ``loss`` (CO at the step's weights before the update;
    NaN at the final step), and ``objective``, ``mask``, ``fraction``, ``lr``.  With
    ``return_state=True`` returns ``(df, {"mask": {name: Bool}, "delta": {name: θ_final − θ₀}})``
    (CPU tensors; ``mask`` per eligible parameter, ``delta`` per parameter, zero outside the
    mask); the model itself is still restored, and ``.grad`` of every parameter is as before.

    Speed: ``non_memorized_continuation`` [N, T] is the model's greedy continuation of the NMP
    prefixes at θ₀ (the NMPs' EM reference); pass it when fine-tuning several variants on the same
    NMPs (e.g. :func:`memloc.metrics.greedy_continuation` once) to skip decoding it per call.
    ``em_via="teacher_forced"`` (default) reads every EM off the teacher-forced pass that gives
    the NLLs (exactly the greedy EM, see :func:`memloc.metrics.exact_match_teacher_forced`);
    ``"greedy"`` decodes T tokens per paragraph and step (the slow reference).  The trained
    weights all lie in the transformer blocks (embeddings are never trained), so the input of block
    0 is fixed: training steps and evaluations re-run the blocks from it and unembed only the
    continuation positions (:func:`memloc.localize._common.partial_forward`, checked once against
    a full forward; otherwise full forwards after a WARNING).
    """
    require_resident_weights(model, "sparse_finetune")
    mp, nmp, edit_seq = _check_finetune_args(model, memorized, non_memorized, prefix_len, objective, mask, fraction,
                                             seed, edit_targets)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if n_nmp_per_batch is not None:
        check_positive_int(n_nmp_per_batch, "n_nmp_per_batch")
        if n_nmp_per_batch > len(nmp):
            raise ValueError(f"n_nmp_per_batch={n_nmp_per_batch} exceeds the {len(nmp)} NMPs given")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(eval_every, "eval_every")
    check_choice(em_via, "em_via", ("teacher_forced", "greedy"))
    T = nmp.shape[1] - prefix_len
    if non_memorized_continuation is not None:
        if (not isinstance(non_memorized_continuation, Tensor) or non_memorized_continuation.dtype.is_floating_point
                or tuple(non_memorized_continuation.shape) != (len(nmp), T)):
            raise ValueError(f"non_memorized_continuation must be an integer tensor [{len(nmp)}, {T}] (the greedy "
                             "continuation of the NMP prefixes), got "
                             f"{tuple(getattr(non_memorized_continuation, 'shape', ())) or type(non_memorized_continuation).__name__}")

    saved_grads = {n: q.grad for n, q in model.named_parameters()}
    try:
        df, state = _sparse_finetune(model, mp, nmp, prefix_len, objective, mask, fraction, steps, lr, seed,
                                     edit_seq, n_nmp_per_batch, batch_size, eval_every, return_state,
                                     progress_bar, non_memorized_continuation, em_via)
    finally:
        for n, q in model.named_parameters():
            q.grad = saved_grads.get(n)
    return (df, state) if return_state else df


def _sparse_finetune(model, mp, nmp, prefix_len, objective, mask, fraction, steps, lr, seed, edit_seq,
                     n_nmp_per_batch, batch_size, eval_every, return_state, progress_bar, nmp_ref=None,
                     em_via="teacher_forced"):
    """:func:`sparse_finetune` on validated arguments: mask at θ₀, ``steps`` masked Adam steps on CO↓ /
    CO↔ (Stoehr Eq. 3 / 4), evaluations; returns the table and (with ``return_state``) the state."""
    with borrowed(model, restore_weights=True):
        names = eligible_parameters(model)
        params = dict(model.named_parameters())
        theta0 = {n: q.detach().clone() for n, q in params.items()} if return_state else None
        trainable_only(model, names)
        if nmp_ref is None:
            with torch.no_grad():
                nmp_ref = greedy_continuation(model, nmp, prefix_len, batch_size=batch_size)
        nmp_ref = nmp_ref.to(nmp.device)
        ref = reference_logits(model, nmp, prefix_len, batch_size=batch_size)
        masks, trainable = _masks_and_trainable(model, names, mp, nmp, prefix_len, objective, edit_seq, ref, mask,
                                                fraction, seed)
        opt = torch.optim.Adam([params[n] for n in trainable], lr=float(lr), weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        target = mp if objective == "unlearn" else edit_seq
        train_fwd, eval_fwd = _partial_forwards(model, names, mp, nmp, prefix_len, target, nmp_ref, edit_seq, em_via)
        rows, em_via, eval_fwd = _step0_rows(model, mp, nmp, prefix_len, nmp_ref, edit_seq, batch_size, em_via,
                                             eval_fwd)
        losses = []
        for step in progress(range(1, steps + 1), enabled=progress_bar, desc=f"sparse {objective} ({mask})",
                             total=steps):
            if n_nmp_per_batch is None:
                idx = torch.arange(len(nmp), device=nmp.device)
            else:
                idx = torch.randperm(len(nmp), generator=gen)[:n_nmp_per_batch].to(nmp.device)
            opt.zero_grad(set_to_none=True)
            loss = _train_loss(model, train_fwd, mp, nmp, idx, target, ref, prefix_len, objective, edit_seq)
            loss.backward()
            with torch.no_grad():
                for n in trainable:
                    g = params[n].grad
                    if g is not None:
                        g.mul_(masks[n])
            opt.step()
            losses.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                rows += _evaluate(model, step, mp, nmp, prefix_len, nmp_ref, edit_seq, batch_size, em_via, eval_fwd)
        opt.zero_grad(set_to_none=True)
        state = None
        if return_state:
            state = {"mask": {n: masks[n].cpu() for n in names},
                     "delta": {n: (q.detach() - theta0[n]).cpu() for n, q in params.items()}}
    df = pd.DataFrame(rows)
    df["loss"] = df["step"].map(lambda s: losses[s] if s < len(losses) else float("nan"))
    df["objective"], df["mask"], df["fraction"], df["lr"] = objective, mask, float(fraction), float(lr)
    return df, state


def _masks_and_trainable(model: Model, names: list[str], mp: Tensor, nmp: Tensor, prefix_len: int, objective: str,
                         edit_seq: Tensor | None, ref: Tensor, mask: str, fraction: float,
                         seed: int) -> tuple[dict[str, Tensor], list[str]]:
    """The fixed mask of :func:`sparse_finetune` (computed once at θ₀), and the parameters it leaves
    trainable (the others stop requiring grad)."""
    params = dict(model.named_parameters())
    if mask == "top":
        masks = _mask_from_scores(_co_gradients(model, names, mp, nmp, prefix_len, objective, edit_seq, ref),
                                  mask, fraction, seed)
    else:
        masks = _mask_from_scores({n: params[n].detach() for n in names}, mask, fraction, seed)
    logger.info("sparse_finetune: %s mask, %d of %d eligible weights", mask,
                sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values()))
    trainable = [n for n in names if bool(masks[n].any())]
    for n in names:
        if n not in trainable:
            params[n].requires_grad_(False)
    return masks, trainable


def _partial_forwards(model: Model, names: list[str], mp: Tensor, nmp: Tensor, prefix_len: int, target: Tensor,
                      nmp_ref: Tensor, edit_seq: Tensor | None, em_via: str) -> tuple[Any, Any]:
    """Fast path: the embeddings are not trained, so the input of block 0 is fixed; the training
    loss and the evaluation re-run the blocks from it and unembed only the continuation positions
    (partial_forward, checked once against a full forward; else full forwards).  Returns the
    training and evaluation partial forwards (None where full forwards are used)."""
    from .localize._common import partial_forward

    params = dict(model.named_parameters())
    seq = nmp.shape[1]
    cont = slice(prefix_len - 1, seq - 1)
    train_fwd = eval_fwd = None
    in_blocks = {id(q) for q in model.blocks.parameters()}
    if not all(id(params[n]) in in_blocks for n in names):
        logger.warning("sparse_finetune: some trained weights lie outside the transformer blocks; using full "
                       "forwards (slower)")
    elif target.shape[1] == seq:
        train_fwd = partial_forward(model, torch.cat([target, nmp]), 0, cont, what="sparse fine-tuning")
        ev = _eval_inputs(mp, nmp, prefix_len, nmp_ref, edit_seq)
        if em_via == "teacher_forced" and len({x.shape[1] for x in ev}) == 1:
            eval_fwd = partial_forward(model, torch.cat(ev), 0, cont, what="sparse fine-tuning evaluation")
    return train_fwd, eval_fwd


def _step0_rows(model: Model, mp: Tensor, nmp: Tensor, prefix_len: int, nmp_ref: Tensor, edit_seq: Tensor | None,
                batch_size: int, em_via: str, eval_fwd: Any) -> tuple[list[dict], str, Any]:
    """The evaluation at θ₀, and the ``em_via`` / ``eval_fwd`` the later steps use."""
    rows = _evaluate(model, 0, mp, nmp, prefix_len, nmp_ref, edit_seq, batch_size, em_via, eval_fwd)
    T = nmp.shape[1] - prefix_len
    if em_via == "teacher_forced" and any(r["em"] != T for r in rows if r["split"] == "non-memorized"):
        # the NMP reference is the model's own greedy continuation: its teacher-forced EM must be T.
        # If not, this model's greedy (KV-cache) decoding and its full forward disagree (near-tied
        # logits, e.g. a random-weight model): read every EM off greedy decoding instead.
        logger.warning("sparse_finetune: teacher-forced EM disagrees with greedy decoding on this model; "
                       "decoding every step instead (slower)")
        em_via, eval_fwd = "greedy", None
        rows = _evaluate(model, 0, mp, nmp, prefix_len, nmp_ref, edit_seq, batch_size, em_via, eval_fwd)
    return rows, em_via, eval_fwd


def _train_loss(model: Model, train_fwd: Any, mp: Tensor, nmp: Tensor, idx: Tensor, target: Tensor, ref: Tensor,
                prefix_len: int, objective: str, edit_seq: Tensor | None) -> Tensor:
    """CO↓ (Stoehr Eq. 3) or CO↔ (Stoehr Eq. 4) at the current weights on the NMPs ``idx``: from the
    partial forward if there is one, else :func:`contrastive_loss`."""
    if train_fwd is not None:
        sel = torch.cat([torch.arange(len(target)), len(target) + idx.cpu()]).to(train_fwd.resid.device)
        logits = train_fwd(train_fwd.resid[sel]).float()
        return contrastive_loss_from_logits(logits[:len(target)], logits[len(target):], target, ref[idx], prefix_len,
                                            objective)
    return contrastive_loss(model, mp, nmp[idx], prefix_len, objective=objective, edit_targets=edit_seq,
                            reference_logits=ref[idx])
