"""Stoehr et al.'s parameter components (§5: ``θ ∈ R^{L × C × D*}``): which slice of which Hugging Face
parameter is ``W_Q`` of head h in layer l, for every family memloc supports (the module names and
layouts come from :mod:`memloc.architectures`).  Used by :mod:`memloc.gradients` (parameter
gradients, Eq. 1-2) and :mod:`memloc.contrastive` (the weights the objectives train)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .architectures import ArchitectureAdapter, adapter_for, layer_of, model_type, module_path, weight_layout
from .models import Model

__all__ = ["ParamComponent", "parameter_components", "ATTN_COMPONENTS", "MLP_COMPONENTS"]

ATTN_COMPONENTS = ("W_Q", "W_K", "W_V", "W_O")
MLP_COMPONENTS = ("W_in", "W_gate", "W_out")


@dataclass(frozen=True)
class ParamComponent:
    """One component (Stoehr §5: ``c`` in ``theta in R^{L x C x D*}``) of one layer.

    Attributes:
        layer: block index.
        component: ``W_Q``, ``W_K``, ``W_V``, ``W_O``, ``W_in``, ``W_gate`` or ``W_out``.
        head: attention head (key/value head for grouped-query ``W_K``/``W_V``); -1 for MLP weights.
        name: name of the parameter in ``model.named_parameters()``.
        param: the parameter itself.
        index: slicer selecting the component's weights in ``param`` (and in its gradient).
        orientation: ``"out_in"`` (torch Linear ``[out, in]``) or ``"in_out"`` (GPT-2 Conv1D ``[in, out]``).
    """

    layer: int
    component: str
    head: int
    name: str
    param: Any
    index: tuple
    orientation: str

    @property
    def label(self) -> str:
        return f"{self.component} H{self.head}" if self.head >= 0 else self.component

    def block(self, tensor: Tensor | None = None) -> Tensor:
        """The component's weights (or the same slice of ``tensor``, e.g. a gradient)."""
        t = self.param if tensor is None else tensor
        return t[self.index]


def _head_slices(orient: str, n: int, d_head: int, axis_role: str, offset: int = 0, stride: int | None = None):
    """Slicers of ``n`` head blocks of ``d_head`` along the output (``axis_role="out"``) or input axis."""
    out = []
    for h in range(n):
        start = offset + h * (stride if stride is not None else d_head)
        sl = slice(start, start + d_head)
        out_axis = 0 if orient == "out_in" else 1
        axis = out_axis if axis_role == "out" else 1 - out_axis
        out.append((slice(None), sl) if axis == 1 else (sl, slice(None)))
    return out


def parameter_components(model: Model, *, prefer_fused: bool = False) -> list[ParamComponent]:
    """Map the bridge's parameters to Stoehr's per-layer, per-head components (§5, Fig. 4).

    Works on the Hugging Face parameters the TransformerBridge exposes (``model.named_parameters()``):
    separate q/k/v/o projections (GPT-Neo ``q_proj``..., the bridge's split ``q/k/v/o`` of GPT-2
    and GPT-NeoX, Llama ``q_proj``... with grouped-query ``k_proj``/``v_proj`` of
    ``n_key_value_heads`` heads), fused projections when no split ones exist (GPT-2 ``c_attn``
    Conv1D ``[d_model, 3 d_model]`` laid out q|k|v; GPT-NeoX ``query_key_value`` Linear with the
    per-head interleaved layout ``[head, (q k v), d_head]``), torch ``Linear`` ``[out, in]`` and GPT-2
    ``Conv1D`` ``[in, out]`` orientations, and MLP ``W_in``/``W_gate``/``W_out``.  Embeddings,
    unembedding, biases and norm weights are excluded (Stoehr §5.2).

    Returns:
        One :class:`ParamComponent` per (layer, component, head), ordered by layer, then
        ``W_Q, W_K, W_V, W_O`` (heads ascending), ``W_in, W_gate, W_out``.

    ``prefer_fused=True`` maps q/k/v from the fused projection even where split ones exist (the
    TransformerBridge keeps GPT-2's/NeoX's original fused weight beside the split ones it runs;
    only the split ones receive gradients, so this is for inspecting weights, not for gradients).

    Raises:
        ValueError: if some layer's attention or MLP weights cannot be identified.
    """
    cfg = model.cfg
    n_layers, n_heads, d_head = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    adapter = adapter_for(model)
    arch = f"{adapter.family} ({model_type(model)})"
    interleaved = adapter.fused_layout == "interleaved"
    found = _layer_weights(model, adapter, n_layers)
    comps: list[ParamComponent] = []
    for layer in range(n_layers):
        comps += _layer_components(layer, found[layer], prefer_fused, interleaved, arch, n_heads, n_kv, d_head)
    order = {c: i for i, c in enumerate(ATTN_COMPONENTS + MLP_COMPONENTS)}
    comps.sort(key=lambda c: (c.layer, order[c.component], c.head))
    return comps


def _layer_components(layer: int, f: dict, prefer_fused: bool, interleaved: bool, arch: str, n_heads: int,
                      n_kv: int, d_head: int) -> list[ParamComponent]:
    """The components of one layer from its weights ``f`` (see :func:`_layer_weights`)."""
    comps: list[ParamComponent] = []
    split = all(k in f for k in ("W_Q", "W_K", "W_V")) and not (prefer_fused and "fused" in f)
    if not split and "fused" not in f:
        raise ValueError(f"parameter_components: cannot find the q/k/v weights of layer {layer} "
                         f"(found {sorted(f)}); unsupported architecture {arch!r}")
    if "W_O" not in f or "W_in" not in f or "W_out" not in f:
        raise ValueError(f"parameter_components: cannot find W_O/W_in/W_out of layer {layer} "
                         f"(found {sorted(f)}); unsupported architecture {arch!r}")
    if split:
        for comp, n in (("W_Q", n_heads), ("W_K", n_kv), ("W_V", n_kv)):
            name, p, orient = f[comp]
            for h, idx in enumerate(_head_slices(orient, n, d_head, "out")):
                comps.append(ParamComponent(layer, comp, h, name, p, idx, orient))
    else:
        name, p, orient = f["fused"]
        for c_i, comp in enumerate(("W_Q", "W_K", "W_V")):
            if interleaved:  # NeoX: rows [head, (q, k, v), d_head]
                idx = _head_slices(orient, n_heads, d_head, "out", offset=c_i * d_head, stride=3 * d_head)
            else:            # GPT-2: columns q | k | v, each [head, d_head]
                idx = _head_slices(orient, n_heads, d_head, "out", offset=c_i * n_heads * d_head)
            for h, sl in enumerate(idx):
                comps.append(ParamComponent(layer, comp, h, name, p, sl, orient))
    # keep W_Q, W_K, W_V, W_O order with heads ascending
    name, p, orient = f["W_O"]
    for h, idx in enumerate(_head_slices(orient, n_heads, d_head, "in")):
        comps.append(ParamComponent(layer, "W_O", h, name, p, idx, orient))
    for comp in MLP_COMPONENTS:
        if comp in f:
            name, p, orient = f[comp]
            comps.append(ParamComponent(layer, comp, -1, name, p, (slice(None), slice(None)), orient))
    return comps


def _layer_weights(model: Model, adapter: ArchitectureAdapter, n_layers: int) -> dict[int, dict[str, tuple[str, Any, str]]]:
    """Per layer: component (``W_Q`` ... ``"fused"`` ... ``W_out``) -> (parameter name, parameter,
    weight layout), found by the family adapter's module names among ``model.named_parameters()``."""
    found: dict[int, dict[str, tuple[str, Any, str]]] = {l: {} for l in range(n_layers)}
    for name, param in model.named_parameters():
        if not name.endswith("weight") or param.ndim != 2:
            continue
        layer = layer_of(name)
        if layer not in found:
            continue
        parts = module_path(name)
        leaf = parts[-2]
        context = parts[:-2]
        in_attn = any("attn" in p or "attention" in p for p in context)
        in_mlp = any("mlp" in p or p == "feed_forward" for p in context)
        module = model.get_submodule(name[: -len(".weight")])
        orient = weight_layout(module) or "out_in"
        key = adapter.component(leaf, in_attention=in_attn, in_mlp=in_mlp)
        if key is not None:
            found[layer][key] = (name, param, orient)
    return found


