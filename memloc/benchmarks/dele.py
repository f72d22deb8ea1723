"""The DEL benchmark (Chang et al. §3.2, §5.2, Table 3, Figure 2; A.8).

For every target x in a set X of memorized sequences, each localization method scores the FFN
neurons on x; the top-k% neurons of every layer except the bottom one (A.8) are dropped out
(zero ablation, :func:`memloc.ablation.ablate`) and the benchmark measures

* ΔSelf-Acc / ΔSelf-Dist: change of the teacher-forced accuracy (Eq. 5) and of the character
  Levenshtein distance of the teacher-forced argmax suffix (Eq. 4) on x itself;
* ΔNeg-Acc / ΔNeg-Dist: the same, averaged over the negatives X∖{x};
* ΔRand-PPL: change of the perplexity on a batch of random held-out sequences D.

One teacher-forced pass over all of X under the ablation gives Self and Neg at once, and the
row of ΔAcc over X is one row of the confusion matrix of Figure 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from .._checks import check_choice, check_positive_int, check_tokens
from .._progress import progress
from ..ablation import mean_activations
from ..borrow import borrowed
from ..metrics import teacher_forced
from ..executors import Task, check_calls, resolve_executor
from ..models import Model
from ._scores import (PAPER_ORDER, cached_scores, check_method_kwargs, localize_cached, model_fingerprint,
                      resolve_methods, store_scores, with_defaults)
from .dropout import DelSetting, eval_cache_path, evaluate_dropout, measure, read_eval, write_eval

logger = logging.getLogger(__name__)

__all__ = ["DelResult", "del_benchmark", "del_table", "memorized_set", "DEFAULT_DEL_RATIOS", "METRICS"]

#: Dropout ratios k for the embedded model: the paper's 0.5% (5 neurons per layer) plus 5% and 10%.
#: Measured on the 4-layer model: at 0.1-2% per layer no method moves a memorized paragraph more
#: than RANDOM does (ΔSelf-Acc about -0.5%); at 10% IG gives ΔSelf-Acc -9% vs RANDOM 0%.
DEFAULT_DEL_RATIOS = (0.005, 0.05, 0.1)
#: The Table 3 columns, in order, with their direction (↓ good for Self, ↑ good for Neg...).
METRICS = ("d_self_acc", "d_self_dist", "d_neg_acc", "d_neg_dist", "d_rand_ppl")


@dataclass
class DelResult:
    """Everything the DEL benchmark measured.

    Attributes:
        rows: one row per (method, ratio, target): ``method, ratio, target_id, d_self_acc,
            d_self_dist, d_neg_acc, d_neg_dist, d_rand_ppl, n_dropped`` (accuracies as
            fractions; :func:`del_table` shows them in %).
        matrices: ``{(method, ratio): DataFrame}`` of ΔAcc, index ``target_id`` x columns
            ``seq_id`` (Chang et al. Figure 2); the diagonal entries are ΔSelf-Acc.
        dist_matrices: the same for ΔDist (characters).
        baseline: per-sequence ``seq_id, accuracy, distance`` before dropout, and the
            unablated random-batch perplexity in ``rand_ppl``.
        ids: the ``seq_id`` of every row of the token tensor X.
    """

    rows: pd.DataFrame
    matrices: dict[tuple[str, float], pd.DataFrame]
    dist_matrices: dict[tuple[str, float], pd.DataFrame]
    baseline: pd.DataFrame
    rand_ppl: float
    ids: list = field(default_factory=list)

    def confusion_long(self) -> pd.DataFrame:
        """All ΔAcc / ΔDist matrices as one tidy frame: ``method, ratio, target_id, seq_id, d_acc, d_dist``."""
        parts = []
        for (method, ratio), m in self.matrices.items():
            acc = m.stack().rename("d_acc")
            dist = self.dist_matrices[(method, ratio)].stack().rename("d_dist")
            part = pd.concat([acc, dist], axis=1).reset_index()
            part.columns = ["target_id", "seq_id", "d_acc", "d_dist"]
            part.insert(0, "ratio", ratio)
            part.insert(0, "method", method)
            parts.append(part)
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["method", "ratio", "target_id", "seq_id", "d_acc", "d_dist"])


def memorized_set(model: Model, name: str = "tiny", *, min_em: int | None = None, n: int | None = None,
                  batch_size: int = 64) -> tuple[Int[Tensor, "n seq"], int, pd.DataFrame]:
    """The memorized paragraphs of a bundled paragraph set on ``model``: those whose exact match
    (greedy, Stoehr et al. §3.2) equals the whole continuation (``min_em``, default T = 50).

    Returns ``(tokens, prefix_len, table)`` with the table rows of the kept paragraphs (their
    ``id`` is the paragraph id of the set) and an ``em`` column measured on ``model`` (with the
    default ``min_em = T`` it is T for every kept row: full EM is checked through the equivalent
    teacher-forced accuracy of 1, in one forward pass).
    """
    from ..data import load_paragraphs
    from ..metrics import exact_match

    ps = load_paragraphs(name)
    t_len = ps.tokens.shape[1] - ps.prefix_len
    min_em = t_len if min_em is None else min_em
    if isinstance(min_em, bool) or not isinstance(min_em, int) or not 0 < min_em <= t_len:
        raise ValueError(f"min_em must be an int in 1..{t_len}, got {min_em!r}")
    if n is not None:
        check_positive_int(n, "n")
    ems = []
    for start in range(0, len(ps.tokens), batch_size):  # chunked, so a small n stops early
        chunk = ps.tokens[start:start + batch_size]
        if min_em == t_len:
            # EM = T  <=>  every teacher-forced argmax is the true token (greedy decoding then
            # follows the true suffix exactly), so one teacher-forced pass replaces T greedy steps.
            full = teacher_forced(model, chunk, ps.prefix_len, batch_size=batch_size)["accuracy"] == 1.0
            ems.append(np.where(full.numpy(), t_len, -1))
        else:
            ems.append(exact_match(model, chunk, ps.prefix_len, batch_size=batch_size).numpy())
        if n is not None and int((np.concatenate(ems) >= min_em).sum()) >= n:
            break
    em = np.concatenate(ems)
    table = ps.table.iloc[:len(em)].assign(em=em)
    keep = np.flatnonzero(em >= min_em)
    if n is not None:
        keep = keep[:n]
    if len(keep) < 2:
        raise ValueError(f"only {len(keep)} paragraphs of {name!r} reach EM >= {min_em} on this model; "
                         "DEL needs at least 2 (a target and a negative)")
    return ps.tokens[torch.as_tensor(keep, dtype=torch.long)], ps.prefix_len, table.iloc[keep].reset_index(drop=True)


def _check_ratios(ratios: Any) -> list[float]:
    if isinstance(ratios, (int, float)) and not isinstance(ratios, bool):
        ratios = [ratios]
    if not isinstance(ratios, (list, tuple)) or not ratios:
        raise ValueError(f"ratios must be a non-empty list of fractions in [0, 1], got {ratios!r}")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"ratios must be fractions in [0, 1] (0 = drop nothing), got {r!r}")
    return [float(r) for r in ratios]


def _scores_task(model: Model, name: str, fn: Callable, x: Tensor, prefix_len: int, kw: dict) -> Tensor:
    """Attribution task: one method's neuron scores on one target (checked as the cache stores them)."""
    return localize_cached(model, name, fn, x, prefix_len, kw)


def _run_del_tasks(executor: Any, model: Model, fns: Mapping[str, Callable], pairs: list, pair_kwargs: dict,
                   ratios: list[float], setting: DelSetting, cache_dir: str | Path | None, fingerprint: str | None,
                   progress_bar: bool) -> dict:
    """Attribution and evaluation results ``{(method, target row, ratio): (acc, dist, ppl, n_dropped)}``:
    read from the cache where present, the missing ones computed by ``executor``."""
    stats = executor.start_sweep()
    out: dict = {}
    x = {t: setting.tokens[t:t + 1].clone() for _, t in pairs}  # a view would pickle all of X

    def eval_tasks(name: str, t: int, scores: Tensor) -> list[Task]:
        tasks = []
        for r in ratios:
            path = eval_cache_path(cache_dir, fingerprint, scores, r, setting) if cache_dir is not None else None
            hit = read_eval(path) if path is not None else None
            if hit is not None:
                out[(name, t, r)] = hit
                stats.n_cached += 1
            else:
                tasks.append(Task(evaluate_dropout, (setting, scores, r), ("eval", name, t, r, path)))
        return tasks

    tasks = []
    # longest first: the papers' method order puts mask training and exact ZERO-OUT before IG,
    # ACTIVATIONS and RANDOM, so the last tasks of a sweep on several workers are short ones
    # (the table's row order does not depend on it)
    rank = {m: i for i, m in enumerate(PAPER_ORDER)}
    for name, t in sorted(pairs, key=lambda p: rank.get(p[0], len(PAPER_ORDER))):
        scores = cached_scores(model, name, x[t], setting.prefix_len, pair_kwargs[(name, t)], cache_dir, fingerprint)
        if scores is None:
            tasks.append(Task(_scores_task, (name, fns[name], x[t], setting.prefix_len, pair_kwargs[(name, t)]),
                              ("scores", name, t), spawns=len(ratios)))
        else:
            stats.n_cached += 1
            tasks.extend(eval_tasks(name, t, scores))

    def on_done(task: Task, result: Any) -> list[Task]:
        if task.key[0] == "scores":
            _, name, t = task.key
            scores = store_scores(model, name, x[t], setting.prefix_len, pair_kwargs[(name, t)], result, cache_dir,
                                  fingerprint)
            return eval_tasks(name, t, scores)
        _, name, t, r, path = task.key
        if path is not None:
            write_eval(path, result)
        out[(name, t, r)] = result
        return []

    executor.run(model, tasks, on_done, desc="DEL", progress_bar=progress_bar)
    return out


def del_benchmark(model: Model, methods: Mapping[str, Callable] | Sequence[str],
                  tokens: Int[Tensor, "n seq"] | None = None, prefix_len: int | None = None, *,
                  ids: Sequence | None = None, targets: Sequence[int] | None = None, n_targets: int | None = None,
                  set_size: int | None = None,
                  ratios: Sequence[float] = DEFAULT_DEL_RATIOS, method_kwargs: Mapping[str, Mapping] | None = None,
                  exclude_layers: Sequence[int] = (0,), random_tokens: Int[Tensor, "m seq"] | None = None,
                  n_random: int = 64, mode: Literal["zero", "mean"] = "zero", batch_size: int = 64,
                  tokenizer: Any = None, cache_dir: str | Path | None = None, fast: bool = True,
                  progress_bar: bool = True, executor: Any = "serial") -> DelResult:
    """Run the DEL benchmark (Chang et al. §3.2/§5.2, Table 3 and Figure 2).

    (Over 80 lines only through this docstring, which documents its 20 arguments; the body is
    argument checks, then the task sweep of ``_run_del_tasks`` and the tables of ``_del_result``.)

    Args:
        model: the TransformerBridge (borrowed; only hooks are added, and removed again).
        methods: ``{name: fn}`` localization methods or names in ``memloc.localize.METHODS``;
            each is called as ``fn(model, x [1, seq], prefix_len, **method_kwargs[name])``; a method
            with a ``seed`` keyword that ``method_kwargs`` does not set gets ``seed`` = the target's
            row index (RANDOM draws a fresh neuron set per target), and a method with a
            ``start_layer`` keyword (SLIMMING, HARD CONCRETE) gets the first layer above the
            excluded bottom layers, so the masks are trained only where neurons can be dropped
            (the authors' DEL setting, A.8).
        tokens: the memorized set X [n, seq]; default: the embedded model's fully memorized
            paragraphs (:func:`memorized_set`, prefix 50 / suffix 50) except the dev paragraphs
            of :func:`memloc.data.tuning_dev_ids`, the first ``set_size`` of them if given.
        prefix_len: prefix length p (default 50 with the default set; required with ``tokens``).
        ids: labels of the rows of ``tokens`` (default 0..n-1, or the paragraph ids).
        targets: row indices of X used as targets (default: every row); the negatives of a
            target are all other rows of X.
        n_targets: use only the first ``n_targets`` targets.
        ratios: dropout ratios k (fraction of neurons per layer; 0 drops nothing).
        method_kwargs: per-method hyperparameters.
        exclude_layers: layers never dropped out (default ``(0,)``: the bottom layer, A.8).
        random_tokens: the random batch D for Rand-PPL (default: the first ``n_random`` of
            :func:`memloc.data.random_sequences` for the embedded model; None for other models
            skips Rand-PPL, reported as NaN).
        mode: ``"zero"`` (the paper's dropout) or ``"mean"`` (mean ablation over D, see §7).
        batch_size: batch size of the teacher-forced passes.
        tokenizer: for the Levenshtein distance (default: the model's).
        cache_dir: cache attribution scores there (see :func:`~memloc.benchmarks.localize_cached`) and
            the evaluations (``del_eval/``, keyed by the model, the scores, the ratio and the setting):
            a sweep run again with the same ``cache_dir`` computes only what is missing.
        fast: measure the dropouts by re-running only the layers above the excluded ones from the
            cached input of the first droppable block (the same numbers as full forwards under
            :func:`memloc.ablation.ablate`, which ``fast=False`` runs; see :class:`memloc.benchmarks.dropout.DropoutMeasurer`).
            Methods with a ``layers`` keyword (ZERO-OUT, IG) score only the non-excluded layers
            either way.
        progress_bar: progress bar over the tasks (attributions and evaluations).
        executor: ``"serial"`` (default: this process), ``"ray"`` (a local Ray instance) or an
            executor of :mod:`memloc.executors` (e.g. ``RayExecutor(address)`` for a cluster); the
            result is the same table.

    Returns:
        :class:`DelResult`.
    """
    fns = resolve_methods(methods)
    kwargs = check_method_kwargs(method_kwargs, fns)
    ratios = _check_ratios(ratios)
    check_choice(mode, "mode", ("zero", "mean"))
    check_positive_int(batch_size, "batch_size")
    check_positive_int(n_random, "n_random")
    executor = resolve_executor(executor)
    n_layers = int(model.cfg.n_layers)
    exclude_layers = list(exclude_layers)
    bad = [l for l in exclude_layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers]
    if bad or len(set(exclude_layers)) >= n_layers:
        raise ValueError(f"exclude_layers must be distinct layer indices in 0..{n_layers - 1} leaving at least one "
                         f"layer, got {exclude_layers}")
    if (tokenizer or getattr(model, "tokenizer", None)) is None:
        raise ValueError("the Levenshtein distance needs a tokenizer: the model has none, pass tokenizer=")
    tokens, prefix_len, ids = _memorized_set_x(model, tokens, prefix_len, ids, set_size, batch_size)
    n = len(tokens)
    targets = _check_targets(targets, n, n_targets)
    random_tokens = _random_batch(model, random_tokens, n_random)
    if random_tokens is None and mode == "mean":
        raise ValueError("mode='mean' needs random_tokens (the reference batch for the means)")

    start_layer = 0  # first layer above the excluded bottom layers (mask methods train from there)
    while start_layer in exclude_layers:
        start_layer += 1
    pairs = [(name, t) for name in fns for t in targets]
    # the excluded layers are never dropped: methods with a ``layers`` keyword (ZERO-OUT, IG) score
    # only the others (the same top-k selection, without the cost of the excluded layers)
    scored_layers = [l for l in range(n_layers) if l not in exclude_layers]
    pair_kwargs = {(name, t): with_defaults(fns[name], kwargs[name], seed=int(t), start_layer=start_layer,
                                            layers=scored_layers)
                   for name, t in pairs}
    check_calls(fns, {name: pair_kwargs[(name, t)] for name, t in pairs})

    with borrowed(model):
        acc0, dist0, ppl0 = measure(model, tokens, prefix_len, random_tokens, batch_size, tokenizer)
        means = mean_activations(model, random_tokens, batch_size=batch_size) if mode == "mean" else None
        fingerprint = model_fingerprint(model) if cache_dir is not None else None
        setting = DelSetting(tokens, prefix_len, random_tokens, batch_size, tokenizer, exclude_layers, mode, means,
                             start=start_layer, fast=bool(fast))
        measured = _run_del_tasks(executor, model, fns, pairs, pair_kwargs, ratios, setting, cache_dir, fingerprint,
                                  progress_bar)
        return _del_result(measured, pairs, targets, ratios, ids, acc0, dist0, ppl0)


def _memorized_set_x(model: Model, tokens: Any, prefix_len: Any, ids: Any, set_size: Any,
                     batch_size: int) -> tuple[Tensor, int, list]:
    """The memorized set X, its prefix length and row labels: ``tokens`` as given (checked), or the
    embedded model's fully memorized paragraphs except the tuning dev set (A.7)."""
    if tokens is None:
        if prefix_len is not None:
            raise ValueError("prefix_len is only used together with tokens")
        if set_size is not None:
            check_positive_int(set_size, "set_size")
        from ..data import tuning_dev_ids

        # the dev paragraphs the mask hyperparameters were selected on are not test data (A.7)
        dev = tuning_dev_ids("tiny")
        tokens, prefix_len, table = memorized_set(model, "tiny", batch_size=batch_size,
                                                  n=None if set_size is None else set_size + len(dev))
        keep = np.flatnonzero(~table["id"].isin(dev).to_numpy())[:set_size]
        tokens, table = tokens[torch.as_tensor(keep, device=tokens.device)], table.iloc[keep]
        logger.info("DEL: %d memorized paragraphs of the embedded model form the set X", len(tokens))
        if ids is None:
            ids = table["id"].tolist()
    elif prefix_len is None:
        raise ValueError("prefix_len is required when tokens are given")
    elif set_size is not None:
        raise ValueError("set_size only applies to the default set; slice tokens yourself")
    tokens = check_tokens(model, tokens, prefix_len)
    n = len(tokens)
    if n < 2:
        raise ValueError(f"tokens must hold at least 2 sequences (a target and its negatives), got {n}")
    ids = list(range(n)) if ids is None else list(ids)
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"ids must be {n} distinct labels, one per row of tokens")
    return tokens, prefix_len, ids


def _check_targets(targets: Any, n: int, n_targets: Any) -> list[int]:
    targets = list(range(n)) if targets is None else list(targets)
    if not targets or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n for t in targets):
        raise ValueError(f"targets must be a non-empty list of row indices in 0..{n - 1}, got {targets}")
    if n_targets is not None:
        targets = targets[:check_positive_int(n_targets, "n_targets")]
    return targets


def _random_batch(model: Model, random_tokens: Any, n_random: int) -> Tensor | None:
    """The random batch D of ΔRand-PPL: as given (checked), else the bundled held-out text of the
    model's paragraph profile (the embedded model), else None (ΔRand-PPL is NaN)."""
    if random_tokens is None:
        try:
            from ..data import bundled_profile, random_sequences

            profile = bundled_profile(model)  # the embedded model ships held-out text
            if profile is not None and profile.random_text:
                random_tokens = random_sequences(profile.name)[:n_random]
        except ValueError:
            random_tokens = None
    return None if random_tokens is None else check_tokens(model, random_tokens, name="random_tokens")


def _del_result(measured: dict, pairs: list, targets: list[int], ratios: list[float], ids: list, acc0: Tensor,
                dist0: Tensor, ppl0: float) -> DelResult:
    """Table 3 rows and the Figure 2 matrices from the measured dropouts (differences to the baseline)."""
    n = len(ids)
    names = list(dict.fromkeys(name for name, _ in pairs))
    rows = []
    d_acc: dict[tuple[str, float], list] = {(m, r): [] for m in names for r in ratios}
    d_dist: dict[tuple[str, float], list] = {(m, r): [] for m in names for r in ratios}
    for name, t in pairs:
        for r in ratios:
            acc, dist, ppl, n_dropped = measured[(name, t, r)]
            da, dd = acc - acc0, dist - dist0
            neg = torch.ones(n, dtype=torch.bool)
            neg[t] = False
            rows.append({"method": name, "ratio": r, "target_id": ids[t], "d_self_acc": float(da[t]),
                         "d_self_dist": float(dd[t]), "d_neg_acc": float(da[neg].mean()),
                         "d_neg_dist": float(dd[neg].mean()), "d_rand_ppl": ppl - ppl0,
                         "n_dropped": n_dropped, "self_acc_before": float(acc0[t])})
            d_acc[(name, r)].append(da.numpy())
            d_dist[(name, r)].append(dd.numpy())
    target_ids = pd.Index([ids[t] for t in targets], name="target_id")
    seq_ids = pd.Index(ids, name="seq_id")
    matrices = {key: pd.DataFrame(np.stack(v), index=target_ids, columns=seq_ids) for key, v in d_acc.items()}
    dist_matrices = {key: pd.DataFrame(np.stack(v), index=target_ids, columns=seq_ids) for key, v in d_dist.items()}
    baseline = pd.DataFrame({"seq_id": ids, "accuracy": acc0.numpy(), "distance": dist0.numpy()})
    return DelResult(pd.DataFrame(rows), matrices, dist_matrices, baseline, ppl0, ids)


def del_table(rows: pd.DataFrame | DelResult) -> pd.DataFrame:
    """Chang et al. Table 3 layout: mean ΔSelf-Acc (%), ΔSelf-Dist, ΔNeg-Acc (%), ΔNeg-Dist and
    ΔRand-PPL over targets, rows = methods (paper order), columns = (metric, dropout ratio)."""
    if isinstance(rows, DelResult):
        rows = rows.rows
    need = {"method", "ratio", "target_id", *METRICS}
    if not isinstance(rows, pd.DataFrame) or not need <= set(rows.columns):
        raise ValueError(f"rows must be DelResult.rows (columns {sorted(need)})")
    t = rows.groupby(["method", "ratio"])[list(METRICS)].mean()
    t["d_self_acc"] *= 100
    t["d_neg_acc"] *= 100
    t = t.rename(columns={"d_self_acc": "ΔSelf-Acc %", "d_self_dist": "ΔSelf-Dist", "d_neg_acc": "ΔNeg-Acc %",
                          "d_neg_dist": "ΔNeg-Dist", "d_rand_ppl": "ΔRand-PPL"})
    t = t.unstack("ratio")
    names = list(dict.fromkeys(rows["method"]))
    # a variant row such as "hard_concrete (tuned)" (``memloc bench del --compare-tuned``) follows its method
    base = {n: n.split(" (")[0] for n in names}
    rank = {m: i for i, m in enumerate(PAPER_ORDER)}
    order = sorted(names, key=lambda n: (rank.get(base[n], len(PAPER_ORDER)), names.index(base[n])
                                         if base[n] in names else names.index(n), n != base[n], names.index(n)))
    t = t.reindex(order)
    t.columns = t.columns.set_names(["metric", "ratio"])
    return t
