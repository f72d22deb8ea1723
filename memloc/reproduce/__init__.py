"""Reproduce the figures and tables of both papers end to end on one model (``memloc reproduce``).

A pipeline of declared stages (:mod:`memloc.reproduce.stages`, one module each), run by a small
generic runner (:mod:`memloc.reproduce.runner`: requires/uses, skip with a reason, timing, the
content-addressed cache of :mod:`memloc.cache`).  Each stage computes a result object, renders
its figures (HTML + PNG) and tables (CSV), and states one computed finding:

==================  =====================================================================
``memorization``    EM and NLL of every paragraph, the MP/NMP split (Stoehr §3.2, Fig. 2)
``perturbation``    prefix-token perturbation of one MP (Fig. 3 top), MP vs NMP (Fig. 3 bottom);
                    the PMPs used by ``finetune`` (editing) and ``patching``
``gradients``       parameter gradients MP vs NMP (Fig. 4 top) and by EM bin (Fig. 9)
``contrastive``     contrastive-objective gradients, the top component (Fig. 4 bottom)
``finetune``        sparse unlearning and editing, top vs random vs all weights (Fig. 5)
``head``            the memorization head (uses ``contrastive``): value-activation gradients and
                    first-token attention of its layer (Fig. 6)
``rare_tokens``     attention per token-frequency rank and its correlation (Fig. 7; highlights
                    the ``head`` stage's head)
``inj``             INJ benchmark, Recall@k% (Chang et al. Table 2)
``del``             DEL benchmark table and confusion matrix (Chang et al. Table 3, Fig. 2)
``patching``        two-way activation patching at the perturbed token (Stoehr Fig. 11)
==================  =====================================================================

``REPORT.md`` opens with the claims ledger (:mod:`memloc.reproduce.claims`, also ``claims.csv``;
:func:`compare_claims` puts several models' ledgers side by side)
and collects the findings; it and the CSVs are byte-stable, the stage times go to ``timings.json``.
Stages that need memorized paragraphs are skipped, with the reason in the report, when the model
memorized none (e.g. a random-weight model) or when no bundled paragraph set fits its tokenizer.

Paragraphs come from the model's bundled profile (:func:`memloc.data.bundled_profile`): the
embedded model uses ``load_paragraphs("tiny")`` (NMP: EM <= 10); a model with GPT-2's vocabulary
(GPT-Neo 125M) the bundled GPT-Neo sets ``gpt-neo-125m`` (EM = 50), ``-em30-49`` and ``-em11-29``;
as no EM <= 10 set is bundled, its non-memorized group is the paragraphs whose *measured* EM is
<= 29 (the em11-29 set, mostly), which the report states.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..borrow import borrowed
from ..data import ParagraphSet
from ..models import Model
from ._format import fmt_duration
from .claims import CLAIMS, claims_ledger, claims_markdown, compare_claims, write_claims
from .context import RunContext, build_context, check_stages
from .report import TITLES as _TITLES  # noqa: F401  (the old private name, kept for callers)
from .report import write_report, write_timings
from .runner import TYPICAL_SECONDS, Stage, StageClock
from .settings import CSV_FLOAT_FORMAT, DEFAULT, QUICK, STAGES, ReproduceResult, Settings

__all__ = ["STAGES", "Settings", "QUICK", "DEFAULT", "ReproduceResult", "reproduce", "RunContext", "Stage",
           "StageClock", "fmt_duration", "TYPICAL_SECONDS", "CSV_FLOAT_FORMAT", "CLAIMS", "claims_ledger",
           "compare_claims"]

#: Names that moved to :mod:`memloc.data` (still importable from here, with a DeprecationWarning).
_MOVED = {"default_paragraphs": "memloc.data.default_paragraphs", "select_groups": "memloc.data.select_groups"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"memloc.reproduce.{name} moved to {_MOVED[name]}; import it from there", DeprecationWarning,
                      stacklevel=2)
        from .. import data

        return getattr(data, name)
    raise AttributeError(f"module 'memloc.reproduce' has no attribute {name!r}")


def _worker_spec(model: Model, workers: Any) -> Any:
    """How worker processes load ``model`` (None for ``workers == 1``); ValueError before any work."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int (processes computing stages), got {workers!r}")
    if workers == 1:
        return None
    from ..models import load_args
    from ..ray_executor import ModelSpec

    if load_args(model) is None:
        raise ValueError("workers > 1 needs a model returned by memloc.load_model: each worker process loads it "
                         "the same way; this model was built another way (or copied), so use workers=1")
    return ModelSpec.from_model(model)


def reproduce(model: Model, out_dir: str | Path = "memloc-out", *, quick: bool = False,
              settings: Settings | None = None, paragraphs: ParagraphSet | None = None,
              non_memorized_max_em: int | None = None, frequencies: Int[Tensor, "vocab"] | None = None,
              stages: Sequence[str] | None = None, cache_dir: str | Path | None = ".memloc_cache", png: bool = True,
              model_name: str = "model", progress_bar: bool = True,
              timings_path: str | Path | None = None, workers: int = 1) -> ReproduceResult:
    """Run the reproduction pipeline of both papers on ``model`` and write figures, tables,
    ``claims.csv`` and ``REPORT.md``.

    Args:
        model: a TransformerBridge (borrowed; left exactly as found).
        out_dir: output directory (created).
        quick: use :data:`QUICK` sizes instead of :data:`DEFAULT` (ignored when ``settings`` is given).
        settings: explicit stage sizes.
        paragraphs: the paragraph pool (default: the model's bundled profile,
            :func:`memloc.data.default_paragraphs`; none for an unknown tokenizer, whose
            paragraph stages are then skipped with a note).
        non_memorized_max_em: NMP threshold (default 10 for the embedded set, 29 for GPT-Neo sets).
        frequencies: corpus unigram counts for the rare-token analysis (default: the embedded
            model's training counts; otherwise counted from the paragraphs, a stand-in noted in
            the report).
        stages: subset of :data:`STAGES` (default all); the stages they require or use are added.
        cache_dir: the content-addressed cache of stage results and attribution scores (None: no cache).
        png: also write PNGs (HTML is always written; without Chromium the PNGs are skipped with a
            note in the report).
        model_name: the name shown in the report.
        progress_bar: progress bars (also silenced by ``MEMLOC_PROGRESS=0``).
        timings_path: where the stage times and cache hits are written as JSON (default
            ``out_dir/timings.json``); REPORT.md and the CSVs hold no times, so that a rerun
            writes the same bytes.
        workers: compute the stages on this many processes (default 1: in this process).  Each
            loads the model once, the way :func:`memloc.load_model` loaded ``model`` (so ``model``
            must come from it), with ``torch.get_num_threads() // workers`` threads (at least 1);
            independent stages run side by side (:mod:`memloc.reproduce.parallel`).  The results,
            CSVs and report are the same as with one.  On the 2-core VM two single-threaded
            workers were slower than one process with two threads (README "Gallery"); more
            cores are where it helps.

    Returns:
        :class:`ReproduceResult`.

    Raises:
        ValueError: bad arguments (before any work).
    """
    from .stages import REGISTRY

    settings = settings if settings is not None else (QUICK if quick else DEFAULT)
    requested = check_stages(stages)
    spec = _worker_spec(model, workers)
    if "memorization" not in requested:
        requested.insert(0, "memorization")  # everything depends on the split
    with borrowed(model):
        ctx = build_context(model, out_dir, settings=settings, stages=requested, paragraphs=paragraphs,
                            non_memorized_max_em=non_memorized_max_em, frequencies=frequencies, cache_dir=cache_dir,
                            png=png, model_name=model_name, progress_bar=progress_bar, quick=quick)
        from ..plots import png_session
        from .runner import run_stages

        # one browser for all the run's PNGs (a browser per figure cost ~4 s each, a minute per run)
        with png_session() if png else contextlib.nullcontext():
            run_stages(ctx, requested, REGISTRY, workers=workers, spec=spec,
                       threads=max(1, torch.get_num_threads() // workers))
    result = ctx.result
    result.summary["seconds"] = sum(result.timings.values())
    result.summary["cached_stages"] = sorted(result.cached)
    result.claims = claims_ledger(result.results, result.skipped, n_layers=int(model.cfg.n_layers))
    result.tables.setdefault("claims", []).append(write_claims(result.claims, result.out_dir / "claims.csv"))
    write_report(ctx, claims_markdown(result.claims))
    write_timings(result, Path(timings_path) if timings_path is not None else result.out_dir / "timings.json")
    return result
