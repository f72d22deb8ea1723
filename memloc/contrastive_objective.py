"""The contrastive unlearning / editing objectives CO↓ and CO↔ (Stoehr et al. §5.2, Eq. 3-4).

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

import numbers
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._checks import check_choice, check_positive_int, check_prefix_len, check_tokens
from ._deprecation import reordered_args
from .gradients import parameter_components
from .metrics import suffix_nll
from .models import Model

__all__ = ["OBJECTIVES", "eligible_parameters", "continuation_logits", "reference_logits", "contrastive_loss",
           "contrastive_loss_from_logits", "check_contrastive_sets", "check_objective_targets"]

OBJECTIVES = ("unlearn", "edit")


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------

def check_contrastive_sets(model: Model, memorized: Any, non_memorized: Any, prefix_len: Any, *,
                           mp_name: str = "memorized", nmp_name: str = "non_memorized"
                           ) -> tuple[Int[Tensor, "n seq"], Int[Tensor, "N seq"]]:
    """Validate the MP and NMP token sets of the contrastive objective (Stoehr Eq. 3-4) and the
    prefix length against both (ValueError naming the argument); returns them as token tensors."""
    mp = check_tokens(model, memorized, None, name=mp_name)
    nmp = check_tokens(model, non_memorized, None, name=nmp_name)
    check_prefix_len(prefix_len, mp.shape[1])
    check_prefix_len(prefix_len, nmp.shape[1])
    return mp, nmp


def _edit_sequences(model: Model, memorized: Tensor, edit_targets: Any, prefix_len: int) -> Tensor:
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


def check_objective_targets(model: Model, objective: Any, mp: Int[Tensor, "n seq"], edit_targets: Any,
                            prefix_len: int) -> Int[Tensor, "n seq"] | None:
    """Validate ``objective`` (``"unlearn"``: CO↓, Eq. 3; ``"edit"``: CO↔, Eq. 4) with its
    ``edit_targets``; returns the whole edit paragraphs [n, seq] for editing, None for unlearning."""
    check_choice(objective, "objective", OBJECTIVES)
    if objective == "edit":
        return _edit_sequences(model, mp, edit_targets, prefix_len)
    if edit_targets is not None:
        raise ValueError("edit_targets is only used with objective='edit'; got objective='unlearn'")
    return None


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------

def eligible_parameters(model: Model) -> list[str]:
    """Names (``model.named_parameters()``) of the weights the contrastive objective trains and
    attributes: the parameters behind the W_Q/W_K/W_V/W_O/W_in/W_gate/W_out components of
    :func:`memloc.gradients.parameter_components` — no embeddings, unembedding, biases or
    LayerNorm gains (Stoehr §5.2), and none of the bridge's unused fused copies (e.g. GPT-2's
    ``c_attn`` beside the split q/k/v it runs)."""
    return list(dict.fromkeys(c.name for c in parameter_components(model)))


# ----------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------

def continuation_logits(model: Model, tokens: Int[Tensor, "batch seq"],
                        prefix_len: int) -> Float[Tensor, "batch T vocab"]:
    """Logits that predict the continuation tokens ``tokens[:, prefix_len:]`` (positions
    ``prefix_len-1 .. seq-2``), with gradients if enabled; float32."""
    return model(tokens)[:, prefix_len - 1:-1].float()


@torch.no_grad()
def reference_logits(model: Model, non_memorized: Int[Tensor, "N seq"], prefix_len: int, *,
                     batch_size: int = 64) -> Float[Tensor, "N T vocab"]:
    """The θ₀ side of the KL term of Stoehr Eq. 3-4: the current model's continuation logits on
    the NMPs, detached (computed without building a graph).  Compute once before editing the
    weights and pass to :func:`contrastive_loss` as ``reference_logits``."""
    nmp = check_tokens(model, non_memorized, prefix_len, name="non_memorized")
    check_positive_int(batch_size, "batch_size")
    out = [continuation_logits(model, nmp[i:i + batch_size], prefix_len) for i in range(0, len(nmp), batch_size)]
    return torch.cat(out).detach()


def _mean_kl(logits: Tensor, ref: Tensor) -> Tensor:
    """Mean over (paragraph, position) of KL(p_θ ‖ p_θ₀), summed over the vocabulary."""
    logp = logits.log_softmax(-1)
    logq = ref.detach().float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def _is_old_order(args: tuple) -> bool:
    """``contrastive_loss(model, memorized, prefix_len, non_memorized)``, the order before the NMP set
    moved next to the MP set: an int third, where the new order has the NMP tokens."""
    return len(args) > 2 and isinstance(args[2], numbers.Integral) and not isinstance(args[2], bool)


@reordered_args(("model", "memorized", "prefix_len", "non_memorized"), is_old=_is_old_order)
def contrastive_loss(model: Model, memorized: Int[Tensor, "n seq"], non_memorized: Int[Tensor, "N seq"],
                     prefix_len: int, *, objective: Literal["unlearn", "edit"] = "unlearn",
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

    The NMP set comes second, as in every function of :mod:`memloc.contrastive`; the former order
    ``contrastive_loss(model, memorized, prefix_len, non_memorized)`` still works, with a
    DeprecationWarning.
    """
    mp, nmp = check_contrastive_sets(model, memorized, non_memorized, prefix_len)
    edit_seq = check_objective_targets(model, objective, mp, edit_targets, prefix_len)
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
    loss, nll, kl = _co_terms(target_logits, nmp_logits, target, ref, prefix_len, objective)
    if return_terms:
        return loss, {"nll": nll.detach(), "kl": kl.detach()}
    return loss


def _reference(model: Model, nmp: Tensor, prefix_len: int) -> Tensor:
    # contrastive_loss's argument ``reference_logits`` shadows the function there
    return reference_logits(model, nmp, prefix_len, batch_size=len(nmp))


def _co_terms(target_logits: Tensor, nmp_logits: Tensor, target: Tensor, ref: Tensor, prefix_len: int,
              objective: str) -> tuple[Tensor, Tensor, Tensor]:
    """Stoehr Eq. 3 / 4 from continuation logits: ``(loss, nll, kl)`` with ``loss = ∓nll + kl``."""
    nll = suffix_nll(target_logits, target[:, prefix_len:]).mean()
    kl = _mean_kl(nmp_logits, ref)
    return (-nll if objective == "unlearn" else nll) + kl, nll, kl


def contrastive_loss_from_logits(target_logits: Float[Tensor, "n T vocab"], nmp_logits: Float[Tensor, "N T vocab"],
                                 target: Int[Tensor, "n seq"], ref: Float[Tensor, "N T vocab"], prefix_len: int,
                                 objective: str) -> Float[Tensor, ""]:
    """Stoehr Eq. 3 / 4 from continuation logits (the arithmetic of :func:`contrastive_loss`, for
    callers that run their own forward, e.g. the partial forwards of sparse fine-tuning):
    ``∓ NLL(target continuation) + KL(p_θ ‖ p_θ₀)`` on the NMPs, ``ref`` the θ₀ logits."""
    return _co_terms(target_logits, nmp_logits, target, ref, prefix_len, objective)[0]
