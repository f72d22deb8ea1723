"""Loading models through TransformerLens 4 and the facts memloc needs about them.

Every memloc function takes a ``TransformerBridge`` in compatibility mode, i.e. with the
HookedTransformer hook names (``blocks.{l}.mlp.hook_post``, ``blocks.{l}.attn.hook_pattern``, ...).
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Names that select the embedded model shipped inside the package.
TINY_NAMES = (None, "tiny")


def tiny_model_dir() -> Path:
    """Directory of the embedded model (weights, config, tokenizer, paragraph set)."""
    return Path(str(resources.files("memloc") / "assets" / "tiny"))


def load_model(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32, process_weights: bool = False) -> Any:
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
    alias_kv_cache_kwarg(bridge)
    return bridge


def _cache_alias_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


def alias_kv_cache_kwarg(bridge: Any) -> int:
    """Make the bridge's attention components see the KV cache under its new name.

    Hugging Face transformers 5.x renamed the cache argument of migrated architectures (Llama,
    ...) from ``past_key_values`` to ``cache``: their decoder layers call the attention with
    ``cache=``, while TransformerLens 4.3's attention bridges read only ``past_key_values`` /
    ``layer_past``, so the cache stayed empty and every cached step attended to itself alone
    (greedy decoding of SmolLM2 repeated one token; IG's KV-cache self-check failed).  A
    forward pre-hook on each attention bridge copies ``cache`` to ``past_key_values``; it is a
    no-op for architectures that still pass ``past_key_values`` (GPT-2, GPT-Neo).  Installed
    once by :func:`load_model` (part of building the bridge); returns the number of components
    hooked (0 if already installed).
    """
    if getattr(bridge, "_memloc_cache_alias", None):
        return 0
    handles = [module.register_forward_pre_hook(_cache_alias_hook, with_kwargs=True)
               for module in bridge.modules() if hasattr(module, "_update_kv_cache")]
    bridge._memloc_cache_alias = handles  # the hook handles (removable)
    return len(handles)


def model_facts(model: Any) -> dict:
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


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def neuron_hook_name(layer: int) -> str:
    """Hook point of the FFN neurons h^l (Chang et al. Eq. 1): the MLP's post-activation, which for
    gated MLPs is the input of the down-projection."""
    return f"blocks.{layer}.mlp.hook_post"
