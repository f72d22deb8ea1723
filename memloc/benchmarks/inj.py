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
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._checks import check_fraction, check_positive_int, check_tokens
from ..ablation import select_top_k
from ..borrow import borrowed
from ..executors import Task, check_calls, resolve_executor
from ..models import Model
from ._scores import (PAPER_ORDER, cached_scores, check_method_kwargs, localize_cached, model_fingerprint,
                      resolve_methods, store_scores, with_sequence_seed)
from .injection import (DEFAULT_INJ_LR, InjectionResult, ValueVectors, ffn_value_vectors, injected, injected_rows,
                        injection_loss, sample_injection_mask, with_injected_rows)

logger = logging.getLogger(__name__)

__all__ = ["ValueVectors", "ffn_value_vectors", "sample_injection_mask", "injection_loss", "injected",
           "InjectionResult", "recall_at_k", "inj_benchmark", "inj_table", "DEFAULT_INJ_RATIOS",
           "DEFAULT_K_MULTIPLES"]

#: Injection ratios r for the embedded model (4 layers x 1024 neurons: 41 and 20 injected neurons).
#: The paper uses 1% and 0.1% on GPT-2/Pythia; 0.1% of 4096 would be 4 neurons.
DEFAULT_INJ_RATIOS = (0.01, 0.005)
#: Recall@k% is reported for k = r, 2r and 5r (Chang et al. Table 2).
DEFAULT_K_MULTIPLES = (1, 2, 5)



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


def _sequences(model: Model, sequences: Any, n: int | None, max_len: int | None) -> list[Tensor]:
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


def _inject_task(model: Model, x: Tensor, mask: Tensor, lr: float, max_steps: int, target_loss: float,
                 fingerprint: bool) -> dict:
    """Injection task (Algorithm 1 for one sequence): the injected value vectors, the run's outcome
    and (if ``fingerprint``) the injected model's fingerprint, the key of its score cache."""
    with injected(model, x, mask, lr=lr, max_steps=max_steps, target_loss=target_loss) as res:
        return {"values": injected_rows(model, mask), "steps": res.steps, "final_loss": res.final_loss,
                "converged": res.converged, "losses": list(res.losses),
                "fingerprint": model_fingerprint(model) if fingerprint else None}


def _inj_scores_task(model: Model, x: Tensor, mask: Tensor, injection: dict, name: str, fn: Callable,
                     kw: dict) -> Tensor:
    """Attribution task: one method's scores on the injected model (the injection's value vectors are
    written into the worker's model, checked against the injected fingerprint, and undone)."""
    with with_injected_rows(model, mask, injection["values"]):
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


def _run_inj_tasks(executor: Any, model: Model, fns: Mapping[str, Callable], seqs: list[Tensor], jobs: list,
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
                hit = cached_scores(model, name, seqs[i], 1, seq_kwargs[(name, i)], cache_dir, inj["fingerprint"])
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
            result = store_scores(model, name, seqs[i], 1, seq_kwargs[(name, i)], result, cache_dir,
                                   inj["fingerprint"])
        scores[(i, r, name)] = result
        return []

    executor.run(model, tasks, on_done, desc="INJ", progress_bar=progress_bar)
    return injections, scores


def inj_benchmark(model: Model, methods: Mapping[str, Callable] | Sequence[str], *, sequences: Any = None,
                  n: int | None = None, ratios: Sequence[float] = DEFAULT_INJ_RATIOS,
                  k_multiples: Sequence[float] = DEFAULT_K_MULTIPLES, method_kwargs: Mapping[str, Mapping] | None = None,
                  lr: float = DEFAULT_INJ_LR, max_steps: int = 500, target_loss: float = 0.05,
                  max_len: int | None = None, cache_dir: str | Path | None = None,
                  progress_bar: bool = True, executor: Any = "serial") -> pd.DataFrame:
    """Run the INJ benchmark (Chang et al. §3.1, Algorithm 1, Tables 2 and 6).

    (Over 80 lines only through this docstring, which documents its arguments; the work is in
    ``_run_inj_tasks``.)

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
