"""The INJ benchmark (Chang et al. §3.1, Algorithm 1, Eq. 13, Tables 2 and 6).

For every new sequence x_i (ECBD-2021 definitions by default) the benchmark

1. samples r% of all FFN value vectors v^l_j across layers (the vectors the down-projection
   W_out multiplies neuron h^l_j with, Chang et al. Eq. 3), seeded by the sequence index i;
2. fine-tunes only those vectors on the language-modelling loss of x_i (Eq. 13) until the
   loss is below 0.05, every other weight frozen (gradient masking on the W_out parameters,
   Adam without weight decay, as the authors' code does);
3. asks every localization method for neuron scores with the first token as prefix, and
4. reports Recall@k% = |Γ ∩ Γ̂| / |Γ| of the injected neurons Γ among the top-k% per layer
   (Table 2) and across layers (A.9, Table 6), for k in {r, 2r, 5r}.

The model is restored after every sequence (the W_out parameters are snapshotted and copied
back, also on exceptions).
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._checks import check_fraction, check_positive_int, check_seed, check_tokens
from .._progress import progress
from ..ablation import n_selected, select_top_k
from ..architectures import weight_layout
from ..borrow import borrowed
from ..executors import Task, check_calls, resolve_executor
from .dele import _cached_scores, _store_scores
from ._scores import (PAPER_ORDER, check_method_kwargs, localize_cached, model_fingerprint, resolve_methods,
                      with_sequence_seed)

logger = logging.getLogger(__name__)

__all__ = ["ValueVectors", "ffn_value_vectors", "sample_injection_mask", "injection_loss", "injected",
           "InjectionResult", "recall_at_k", "inj_benchmark", "inj_table", "DEFAULT_INJ_RATIOS",
           "DEFAULT_K_MULTIPLES"]

#: Injection ratios r for the embedded model (4 layers x 1024 neurons: 41 and 20 injected neurons).
#: The paper uses 1% and 0.1% on GPT-2/Pythia; 0.1% of 4096 would be 4 neurons.
DEFAULT_INJ_RATIOS = (0.01, 0.005)
#: Recall@k% is reported for k = r, 2r and 5r (Chang et al. Table 2).
DEFAULT_K_MULTIPLES = (1, 2, 5)
#: Adam learning rate of the injection (the authors' code, terarachang/MemPi inject.py: lr=1e-2).
DEFAULT_INJ_LR = 1e-2


@dataclass(frozen=True)
class ValueVectors:
    """The FFN output weight of one layer: ``param`` (a real parameter of the model, named
    ``name``) holds value vector v^l_j along ``neuron_axis`` (1 for ``nn.Linear`` weights of shape
    [d_model, d_mlp], 0 for GPT-2's ``Conv1D`` of shape [d_mlp, d_model])."""

    layer: int
    name: str
    param: torch.nn.Parameter
    neuron_axis: int

    def vector(self, neuron: int) -> Tensor:
        """v^l_neuron, shape [d_model]."""
        return self.param.select(self.neuron_axis, neuron)


def ffn_value_vectors(model: Any) -> list[ValueVectors]:
    """Locate every layer's FFN down-projection weight (W_out, Chang et al. Eq. 2-3's V^l).

    Works through the bridge's ``blocks[l].mlp.out`` component, so it covers GPT-2 (Conv1D),
    GPT-Neo, GPT-NeoX/Pythia and Llama-style gated MLPs (nn.Linear).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    d_mlp = int(model.cfg.d_mlp)
    out = []
    for l in range(int(model.cfg.n_layers)):
        try:
            comp = model.blocks[l].mlp.out
        except (AttributeError, IndexError) as exc:
            raise ValueError(f"model has no FFN output projection at blocks[{l}].mlp.out; INJ needs one") from exc
        module = getattr(comp, "_original_component", comp)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or id(weight) not in names or weight.ndim != 2:
            raise ValueError(f"blocks[{l}].mlp.out has no 2-D weight parameter")
        layout = weight_layout(module)  # the neuron axis is the input axis: 1 of [out, in], 0 of [in, out]
        if layout is not None:
            axis = 1 if layout == "out_in" else 0
        else:
            matches = [a for a in (0, 1) if weight.shape[a] == d_mlp]
            if len(matches) != 1:
                raise ValueError(f"cannot tell the neuron axis of blocks[{l}].mlp.out ({type(module).__name__}, "
                                 f"shape {tuple(weight.shape)})")
            axis = matches[0]
        if weight.shape[axis] != d_mlp:
            raise ValueError(f"blocks[{l}].mlp.out weight {tuple(weight.shape)} has no d_mlp={d_mlp} axis at {axis}")
        out.append(ValueVectors(l, names[id(weight)], weight, axis))
    return out


def sample_injection_mask(n_layers: int, d_mlp: int, ratio: float, seed: int) -> Bool[Tensor, "layer neuron"]:
    """Algorithm 1: sample round(ratio * n_layers * d_mlp) value vectors uniformly across all layers,
    with the random seed set to ``seed`` (the sequence index).  Returns a CPU bool mask."""
    check_positive_int(n_layers, "n_layers")
    check_positive_int(d_mlp, "d_mlp")
    check_fraction(ratio, "ratio")
    check_seed(seed, non_negative=True)
    total = n_layers * d_mlp
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=gen)[:n_selected(ratio, total)]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(n_layers, d_mlp)


def injection_loss(model: Any, tokens: Int[Tensor, "1 seq"]) -> Tensor:
    """Language-modelling loss of Chang et al. Eq. 13: mean NLL of tokens 2..T given their prefix."""
    logits = model(tokens)
    return F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])


@dataclass
class InjectionResult:
    """Outcome of one injection: optimizer ``steps`` taken, ``final_loss`` (Eq. 13 at the
    injected weights), whether it ``converged`` (final loss < target), the loss curve, and the
    injected ``mask`` [layer, neuron]."""

    steps: int
    final_loss: float
    converged: bool
    mask: Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def n_injected(self) -> int:
        return int(self.mask.sum())


def _check_mask(model: Any, mask: Any) -> Tensor:
    shape = (int(model.cfg.n_layers), int(model.cfg.d_mlp))
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(f"mask must be a bool tensor of shape {shape} [layer, neuron], got "
                         f"{type(mask).__name__} {getattr(mask, 'dtype', '')} {tuple(getattr(mask, 'shape', ()))}")
    if not mask.any():
        raise ValueError("mask selects no value vectors; nothing to inject into")
    return mask


@contextmanager
def injected(model: Any, tokens: Int[Tensor, "1 seq"], mask: Bool[Tensor, "layer neuron"], *,
             lr: float = DEFAULT_INJ_LR, max_steps: int = 500, target_loss: float = 0.05) -> Iterator[InjectionResult]:
    """Context manager: inject ``tokens`` into the value vectors selected by ``mask``
    (Chang et al. Algorithm 1 for one sequence) and undo it on exit.

    Only the selected value vectors change: the W_out parameters are the only trainable ones
    and their gradients are zeroed outside ``mask`` before each Adam step (no weight decay, so
    zero-gradient rows keep their exact bytes).  Training stops when the loss of Eq. 13 is
    below ``target_loss`` or after ``max_steps`` steps; the model runs in eval mode (no dropout).
    Inside the context the model holds the injected weights; on exit (also on exceptions) the
    W_out snapshot, ``requires_grad``, train/eval flags, hooks and ``.grad`` are restored.

    Yields:
        :class:`InjectionResult` (``converged=False`` when the step cap was hit first).
    """
    tokens = check_tokens(model, tokens)
    if tokens.shape[0] != 1 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be one sequence [1, seq] with seq >= 2, got {tuple(tokens.shape)}")
    mask = _check_mask(model, mask)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    check_positive_int(max_steps, "max_steps")
    if isinstance(target_loss, bool) or not isinstance(target_loss, (int, float)) or not target_loss > 0:
        raise ValueError(f"target_loss must be a positive number, got {target_loss!r}")
    vectors = ffn_value_vectors(model)
    old_grads = {v.name: v.param.grad for v in vectors}
    try:
        with borrowed(model, restore_weights=[v.name for v in vectors]):
            result = _inject(model, tokens, mask, vectors, float(lr), max_steps, float(target_loss))
            yield result
    finally:
        for v in vectors:
            v.param.grad = old_grads[v.name]


def _inject(model: Any, tokens: Tensor, mask: Tensor, vectors: list[ValueVectors], lr: float, max_steps: int,
            target_loss: float) -> InjectionResult:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    grad_masks = []
    for v in vectors:
        v.param.requires_grad_(True)
        v.param.grad = None
        m = mask[v.layer].to(v.param.device, v.param.dtype)
        grad_masks.append(m.view(1, -1) if v.neuron_axis == 1 else m.view(-1, 1))
    optimizer = torch.optim.Adam([v.param for v in vectors], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    steps = 0
    while True:
        optimizer.zero_grad(set_to_none=True)
        loss = injection_loss(model, tokens)
        losses.append(float(loss.detach()))
        if losses[-1] < target_loss or steps >= max_steps:
            break
        loss.backward()
        for v, gm in zip(vectors, grad_masks):
            if v.param.grad is not None:
                v.param.grad.mul_(gm)
        optimizer.step()
        steps += 1
    for v in vectors:
        v.param.grad = None
    converged = losses[-1] < target_loss
    if not converged:
        logger.info("injection stopped at the step cap %d with loss %.4f >= %.3f", max_steps, losses[-1], target_loss)
    return InjectionResult(steps, losses[-1], converged, mask.detach().cpu().clone(), losses)


def recall_at_k(scores: Float[Tensor, "layer neuron"], truth: Bool[Tensor, "layer neuron"], k: float, *,
                per_layer: bool = True) -> float:
    """Recall@k% of Chang et al. §3.1: |Γ ∩ Γ̂| / |Γ| with Γ = ``truth`` (the injected neurons) and Γ̂
    the top-k fraction of ``scores`` per layer (Table 2) or across layers (``per_layer=False``, A.9)."""
    if not isinstance(truth, Tensor) or truth.dtype != torch.bool or not isinstance(scores, Tensor) \
            or tuple(truth.shape) != tuple(scores.shape):
        raise ValueError(f"truth must be a bool tensor shaped like scores {tuple(getattr(scores, 'shape', ()))}, "
                         f"got {type(truth).__name__} {tuple(getattr(truth, 'shape', ()))}")
    if not truth.any():
        raise ValueError("truth selects no neurons; recall is undefined")
    predicted = select_top_k(scores, k, per_layer=per_layer)
    return float((predicted.cpu() & truth.cpu()).sum()) / float(truth.sum())


def _sequences(model: Any, sequences: Any, n: int | None, max_len: int | None) -> list[Tensor]:
    from ..data import load_ecbd, tokenize_texts

    if sequences is None:
        sequences = load_ecbd()
    if isinstance(sequences, Tensor):
        if sequences.ndim != 2:
            raise ValueError(f"sequences as a tensor must be 2-D [n, seq], got shape {tuple(sequences.shape)}")
        sequences = list(sequences)
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise ValueError("sequences must be a non-empty list of texts or 1-D token tensors (or None for ECBD-2021)")
    if n is not None:
        check_positive_int(n, "n")
        sequences = list(sequences)[:n]
    if all(isinstance(s, str) for s in sequences):
        toks = tokenize_texts(model, list(sequences), max_len=max_len)
    elif all(isinstance(s, Tensor) for s in sequences):
        toks = [s.flatten()[:max_len] if max_len else s.flatten() for s in sequences]
    else:
        raise ValueError("sequences must all be strings or all be 1-D token tensors")
    out = []
    for i, t in enumerate(toks):
        if t.numel() < 2:
            raise ValueError(f"sequences[{i}] has {t.numel()} tokens; at least 2 are needed")
        out.append(check_tokens(model, t.view(1, -1), name=f"sequences[{i}]"))
    return out


def _injected_rows(model: Any, mask: Tensor) -> Tensor:
    """The value vectors selected by ``mask`` as rows [n_selected, d_model], in (layer, neuron) order."""
    parts = []
    for v in ffn_value_vectors(model):
        idx = mask[v.layer].nonzero().flatten().to(v.param.device)
        rows = v.param.detach().index_select(v.neuron_axis, idx)
        parts.append(rows.T if v.neuron_axis == 1 else rows)
    return torch.cat(parts).cpu().clone()


@contextmanager
def _with_rows(model: Any, mask: Tensor, values: Tensor) -> Iterator[None]:
    """Write injected value vectors (from :func:`_injected_rows`) into the model; undone on exit."""
    vectors = ffn_value_vectors(model)
    with borrowed(model, restore_weights=[v.name for v in vectors]), torch.no_grad():
        start = 0
        for v in vectors:
            idx = mask[v.layer].nonzero().flatten()
            rows = values[start:start + len(idx)].to(v.param.device, v.param.dtype)
            start += len(idx)
            v.param.index_copy_(v.neuron_axis, idx.to(v.param.device), rows.T if v.neuron_axis == 1 else rows)
        yield


def _inject_task(model: Any, x: Tensor, mask: Tensor, lr: float, max_steps: int, target_loss: float,
                 fingerprint: bool) -> dict:
    """Injection task (Algorithm 1 for one sequence): the injected value vectors, the run's outcome
    and (if ``fingerprint``) the injected model's fingerprint, the key of its score cache."""
    with injected(model, x, mask, lr=lr, max_steps=max_steps, target_loss=target_loss) as res:
        return {"values": _injected_rows(model, mask), "steps": res.steps, "final_loss": res.final_loss,
                "converged": res.converged, "losses": list(res.losses),
                "fingerprint": model_fingerprint(model) if fingerprint else None}


def _inj_scores_task(model: Any, x: Tensor, mask: Tensor, injection: dict, name: str, fn: Callable,
                     kw: dict) -> Tensor:
    """Attribution task: one method's scores on the injected model (the injection's value vectors are
    written into the worker's model, checked against the injected fingerprint, and undone)."""
    with _with_rows(model, mask, injection["values"]):
        if injection["fingerprint"] is not None and model_fingerprint(model) != injection["fingerprint"]:
            raise RuntimeError("the injected value vectors did not reproduce the injected model's weights")
        return localize_cached(model, name, fn, x, 1, kw)


def _injection_cache_path(cache_dir: str | Path, fingerprint: str, x: Tensor, r: float, seed: int, lr: float,
                          max_steps: int, target_loss: float) -> Path:
    h = hashlib.blake2b(digest_size=16)
    for part in (fingerprint, repr(float(r)), str(seed), repr(float(lr)), str(max_steps), repr(float(target_loss)),
                 str(tuple(x.shape))):
        h.update(part.encode())
        h.update(b"\0")
    h.update(x.detach().cpu().long().contiguous().flatten().view(torch.uint8).numpy())
    return Path(cache_dir) / "inj_injection" / f"{h.hexdigest()}.safetensors"


def _read_injection(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        d = load_file(str(path))
        return {"values": d["values"], "steps": int(meta["steps"]), "final_loss": float(d["losses"][-1]),
                "converged": meta["converged"] == "1", "losses": d["losses"].tolist(),
                "fingerprint": meta["fingerprint"]}
    except Exception as exc:  # a truncated or foreign file: inject again
        logger.warning("could not read injection cache %s (%s); injecting again", path, exc)
        return None


def _write_injection(path: Path, inj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"values": inj["values"].contiguous(), "losses": torch.tensor(inj["losses"], dtype=torch.float64)},
              str(tmp), metadata={"steps": str(inj["steps"]), "converged": "1" if inj["converged"] else "0",
                                  "fingerprint": inj["fingerprint"]})
    tmp.replace(path)


def _run_inj_tasks(executor: Any, model: Any, fns: Mapping[str, Callable], seqs: list[Tensor], jobs: list,
                   seq_kwargs: dict, lr: float, max_steps: int, target_loss: float, cache_dir: str | Path | None,
                   progress_bar: bool) -> tuple[dict, dict]:
    """Injections ``{(i, r): InjectionResult}`` and scores ``{(i, r, method): scores}``, read from the
    cache where present (injections under ``inj_injection/``, scores in the score cache keyed by the
    injected model), the missing ones computed by ``executor`` (an injection, then one attribution
    task per method on the injected model)."""
    stats = executor.start_sweep()
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    base = model_fingerprint(model) if cache_dir is not None else None
    masks = {(i, r): sample_injection_mask(n_layers, d_mlp, r, i) for i, r in jobs}
    injections: dict = {}
    scores: dict = {}

    def attribution_tasks(i: int, r: float, inj: dict) -> list[Task]:
        mask = masks[(i, r)]
        injections[(i, r)] = InjectionResult(inj["steps"], inj["final_loss"], inj["converged"], mask.clone(),
                                             list(inj["losses"]))
        tasks = []
        for name, fn in fns.items():
            hit = None
            if cache_dir is not None:  # keyed by the injected model's fingerprint: the weights are not read
                hit = _cached_scores(model, name, seqs[i], 1, seq_kwargs[(name, i)], cache_dir, inj["fingerprint"])
            if hit is not None:
                scores[(i, r, name)] = hit
                stats.n_cached += 1
            else:
                tasks.append(Task(_inj_scores_task, (seqs[i], mask, inj, name, fn, seq_kwargs[(name, i)]),
                                  ("scores", i, r, name, inj)))
        return tasks

    tasks = []
    for i, r in jobs:
        path = (_injection_cache_path(cache_dir, base, seqs[i], r, i, lr, max_steps, target_loss)
                if cache_dir is not None else None)
        inj = _read_injection(path) if path is not None else None
        if inj is None:
            tasks.append(Task(_inject_task, (seqs[i], masks[(i, r)], lr, max_steps, target_loss, cache_dir is not None),
                              ("inject", i, r, path), spawns=len(fns)))
        else:
            stats.n_cached += 1
            tasks.extend(attribution_tasks(i, r, inj))

    def on_done(task: Task, result: Any) -> list[Task]:
        if task.key[0] == "inject":
            _, i, r, path = task.key
            if path is not None:
                _write_injection(path, result)
            return attribution_tasks(i, r, result)
        _, i, r, name, inj = task.key
        if cache_dir is not None:
            result = _store_scores(model, name, seqs[i], 1, seq_kwargs[(name, i)], result, cache_dir,
                                   inj["fingerprint"])
        scores[(i, r, name)] = result
        return []

    executor.run(model, tasks, on_done, desc="INJ", progress_bar=progress_bar)
    return injections, scores


def inj_benchmark(model: Any, methods: Mapping[str, Callable] | Sequence[str], *, sequences: Any = None,
                  n: int | None = None, ratios: Sequence[float] = DEFAULT_INJ_RATIOS,
                  k_multiples: Sequence[float] = DEFAULT_K_MULTIPLES, method_kwargs: Mapping[str, Mapping] | None = None,
                  lr: float = DEFAULT_INJ_LR, max_steps: int = 500, target_loss: float = 0.05,
                  max_len: int | None = None, cache_dir: str | Path | None = None,
                  progress_bar: bool = True, executor: Any = "serial") -> pd.DataFrame:
    """Run the INJ benchmark (Chang et al. §3.1, Algorithm 1, Tables 2 and 6).

    Args:
        model: the TransformerBridge (borrowed; restored after every sequence).
        methods: ``{name: fn}`` localization methods, or names in ``memloc.localize.METHODS``.
            Each is called as ``fn(model, tokens [1, seq], prefix_len=1, **method_kwargs[name])``
            on the injected model; a method with a ``seed`` keyword that ``method_kwargs`` does not
            set gets ``seed=i`` for sequence i (RANDOM draws a fresh set per sequence).
        sequences: texts or 1-D token tensors to inject (default: ECBD-2021 definitions); the
            i-th sequence seeds its injection mask with ``i``.
        n: use only the first ``n`` sequences.
        ratios: injection ratios r (fraction of all value vectors across layers).
        k_multiples: Recall@k% is reported for k = m * r for every m here.
        method_kwargs: per-method hyperparameters.
        lr, max_steps, target_loss: Adam learning rate, step cap and the stopping loss (0.05).
        max_len: truncate sequences to this many tokens (default: the model's context).
        cache_dir: if given, attribution scores are cached there (keyed by the injected model's
            fingerprint, method, hyperparameters and sequence), and so are the injections
            (``inj_injection/``: the injected value vectors, keyed by the model, sequence, ratio, seed
            and fine-tuning settings): a sweep run again computes only what is missing.
        progress_bar: show a progress bar over the tasks (injections and attributions).
        executor: ``"serial"`` (default: this process), ``"ray"`` (a local Ray instance) or an
            executor of :mod:`memloc.executors`; the result is the same table.

    Returns:
        Tidy DataFrame, one row per (sequence, method, ratio, k, selection): ``seq_id, method,
        ratio, k, selection`` ("per_layer" / "across_layers"), ``recall``, ``n_injected``,
        ``inj_steps``, ``inj_final_loss``, ``inj_converged``, ``seq_len``.
    """
    fns = resolve_methods(methods)
    kwargs = check_method_kwargs(method_kwargs, fns)
    if isinstance(ratios, (int, float)):
        ratios = [ratios]
    if not ratios:
        raise ValueError("ratios is empty; pass at least one injection ratio")
    ratios = [check_fraction(r, "ratios") for r in ratios]
    if not k_multiples:
        raise ValueError("k_multiples is empty")
    for m in k_multiples:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0:
            raise ValueError(f"k_multiples must be positive numbers, got {m!r}")
    too_big = [(r, m) for r in ratios for m in k_multiples if r * m > 1]
    if too_big:
        raise ValueError(f"ratio x k_multiple must be <= 1, got {too_big}")
    if max_len is not None:
        check_positive_int(max_len, "max_len")
    executor = resolve_executor(executor)
    seqs = _sequences(model, sequences, n, max_len)
    ffn_value_vectors(model)  # fail early on architectures without a W_out
    seq_kwargs = {(name, i): with_sequence_seed(fn, kwargs[name], i) for name, fn in fns.items() for i in range(len(seqs))}
    check_calls(fns, {name: seq_kwargs[(name, 0)] for name in fns})
    rows = []
    jobs = [(i, r) for i in range(len(seqs)) for r in ratios]
    with borrowed(model):
        injections, scores = _run_inj_tasks(executor, model, fns, seqs, jobs, seq_kwargs, lr, max_steps, target_loss,
                                            cache_dir, progress_bar)
        for i, r in jobs:
            x = seqs[i]
            res = injections[(i, r)]
            mask = res.mask
            for name in fns:
                for m in k_multiples:
                    k = r * m
                    for sel, per_layer in (("per_layer", True), ("across_layers", False)):
                        rows.append({"seq_id": i, "method": name, "ratio": r, "k": k, "k_multiple": m,
                                     "selection": sel,
                                     "recall": recall_at_k(scores[(i, r, name)], mask, k, per_layer=per_layer),
                                     "n_injected": res.n_injected, "inj_steps": res.steps,
                                     "inj_final_loss": res.final_loss, "inj_converged": res.converged,
                                     "seq_len": int(x.shape[1])})
    df = pd.DataFrame(rows)
    n_bad = int((~df.drop_duplicates(["seq_id", "ratio"])["inj_converged"]).sum()) if len(df) else 0
    if n_bad:
        logger.warning("%d of %d injections did not reach loss < %g within %d steps (column inj_converged)",
                       n_bad, len(jobs), target_loss, max_steps)
    return df


def _method_order(names: Sequence[str]) -> list[str]:
    known = [m for m in PAPER_ORDER if m in names]
    return known + [m for m in names if m not in known]


def inj_table(df: pd.DataFrame, *, selection: str = "per_layer", converged_only: bool = False) -> pd.DataFrame:
    """Chang et al. Table 2 (``selection="per_layer"``) or Table 6 (``"across_layers"``) layout:
    mean Recall@k% x 100 with rows (ratio, method) and one column per k multiple (R@r, R@2r, R@5r,
    labelled with the percentages of the first ratio's row group).

    ``converged_only`` drops injections that did not reach the target loss.
    """
    need = {"seq_id", "method", "ratio", "k", "selection", "recall"}
    if not isinstance(df, pd.DataFrame) or not need <= set(df.columns):
        raise ValueError(f"df must be the DataFrame inj_benchmark returns (columns {sorted(need)})")
    if selection not in set(df["selection"]):
        raise ValueError(f"selection must be one of {sorted(set(df['selection']))}, got {selection!r}")
    d = df[df["selection"] == selection]
    if converged_only and "inj_converged" in d:
        d = d[d["inj_converged"]]
    if "k_multiple" not in d:
        d = d.assign(k_multiple=(d["k"] / d["ratio"]).round(6))
    t = d.groupby(["ratio", "method", "k_multiple"])["recall"].mean().mul(100).unstack("k_multiple")
    t.columns = [f"R@{m:g}r" for m in t.columns]
    ratios = sorted(set(d["ratio"]), reverse=True)
    order = _method_order(list(dict.fromkeys(d["method"])))
    t = t.reindex(pd.MultiIndex.from_tuples([(r, m) for r in ratios for m in order if (r, m) in t.index],
                                            names=["ratio", "method"]))
    n = d.groupby(["ratio", "method"])["seq_id"].nunique()
    t["n_seq"] = n.reindex(t.index).astype(int)
    return t
