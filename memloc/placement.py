"""Models placed by Hugging Face's ``device_map`` (:func:`memloc.load_model` with ``device_map=``):
which weights accelerate has offloaded, and reading them anyway.

A model too large for one device is placed by accelerate (through TransformerLens's
``boot_transformers``); modules mapped to ``"cpu"`` or ``"disk"`` next to other devices, or to
``"disk"`` at all, keep their parameters on the ``meta`` device and an accelerate hook that loads
them for each call of the module.  Forwards, hooks and gradients with respect to activations work
unchanged; what does not is reading a weight outside a forward (TransformerLens raises
``NotImplementedError`` for ``model.W_out``) or writing or training one.  memloc reads the MLP
weights it needs (value vectors, Chang et al. Eq. 2-3) one block at a time under accelerate's own
``align_module_device``, so no more than one block is materialized at once, and refuses, with a
``ValueError`` before any work, the analyses that write or train weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from .models import Model

__all__ = ["offloaded_modules", "materialized", "stacked_mlp_param", "require_resident_weights"]


def offloaded_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose parameters accelerate has offloaded (kept on ``meta`` and loaded
    per call); empty for a model held on real devices."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return []
    from accelerate.utils import has_offloaded_params

    return [name for name, m in model.named_modules() if has_offloaded_params(m)]


@contextlib.contextmanager
def materialized(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every offloaded parameter under ``module`` holds its real values (on the
    module's execution device); a no-op for a module without offloaded parameters.  Uses
    accelerate's ``align_module_device`` on each hooked submodule (accelerate hooks leaf modules)."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield


def stacked_mlp_param(model: Model, name: str) -> Float[Tensor, "layer ..."] | None:
    """``model.W_in`` / ``W_out`` / ``b_in`` / ``b_out`` (TransformerLens's stacked MLP parameters,
    detached), also on a model with offloaded blocks: each block's MLP is then materialized in
    turn and its copy kept.  ``None`` where the model has no such parameter (a bias-free MLP)."""
    if name not in ("W_in", "W_out", "b_in", "b_out"):
        raise ValueError(f"name must be one of W_in, W_out, b_in, b_out, got {name!r}")
    if not offloaded_modules(model):
        value = getattr(model, name, None)
        return None if value is None else value.detach()
    rows = []
    for block in model.blocks:
        with materialized(block.mlp):
            # the bias aliases (mlp.b_out -> out.bias) hold on to the meta parameter that accelerate
            # swaps out while materializing; the subcomponent's own attribute sees the loaded one
            value = getattr(block.mlp.out if name == "b_out" else block.mlp.get_submodule("in"), "bias", None) \
                if name.startswith("b_") else getattr(block.mlp, name, None)
            if value is None:
                return None
            rows.append(value.detach().clone())
    return torch.stack([r.to(rows[0].device) for r in rows])


def require_resident_weights(model: Model, what: str) -> None:
    """ValueError naming ``what`` when some of the model's weights are offloaded: analyses that
    write or train weights (INJ's injection, fine-tuning, parameter gradients) need every weight
    held on a real device."""
    names = offloaded_modules(model)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"model: {what} writes or differentiates the weights, but accelerate has offloaded "
                         f"some of them (device_map with 'cpu'/'disk' entries: {shown}); load the model with "
                         "every module on a real device (an all-GPU device_map, or device=...)")
