"""Contrastive unlearning / editing objectives and sparse fine-tuning (Stoehr et al. §5.2-5.3).

A memorized paragraph (MP) ``x^M = (p, s)`` is split at ``prefix_len`` into prefix ``p`` and
continuation ``s`` (tokens ``prefix_len .. seq-1``).  The contrastive objectives are

* CO↓ (unlearning, Stoehr Eq. 3):  ``-L_NLL(x^M; θ) + D_KL((x^NM; θ), (x^NM; θ₀))``
* CO↔ (editing, Stoehr Eq. 4):     ``+L_NLL(x^PMP; θ) + D_KL((x^NM; θ), (x^NM; θ₀))``

where ``L_NLL`` is the mean next-token NLL over the continuation tokens (positions 50..100 in
the paper, i.e. ``prefix_len .. seq-1`` here), and the KL term keeps the model's next-token
distributions on a batch of non-memorized paragraphs (NMPs) close to those of the original
parameters θ₀ (detached).  The KL is taken in the order the paper writes it,
``KL(p_θ ‖ p_θ₀) = Σ_v p_θ(v) (log p_θ(v) − log p_θ₀(v))``, per continuation position of every
NMP, summed over the vocabulary and averaged over positions and NMPs; both terms have weight 1.

Note: at θ = θ₀ the KL term is 0 *and so is its gradient* (θ₀ is its minimum), so the gradient
attribution of the CO at the original weights (Fig. 4 bottom) equals that of ∓NLL; the KL term
matters once the weights move (sparse fine-tuning, Fig. 5).

Parameters the objectives touch ("eligible" weights): every weight matrix of the transformer
blocks — attention W_Q, W_K, W_V, W_O and MLP W_in, W_out (gated MLPs: also W_gate).  Excluded,
as in Stoehr §5.2: the token embedding ("embed"), positional embedding ("pos_embed"), unembedding
("unembed") and all biases; LayerNorm gains are excluded too (in the paper's TransformerLens setup
they are folded into the adjacent weights and do not exist as parameters).  The models are used
with raw (unfolded) weights (``load_model(process_weights=False)``), so masks and deltas refer to
the checkpoint's own parameters.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ._checks import check_choice, check_fraction, check_positive_int, check_prefix_len, check_seed, check_tokens
from ._deprecation import renamed_kwargs
from ._progress import progress
from .borrow import borrowed, trainable_only
from .gradients import parameter_components
from .metrics import em_from_generations, greedy_continuation, suffix_nll, teacher_forced

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES", "MASKS", "eligible_parameters", "continuation_logits", "reference_logits", "contrastive_loss",
    "contrastive_gradients", "top_components", "finetune_mask", "sparse_finetune",
]

OBJECTIVES = ("unlearn", "edit")
MASKS = ("top", "random", "all")
POOLINGS = ("max", "sum", "mean")


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------

def _check_sets(model: Any, memorized: Any, non_memorized: Any, prefix_len: Any, *, mp_name: str = "memorized",
                nmp_name: str = "non_memorized") -> tuple[Tensor, Tensor]:
    mp = check_tokens(model, memorized, None, name=mp_name)
    nmp = check_tokens(model, non_memorized, None, name=nmp_name)
    check_prefix_len(prefix_len, mp.shape[1])
    check_prefix_len(prefix_len, nmp.shape[1])
    return mp, nmp


def _edit_sequences(model: Any, memorized: Tensor, edit_targets: Any, prefix_len: int) -> Tensor:
    """The paragraphs whose continuation NLL CO↔ lowers.

    ``edit_targets`` [n, T] (T = seq - prefix_len): new continuations attached to the MPs' own
    prefixes (edit "given this prefix, say that instead").  ``edit_targets`` [n, seq]: whole
    paragraphs (e.g. PMPs = perturbed prefix + the model's continuation of it), used as they are.
    """
    if edit_targets is None:
        raise ValueError("objective='edit' needs edit_targets: [n, T] new continuations or [n, seq] PMPs")
    tgt = check_tokens(model, edit_targets, None, name="edit_targets")
    n, seq = memorized.shape
    T = seq - prefix_len
    if tgt.shape == (n, T):
        return torch.cat([memorized[:, :prefix_len], tgt], dim=1)
    if tgt.shape == (n, seq):
        return tgt
    raise ValueError(f"edit_targets must have shape [{n}, {T}] (continuations) or [{n}, {seq}] (whole paragraphs) "
                     f"to match memorized {tuple(memorized.shape)} with prefix_len={prefix_len}, "
                     f"got {tuple(tgt.shape)}")


def _check_objective_targets(model: Any, objective: Any, mp: Tensor, edit_targets: Any, prefix_len: int) -> Tensor | None:
    check_choice(objective, "objective", OBJECTIVES)
    if objective == "edit":
        return _edit_sequences(model, mp, edit_targets, prefix_len)
    if edit_targets is not None:
        raise ValueError("edit_targets is only used with objective='edit'; got objective='unlearn'")
    return None


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------

def eligible_parameters(model: Any) -> list[str]:
    """Names (``model.named_parameters()``) of the weights the contrastive objective trains and
    attributes: the parameters behind the W_Q/W_K/W_V/W_O/W_in/W_gate/W_out components of
    :func:`memloc.gradients.parameter_components` — no embeddings, unembedding, biases or
    LayerNorm gains (Stoehr §5.2), and none of the bridge's unused fused copies (e.g. GPT-2's
    ``c_attn`` beside the split q/k/v it runs)."""
    return list(dict.fromkeys(c.name for c in parameter_components(model)))


# ----------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------

def continuation_logits(model: Any, tokens: Int[Tensor, "batch seq"], prefix_len: int) -> Float[Tensor, "batch T vocab"]:
    """Logits that predict the continuation tokens ``tokens[:, prefix_len:]`` (positions
    ``prefix_len-1 .. seq-2``), with gradients if enabled; float32."""
    return model(tokens)[:, prefix_len - 1:-1].float()


@torch.no_grad()
def reference_logits(model: Any, non_memorized: Int[Tensor, "N seq"], prefix_len: int, *,
                     batch_size: int = 64) -> Float[Tensor, "N T vocab"]:
    """The θ₀ side of the KL term of Stoehr Eq. 3-4: the current model's continuation logits on
    the NMPs, detached.  Compute once before editing the weights and pass to
    :func:`contrastive_loss` as ``reference_logits``."""
    nmp = check_tokens(model, non_memorized, prefix_len, name="non_memorized")
    check_positive_int(batch_size, "batch_size")
    out = [continuation_logits(model, nmp[i:i + batch_size], prefix_len) for i in range(0, len(nmp), batch_size)]
    return torch.cat(out).detach()


def _mean_kl(logits: Tensor, ref: Tensor) -> Tensor:
    """Mean over (paragraph, position) of KL(p_θ ‖ p_θ₀), summed over the vocabulary."""
    logp = logits.log_softmax(-1)
    logq = ref.detach().float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def contrastive_loss(model: Any, memorized: Int[Tensor, "n seq"], prefix_len: int,
                     non_memorized: Int[Tensor, "N seq"], *, objective: Literal["unlearn", "edit"] = "unlearn",
                     edit_targets: Int[Tensor, "n T_or_seq"] | None = None,
                     reference_logits: Float[Tensor, "N T vocab"] | None = None,
                     return_terms: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """The contrastive objective CO↓ (Stoehr Eq. 3) or CO↔ (Stoehr Eq. 4), differentiable in θ.

    ``objective="unlearn"``: ``-NLL(memorized continuation) + KL``;
    ``objective="edit"``: ``+NLL(edit continuation) + KL`` with ``edit_targets`` either [n, T]
    new continuations after the MPs' prefixes, or [n, seq] whole PMPs (perturbed prefix + the
    model's continuation).  NLL: mean over the n paragraphs and their T continuation tokens.
    KL: ``KL(p_θ ‖ p_θ₀)`` per NMP continuation position (summed over the vocabulary), averaged
    over positions and NMPs; ``reference_logits`` [N, T, vocab] are the θ₀ logits (from
    :func:`reference_logits`); if None they are computed now from the current weights (then
    the KL and its gradient are exactly 0).

    Returns the scalar loss (float32, attached to the graph when the model's parameters require
    grad); with ``return_terms`` also ``{"nll": ..., "kl": ...}`` (detached).  The model is not
    modified; calling ``.backward()`` on the loss fills ``.grad`` as usual (the caller's choice).
    """
    mp, nmp = _check_sets(model, memorized, non_memorized, prefix_len)
    edit_seq = _check_objective_targets(model, objective, mp, edit_targets, prefix_len)
    T = nmp.shape[1] - prefix_len
    if reference_logits is not None:
        if not isinstance(reference_logits, Tensor) or tuple(reference_logits.shape) != (len(nmp), T, model.cfg.d_vocab):
            raise ValueError(f"reference_logits must be a tensor [{len(nmp)}, {T}, {model.cfg.d_vocab}] "
                             f"(from memloc.contrastive.reference_logits), got "
                             f"{tuple(getattr(reference_logits, 'shape', ())) or type(reference_logits).__name__}")
    target = mp if objective == "unlearn" else edit_seq
    ref = (reference_logits.to(nmp.device) if reference_logits is not None
           else _reference(model, nmp, prefix_len))
    if target.shape[1] == nmp.shape[1]:  # one forward over both sets (rows are independent)
        logits = continuation_logits(model, torch.cat([target, nmp]), prefix_len)
        target_logits, nmp_logits = logits[:len(target)], logits[len(target):]
    else:
        target_logits = continuation_logits(model, target, prefix_len)
        nmp_logits = continuation_logits(model, nmp, prefix_len)
    nll = suffix_nll(target_logits, target[:, prefix_len:]).mean()
    kl = _mean_kl(nmp_logits, ref)
    loss = (-nll if objective == "unlearn" else nll) + kl
    if return_terms:
        return loss, {"nll": nll.detach(), "kl": kl.detach()}
    return loss


@torch.no_grad()
def _reference(model: Any, nmp: Tensor, prefix_len: int) -> Tensor:
    return continuation_logits(model, nmp, prefix_len).detach()


# ----------------------------------------------------------------------------------------------
# gradient attribution (Fig. 4 bottom)
# ----------------------------------------------------------------------------------------------

def _pool_components(model: Any, grads: dict[str, Tensor], pooling: str) -> pd.DataFrame:
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
def contrastive_gradients(model: Any, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "N seq"],
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
    mp, nmp = _check_sets(model, memorized, non_memorized, prefix_len)
    edit_seq = _check_objective_targets(model, objective, mp, edit_targets, prefix_len)
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
            loss = contrastive_loss(model, mp[i:i + 1], prefix_len, batch, objective=objective, edit_targets=targets)
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


# ----------------------------------------------------------------------------------------------
# sparse fine-tuning (Fig. 5)
# ----------------------------------------------------------------------------------------------

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


def _co_gradients(model: Any, names: list[str], mp: Tensor, nmp: Tensor, prefix_len: int, objective: str,
                  edit_seq: Tensor | None, ref: Tensor) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    loss = contrastive_loss(model, mp, prefix_len, nmp, objective=objective,
                            edit_targets=None if edit_seq is None else edit_seq, reference_logits=ref)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return dict(zip(names, grads))


def _check_finetune_args(model, memorized, non_memorized, prefix_len, objective, mask, fraction, seed, edit_targets):
    mp, nmp = _check_sets(model, memorized, non_memorized, prefix_len)
    edit_seq = _check_objective_targets(model, objective, mp, edit_targets, prefix_len)
    check_choice(mask, "mask", MASKS)
    check_fraction(fraction, "fraction")
    check_seed(seed)
    return mp, nmp, edit_seq


@renamed_kwargs(nonmemorized="non_memorized")
def finetune_mask(model: Any, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "N seq"], prefix_len: int, *,
                  objective: Literal["unlearn", "edit"] = "unlearn", mask: Literal["top", "random", "all"] = "top",
                  fraction: float = 0.001, seed: int = 0,
                  edit_targets: Int[Tensor, "n T_or_seq"] | None = None) -> dict[str, Bool[Tensor, "..."]]:
    """Which weights sparse fine-tuning may change (Stoehr §5.3), per eligible parameter name.

    ``"top"``: the ``round(fraction × n_eligible)`` weights with the largest ``|∂CO/∂θ|`` at the
    current weights, chosen jointly over all eligible weights (one global top-k, not per
    layer or per component; CO over the whole MP set and NMP set); ``"random"``: as many weights
    drawn uniformly at random (``seed``); ``"all"``: every eligible weight.
    """
    mp, nmp, edit_seq = _check_finetune_args(model, memorized, non_memorized, prefix_len, objective, mask, fraction,
                                             seed, edit_targets)
    with borrowed(model):
        names = eligible_parameters(model)
        params = dict(model.named_parameters())
        if mask != "top":
            return _mask_from_scores({n: params[n].detach() for n in names}, mask, fraction, seed)
        for n in names:
            params[n].requires_grad_(True)
        ref = _reference(model, nmp, prefix_len)
        grads = _co_gradients(model, names, mp, nmp, prefix_len, objective, edit_seq, ref)
        return _mask_from_scores(grads, mask, fraction, seed)


def _batched(fn: Any, model: Any, seqs: list[Tensor], prefix_len: int, batch_size: int) -> list[Tensor]:
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
        nll.append(F.cross_entropy(logits.transpose(1, 2), target[i:i + batch_size], reduction="none").mean(1).cpu())
        argmax.append(logits.argmax(-1).cpu())
    return {"nll": torch.cat(nll), "em": em_from_generations(torch.cat(argmax), target)}


def _evaluate(model: Any, step: int, mp: Tensor, nmp: Tensor, prefix_len: int, nmp_ref: Tensor,
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
def sparse_finetune(model: Any, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "N seq"], prefix_len: int,
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


def _co_from_logits(target_logits: Tensor, nmp_logits: Tensor, target: Tensor, ref: Tensor, prefix_len: int,
                    objective: str) -> Tensor:
    """Stoehr Eq. 3 / 4 from continuation logits (the arithmetic of :func:`contrastive_loss`)."""
    nll = suffix_nll(target_logits, target[:, prefix_len:]).mean()
    kl = _mean_kl(nmp_logits, ref)
    return (-nll if objective == "unlearn" else nll) + kl


def _sparse_finetune(model, mp, nmp, prefix_len, objective, mask, fraction, steps, lr, seed, edit_seq,
                     n_nmp_per_batch, batch_size, eval_every, return_state, progress_bar, nmp_ref=None,
                     em_via="teacher_forced"):
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
        opt = torch.optim.Adam([params[n] for n in trainable], lr=float(lr), weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        # Fast path: the embeddings are not trained, so the input of block 0 is fixed; the training
        # loss and the evaluation re-run the blocks from it and unembed only the continuation
        # positions (partial_forward, checked once against a full forward; else full forwards).
        from .localize._common import partial_forward

        target = mp if objective == "unlearn" else edit_seq
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
        rows = _evaluate(model, 0, mp, nmp, prefix_len, nmp_ref, edit_seq, batch_size, em_via, eval_fwd)
        if em_via == "teacher_forced" and any(r["em"] != seq - prefix_len for r in rows
                                              if r["split"] == "non-memorized"):
            # the NMP reference is the model's own greedy continuation: its teacher-forced EM must be T.
            # If not, this model's greedy (KV-cache) decoding and its full forward disagree (near-tied
            # logits, e.g. a random-weight model): read every EM off greedy decoding instead.
            logger.warning("sparse_finetune: teacher-forced EM disagrees with greedy decoding on this model; "
                           "decoding every step instead (slower)")
            em_via, eval_fwd = "greedy", None
            rows = _evaluate(model, 0, mp, nmp, prefix_len, nmp_ref, edit_seq, batch_size, em_via, eval_fwd)
        losses = []
        for step in progress(range(1, steps + 1), enabled=progress_bar, desc=f"sparse {objective} ({mask})",
                             total=steps):
            if n_nmp_per_batch is None:
                idx = torch.arange(len(nmp), device=nmp.device)
            else:
                idx = torch.randperm(len(nmp), generator=gen)[:n_nmp_per_batch].to(nmp.device)
            opt.zero_grad(set_to_none=True)
            if train_fwd is not None:
                sel = torch.cat([torch.arange(len(target)), len(target) + idx.cpu()]).to(train_fwd.resid.device)
                logits = train_fwd(train_fwd.resid[sel]).float()
                loss = _co_from_logits(logits[:len(target)], logits[len(target):], target, ref[idx], prefix_len,
                                       objective)
            else:
                loss = contrastive_loss(model, mp, prefix_len, nmp[idx], objective=objective, edit_targets=edit_seq,
                                        reference_logits=ref[idx])
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
