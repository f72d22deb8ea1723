"""What memloc knows about each model family, in one place: one adapter per architecture.

Everything else in memloc works through TransformerLens hook points and the bridge's stacked
weights (``W_Q``, ``W_in``, ...), which are the same for every family.  A few analyses need the
Hugging Face model underneath, and what they need differs per family; it lives here, the way
TransformerLens keeps its ``model_bridge/supported_architectures/`` (one adapter per family):

* the names of the Hugging Face weight modules behind each component (``q_proj`` / ``c_attn`` /
  ``query_key_value`` ...) and the layout of a fused q|k|v projection
  (:func:`memloc.gradients.parameter_components`, Stoehr et al. §5);
* the attention score scale and the local-attention window of each layer (GPT-2 scales scores
  by ``1/sqrt(d_head)``, GPT-Neo does not and alternates global / local layers): the direct
  single-token pass of integrated gradients re-implements attention with them;
* the weight orientation of a linear module (``nn.Linear`` ``[out, in]`` vs GPT-2's ``Conv1D``
  ``[in, out]``);
* the extra arguments a Hugging Face block takes, and how to replay them without a KV cache.

:func:`adapter_for` picks the adapter from the bridge's Hugging Face config (``model_type``);
families without a dedicated adapter get :data:`GENERIC`, which recognizes the union of the
known module names and declines the family-specific fast paths.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .models import Model

logger = logging.getLogger(__name__)

__all__ = ["ArchitectureAdapter", "AttentionGeometry", "GPT2", "GPT_NEO", "GPT_NEOX", "LLAMA", "GENERIC",
           "ADAPTERS", "adapter_for", "model_type", "weight_layout", "layer_of", "module_path",
           "replayable_block_arguments"]

Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class AttentionGeometry:
    """Per layer: the factor multiplying ``q·k`` before the softmax, and the local-attention window
    (``None`` = global causal attention; otherwise query q sees keys p with ``0 <= q - p < window``)."""

    scales: list[float]
    windows: list[int | None]


@dataclass(frozen=True)
class ArchitectureAdapter:
    """One model family's Hugging Face specifics (see the module docstring).

    Attributes:
        family: short name (``"gpt_neo"``, ``"gpt2"``, ``"gpt_neox"``, ``"llama"``, ``"generic"``).
        model_types: Hugging Face ``config.model_type`` values this adapter serves.
        q, k, v, o: leaf names of the separate attention projections (as the bridge exposes them:
            GPT-2 and GPT-NeoX get split ``q/k/v/o`` beside their fused original weight).
        fused_qkv: leaf names of a fused q|k|v projection.
        fused_layout: ``"blocks"`` (columns/rows q | k | v, each head-major: GPT-2 ``c_attn``) or
            ``"interleaved"`` (``[head, (q k v), d_head]``: GPT-NeoX ``query_key_value``).
        mlp_in, mlp_gate, mlp_out: leaf names of the MLP up-, gate- and down-projections.
    """

    family: str
    model_types: tuple[str, ...]
    q: frozenset[str]
    k: frozenset[str]
    v: frozenset[str]
    o: frozenset[str]
    fused_qkv: frozenset[str]
    mlp_in: frozenset[str]
    mlp_out: frozenset[str]
    mlp_gate: frozenset[str] = field(default_factory=frozenset)
    fused_layout: Literal["blocks", "interleaved"] = "blocks"

    def component(self, leaf: str, *, in_attention: bool, in_mlp: bool) -> str | None:
        """The Stoehr component (``W_Q``, ``W_K``, ``W_V``, ``W_O``, ``"fused"``, ``W_in``, ``W_gate``,
        ``W_out``) of a weight whose module's leaf name is ``leaf``; None if it is none of them."""
        if in_attention:
            for comp, names in (("W_Q", self.q), ("W_K", self.k), ("W_V", self.v), ("W_O", self.o),
                                ("fused", self.fused_qkv)):
                if leaf in names:
                    return comp
        elif in_mlp:
            for comp, names in (("W_in", self.mlp_in), ("W_gate", self.mlp_gate), ("W_out", self.mlp_out)):
                if leaf in names:
                    return comp
        return None

    def attention_geometry(self, model: Model) -> AttentionGeometry | None:
        """Score scales and windows of every layer, or None where memloc does not implement this
        family's attention by hand (rotary embeddings, grouped-query attention, ...)."""
        return None

    def mlp_activation(self, model: Model) -> Callable[[Any], Any]:
        """The MLP nonlinearity (Hugging Face's ``ACT2FN[config.activation_function]``)."""
        from transformers.activations import ACT2FN

        return ACT2FN[hf_config(model).activation_function]


@dataclass(frozen=True)
class _GPTNeo(ArchitectureAdapter):
    def attention_geometry(self, model: Model) -> AttentionGeometry | None:
        """GPT-Neo: unscaled scores (HF ``GPTNeoSelfAttention`` has no ``1/sqrt(d_head)``);
        ``config.attention_layers[l] == "local"`` layers see keys ``0 <= q - p < window_size``
        (its mask ``tril ^ tril(-window_size)``)."""
        config, n_layers = hf_config(model), int(model.cfg.n_layers)
        types = list(getattr(config, "attention_layers", None) or [])
        if len(types) != n_layers or any(t not in ("global", "local") for t in types):
            logger.info("GPT-Neo attention_layers %r do not describe %d layers", types, n_layers)
            return None
        window = int(config.window_size)
        return AttentionGeometry([1.0] * n_layers, [window if t == "local" else None for t in types])


@dataclass(frozen=True)
class _GPT2(ArchitectureAdapter):
    def attention_geometry(self, model: Model) -> AttentionGeometry | None:
        """GPT-2: scores times ``d_head**-0.5`` (if ``scale_attn_weights``) and ``1/(l+1)`` (if
        ``scale_attn_by_inverse_layer_idx``), as HF ``GPT2Attention``; global causal attention."""
        config, n_layers = hf_config(model), int(model.cfg.n_layers)
        base = int(model.cfg.d_head) ** -0.5 if config.scale_attn_weights else 1.0
        by_layer = bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))
        return AttentionGeometry([base / (l + 1) if by_layer else base for l in range(n_layers)], [None] * n_layers)


_fs = frozenset
GPT_NEO = _GPTNeo("gpt_neo", ("gpt_neo",), q=_fs({"q_proj"}), k=_fs({"k_proj"}), v=_fs({"v_proj"}),
                  o=_fs({"out_proj"}), fused_qkv=_fs(), mlp_in=_fs({"c_fc"}), mlp_out=_fs({"c_proj"}))
GPT2 = _GPT2("gpt2", ("gpt2",), q=_fs({"q"}), k=_fs({"k"}), v=_fs({"v"}), o=_fs({"o", "c_proj"}),
             fused_qkv=_fs({"qkv", "c_attn"}), mlp_in=_fs({"c_fc"}), mlp_out=_fs({"c_proj"}))
GPT_NEOX = ArchitectureAdapter("gpt_neox", ("gpt_neox",), q=_fs({"q"}), k=_fs({"k"}), v=_fs({"v"}),
                               o=_fs({"o", "dense"}), fused_qkv=_fs({"qkv", "query_key_value"}),
                               mlp_in=_fs({"dense_h_to_4h"}), mlp_out=_fs({"dense_4h_to_h"}),
                               fused_layout="interleaved")
LLAMA = ArchitectureAdapter("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "smollm3"),
                            q=_fs({"q_proj"}), k=_fs({"k_proj"}), v=_fs({"v_proj"}), o=_fs({"o_proj"}),
                            fused_qkv=_fs(), mlp_in=_fs({"up_proj"}), mlp_gate=_fs({"gate_proj"}),
                            mlp_out=_fs({"down_proj"}))
#: Any other family: the union of the names above and of common variants; no hand-written attention.
GENERIC = ArchitectureAdapter(
    "generic", (), q=_fs({"q", "q_proj", "query"}), k=_fs({"k", "k_proj", "key"}), v=_fs({"v", "v_proj", "value"}),
    o=_fs({"o", "o_proj", "out_proj", "c_proj", "dense", "wo"}), fused_qkv=_fs({"qkv", "c_attn", "query_key_value", "wqkv"}),
    mlp_in=_fs({"c_fc", "fc_in", "dense_h_to_4h", "up_proj", "fc1", "w1", "in"}),
    mlp_gate=_fs({"gate_proj", "gate", "w3"}),
    mlp_out=_fs({"c_proj", "fc_out", "dense_4h_to_h", "down_proj", "fc2", "w2", "out"}))
ADAPTERS: tuple[ArchitectureAdapter, ...] = (GPT_NEO, GPT2, GPT_NEOX, LLAMA)


def hf_config(model: Model) -> Any:
    """The Hugging Face config of the model under the bridge (None if there is none)."""
    return getattr(getattr(model, "original_model", None), "config", None)


def model_type(model: Model) -> str | None:
    """Hugging Face ``config.model_type`` of the model under the bridge (e.g. ``"gpt_neo"``)."""
    return getattr(hf_config(model), "model_type", None)


def adapter_for(model: Model) -> ArchitectureAdapter:
    """The adapter of the model's family, chosen by its Hugging Face ``model_type`` (the NeoX
    layout is also recognized from the bridge's ``original_architecture``); :data:`GENERIC` otherwise."""
    kind = model_type(model)
    for adapter in ADAPTERS:
        if kind in adapter.model_types:
            return adapter
    arch = str(getattr(model.cfg, "original_architecture", "") or "")
    if "neox" in arch.lower():
        return GPT_NEOX
    return GENERIC


def weight_layout(module: Any) -> Layout | None:
    """Orientation of a linear module's 2-D weight: ``"out_in"`` for ``torch.nn.Linear``
    (``y = x W^T``), ``"in_out"`` for Hugging Face's ``Conv1D`` (GPT-2: ``y = x W``); None for
    anything else.  A bridge component is looked through to its original module."""
    module = getattr(module, "_original_component", module)
    import torch

    if isinstance(module, torch.nn.Linear):
        return "out_in"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or very new transformers
        Conv1D = None
    if (Conv1D is not None and isinstance(module, Conv1D)) or type(module).__name__ == "Conv1D":
        return "in_out"
    return None


_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)\.")


def layer_of(param_name: str) -> int | None:
    """Block index in a Hugging Face parameter name (``transformer.h.3.``, ``model.layers.3.``, ...)."""
    m = _LAYER_RE.search(param_name)
    return None if m is None else int(m.group(1))


def module_path(param_name: str) -> list[str]:
    """The parts of a parameter name without the bridge's ``_original_component`` wrappers."""
    return [p for p in param_name.split(".") if p != "_original_component"]


def replayable_block_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The extra arguments a Hugging Face transformer block received (after the hidden states), made
    replayable on a fresh residual stream of any batch size: any KV cache is dropped and
    ``use_cache`` turned off (attention masks, position ids and rotary embeddings are kept)."""
    from transformers.cache_utils import Cache

    strip = lambda v: None if isinstance(v, Cache) else v  # noqa: E731
    kw = {k: strip(v) for k, v in kwargs.items()}
    if "use_cache" in kw:
        kw["use_cache"] = False
    return tuple(strip(a) for a in args), kw
