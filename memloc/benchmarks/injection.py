"""Injecting a sequence into chosen FFN value vectors (Chang et al. §3.1, Algorithm 1, Eq. 13): the
value vectors of every layer (:func:`ffn_value_vectors`), the sampled injection mask, the injection
fine-tuning as a context manager that undoes itself (:func:`injected`), and the injected rows as
data (what an INJ worker sends back and the injection cache stores)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from .._checks import check_fraction, check_positive_int, check_seed, check_tokens
from ..ablation import n_selected
from ..architectures import weight_layout
from ..borrow import borrowed
from ..models import Model
from ..placement import require_resident_weights

logger = logging.getLogger(__name__)

__all__ = ["ValueVectors", "ffn_value_vectors", "sample_injection_mask", "injection_loss", "injected",
           "InjectionResult", "injected_rows", "with_injected_rows", "DEFAULT_INJ_LR"]

#: Adam learning rate of the injection (the authors' code, terarachang/MemPi inject.py: lr=1e-2).
DEFAULT_INJ_LR = 1e-2


@dataclass(frozen=True)
class ValueVectors:
    """The FFN output weight of one layer: ``param`` (a real parameter of the model, named
    ``name``) holds value vector v^l_j along ``neuron_axis`` (1 for ``nn.Linear`` weights of shape
    [d_model, d_mlp], 0 for GPT-2's ``Conv1D`` of shape [d_mlp, d_model])."""

    layer: int
    name: str
    param: torch.nn.Parameter
    neuron_axis: int

    def vector(self, neuron: int) -> Tensor:
        """v^l_neuron, shape [d_model]."""
        return self.param.select(self.neuron_axis, neuron)


def ffn_value_vectors(model: Model) -> list[ValueVectors]:
    """Locate every layer's FFN down-projection weight (W_out, Chang et al. Eq. 2-3's V^l).

    Works through the bridge's ``blocks[l].mlp.out`` component, so it covers GPT-2 (Conv1D),
    GPT-Neo, GPT-NeoX/Pythia and Llama-style gated MLPs (nn.Linear).
    """
    require_resident_weights(model, "INJ (ffn_value_vectors)")
    names = {id(p): n for n, p in model.named_parameters()}
    d_mlp = int(model.cfg.d_mlp)
    out = []
    for l in range(int(model.cfg.n_layers)):
        try:
            comp = model.blocks[l].mlp.out
        except (AttributeError, IndexError) as exc:
            raise ValueError(f"model has no FFN output projection at blocks[{l}].mlp.out; INJ needs one") from exc
        module = getattr(comp, "_original_component", comp)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or id(weight) not in names or weight.ndim != 2:
            raise ValueError(f"blocks[{l}].mlp.out has no 2-D weight parameter")
        layout = weight_layout(module)  # the neuron axis is the input axis: 1 of [out, in], 0 of [in, out]
        if layout is not None:
            axis = 1 if layout == "out_in" else 0
        else:
            matches = [a for a in (0, 1) if weight.shape[a] == d_mlp]
            if len(matches) != 1:
                raise ValueError(f"cannot tell the neuron axis of blocks[{l}].mlp.out ({type(module).__name__}, "
                                 f"shape {tuple(weight.shape)})")
            axis = matches[0]
        if weight.shape[axis] != d_mlp:
            raise ValueError(f"blocks[{l}].mlp.out weight {tuple(weight.shape)} has no d_mlp={d_mlp} axis at {axis}")
        out.append(ValueVectors(l, names[id(weight)], weight, axis))
    return out


def sample_injection_mask(n_layers: int, d_mlp: int, ratio: float, seed: int) -> Bool[Tensor, "layer neuron"]:
    """Algorithm 1: sample round(ratio * n_layers * d_mlp) value vectors uniformly across all layers,
    with the random seed set to ``seed`` (the sequence index).  Returns a CPU bool mask."""
    check_positive_int(n_layers, "n_layers")
    check_positive_int(d_mlp, "d_mlp")
    check_fraction(ratio, "ratio")
    check_seed(seed, non_negative=True)
    total = n_layers * d_mlp
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=gen)[:n_selected(ratio, total)]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(n_layers, d_mlp)


def injection_loss(model: Model, tokens: Int[Tensor, "1 seq"]) -> Tensor:
    """Language-modelling loss of Chang et al. Eq. 13: mean NLL of tokens 2..T given their prefix."""
    logits = model(tokens)
    return F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])


@dataclass
class InjectionResult:
    """Outcome of one injection: optimizer ``steps`` taken, ``final_loss`` (Eq. 13 at the
    injected weights), whether it ``converged`` (final loss < target), the loss curve, and the
    injected ``mask`` [layer, neuron]."""

    steps: int
    final_loss: float
    converged: bool
    mask: Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def n_injected(self) -> int:
        return int(self.mask.sum())


def _check_mask(model: Model, mask: Any) -> Tensor:
    shape = (int(model.cfg.n_layers), int(model.cfg.d_mlp))
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(f"mask must be a bool tensor of shape {shape} [layer, neuron], got "
                         f"{type(mask).__name__} {getattr(mask, 'dtype', '')} {tuple(getattr(mask, 'shape', ()))}")
    if not mask.any():
        raise ValueError("mask selects no value vectors; nothing to inject into")
    return mask


@contextmanager
def injected(model: Model, tokens: Int[Tensor, "1 seq"], mask: Bool[Tensor, "layer neuron"], *,
             lr: float = DEFAULT_INJ_LR, max_steps: int = 500, target_loss: float = 0.05) -> Iterator[InjectionResult]:
    """Context manager: inject ``tokens`` into the value vectors selected by ``mask``
    (Chang et al. Algorithm 1 for one sequence) and undo it on exit.

    Only the selected value vectors change: the W_out parameters are the only trainable ones
    and their gradients are zeroed outside ``mask`` before each Adam step (no weight decay, so
    zero-gradient rows keep their exact bytes).  Training stops when the loss of Eq. 13 is
    below ``target_loss`` or after ``max_steps`` steps; the model runs in eval mode (no dropout).
    Inside the context the model holds the injected weights; on exit (also on exceptions) the
    W_out snapshot, ``requires_grad``, train/eval flags, hooks and ``.grad`` are restored.

    Yields:
        :class:`InjectionResult` (``converged=False`` when the step cap was hit first).
    """
    tokens = check_tokens(model, tokens)
    if tokens.shape[0] != 1 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be one sequence [1, seq] with seq >= 2, got {tuple(tokens.shape)}")
    mask = _check_mask(model, mask)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    check_positive_int(max_steps, "max_steps")
    if isinstance(target_loss, bool) or not isinstance(target_loss, (int, float)) or not target_loss > 0:
        raise ValueError(f"target_loss must be a positive number, got {target_loss!r}")
    vectors = ffn_value_vectors(model)
    old_grads = {v.name: v.param.grad for v in vectors}
    try:
        with borrowed(model, restore_weights=[v.name for v in vectors]):
            result = _inject(model, tokens, mask, vectors, float(lr), max_steps, float(target_loss))
            yield result
    finally:
        for v in vectors:
            v.param.grad = old_grads[v.name]


def _inject(model: Model, tokens: Tensor, mask: Tensor, vectors: list[ValueVectors], lr: float, max_steps: int,
            target_loss: float) -> InjectionResult:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    grad_masks = []
    for v in vectors:
        v.param.requires_grad_(True)
        v.param.grad = None
        m = mask[v.layer].to(v.param.device, v.param.dtype)
        grad_masks.append(m.view(1, -1) if v.neuron_axis == 1 else m.view(-1, 1))
    optimizer = torch.optim.Adam([v.param for v in vectors], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    steps = 0
    while True:
        optimizer.zero_grad(set_to_none=True)
        loss = injection_loss(model, tokens)
        losses.append(float(loss.detach()))
        if losses[-1] < target_loss or steps >= max_steps:
            break
        loss.backward()
        for v, gm in zip(vectors, grad_masks):
            if v.param.grad is not None:
                v.param.grad.mul_(gm)
        optimizer.step()
        steps += 1
    for v in vectors:
        v.param.grad = None
    converged = losses[-1] < target_loss
    if not converged:
        logger.info("injection stopped at the step cap %d with loss %.4f >= %.3f", max_steps, losses[-1], target_loss)
    return InjectionResult(steps, losses[-1], converged, mask.detach().cpu().clone(), losses)


def injected_rows(model: Model, mask: Tensor) -> Tensor:
    """The value vectors selected by ``mask`` as rows [n_selected, d_model], in (layer, neuron) order."""
    parts = []
    for v in ffn_value_vectors(model):
        idx = mask[v.layer].nonzero().flatten().to(v.param.device)
        rows = v.param.detach().index_select(v.neuron_axis, idx)
        parts.append(rows.T if v.neuron_axis == 1 else rows)
    return torch.cat(parts).cpu().clone()


@contextmanager
def with_injected_rows(model: Model, mask: Tensor, values: Tensor) -> Iterator[None]:
    """Write injected value vectors (from :func:`injected_rows`) into the model; undone on exit."""
    vectors = ffn_value_vectors(model)
    with borrowed(model, restore_weights=[v.name for v in vectors]), torch.no_grad():
        start = 0
        for v in vectors:
            idx = mask[v.layer].nonzero().flatten()
            rows = values[start:start + len(idx)].to(v.param.device, v.param.dtype)
            start += len(idx)
            v.param.index_copy_(v.neuron_axis, idx.to(v.param.device), rows.T if v.neuron_axis == 1 else rows)
        yield
