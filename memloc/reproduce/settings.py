"""Sizes of every stage (:class:`Settings`, :data:`QUICK`, :data:`DEFAULT`) and what a run returns
(:class:`ReproduceResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..localize._masks import DEFAULT_STOP_MASK_MEAN

__all__ = ["STAGES", "Settings", "QUICK", "DEFAULT", "ReproduceResult", "CSV_FLOAT_FORMAT"]

#: Pipeline stages in order.
STAGES = ("memorization", "perturbation", "gradients", "contrastive", "finetune", "head", "rare_tokens", "inj",
          "del", "patching")

#: Floats in the written CSVs: 6 significant digits, so that a rerun writes the same bytes (the last
#: digits of float32 sums vary with batch composition and thread count).
CSV_FLOAT_FORMAT = "%.6g"


@dataclass(frozen=True)
class Settings:
    """Sizes of every stage (``QUICK`` / ``DEFAULT``; change with ``dataclasses.replace``).

    Attributes:
        max_paragraphs: paragraphs scored in the memorization stage (None: the whole set; else an
            evenly spaced subset).
        n_mp, n_nmp: MPs / NMPs used by the gradient, contrastive and head stages (paper: 50).
        n_perturb: MPs and NMPs each in the perturbation stage (every prefix position perturbed).
        perturb_samples: random replacement tokens per position.
        n_finetune: MPs unlearned/edited together; the KL batch has ``n_nmp`` NMPs.
        finetune_steps, finetune_fraction, finetune_lr: Stoehr Fig. 5 (10 steps, 0.1 % of weights).
        finetune_masks: masks compared (``top``, ``random``, ``all``).
        inj_n, inj_ratios, inj_max_steps: INJ sequences, injection ratios and step cap.
        del_set_size, del_targets, del_ratios: DEL memorized set, targets and dropout ratios.
        methods: localization methods of INJ and DEL.
        mask_steps: step cap of the SLIMMING / HARD CONCRETE mask training (None: the tuned
            model's value, see ``tuned_hyperparameters``, else 200).
        stop_mask_mean: the mask trainings of INJ and DEL stop once the test-time mask averages
            at most this (the library default 0.4, ``memloc.localize.DEFAULT_STOP_MASK_MEAN``),
            applied on top of the tuned λ / lr; None: only the authors' sparsity criterion, under
            which the tuned values were selected (the runs then take their whole ``max_steps``
            more often).  Measured on the embedded model's default run: INJ's mask trainings
            76 s → 24 s and DEL 207 s → 113 s, every INJ/DEL claim with the same verdict
            (``benchmarks/results/reproduce_mask_stop.txt``).
        ig_steps: integrated-gradients steps.
        n_patching: PMPs patched.
        batch_size: batch size of the forward passes.
    """

    max_paragraphs: int | None = None
    n_mp: int = 32
    n_nmp: int = 32
    n_perturb: int = 16
    perturb_samples: int = 1
    n_finetune: int = 16
    finetune_steps: int = 10
    finetune_fraction: float = 0.001
    finetune_lr: float = 1e-3
    finetune_masks: tuple[str, ...] = ("top", "random", "all")
    inj_n: int = 2
    inj_ratios: tuple[float, ...] = (0.01, 0.005)
    inj_max_steps: int = 300
    del_set_size: int = 40
    del_targets: int = 5
    del_ratios: tuple[float, ...] = (0.005, 0.02, 0.1)
    methods: tuple[str, ...] = ("hard_concrete", "slimming", "zero_out", "integrated_gradients", "activations",
                                "random")
    mask_steps: int | None = None
    stop_mask_mean: float | None = DEFAULT_STOP_MASK_MEAN
    ig_steps: int = 16
    n_patching: int = 16
    batch_size: int = 64

    def method_kwargs(self, tuned: dict[str, dict] | None = None) -> dict[str, dict]:
        """Per-method hyperparameters of INJ and DEL: ``tuned`` (the model's dev-set selection,
        Chang et al. A.7, e.g. :func:`memloc.data.tuned_hyperparameters`) under these sizes."""
        tuned = tuned or {}
        kw: dict[str, dict] = {}
        for m in self.methods:
            if m in ("hard_concrete", "slimming"):
                kw[m] = {"max_steps": 200, **tuned.get(m, {}), "progress_bar": False}
                if self.mask_steps is not None:
                    kw[m]["max_steps"] = self.mask_steps
                kw[m]["stop_mask_mean"] = self.stop_mask_mean
            elif m in ("integrated_gradients", "ig"):
                kw[m] = {"steps": self.ig_steps, "progress_bar": False}
            elif m == "zero_out":
                kw[m] = {"progress_bar": False}
        return kw


#: The default run: on the embedded model about 5 minutes on an idle 2-core machine (measured 2026-11-28: 5 min 06 s of
#: stages for ``make gallery``, see README "Gallery"; a shared VM whose host runs other guests is slower, and the last
#: console line then names the CPU steal); fine-tuning, INJ and DEL take three quarters of it.
DEFAULT = Settings()
#: ``--quick``: every stage, small sizes (measured on 2 CPU cores for the embedded model: 1 min 23 s on 2026-11-28,
#: 66 s of stages; 2 min 55 s to 3 min 36 s before the fused GELU and the mask-mean stop).
QUICK = Settings(max_paragraphs=160, n_mp=8, n_nmp=8, n_perturb=3, n_finetune=4, finetune_steps=3,
                 inj_n=1, inj_ratios=(0.01,), inj_max_steps=150, del_set_size=8, del_targets=2,
                 del_ratios=(0.02, 0.1), mask_steps=40, ig_steps=4, n_patching=4)


@dataclass
class ReproduceResult:
    """What :func:`memloc.reproduce.reproduce` did.

    Attributes:
        out_dir: output directory.
        report: path of ``REPORT.md``.
        findings: stage -> one-line finding (computed from the results).
        figures: stage -> written figure files (HTML and PNG).
        tables: stage -> written CSV files.
        skipped: stage -> reason (stages that did not run).
        timings: stage -> seconds.
        results: stage -> the stage's result object (``memloc.reproduce.stages.*``).
        summary: headline numbers (n MPs, memorization head, top methods, ...).
        claims: the claims ledger (:func:`memloc.reproduce.claims.claims_ledger`), also written
            as ``claims.csv``.
        cached: stages whose results were read from the cache.
        cpu_steal_percent: CPU steal of the machine during the run (percent of its CPU time the
            hypervisor gave to other guests; None where not reported), also in ``timings.json``.
    """

    out_dir: Path
    report: Path
    findings: dict[str, str] = field(default_factory=dict)
    figures: dict[str, list[Path]] = field(default_factory=dict)
    tables: dict[str, list[Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    claims: Any = None
    cached: list[str] = field(default_factory=list)
    cpu_steal_percent: float | None = None
