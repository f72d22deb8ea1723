"""Shared pieces of the neuron-localization methods (Chang et al. §4).

Conventions: a sequence ``x = (p, s)`` of ``seq`` tokens has prefix ``p = x[:prefix_len]`` and
suffix ``s = x[prefix_len:]`` of ``T = seq - prefix_len`` tokens.  The suffix token ``s_t`` is
predicted at position ``prefix_len - 1 + t`` (0-indexed t), so the *suffix positions* whose
activations and logits matter are ``prefix_len - 1 .. seq - 2`` (Chang et al. Eq. 8: "the
activation ... when the input consists of all the tokens before s_t").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._checks import check_tokens
from ..architectures import replayable_block_arguments
from ..metrics import suffix_nll
from ..models import Model, hook_name, neuron_hook_name

#: The memorization loss (Chang et al. Eq. 6), kept under the name the localization methods use.
memorization_loss = suffix_nll

__all__ = ["prepare_sequence", "suffix_positions", "memorization_loss", "BlockInputs", "capture_clean",
           "run_blocks_from", "logits_at", "w_out", "mlp_out_is_linear"]


def prepare_sequence(model: Model, tokens: Any, prefix_len: int) -> Int[Tensor, "1 seq"]:
    """Validate one sequence (``[seq]`` or ``[1, seq]``) and return it as ``[1, seq]`` int64 on the
    model's device.  Raises ValueError for a batch of several sequences (one score map per
    sequence is the paper's setting: call the method once per sequence), for 3-D input, and for a
    ``prefix_len`` outside ``1..seq-1``."""
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if isinstance(tokens, Tensor) and tokens.ndim == 2 and tokens.shape[0] != 1:
        raise ValueError(f"tokens must be a single sequence [seq] or [1, seq] (one score map per sequence, "
                         f"Chang et al. §4); got a batch of shape {tuple(tokens.shape)} - call once per sequence")
    return check_tokens(model, tokens, prefix_len)


def suffix_positions(seq_len: int, prefix_len: int) -> slice:
    """Positions ``prefix_len-1 .. seq_len-2``: the inputs ``[p, s_<t]`` that predict each ``s_t``."""
    return slice(prefix_len - 1, seq_len - 1)


class BlockInputs:
    """The extra positional and keyword arguments each transformer block received in a clean run
    (attention masks, position ids, rotary embeddings, ...), with any KV cache removed, so that
    blocks ``l..L-1`` can be re-run on a modified residual stream of any batch size without
    re-running blocks ``0..l-1`` (the bridge's ``start_at_layer`` still executes them)."""

    def __init__(self) -> None:
        self.args: dict[int, tuple] = {}
        self.kwargs: dict[int, dict] = {}


def capture_clean(model: Model, tokens: Int[Tensor, "1 seq"], names: list[str], *,
                  capture_blocks: bool = True) -> tuple[Tensor, dict[str, Tensor], BlockInputs]:
    """One clean forward: logits, the activations at hook points ``names`` (detached) and the
    block inputs.  Uses TransformerLens hooks for activations and plain torch forward-pre-hooks
    (removed in ``finally``) on ``model.blocks[i]`` to record their arguments."""
    inputs = BlockInputs()
    acts: dict[str, Tensor] = {}
    handles = []

    def make_pre(i: int) -> Callable:
        def pre(module, args, kwargs):
            inputs.args[i], inputs.kwargs[i] = replayable_block_arguments(args[1:], kwargs)
        return pre

    def saver(name: str) -> Callable:
        def save(act, hook):  # keyed by the requested name: hook.name may be an alias's canonical name
            acts[name] = act.detach()
        return save

    try:
        if capture_blocks:
            handles = [b.register_forward_pre_hook(make_pre(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(n, saver(n)) for n in names])
    finally:
        for h in handles:
            h.remove()
    return logits.detach(), acts, inputs


def run_blocks_from(model: Model, resid: Float[Tensor, "batch seq d_model"], start: int,
                    inputs: BlockInputs) -> Float[Tensor, "batch seq d_model"]:
    """Run blocks ``start .. n_layers-1`` on a residual stream (the input of block ``start``)."""
    for i in range(start, model.cfg.n_layers):
        out = model.blocks[i](resid, *inputs.args[i], **inputs.kwargs[i])
        resid = out[0] if isinstance(out, tuple) else out
    return resid


def logits_at(model: Model, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos vocab"]:
    """Final norm and unembedding of a final residual stream (only the positions passed in)."""
    return model.unembed(model.ln_final(resid))


def w_out(model: Model) -> Float[Tensor, "layer neuron d_model"]:
    """Value vectors v_i^l (Chang et al. Eq. 2-3): row i of ``W_out[l]`` is what neuron i writes
    into the residual stream per unit of activation."""
    return model.W_out.detach()


def mlp_out_is_linear(model: Model, acts: dict[str, Tensor], layer: int, *, atol: float = 1e-4) -> bool:
    """Whether ``hook_mlp_out == hook_post @ W_out + b_out`` holds in this model's coordinates
    (true for unprocessed weights; checked before relying on it)."""
    h = acts[neuron_hook_name(layer)]
    out = acts[hook_name("mlp_out", layer)]
    b = getattr(model, "b_out", None)
    pred = h @ w_out(model)[layer].to(h.dtype) + (b[layer].detach() if b is not None else 0.0)
    scale = out.abs().max().clamp_min(1.0)
    return bool(((pred - out).abs().max() / scale) < atol)
