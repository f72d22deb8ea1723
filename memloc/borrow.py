"""The model is borrowed, never kept: leave it exactly as it was found.

``borrowed(model)`` restores train/eval mode and every parameter's ``requires_grad`` on exit
(also when an exception escapes), removes hook functions added while it was open, and can
restore weights from a snapshot for functions that edit weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch


def _hook_handles(model: Any) -> set:
    handles = set()
    for hp in model.hook_dict.values():
        for h in list(getattr(hp, "fwd_hooks", [])) + list(getattr(hp, "bwd_hooks", [])):
            handles.add(id(h))
    return handles


@contextmanager
def borrowed(model: Any, *, restore_weights: Iterable[str] | bool = False) -> Iterator[Any]:
    """Context manager that hands the model back exactly as it was.

    Args:
        model: the TransformerBridge.
        restore_weights: False (nothing is snapshotted), True (every parameter), or an iterable of
            parameter names to snapshot and copy back on exit.
    """
    training = {name: m.training for name, m in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    if restore_weights is True:
        names = list(params)
    elif restore_weights is False:
        names = []
    else:
        names = list(restore_weights)
    snapshot = {n: params[n].detach().clone() for n in names}
    before = _hook_handles(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, t in snapshot.items():
                params[n].copy_(t)
                params[n].grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        for name, m in model.named_modules():
            if name in training:
                m.training = training[name]
        for hp in model.hook_dict.values():
            for attr in ("fwd_hooks", "bwd_hooks"):
                for h in list(getattr(hp, attr, [])):
                    if id(h) not in before:
                        h.hook.remove()
                        getattr(hp, attr).remove(h)
