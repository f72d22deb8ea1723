"""Parameter and activation gradients of the continuation NLL (Stoehr et al. §5.1, §6.1, Fig. 4, 6, 9).

The loss is the mean NLL of the continuation tokens ``x[prefix_len:]`` given everything before
them (Stoehr §3.2 ``L_NLL``; "tokens 50 to 100").  Gradients are taken in eval mode (no dropout)
in the coordinates of the loaded model: with ``load_model(..., process_weights=False)`` (the
default) they are gradients w.r.t. the checkpoint's real weights.

Parameter gradients (Eq. 1-2)
    Every weight matrix of every layer except embeddings, unembedding, biases (and LayerNorm
    gains, which TransformerLens folds away in the paper's setting) is split into components:
    ``W_Q, W_K, W_V, W_O`` per attention head, ``W_in``, ``W_out`` (and ``W_gate`` for gated
    MLPs) per layer.  The score of a component is the max (Eq. 2; or sum / mean) of the
    absolute gradient over its weights.

    * Set level (default, the paper's Fig. 4 and Fig. 9): Eq. 1 differentiates the loss of the
      whole batch, ``L = 1/N sum_n L_n``, so the gradient is averaged over paragraphs *before*
      the absolute value and the pooling.  It is accumulated over batches of ``batch_size``
      (one backward per batch), which equals one backward over all N paragraphs.
    * Per paragraph (``per_paragraph=True``): the pooled score of each paragraph's own gradient.
      Every component is a linear map ``y = x W``, so a paragraph's weight gradient is
      ``sum_pos x[pos]^T dL_n/dy[pos]``; memloc captures the inputs and output gradients of the
      weight-owning modules with torch hooks during one backward per batch and forms these
      per-sample gradients exactly (no per-paragraph backward).

Activation gradients (Eq. 5)
    Gradients w.r.t. hook-point activations (``hook_q/k/v/z`` per head, the per-head attention
    result, ``hook_attn_out``, ``mlp.hook_pre/post``, ``hook_resid_pre/mid/post``) per layer x
    component x head x position, with |.| max-pooled (or sum / mean) over the hidden dimension.
    In a batch the loss is the *sum* of the paragraphs' losses, so each paragraph's activation
    gradient is that of its own loss (Eq. 5 with N = 1) from one backward per batch.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._checks import check_choice, check_layers, check_positive_int, check_tokens
from ._progress import progress
from .borrow import borrowed, trainable_only
from .components import ATTN_COMPONENTS, MLP_COMPONENTS, ParamComponent, parameter_components
from .metrics import suffix_nll
from .models import Model, hook_name
from .placement import require_resident_weights

__all__ = ["ParamComponent", "parameter_components", "parameter_gradients", "parameter_gradients_by_group",
           "parameter_gradient_tensor", "em_bins", "EM_BINS", "attention_mlp_totals", "activation_gradients",
           "activation_gradient_tensor", "ACTIVATION_COMPONENTS", "continuation_loss"]

Pooling = Literal["max", "sum", "mean"]
POOLINGS = ("max", "sum", "mean")
#: Stoehr et al. Fig. 9 EM bins (inclusive bounds).
EM_BINS = ((0, 10), (11, 29), (30, 49), (50, 50))


# ---------------------------------------------------------------------------------------------
# losses and pooling
# ---------------------------------------------------------------------------------------------

def continuation_loss(logits: Float[Tensor, "batch seq vocab"], tokens: Int[Tensor, "batch seq"],
                      prefix_len: int) -> Float[Tensor, "batch"]:
    """Per-paragraph mean NLL of the continuation ``tokens[:, prefix_len:]`` (Stoehr §3.2 L_NLL, N = 1)
    from a full forward's logits: :func:`memloc.metrics.suffix_nll` at the suffix positions."""
    return suffix_nll(logits[:, prefix_len - 1:-1], tokens[:, prefix_len:])


def _pool(x: Tensor, pooling: str, dims: tuple[int, ...]) -> Tensor:
    a = x.abs()
    if pooling == "max":
        return a.amax(dim=dims)
    if pooling == "sum":
        return a.sum(dim=dims)
    return a.mean(dim=dims)


def _check_common(model: Model, tokens: Any, prefix_len: int, pooling: str, batch_size: int) -> Tensor:
    tokens = check_tokens(model, tokens, prefix_len)
    check_choice(pooling, "pooling", POOLINGS)
    check_positive_int(batch_size, "batch_size")
    return tokens


def _param_frame(comps: list[ParamComponent], values: Tensor, paragraphs: Sequence[int] | None) -> pd.DataFrame:
    """values: [n_comps] or [n_paragraphs, n_comps]."""
    base = pd.DataFrame({
        "layer": [c.layer for c in comps], "component": [c.component for c in comps],
        "head": [c.head for c in comps], "label": [c.label for c in comps],
        "block": ["attn" if c.component in ATTN_COMPONENTS else "mlp" for c in comps],
    })
    if paragraphs is None:
        base["value"] = values.double().numpy()
        return base
    frames = []
    for i, n in enumerate(paragraphs):
        f = base.copy()
        f.insert(0, "paragraph", n)
        f["value"] = values[i].double().numpy()
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# parameter gradients
# ---------------------------------------------------------------------------------------------

def parameter_gradients(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int, *, pooling: Pooling = "max",
                        per_paragraph: bool = False, batch_size: int = 8,
                        progress_bar: bool = True) -> pd.DataFrame:
    """Parameter gradient attribution scores per layer x component (x head) (Stoehr Eq. 1-2, Fig. 4).

    Args:
        model: the TransformerBridge (borrowed: requires_grad, train flags, ``.grad`` are left as found;
            gradients are obtained with ``torch.autograd.grad`` and never written to ``.grad``).
        tokens: Int[Tensor, "n seq"] paragraphs.
        prefix_len: prefix length; the loss is the mean NLL of ``tokens[:, prefix_len:]``.
        pooling: ``"max"`` |grad| over the component's weights (Eq. 2), ``"sum"`` or ``"mean"``.
        per_paragraph: False (default): the score of the gradient of the set's mean loss (Eq. 1,
            gradients averaged over paragraphs before |.| and pooling).  True: each paragraph's
            own pooled score (exact per-sample gradients, one backward per batch).
        batch_size: paragraphs per forward/backward.

    Returns:
        Tidy DataFrame ``[paragraph,] layer, component, head, label, block, value`` with ``head = -1``
        for MLP weights, ``label`` like ``"W_V H2"`` and ``block`` ``"attn"``/``"mlp"``.
    """
    require_resident_weights(model, "parameter_gradients")
    tokens = _check_common(model, tokens, prefix_len, pooling, batch_size)
    if not isinstance(per_paragraph, bool):
        raise ValueError(f"per_paragraph must be a bool, got {per_paragraph!r}")
    comps = parameter_components(model)
    names = list(dict.fromkeys(c.name for c in comps))
    params = dict(model.named_parameters())
    n = len(tokens)
    batches = [slice(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    with borrowed(model):
        model.eval()
        trainable_only(model, names)
        if per_paragraph:
            values = _per_sample_scores(model, tokens, prefix_len, comps, names, batches, pooling, progress_bar)
            return _param_frame(comps, values, list(range(n)))
        acc = {nm: torch.zeros_like(params[nm], dtype=torch.float32) for nm in names}
        for sl in progress(batches, enabled=progress_bar, desc="parameter gradients"):
            x = tokens[sl]
            with torch.enable_grad():
                loss = continuation_loss(model(x), x, prefix_len).sum() / n
                grads = torch.autograd.grad(loss, [params[nm] for nm in names])
            for nm, g in zip(names, grads):
                acc[nm] += g.float()
        values = torch.stack([_pool(c.block(acc[c.name]), pooling, (0, 1)) for c in comps]).cpu()
    return _param_frame(comps, values, None)


def _per_sample_scores(model: Model, tokens: Tensor, prefix_len: int, comps: list[ParamComponent], names: list[str],
                       batches: list[slice], pooling: str, progress_bar: bool) -> Tensor:
    """Per-paragraph pooled scores from per-sample weight gradients ``sum_pos x^T dL_n/dy`` of each linear module."""
    by_name: dict[str, list[int]] = {}
    for i, c in enumerate(comps):
        by_name.setdefault(c.name, []).append(i)
    modules = {nm: model.get_submodule(nm[: -len(".weight")]) for nm in names}
    out = torch.zeros(len(tokens), len(comps), dtype=torch.float32)
    for sl in progress(batches, enabled=progress_bar, desc="per-paragraph parameter gradients"):
        x = tokens[sl]
        b = x.shape[0]
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}
        handles = []

        def fwd_hook(module, args, output, nm=None):
            inputs[nm] = args[0].detach()
            outputs[nm] = output

        try:
            for nm, mod in modules.items():
                handles.append(mod.register_forward_hook(lambda m, a, o, nm=nm: fwd_hook(m, a, o, nm)))
            with torch.enable_grad():
                loss = continuation_loss(model(x), x, prefix_len).sum()
                missing = [nm for nm in names if nm not in outputs]
                if missing:
                    raise RuntimeError(f"per-paragraph gradients: modules {missing} were not called as modules")
                keys = list(outputs)
                grads = torch.autograd.grad(loss, [outputs[k] for k in keys])
        finally:
            for h in handles:
                h.remove()
        for nm, g_out in zip(keys, grads):
            inp = inputs[nm].reshape(b, -1, inputs[nm].shape[-1]).float()
            g = g_out.reshape(b, -1, g_out.shape[-1]).float()
            if comps[by_name[nm][0]].orientation == "out_in":
                per_sample = torch.einsum("bpo,bpi->boi", g, inp)
            else:
                per_sample = torch.einsum("bpi,bpo->bio", inp, g)
            for i in by_name[nm]:
                idx = (slice(None),) + comps[i].index
                out[sl, i] = _pool(per_sample[idx], pooling, (1, 2)).cpu()
        del inputs, outputs
    return out


def em_bins(em: Sequence[int] | Tensor | pd.Series, bins: Sequence[tuple[int, int]] = EM_BINS) -> pd.Series:
    """Label each EM with its Stoehr Fig. 9 bin (``"0-10"``, ``"11-29"``, ``"30-49"``, ``"50"``); NaN outside all bins."""
    e = pd.Series(np.asarray(em.cpu() if isinstance(em, Tensor) else em), dtype="float64")
    labels = pd.Series([None] * len(e), dtype="object")
    for lo, hi in bins:
        if lo > hi:
            raise ValueError(f"bins must be (low, high) with low <= high, got {(lo, hi)}")
        lab = f"{lo}" if lo == hi else f"{lo}-{hi}"
        labels[(e >= lo) & (e <= hi)] = lab
    return labels


def parameter_gradients_by_group(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int,
                                 groups: Sequence | pd.Series, *, pooling: Pooling = "max",
                                 max_per_group: int | None = None, batch_size: int = 8,
                                 progress_bar: bool = True) -> pd.DataFrame:
    """Set-level parameter gradient scores (Eq. 1-2) for each group of paragraphs (Fig. 4: MP vs NMP; Fig. 9: EM bins).

    Args:
        groups: one label per paragraph (e.g. ``split_memorization(df)`` or ``em_bins(df.em)``);
            paragraphs labelled None/NaN are skipped.
        max_per_group: use at most the first this many paragraphs of each group (the paper: 50).

    Returns:
        The :func:`parameter_gradients` table with a leading ``group`` column and ``n_paragraphs``.
    """
    tokens = _check_common(model, tokens, prefix_len, pooling, batch_size)
    labels = pd.Series(list(groups.to_numpy() if isinstance(groups, pd.Series) else groups), dtype="object")
    if len(labels) != len(tokens):
        raise ValueError(f"groups has {len(labels)} labels for {len(tokens)} paragraphs")
    if max_per_group is not None:
        check_positive_int(max_per_group, "max_per_group")
    valid = labels.notna()
    if not valid.any():
        raise ValueError("groups labels no paragraph")
    frames = []
    for g in pd.unique(labels[valid]):
        idx = np.flatnonzero((labels == g).to_numpy())
        if max_per_group is not None:
            idx = idx[:max_per_group]
        df = parameter_gradients(model, tokens[torch.as_tensor(idx, device=tokens.device)], prefix_len,
                                 pooling=pooling, batch_size=batch_size, progress_bar=progress_bar)
        df.insert(0, "n_paragraphs", len(idx))
        df.insert(0, "group", g)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def parameter_gradient_tensor(df: pd.DataFrame, *, value: str = "value") -> tuple[Float[Tensor, "layer component"], list[str]]:
    """Dense ``[layer, component]`` matrix (Fig. 4 heatmap) of a :func:`parameter_gradients` table and its column labels.

    Several paragraphs/groups in ``df`` are averaged.
    """
    need = {"layer", "component", "head", value}
    if not isinstance(df, pd.DataFrame) or not need <= set(df.columns):
        raise ValueError(f"df must be a parameter_gradients DataFrame with columns {sorted(need)}")
    order = {c: i for i, c in enumerate(ATTN_COMPONENTS + MLP_COMPONENTS)}
    d = df.assign(_o=df["component"].map(order))
    if d["_o"].isna().any():
        raise ValueError(f"df has unknown components {sorted(set(df.component) - set(order))}")
    d["label"] = [f"{c} H{h}" if h >= 0 else c for c, h in zip(d["component"], d["head"])]
    cols = d.drop_duplicates("label").sort_values(["_o", "head"])["label"].tolist()
    piv = d.pivot_table(index="layer", columns="label", values=value, aggfunc="mean").reindex(columns=cols)
    return torch.tensor(piv.to_numpy(), dtype=torch.float32), cols


def attention_mlp_totals(df: pd.DataFrame, *, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per-layer totals of the scores of attention vs MLP components (Stoehr Fig. 9 bars).

    With a table from ``pooling="sum"`` these are the absolute gradient sums of the attention and
    MLP blocks of each layer, as in Fig. 9.  ``by`` adds grouping columns (e.g. ``["group"]``).

    Returns:
        DataFrame ``*by, layer, block, total``.
    """
    if not isinstance(df, pd.DataFrame) or not {"layer", "component", "value"} <= set(df.columns):
        raise ValueError("df must be a parameter_gradients DataFrame (columns layer, component, value)")
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise ValueError(f"by columns {missing} are not in df")
    d = df.assign(block=np.where(df["component"].isin(ATTN_COMPONENTS), "attn", "mlp"))
    keys = by + (["paragraph"] if "paragraph" in d.columns and "paragraph" not in by else [])
    tot = d.groupby(keys + ["layer", "block"], sort=True)["value"].sum().rename("total").reset_index()
    if "paragraph" in keys and "paragraph" not in by:  # mean over paragraphs
        tot = tot.groupby(by + ["layer", "block"], sort=True)["total"].mean().reset_index()
    return tot


# ---------------------------------------------------------------------------------------------
# activation gradients
# ---------------------------------------------------------------------------------------------

#: component -> (TransformerLens activation name, per-head?); the hook point of layer l is
#: ``memloc.models.hook_name(activation, l)`` (e.g. ``"mlp_pre"`` -> ``blocks.{l}.mlp.hook_pre``).
ACTIVATION_COMPONENTS: dict[str, tuple[str, bool]] = {
    "q": ("q", True),
    "k": ("k", True),
    "v": ("v", True),
    "z": ("z", True),
    "result": ("attn_out", True),
    "attn_out": ("attn_out", False),
    "mlp_pre": ("pre", False),
    "mlp_post": ("post", False),
    "resid_pre": ("resid_pre", False),
    "resid_mid": ("resid_mid", False),
    "resid_post": ("resid_post", False),
}
DEFAULT_ACTIVATION_COMPONENTS = ("q", "k", "v", "z", "attn_out", "mlp_pre", "mlp_post", "resid_pre", "resid_mid",
                                 "resid_post")


def activation_gradients(model: Model, tokens: Int[Tensor, "n seq"], prefix_len: int, *,
                         components: Sequence[str] = DEFAULT_ACTIVATION_COMPONENTS,
                         layers: Sequence[int] | None = None, pooling: Pooling = "max", batch_size: int = 8,
                         progress_bar: bool = True) -> pd.DataFrame:
    """Activation gradient attribution scores per layer x component x head x position (Stoehr Eq. 5, Fig. 6, Fig. 10).

    The gradient of each paragraph's continuation NLL w.r.t. the activations at the hook points
    of ``components`` (see ``ACTIVATION_COMPONENTS``), |.| pooled over the hidden dimension
    (``d_head`` for per-head components, ``d_model``/``d_mlp`` otherwise).  ``"result"`` is the
    per-head attention output ``z_h W_O^h``: since the heads' results are summed into
    ``hook_attn_out``, its gradient is that of ``hook_attn_out`` for every head (so it is the same
    for all heads; it is not in the default components).  Positions after the last scored
    token get zero gradient.

    Args:
        components: subset of ``ACTIVATION_COMPONENTS``.
        layers: layers to report (default all).
        pooling: ``"max"`` (Eq. 5), ``"sum"`` or ``"mean"`` over the hidden dimension.
        batch_size: paragraphs per forward/backward (one backward per batch).

    Returns:
        Tidy DataFrame ``paragraph, layer, component, head, position, value`` (``head = -1`` for
        components without heads).
    """
    tokens = _check_common(model, tokens, prefix_len, pooling, batch_size)
    comps = list(components) if not isinstance(components, str) else [components]
    if not comps:
        raise ValueError("components is empty")
    bad = [c for c in comps if c not in ACTIVATION_COMPONENTS]
    if bad:
        raise ValueError(f"components {bad} are not among {tuple(ACTIVATION_COMPONENTS)}")
    lays = check_layers(model, layers)
    if tuple(comps) == DEFAULT_ACTIVATION_COMPONENTS:  # e.g. parallel-attention models have no resid_mid
        comps = [c for c in comps if all(hook_name(ACTIVATION_COMPONENTS[c][0], l) in model.hook_dict for l in lays)]
    hook_names = sorted({hook_name(ACTIVATION_COMPONENTS[c][0], l) for c in comps for l in lays})
    missing = [h for h in hook_names if h not in model.hook_dict]
    if missing:
        raise ValueError(f"components: the model has no hook points {missing}")
    n = len(tokens)
    frames = []
    with borrowed(model):
        model.eval()
        trainable_only(model)
        for start in progress(range(0, n, batch_size), enabled=progress_bar, desc="activation gradients"):
            x = tokens[start:start + batch_size]
            acts: dict[str, Tensor] = {}

            def grad_leaf(act, hook):  # make everything downstream differentiable
                return act.detach().requires_grad_(True)

            def capture(act, hook, name=None):  # hook.name may be an alias of the requested name
                acts[name] = act
                return act

            fwd = [(hook_name("resid_pre", 0), grad_leaf)] + [
                (h, lambda act, hook, name=h: capture(act, hook, name)) for h in hook_names]
            with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
                loss = continuation_loss(model(x), x, prefix_len).sum()
                names = [h for h in hook_names if h in acts]
                grads = torch.autograd.grad(loss, [acts[h] for h in names], allow_unused=True)
            gmap = {h: (torch.zeros_like(acts[h]) if g is None else g) for h, g in zip(names, grads)}
            frames += _activation_frames(gmap, comps, lays, pooling, start, int(model.cfg.n_heads))
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["paragraph", "layer", "component", "head", "position"], kind="stable").reset_index(drop=True)


def _activation_frames(gmap: dict[str, Tensor], comps: list[str], lays: list[int], pooling: str, start: int,
                       n_heads: int) -> list[pd.DataFrame]:
    """Tidy rows of one batch: the activation gradients ``gmap`` (hook name -> [b, pos, (head,) d])
    |.|-pooled over the hidden dimension, for paragraphs ``start .. start + b - 1``."""
    frames = []
    for c in comps:
        act_name, per_head = ACTIVATION_COMPONENTS[c]
        for l in lays:
            g = gmap[hook_name(act_name, l)].detach().float()
            b, seq = g.shape[:2]
            if per_head and c != "result":
                vals = _pool(g, pooling, (3,))                        # [b, pos, head]
            else:
                vals = _pool(g, pooling, (2,)).unsqueeze(-1)          # [b, pos, 1]
                if c == "result":
                    vals = vals.expand(b, seq, n_heads)
            H = vals.shape[-1]
            heads = np.arange(H) if (per_head or c == "result") else np.array([-1])
            v = vals.permute(0, 2, 1).cpu().numpy()                  # [b, head, pos]
            ii, hh, pp = np.meshgrid(np.arange(b), np.arange(H), np.arange(seq), indexing="ij")
            frames.append(pd.DataFrame({
                "paragraph": start + ii.ravel(), "layer": l, "component": c,
                "head": heads[hh.ravel()], "position": pp.ravel(), "value": v.ravel().astype(np.float64)}))
    return frames


def activation_gradient_tensor(df: pd.DataFrame, component: str, *, paragraph: int | None = None
                               ) -> Float[Tensor, "layer head position"]:
    """Dense ``[layer, head, position]`` tensor of one component of an :func:`activation_gradients` table.

    ``paragraph`` selects one paragraph; otherwise the mean over the table's paragraphs.  Layers
    and heads not in the table are NaN; components without heads have a single head row.
    """
    if not isinstance(df, pd.DataFrame) or not {"layer", "component", "head", "position", "value"} <= set(df.columns):
        raise ValueError("df must be an activation_gradients DataFrame")
    d = df[df["component"] == component]
    if d.empty:
        raise ValueError(f"component {component!r} is not in df (has {sorted(df.component.unique())})")
    if paragraph is not None:
        d = d[d["paragraph"] == paragraph]
        if d.empty:
            raise ValueError(f"paragraph {paragraph!r} is not in df")
    m = d.groupby(["layer", "head", "position"], sort=True)["value"].mean().reset_index()
    heads = sorted(d["head"].unique())
    hidx = pd.Series(np.arange(len(heads)), index=heads)
    out = torch.full((int(d["layer"].max()) + 1, len(heads), int(d["position"].max()) + 1), float("nan"))
    out[torch.as_tensor(m["layer"].to_numpy(dtype=np.int64)), torch.as_tensor(hidx[m["head"]].to_numpy()),
        torch.as_tensor(m["position"].to_numpy(dtype=np.int64))] = torch.as_tensor(m["value"].to_numpy(), dtype=torch.float32)
    return out
