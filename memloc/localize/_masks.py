"""The mask-training loop shared by SLIMMING and HARD CONCRETE (Chang et al. Eq. 9, 12; A.3-A.4)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .._progress import progress
from ..models import layer_hooks
from ._common import memorization_loss, suffix_positions


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
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    opt = torch.optim.Adam([param], lr=lr)
    pos = suffix_positions(tokens.shape[1], prefix_len)
    target = tokens[:, prefix_len:]

    def hook(act, hook, *, layer):
        return act * mask_fn(layer).to(act.dtype)

    hooks = layer_hooks("post", range(start_layer, model.cfg.n_layers), hook)
    steps = 0
    with model.hooks(fwd_hooks=hooks), torch.enable_grad():
        for step in progress(range(max_steps), enabled=progress_bar, desc=desc):
            opt.zero_grad(set_to_none=True)
            logits = model(tokens)
            mem = memorization_loss(logits[:, pos], target)[0]
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
