"""The model is borrowed, never kept: leave it exactly as it was found.

``borrowed(model)`` restores train/eval mode and every parameter's ``requires_grad`` on exit
(also when an exception escapes), removes hook functions added while it was open, and can
restore weights from a snapshot for functions that edit weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Literal

import torch

from .models import Model

__all__ = ["borrowed", "trainable_only"]

_DIRS: tuple[Literal["fwd", "bwd"], ...] = ("fwd", "bwd")


def _handles(model: Model) -> dict[tuple[int, str], tuple[Any, list[Any]]]:
    """Every hook function on the model, per (hook point, direction): ``(HookPoint, [LensHandle])``.

    Walks the bridge's canonical hook registry (``model.hook_points()``; aliases are the same
    objects) and reads the handles of the hook points whose ``has_hooks`` says they have any."""
    out: dict = {}
    for hp in model.hook_points():
        if not hp.has_hooks("both", including_permanent=True):
            continue
        for d, handles in (("fwd", hp.fwd_hooks), ("bwd", hp.bwd_hooks)):
            if handles:
                out[(id(hp), d)] = (hp, list(handles))
    return out


def _remove_added_hooks(model: Model, before: dict) -> None:
    """Remove the hook functions added since ``before`` (a :func:`_handles` snapshot), leaving the
    ones that were there (the caller's own hooks, permanent or not) untouched and in order.

    Through TransformerLens's API: a hook point (direction) that had no hooks before is cleared with
    ``HookPoint.remove_hooks(dir, including_permanent=True)``; where the caller had hooks too, each
    added temporary hook is removed with the bridge's per-handle remover (the one its ``hooks()``
    context manager uses), and an added *permanent* hook with ``remove_hooks(..., level=...)`` when
    that removes nothing of the caller's.  Only the last case cannot be expressed with
    TransformerLens's API (a permanent hook added at a level the caller's hooks share); it drops that
    one handle from the hook point's list directly."""
    from transformer_lens.model_bridge.bridge_core import BridgeCore

    for key, (hp, handles) in _handles(model).items():
        old = {id(h) for h in before.get(key, (None, []))[1]}
        added = [h for h in handles if id(h) not in old]
        if not added:
            continue
        d = key[1]
        if not old:
            hp.remove_hooks(d, including_permanent=True)
            continue
        kept = [h for h in handles if id(h) in old]
        for h in added:
            if not h.is_permanent:
                BridgeCore._remove_temporary_hook(hp, d, h)
            elif h.context_level is not None and all(k.context_level != h.context_level for k in kept):
                hp.remove_hooks(d, including_permanent=True, level=h.context_level)
            else:
                h.hook.remove()
                lst = hp.fwd_hooks if d == "fwd" else hp.bwd_hooks
                lst[:] = [x for x in lst if x is not h]


def trainable_only(model: Model, names: Iterable[str] = ()) -> None:
    """``requires_grad`` on exactly the parameters ``names`` (none: the whole model frozen, e.g. when
    only activations need gradients).  Use inside :func:`borrowed`, which restores the flags."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)


@contextmanager
def borrowed(model: Model, *, restore_weights: Iterable[str] | bool = False) -> Iterator[Model]:
    """Context manager that hands the model back exactly as it was.

    Restores on exit (also when an exception escapes): train/eval flags of every module,
    ``requires_grad`` of every parameter, the hook functions (hooks added inside are removed; hooks
    the caller had attached before, temporary or permanent, stay as they were), and optionally
    weights.

    Args:
        model: the TransformerBridge.
        restore_weights: False (nothing is snapshotted), True (every parameter), or an iterable of
            parameter names to snapshot and copy back on exit (their ``.grad`` is cleared).
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
    before = _handles(model)
    torch_hooks = {name: set(m._forward_hooks) for name, m in model.named_modules()}
    try:
        yield model
    except BaseException:
        # TransformerLens's bridge registers plain torch forward hooks on the wrapped Hugging Face
        # modules during a forward and removes them when it returns; an exception escaping that
        # forward leaves them behind.  torch has no public "remove by id", so drop the ones added
        # since entry from the module's hook dict (what a handle's remove() does).
        for name, m in model.named_modules():
            for key in set(m._forward_hooks) - torch_hooks.get(name, set()):
                m._forward_hooks.pop(key, None)
        raise
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
        _remove_added_hooks(model, before)
