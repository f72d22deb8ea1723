"""Loading models through TransformerLens 4 and the facts memloc needs about them.

Every memloc function takes a ``TransformerBridge`` in compatibility mode, i.e. with the
HookedTransformer hook names (``blocks.{l}.mlp.hook_post``, ``blocks.{l}.attn.hook_pattern``, ...).
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

logger = logging.getLogger(__name__)

__all__ = ["Model", "TINY_NAMES", "tiny_model_dir", "load_model", "model_facts", "model_device", "hook_name",
           "neuron_hook_name", "layer_hooks"]

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    #: The model every memloc function takes: a TransformerLens 4 ``TransformerBridge`` in compatibility mode.
    Model = TransformerBridge
else:
    class _LazyBridgeType(type):
        """``isinstance(x, Model)`` is ``isinstance(x, TransformerBridge)``, resolved on first use so that
        ``import memloc`` does not import TransformerLens (tens of seconds on a loaded machine)."""

        def __instancecheck__(cls, obj: object) -> bool:
            from transformer_lens.model_bridge import TransformerBridge

            return isinstance(obj, TransformerBridge)

        def __subclasscheck__(cls, sub: type) -> bool:
            from transformer_lens.model_bridge import TransformerBridge

            return issubclass(sub, TransformerBridge)

    class Model(metaclass=_LazyBridgeType):
        """The model every memloc function takes: TransformerLens's ``TransformerBridge`` (in
        compatibility mode).  For type checkers this *is* ``TransformerBridge``; at run time it is a
        stand-in whose ``isinstance`` check imports TransformerLens lazily (runtime type checks such
        as beartype's use it)."""

#: Names that select the embedded model shipped inside the package.
TINY_NAMES = (None, "tiny")


def tiny_model_dir() -> Path:
    """Directory of the embedded model (weights, config, tokenizer, paragraph set)."""
    return Path(str(resources.files("memloc") / "assets" / "tiny"))


def load_model(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32, process_weights: bool = False) -> Model:
    """Load a model as a TransformerLens 4 ``TransformerBridge`` in compatibility mode.

    Args:
        name_or_path: ``None`` or ``"tiny"`` for the embedded model (package data, no network);
            a local Hugging Face directory (loaded offline); or a hub name (needs the hub).
        device: ``"cpu"``, ``"cuda"``, ... (default: CPU).
        dtype: parameter dtype.
        process_weights: if False (default), weights stay in the checkpoint's coordinates
            (``enable_compatibility_mode(no_processing=True)``), so parameter gradients refer to
            the real weights; if True, LayerNorm is folded and weights centered as in
            HookedTransformer. Neuron activations (``mlp.hook_post``) are the same either way.

    Returns:
        The bridge, in eval mode.

    Raises:
        ValueError: if ``name_or_path`` is not the embedded model, not a local directory, and
            cannot be fetched from the hub (e.g. offline).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    device = str(device) if device is not None else "cpu"
    if name_or_path in TINY_NAMES:
        path = tiny_model_dir()
        if not (path / "model.safetensors").exists():
            raise ValueError(f"the embedded model is missing from {path}; reinstall memloc")
        target = str(path)
    else:
        target = str(name_or_path)
        local = Path(target).expanduser()
        if local.is_dir():
            if not (local / "config.json").exists():
                raise ValueError(f"name_or_path {target!r} is a directory without a config.json; "
                                 "expected a saved Hugging Face model directory")
            target = str(local)
        elif local.exists():
            raise ValueError(f"name_or_path {target!r} is a file; expected a model directory or hub name")
    try:
        bridge = TransformerBridge.boot_transformers(target, device=device, dtype=dtype)
    except Exception as exc:  # network or hub errors come in many types
        if Path(target).is_dir():
            raise
        raise ValueError(
            f"could not load model {target!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "If this machine is offline, download the model elsewhere and pass its local directory, "
            "or use load_model('tiny') for the embedded model.") from exc
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process_weights)
    bridge.eval()
    return bridge


def model_facts(model: Model) -> dict:
    """Architecture facts: family, layers, heads, d_model, d_mlp, d_head, n_ctx, vocabulary, gating."""
    cfg = model.cfg
    hf_cfg = getattr(model.original_model, "config", None)
    return {
        "architecture": getattr(cfg, "original_architecture", None) or type(model.original_model).__name__,
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "n_key_value_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        "d_model": int(cfg.d_model),
        "d_head": int(cfg.d_head),
        "d_mlp": int(cfg.d_mlp),
        "n_ctx": int(cfg.n_ctx),
        "d_vocab": int(cfg.d_vocab),
        "gated_mlp": bool(getattr(cfg, "gated_mlp", False)),
        "attention_layers": list(getattr(hf_cfg, "attention_layers", []) or []),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype),
    }


def model_device(model: Model) -> torch.device:
    return next(model.parameters()).device


def hook_name(kind: str, layer: int | None = None) -> str:
    """The TransformerLens hook-point name of activation ``kind`` in ``layer``: TransformerLens's own
    ``get_act_name`` (``hook_name("post", 2) == "blocks.2.mlp.hook_post"``, ``"pattern"`` ->
    ``blocks.{l}.attn.hook_pattern``, ``"resid_pre"`` -> ``blocks.{l}.hook_resid_pre``, ...).  These
    are the HookedTransformer names the bridge keeps in compatibility mode.  Every hook name memloc
    uses is built here."""
    from transformer_lens.utilities import get_act_name  # lazy: a model (hence TransformerLens) exists

    return get_act_name(kind, layer)


def neuron_hook_name(layer: int) -> str:
    """Hook point of the FFN neurons h^l (Chang et al. Eq. 1): the MLP's post-activation, which for
    gated MLPs is the input of the down-projection."""
    return hook_name("post", layer)


def layer_hooks(kind: str, layers: Iterable[int], fn: Callable[..., Any]) -> list[tuple[str, Callable[..., Any]]]:
    """``[(hook_name(kind, l), fn with layer=l bound), ...]`` for ``model.hooks``/``run_with_hooks``.

    ``fn(act, hook, *, layer)`` receives the layer it is attached to as an argument (bound with
    ``functools.partial``), so no hook function has to parse the layer out of ``hook.name`` (which
    may be an alias's canonical name on the bridge)."""
    return [(hook_name(kind, int(l)), partial(fn, layer=int(l))) for l in layers]
