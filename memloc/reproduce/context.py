"""The run context: everything a stage reads, validated and built once before any work."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor

from .._checks import check_number, check_positive_int, check_tokens
from ..cache import ContentCache, digest, model_fingerprint
from ..data import BundledProfile, ParagraphSet, bundled_profile, concat_paragraph_sets, can_retokenize
from ..localize.hard_concrete import hard_concrete
from ..models import Model
from .settings import CSV_FLOAT_FORMAT, STAGES, ReproduceResult, Settings

logger = logging.getLogger("memloc.reproduce")

__all__ = ["RunContext", "build_context", "check_stages"]


@dataclass
class RunContext:
    """What every stage of one run shares.

    Attributes:
        model: the borrowed TransformerBridge.
        settings: the stage sizes.
        result: the :class:`ReproduceResult` being filled (figures, tables, findings, ...).
        paragraphs: the paragraph pool (None: no bundled set fits the model's tokenizer and none
            was given; the stages that need paragraphs are skipped).
        non_memorized_max_em: the NMP threshold (None without paragraphs).
        profile: the model's bundled profile (:func:`memloc.data.bundled_profile`), or None.
        frequencies, frequencies_note: unigram counts of the rare-token analysis and where they come from.
        tuned, dev_ids: the profile's dev-set-selected mask hyperparameters (Chang A.7) and the
            paragraph ids they were selected on (left out of DEL).
        random_tokens: held-out text for DEL's Rand-PPL (None: DEL measures none).
        cache: the content-addressed cache (None: ``cache_dir=None``), ``fingerprint`` the model's.
        data_key: digest of the data every stage depends on (pool, thresholds, frequencies, tuning).
        notes: lines for the report's Notes section.
    """

    model: Model
    settings: Settings
    result: ReproduceResult
    paragraphs: ParagraphSet | None
    non_memorized_max_em: int | None
    profile: BundledProfile | None
    frequencies: Tensor | None
    frequencies_note: str
    tuned: dict[str, dict]
    dev_ids: list[int]
    random_tokens: Tensor | None
    cache: ContentCache | None
    fingerprint: str
    data_key: str
    png: bool = True
    progress_bar: bool = True
    model_name: str = "model"
    quick: bool = False
    notes: list[str] = field(default_factory=list)
    png_error: str | None = None

    @property
    def out(self) -> Path:
        return self.result.out_dir

    @property
    def prefix_len(self) -> int:
        if self.paragraphs is None:
            raise ValueError("this run has no paragraphs")
        return self.paragraphs.prefix_len

    @property
    def score_cache(self) -> Path | None:
        """Where the benchmarks cache attribution scores (in the same content-addressed cache)."""
        return None if self.cache is None else self.cache.root / "scores"

    def device_tokens(self, tokens: Tensor) -> Tensor:
        """``tokens`` on the model's device (cached results come back on the CPU)."""
        return tokens.to(next(self.model.parameters()).device)

    def fig(self, stage: str, fig: Any, name: str) -> None:
        """Write a figure as HTML (and PNG unless disabled or impossible) and record it."""
        from ..plots import save

        paths: list[Path] = []
        if self.png and self.png_error is None:
            try:
                paths = save(fig, self.out / name)
            except Exception as exc:  # no Chromium / kaleido problem: keep the HTML
                self.png_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                logger.warning("PNG export failed (%s); writing HTML only (run `make browser` to install Chromium)",
                               self.png_error)
        if not paths:
            paths = save(fig, self.out / name, png=False)
        self.result.figures.setdefault(stage, []).extend(paths)

    def table(self, stage: str, df: pd.DataFrame, name: str, index: bool = False) -> None:
        """Write a CSV (floats with :data:`CSV_FLOAT_FORMAT`, byte-stable) and record it."""
        path = self.out / f"{name}.csv"
        df.to_csv(path, index=index, float_format=CSV_FLOAT_FORMAT)
        self.result.tables.setdefault(stage, []).append(path)


def check_stages(stages: Sequence[str] | None) -> list[str]:
    """The requested stages in pipeline order; ValueError for unknown names or an empty list."""
    names = list(STAGES) if stages is None else list(stages)
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {names}")
    return [s for s in STAGES if s in names]


def _check_inputs(model: Model, settings: Any, paragraphs: Any, frequencies: Any) -> None:
    if not isinstance(settings, Settings):
        raise ValueError(f"settings must be a memloc.reproduce.Settings, got {type(settings).__name__}")
    for name in ("n_mp", "n_nmp", "n_perturb", "n_finetune", "inj_n", "del_set_size", "del_targets", "n_patching",
                 "batch_size"):
        check_positive_int(getattr(settings, name), f"settings.{name}")
    if settings.stop_mask_mean is not None:
        check_number(settings.stop_mask_mean, "settings.stop_mask_mean", 0.0, 1.0, lo_open=True, hi_open=True,
                     what=" (a test-time mask mean, or None)")
    if paragraphs is not None and not isinstance(paragraphs, ParagraphSet):
        raise ValueError(f"paragraphs must be a memloc.data.ParagraphSet, got {type(paragraphs).__name__}")
    vocab = int(model.cfg.d_vocab)
    if frequencies is not None and (not isinstance(frequencies, Tensor) or frequencies.ndim != 1
                                    or len(frequencies) != vocab):
        raise ValueError(f"frequencies must be a 1-D tensor of {vocab} unigram counts, got "
                         f"{type(frequencies).__name__} {tuple(getattr(frequencies, 'shape', ()))}")



def _pool(model: Model, paragraphs: ParagraphSet | None, profile: BundledProfile | None,
          non_memorized_max_em: int | None, notes: list[str]) -> tuple[ParagraphSet | None, int | None]:
    """The paragraph pool and its NMP threshold (validated)."""
    if paragraphs is None and profile is not None:
        paragraphs, default_max = concat_paragraph_sets(profile.paragraph_sets), profile.non_memorized_max_em
        notes.append(f"paragraphs: {profile.note}")
    elif paragraphs is None and can_retokenize(model):
        from ..data import retokenized_paragraphs

        # e.g. SmolLM2 (49,152 tokens): the GPT-Neo memorized Pile paragraphs' texts re-encoded with
        # this model's tokenizer (heavily duplicated web text: the likeliest candidates it memorized)
        paragraphs, default_max = retokenized_paragraphs(model), 10
        notes.append(f"paragraphs: no bundled token set matches this model's vocabulary ({int(model.cfg.d_vocab)} "
                     f"tokens): the {paragraphs.notes['n_kept']} of {paragraphs.notes['n_source']} GPT-Neo-125M "
                     "memorized Pile paragraphs (Stoehr et al.) that are at least 100 tokens long under this model's "
                     "tokenizer, re-encoded with it; NMP: EM <= 10")
    elif paragraphs is None:
        notes.append(f"paragraphs: no bundled paragraph set fits this model's vocabulary ({int(model.cfg.d_vocab)} "
                     "tokens; bundled: the embedded model's 4096, GPT-2's 50257), so the stages that need paragraphs "
                     "are skipped; pass paragraphs= (a memloc.data.ParagraphSet tokenized for this model)")
        return None, None
    else:
        default_max = 10
        notes.append(f"paragraphs: {paragraphs.name} ({len(paragraphs)} paragraphs)")
    nmp_max_em = default_max if non_memorized_max_em is None else non_memorized_max_em
    T = paragraphs.tokens.shape[1] - paragraphs.prefix_len
    if isinstance(nmp_max_em, bool) or not isinstance(nmp_max_em, int) or not 0 <= nmp_max_em < T:
        raise ValueError(f"non_memorized_max_em must be an int in 0..{T - 1}, got {non_memorized_max_em!r}")
    check_tokens(model, paragraphs.tokens, paragraphs.prefix_len, name="paragraphs.tokens")
    return paragraphs, nmp_max_em


def _own_data(profile: BundledProfile | None, paragraphs: ParagraphSet | None) -> bool:
    """Whether the profile's shipped extras (counts, tuning, held-out text) belong to this pool."""
    return profile is not None and (paragraphs is None or paragraphs.tokenizer == profile.name)


def _frequencies(model: Model, profile: BundledProfile | None, paragraphs: ParagraphSet | None,
                 frequencies: Tensor | None) -> tuple[Tensor | None, str]:
    if frequencies is not None:
        return frequencies, "the given corpus frequencies"
    if _own_data(profile, paragraphs) and profile.corpus_counts:
        from ..data import unigram_counts

        return unigram_counts(profile.name), "corpus unigram counts of the embedded model's training stream"
    if paragraphs is None:
        return None, "no token frequencies"
    from ..heads import unigram_counts_from_tokens

    return (unigram_counts_from_tokens(paragraphs.tokens.cpu(), int(model.cfg.d_vocab)),
            "token frequencies counted from the paragraph pool (a stand-in: the training corpus counts are not bundled)")


def _tuning(profile: BundledProfile | None, paragraphs: ParagraphSet | None, stages: list[str],
            notes: list[str]) -> tuple[dict[str, dict], list[int]]:
    if not (_own_data(profile, paragraphs) and profile.tuned):
        return {}, []
    from ..data import tuned_hyperparameters, tuning_dev_ids

    tuned, dev_ids = tuned_hyperparameters(profile.name), tuning_dev_ids(profile.name)
    if {"inj", "del"} & set(stages):
        notes.append("SLIMMING / HARD CONCRETE hyperparameters: the embedded model's dev-set selection "
                     "(Chang et al. A.7, scripts/tune_tiny.py): " + "; ".join(
                         f"{m} " + ", ".join((f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}")
                                        for k, v in kw.items() if k not in ("max_steps", "stop_mask_mean"))
                         for m, kw in tuned.items())
                     + f"; the {len(dev_ids)} dev paragraphs are left out of the DEL set")
    return tuned, dev_ids


#: ``--quick`` leaves exact ZERO-OUT out of INJ/DEL above this many FFN neurons (GPT-Neo 125M's 36,864
#: keep it; SmolLM2-135M's 46,080 would spend ~6 CPU-minutes per INJ sequence on it alone).
QUICK_ZERO_OUT_MAX_NEURONS = 40_000


#: HARD CONCRETE's default ``mask_init`` (where its test-time mask starts), read from its signature.
_HC_MASK_INIT = inspect.signature(hard_concrete).parameters["mask_init"].default


def build_context(model: Model, out_dir: str | Path, *, settings: Settings, stages: list[str],
                  paragraphs: ParagraphSet | None, non_memorized_max_em: int | None, frequencies: Tensor | None,
                  cache_dir: str | Path | None, png: bool, model_name: str, progress_bar: bool,
                  quick: bool) -> RunContext:
    """Validate every input (ValueError before any work) and build the run's context."""
    _check_inputs(model, settings, paragraphs, frequencies)
    notes: list[str] = []
    n_neurons = int(model.cfg.n_layers) * int(model.cfg.d_mlp)
    if quick and "zero_out" in settings.methods and n_neurons > QUICK_ZERO_OUT_MAX_NEURONS:
        settings = dataclasses.replace(settings, methods=tuple(m for m in settings.methods if m != "zero_out"))
        notes.append(f"--quick: ZERO-OUT left out of INJ and DEL: exact ZERO-OUT runs one pass per neuron and this "
                     f"model has {n_neurons:,} FFN neurons (> {QUICK_ZERO_OUT_MAX_NEURONS:,}); Chang et al. skip it "
                     "for Pythia-6.9B too. Run without --quick to include it.")
    profile = bundled_profile(model)
    paragraphs, nmp_max_em = _pool(model, paragraphs, profile, non_memorized_max_em, notes)
    freq, freq_note = _frequencies(model, profile, paragraphs, frequencies)
    tuned, dev_ids = _tuning(profile, paragraphs, stages, notes)
    init = tuned.get("hard_concrete", {}).get("mask_init", _HC_MASK_INIT)
    if "hard_concrete" in settings.methods and (settings.stop_mask_mean or 0.0) >= init:
        raise ValueError(f"settings.stop_mask_mean ({settings.stop_mask_mean:g}) must be below HARD CONCRETE's "
                         f"mask_init ({init:g}), where its test-time mask starts, or None")
    if {"inj", "del"} & set(stages) and {"hard_concrete", "slimming"} & set(settings.methods):
        notes.append("SLIMMING / HARD CONCRETE mask trainings stop at the first check where the test-time mask "
                     + (f"averages <= {settings.stop_mask_mean:g} (Settings.stop_mask_mean, the library default; "
                        "None: the authors' sparsity criterion alone)" if settings.stop_mask_mean is not None else
                        "reaches the authors' sparsity criterion (Settings.stop_mask_mean=None)"))
    random_tokens = None
    if _own_data(profile, paragraphs) and profile.random_text:
        from ..data import random_sequences

        random_tokens = random_sequences(profile.name)[:32]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_key = digest(None if paragraphs is None else paragraphs.tokens.cpu(),
                      None if paragraphs is None else paragraphs.prefix_len, nmp_max_em,
                      None if freq is None else freq.cpu(), tuned, dev_ids,
                      None if random_tokens is None else random_tokens)
    cache = ContentCache(cache_dir) if cache_dir is not None else None
    return RunContext(model=model, settings=settings, result=ReproduceResult(out_dir=out, report=out / "REPORT.md"),
                      paragraphs=paragraphs, non_memorized_max_em=nmp_max_em, profile=profile, frequencies=freq,
                      frequencies_note=freq_note, tuned=tuned, dev_ids=dev_ids, random_tokens=random_tokens,
                      cache=cache, fingerprint=model_fingerprint(model) if cache is not None else "",
                      data_key=data_key, png=png, progress_bar=progress_bar, model_name=model_name, quick=quick,
                      notes=notes)
