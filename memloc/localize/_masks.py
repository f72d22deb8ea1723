"""The mask-training loop shared by SLIMMING and HARD CONCRETE (Chang et al. Eq. 9, 12; A.3-A.4)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .._progress import progress
from ..models import neuron_hook_name
from ._common import memorization_loss, partial_forward, suffix_positions


def train_masks(model: Any, tokens: Tensor, prefix_len: int, param: Tensor, *,
                mask_fn: Callable[[int], Tensor], regularizer: Callable[[], Tensor], lam: float, lr: float,
                max_steps: int, stop_loss: float, check_every: int, start_layer: int,
                clip: tuple[float, float] | None, progress_bar: bool, desc: str,
                history: list | None = None) -> int:
    """Adam on ``param`` [layer, neuron] minimizing ``l_mem(x) + lam * regularizer()`` with
    ``h^l <- h^l * mask_fn(l)`` at ``blocks.{l}.mlp.hook_post`` for layers >= ``start_layer``.

    Every ``check_every`` steps (before that step's update, as in the authors' code) the loop stops
    once ``regularizer() < stop_loss``.  The model's weights are frozen (requires_grad off; the
    caller's ``borrowed`` restores the flags), the model stays in eval mode (no dropout, A.3).
    Returns the number of optimizer steps taken; appends (step, mem_loss, reg) to ``history``.

    Fast path: the masks act on layers >= ``start_layer`` only and the loss reads the suffix
    positions only, so each step re-runs blocks ``start_layer..L-1`` from the cached input of block
    ``start_layer`` and unembeds only the suffix positions (:func:`~memloc.localize._common.partial_forward`,
    checked against a full forward once; identical logits) when that skips blocks or a quarter of
    the positions' unembedding.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    opt = torch.optim.Adam([param], lr=lr)
    pos = suffix_positions(tokens.shape[1], prefix_len)
    target = tokens[:, prefix_len:]

    def hook(act, hook):
        l = int(hook.name.split(".")[1])
        return act * mask_fn(l).to(act.dtype)

    hooks = [(neuron_hook_name(l), hook) for l in range(start_layer, model.cfg.n_layers)]
    # worth it when it skips blocks or a good part of the unembedding (not for INJ's prefix_len = 1)
    useful = start_layer > 0 or (pos.stop - pos.start) < 0.75 * tokens.shape[1]
    fast = partial_forward(model, tokens, start_layer, pos, what=desc) if useful else None
    steps = 0
    with model.hooks(fwd_hooks=hooks), torch.enable_grad():
        for step in progress(range(max_steps), enabled=progress_bar, desc=desc):
            opt.zero_grad(set_to_none=True)
            logits = fast() if fast is not None else model(tokens)[:, pos]
            mem = memorization_loss(logits, target)[0]
            reg = regularizer()
            if history is not None:
                history.append((step, float(mem.detach()), float(reg.detach())))
            if (step + 1) % check_every == 0 and float(reg.detach()) < stop_loss:
                break
            (mem + lam * reg).backward()
            opt.step()
            steps += 1
            if clip is not None:
                with torch.no_grad():
                    param.clamp_(*clip)
    param.grad = None
    return steps
