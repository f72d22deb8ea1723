"""Two-way activation patching at the perturbed token (Stoehr et al. App. A.3, Fig. 11).

A memorized paragraph (MP) and its perturbed counterpart (PMP, :func:`memloc.perturb.make_pmps`)
differ in one prefix token, at ``position`` (the "perturbed token"), and their greedy
continuations first differ at continuation index ``first_impacted`` (the "impact token", absolute
position ``t = prefix_len + first_impacted``).  Everything the model sees before ``t`` is equal in
the two runs except the token at ``position``.

Stoehr A.3 patches in both directions: the PMP run is the *clean* run and activations of the MP
run at the perturbed token position are patched into it (``direction="mp_to_pmp"``), or vice
versa (``"pmp_to_mp"``).  The metric is the change in NLL at the first impacted token: for the
receiving run's own token ``x_t`` (the PMP's new token when patching into the PMP run, the MP's
memorized token when patching into the MP run),

    value = NLL_patched(x_t | x_<t) − NLL_unpatched(x_t | x_<t),

so a positive value means the patched-in activation pushes the receiving run away from its own
continuation (towards the other run's).  One patch per layer × component, where a component is a
TransformerLens hook point at the perturbed position: ``resid_pre`` (``blocks.{l}.hook_resid_pre``),
``attn_out`` (``hook_attn_out``), ``mlp_out`` (``hook_mlp_out``), ``resid_mid``, ``resid_post``,
and ``z`` (``attn.hook_z``, one patch per head).  Patching ``resid_pre`` of layer 0 replaces the
whole residual stream at the position and reproduces the other run's NLL exactly (a sanity
identity that the tests check).

Implemented with ``model.hooks`` rather than ``transformer_lens.patching``: every paragraph has its
own positions and target token, and all patches of one paragraph run as one batched forward
(one row per patch), truncated at the impact token.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_positive_int, check_prefix_len, check_tokens
from ._progress import progress
from .borrow import borrowed
from .models import Model, hook_name

__all__ = ["COMPONENTS", "DIRECTIONS", "activation_patching"]

#: Components that can be patched: TransformerLens activation names (``memloc.models.hook_name(c, l)``
#: is the hook point, e.g. ``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_z``).
COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "resid_mid", "resid_post", "z")
#: ``mp_to_pmp``: clean run = PMP, MP activations patched in; ``pmp_to_mp``: the reverse.
DIRECTIONS = ("mp_to_pmp", "pmp_to_mp")


def _as_index(value: Any, name: str, n: int) -> Tensor:
    try:
        t = torch.as_tensor(value)
    except Exception as exc:
        raise ValueError(f"{name} must be an integer tensor/sequence of length {n}: {exc}") from exc
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim != 1 or len(t) != n:
        raise ValueError(f"{name} must be a 1-D integer tensor of length {n} (one per paragraph), got "
                         f"dtype {t.dtype} shape {tuple(t.shape)}")
    return t.long().cpu()


def _check_inputs(model, memorized, perturbed, position, first_impacted, prefix_len, components, directions):
    mp = check_tokens(model, memorized, None, name="memorized")
    pmp = check_tokens(model, perturbed, None, name="perturbed")
    if mp.shape != pmp.shape:
        raise ValueError(f"memorized {tuple(mp.shape)} and perturbed {tuple(pmp.shape)} must have the same shape")
    check_prefix_len(prefix_len, mp.shape[1])
    n, seq = mp.shape
    T = seq - prefix_len
    pos = _as_index(position, "position", n)
    first = _as_index(first_impacted, "first_impacted", n)
    if ((pos < 0) | (pos >= prefix_len)).any():
        raise ValueError(f"position must lie in the prefix 0..{prefix_len - 1}, got {pos.tolist()}")
    if ((first < 0) | (first >= T)).any():
        raise ValueError(f"first_impacted must be a continuation index in 0..{T - 1} (T means no impact token), "
                         f"got {first.tolist()}")
    if isinstance(components, str):
        components = (components,)
    components = tuple(components)
    if not components or any(c not in COMPONENTS for c in components):
        raise ValueError(f"components must be a non-empty subset of {tuple(COMPONENTS)}, got {components!r}")
    if isinstance(directions, str):
        directions = (directions,)
    directions = tuple(directions)
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {directions!r}")
    a, b = mp.cpu(), pmp.cpu()
    for i in range(n):
        t = prefix_len + int(first[i])
        diff = (a[i, :t] != b[i, :t]).nonzero().flatten().tolist()
        if diff != [int(pos[i])]:
            raise ValueError(f"paragraph {i}: memorized and perturbed must differ before the impact token "
                             f"(position {t}) exactly at position {int(pos[i])}; they differ at {diff}")
    return mp, pmp, pos, first, components, directions


def _settings(model: Model, components: Sequence[str]) -> list[tuple[str, int, str, int]]:
    """(hook name, layer, component, head) for every patch; head = -1 for whole-vector patches."""
    out = []
    n_heads = int(model.cfg.n_heads)
    for layer in range(int(model.cfg.n_layers)):
        for comp in components:
            name = hook_name(comp, layer)
            if comp == "z":
                out += [(name, layer, comp, h) for h in range(n_heads)]
            else:
                out.append((name, layer, comp, -1))
    return out


def _patched_nll(model: Model, receiver: Tensor, source_acts: dict[str, Tensor], settings: list, pos: int,
                 target: int, batch_size: int) -> list[float]:
    """NLL of ``target`` at the last position of ``receiver`` [t] under every patch in ``settings``."""
    out: list[float] = []
    for start in range(0, len(settings), batch_size):
        chunk = settings[start:start + batch_size]
        rows: dict[str, list[tuple[int, int]]] = {}
        for r, (name, _layer, _comp, head) in enumerate(chunk):
            rows.setdefault(name, []).append((r, head))

        def make_hook(entries: list[tuple[int, int]], src: Tensor):
            def hook(act: Tensor, hook: Any) -> Tensor:
                act = act.clone()
                for r, head in entries:
                    if head < 0:
                        act[r, pos] = src[pos].to(act.dtype)
                    else:
                        act[r, pos, head] = src[pos, head].to(act.dtype)
                return act
            return hook

        fwd = [(name, make_hook(entries, source_acts[name])) for name, entries in rows.items()]
        batch = receiver.unsqueeze(0).expand(len(chunk), -1)
        with model.hooks(fwd_hooks=fwd):
            logits = model(batch)[:, -1].float()
        out += (-logits.log_softmax(-1)[:, target]).tolist()
    return out


@torch.no_grad()
def activation_patching(model: Model, memorized: Int[Tensor, "n seq"], perturbed: Int[Tensor, "n seq"],
                        position: Int[Tensor, "n"], first_impacted: Int[Tensor, "n"], prefix_len: int, *,
                        components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
                        directions: Sequence[str] = DIRECTIONS, batch_size: int = 64,
                        progress_bar: bool = True) -> pd.DataFrame:
    """Two-way activation patching at the perturbed token, scored at the impact token (Stoehr A.3, Fig. 11).

    Args:
        memorized: Int[Tensor, "n seq"] MPs (``PMPSet.original``).
        perturbed: Int[Tensor, "n seq"] PMPs (``PMPSet.perturbed``); must equal ``memorized``
            before the impact token except at ``position``.
        position: Int[Tensor, "n"] perturbed prefix position per paragraph (``PMPSet.position``).
        first_impacted: Int[Tensor, "n"] continuation index of the impact token
            (``PMPSet.first_impacted``, 0..T-1).
        prefix_len: prefix length.
        components: subset of :data:`COMPONENTS` (``"z"`` patches each head's ``hook_z``).
        directions: subset of :data:`DIRECTIONS`.
        batch_size: patches per forward.

    Returns:
        Tidy DataFrame, one row per (paragraph ``id``, ``direction``, ``layer``, ``component``,
        ``head``; -1 unless ``component == "z"``): ``value`` = NLL change of the receiving run's
        own token at the impact token (patched − unpatched), ``nll_clean`` (unpatched receiving
        run), ``nll_patched``, ``nll_source`` (the source run's NLL of the same token; patching the
        full residual reproduces it), ``position``, ``impact_position`` (absolute) and
        ``target_token``.
    """
    mp, pmp, pos, first, components, directions = _check_inputs(model, memorized, perturbed, position,
                                                                 first_impacted, prefix_len, components, directions)
    check_positive_int(batch_size, "batch_size")
    settings = _settings(model, components)
    names = {s[0] for s in settings}
    missing = names - set(model.hook_dict)
    if missing:
        raise ValueError(f"the model has no hook points {sorted(missing)[:3]}... for components {components}")
    rows = []
    with borrowed(model):
        for i in progress(range(len(mp)), enabled=progress_bar, desc="activation patching", total=len(mp)):
            t = prefix_len + int(first[i])
            p = int(pos[i])
            pair = torch.stack([mp[i, :t], pmp[i, :t]])           # inputs up to the impact token
            logits, cache = model.run_with_cache(pair, names_filter=lambda n: n in names)
            logp = logits[:, -1].float().log_softmax(-1)
            acts = {"mp": {n: cache[n][0] for n in names}, "pmp": {n: cache[n][1] for n in names}}
            tokens_at_t = {"mp": int(mp[i, t]), "pmp": int(pmp[i, t])}
            run_index = {"mp": 0, "pmp": 1}
            for direction in directions:
                src, dst = ("mp", "pmp") if direction == "mp_to_pmp" else ("pmp", "mp")
                target = tokens_at_t[dst]
                clean = float(-logp[run_index[dst], target])
                source = float(-logp[run_index[src], target])
                patched = _patched_nll(model, pair[run_index[dst]], acts[src], settings, p, target, batch_size)
                for (_name, layer, comp, head), nll in zip(settings, patched):
                    rows.append({"id": i, "direction": direction, "layer": layer, "component": comp, "head": head,
                                 "value": nll - clean, "nll_clean": clean, "nll_patched": nll, "nll_source": source,
                                 "position": p, "impact_position": t, "target_token": target})
    df = pd.DataFrame(rows)
    df["head"] = df["head"].astype(np.int64)
    return df
