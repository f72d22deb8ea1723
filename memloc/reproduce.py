"""Reproduce the figures and tables of both papers end to end on one model (``memloc reproduce``).

Stages (each writes its figures as HTML + PNG, its tables as CSV, and one computed finding):

==================  =====================================================================
``memorization``    EM and NLL of every paragraph, the MP/NMP split (Stoehr §3.2, Fig. 2)
``perturbation``    prefix-token perturbation of one MP (Fig. 3 top), MP vs NMP (Fig. 3 bottom)
``gradients``       parameter gradients MP vs NMP (Fig. 4 top) and by EM bin (Fig. 9)
``contrastive``     contrastive-objective gradients, the top component (Fig. 4 bottom)
``finetune``        sparse unlearning and editing, top vs random vs all weights (Fig. 5)
``head``            the memorization head: value-activation gradients and first-token
                    attention of its layer (Fig. 6)
``rare_tokens``     attention per token-frequency rank and its correlation (Fig. 7)
``inj``             INJ benchmark, Recall@k% (Chang et al. Table 2)
``del``             DEL benchmark table and confusion matrix (Chang et al. Table 3, Fig. 2)
``patching``        two-way activation patching at the perturbed token (Stoehr Fig. 11)
==================  =====================================================================

The findings are collected in ``REPORT.md``.  Stage results are cached (pickles keyed by the
model's weights, the stage's settings and its inputs) under ``cache_dir``, so a rerun only
redraws the figures.  Stages that need memorized paragraphs (EM = T) are skipped, with a note
in the report, when the model memorized none (e.g. a random-weight model).

Paragraphs: the embedded model uses ``load_paragraphs("tiny")`` (NMP: EM <= 10).  A model with
GPT-2's vocabulary (GPT-Neo 125M) uses the bundled GPT-Neo sets ``gpt-neo-125m`` (EM = 50),
``-em30-49`` and ``-em11-29``; as no EM <= 10 set is bundled, its non-memorized group is the
paragraphs whose *measured* EM is <= 29 (the em11-29 set, mostly), which the report states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_positive_int, check_tokens
from ._progress import progress
from .borrow import borrowed
from .data import ParagraphSet, load_paragraphs

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "Settings", "QUICK", "DEFAULT", "ReproduceResult", "reproduce", "default_paragraphs",
           "select_groups"]

#: Pipeline stages in order.
STAGES = ("memorization", "perturbation", "gradients", "contrastive", "finetune", "head", "rare_tokens", "inj",
          "del", "patching")
#: Stages that cannot run without memorized paragraphs.
NEEDS_MP = ("contrastive", "finetune", "del", "patching")


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
            elif m in ("integrated_gradients", "ig"):
                kw[m] = {"steps": self.ig_steps, "progress_bar": False}
            elif m == "zero_out":
                kw[m] = {"progress_bar": False}
        return kw


#: The default run: on the embedded model about 13-22 minutes on 2 CPU cores (measured: 12 min 34 s on an idle
#: machine via `make demo`; 21 min 45 s wall clock on a machine shared with other jobs); INJ and DEL take about
#: half of it.
DEFAULT = Settings()
#: ``--quick``: every stage, small sizes (measured 2 min 55 s to 3 min 36 s on 2 CPU cores for the embedded model).
QUICK = Settings(max_paragraphs=160, n_mp=8, n_nmp=8, n_perturb=3, n_finetune=4, finetune_steps=3,
                 inj_n=1, inj_ratios=(0.01,), inj_max_steps=150, del_set_size=8, del_targets=2,
                 del_ratios=(0.02, 0.1), mask_steps=40, ig_steps=4, n_patching=4)


#: ``--quick`` leaves exact ZERO-OUT out of INJ/DEL above this many FFN neurons (GPT-Neo 125M: 36,864
#: keep it; SmolLM2-135M: 46,080 would spend ~6 CPU-minutes per INJ sequence on it alone).
QUICK_ZERO_OUT_MAX_NEURONS = 40_000


@dataclass
class ReproduceResult:
    """What :func:`reproduce` did.

    Attributes:
        out_dir: output directory.
        report: path of ``REPORT.md``.
        findings: stage -> one-line finding (computed from the results).
        figures: stage -> written figure files (HTML and PNG).
        tables: stage -> written CSV files.
        skipped: stage -> reason (stages that did not run).
        timings: stage -> seconds.
        results: stage -> the raw results (DataFrames, ...).
        summary: headline numbers (n MPs, memorization head, top methods, ...).
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


# ------------------------------------------------------------------------------------ paragraphs

def _concat_sets(names: Sequence[str]) -> ParagraphSet:
    sets = [load_paragraphs(n) for n in names]
    tables = []
    for s in sets:
        t = s.table.copy()
        t.insert(0, "set", s.name)
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    table["set_id"] = table["id"]
    table["id"] = np.arange(len(table))
    return ParagraphSet("+".join(names), torch.cat([s.tokens for s in sets]), sets[0].prefix_len, table,
                        sets[0].tokenizer)


def default_paragraphs(model: Any) -> tuple[ParagraphSet, int, str]:
    """The bundled paragraphs for ``model``, chosen by its vocabulary size.

    Returns ``(paragraphs, non_memorized_max_em, note)``: the embedded model's set (vocabulary
    4096; NMP = EM <= 10) or, for GPT-2-vocabulary models such as GPT-Neo 125M (50257), the
    three GPT-Neo sets EM = 50, 30-49 and 11-29 concatenated (NMP = measured EM <= 29, as no
    EM <= 10 set is bundled); for any other vocabulary, if the model has a tokenizer, the
    GPT-Neo memorized paragraphs' texts re-encoded with it (:func:`memloc.data.retokenized_paragraphs`,
    NMP = EM <= 10).

    Raises:
        ValueError: for other vocabularies without a tokenizer (pass ``paragraphs=`` to :func:`reproduce`).
    """
    vocab = int(model.cfg.d_vocab)
    if vocab == 4096:
        return load_paragraphs("tiny"), 10, "embedded paragraph set (600 paragraphs; NMP: EM <= 10)"
    if vocab in (50257, 50304):
        ps = _concat_sets(["gpt-neo-125m", "gpt-neo-125m-em30-49", "gpt-neo-125m-em11-29"])
        return ps, 29, ("GPT-Neo-125M paragraph sets of Stoehr et al. (EM 50, 30-49, 11-29 as measured on the "
                        "original model); no EM <= 10 set is bundled, so NMP = measured EM <= 29")
    if getattr(model, "tokenizer", None) is not None:  # e.g. SmolLM2 (49,152): re-encode the GPT-Neo texts
        from .data import retokenized_paragraphs

        ps = retokenized_paragraphs(model)
        return ps, 10, (f"no bundled token set matches a vocabulary of {vocab}: the {ps.notes['n_kept']} of "
                        f"{ps.notes['n_source']} GPT-Neo-125M memorized Pile paragraphs (Stoehr et al.) that are at "
                        "least 100 tokens long under this model's tokenizer, re-encoded with it; NMP: EM <= 10")
    raise ValueError(f"no bundled paragraph set matches a vocabulary of {vocab} tokens (the embedded model has 4096, "
                     "GPT-2/GPT-Neo 50257) and the model has no tokenizer to re-encode paragraph texts; pass "
                     "paragraphs= (a memloc.data.ParagraphSet)")


def _subset_evenly(n: int, k: int | None) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def select_groups(df: pd.DataFrame, n_mp: int, n_nmp: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of up to ``n_mp`` memorized and ``n_nmp`` non-memorized paragraphs of a
    memorization table with a ``split`` column (evenly spaced over each group, deterministic)."""
    if "split" not in df:
        raise ValueError("df must have a 'split' column (memloc.split_memorization)")
    mp = np.flatnonzero((df["split"] == "memorized").to_numpy())
    nmp = np.flatnonzero((df["split"] == "non-memorized").to_numpy())
    return mp[_subset_evenly(len(mp), n_mp)], nmp[_subset_evenly(len(nmp), n_nmp)]


# ------------------------------------------------------------------------------------ caching

def _hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        if isinstance(p, Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


class _Cache:
    def __init__(self, cache_dir: str | Path | None, fingerprint: str) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.fingerprint = fingerprint
        self.hits: set[str] = set()

    def get(self, stage: str, key: str, compute: Callable[[], Any]) -> Any:
        if self.dir is None:
            return compute()
        path = self.dir / "reproduce" / f"{stage}-{_hash(self.fingerprint, stage, key)}.pkl"
        if path.exists():
            try:
                with open(path, "rb") as f:
                    value = pickle.load(f)
                self.hits.add(stage)
                return value
            except Exception as exc:  # truncated / incompatible: recompute
                logger.warning("could not read cache %s (%s); recomputing", path, exc)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(value, f)
        tmp.replace(path)
        return value


# ------------------------------------------------------------------------------------ the pipeline

class _Run:
    def __init__(self, model: Any, out: Path, settings: Settings, cache: _Cache, png: bool, progress_bar: bool,
                 result: ReproduceResult, score_cache: Path | None) -> None:
        self.model, self.out, self.s, self.cache, self.png = model, out, settings, cache, png
        self.pb, self.r, self.score_cache = progress_bar, result, score_cache
        self.png_error: str | None = None
        self.tuned: dict[str, dict] = {}

    # output helpers
    def fig(self, stage: str, fig: Any, name: str) -> None:
        from .plots import save

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
        self.r.figures.setdefault(stage, []).extend(paths)

    def table(self, stage: str, df: pd.DataFrame, name: str, index: bool = False) -> None:
        path = self.out / f"{name}.csv"
        df.to_csv(path, index=index)
        self.r.tables.setdefault(stage, []).append(path)


def _ranking(values: pd.Series, *, ascending: bool, fmt: str) -> str:
    """``a 80 = b 80 > c 78``: methods in order, ties (equal after formatting) joined by ``=``."""
    v = values.sort_values(ascending=ascending, kind="stable")
    out, prev = "", None
    sep = " < " if ascending else " > "
    for name, x in v.items():
        txt = fmt.format(x)
        out += ("" if prev is None else (" = " if txt == prev else sep)) + f"{name} {txt}"
        prev = txt
    return out


def _tied_best(values: pd.Series, *, ascending: bool, fmt: str) -> list[str]:
    """Names of the best entries (all that tie with the best after formatting)."""
    v = values.sort_values(ascending=ascending, kind="stable")
    top = fmt.format(v.iloc[0])
    return [str(n) for n, x in v.items() if fmt.format(x) == top]


def _fmt_head(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def _stage_memorization(run: _Run, ps: ParagraphSet, nmp_max_em: int) -> pd.DataFrame:
    from .metrics import memorization, split_memorization
    from .plots import memorization_scatter

    s = run.s
    idx = _subset_evenly(len(ps), s.max_paragraphs)
    sub = ps.subset(torch.as_tensor(idx))
    counts = sub.table["count"].to_numpy() if "count" in sub.table and sub.table["count"].notna().all() else None
    T = sub.tokens.shape[1] - sub.prefix_len

    def compute():
        return memorization(run.model, sub.tokens, sub.prefix_len, counts=counts, batch_size=s.batch_size,
                            progress_bar=run.pb)

    df = run.cache.get("memorization", _hash(sub.tokens, s.batch_size), compute).copy()
    df["id"] = sub.table["id"].to_numpy()
    for col in ("set", "seen"):
        if col in sub.table:
            df[col] = sub.table[col].to_numpy()
    df["split"] = split_memorization(df, memorized_min_em=T, non_memorized_max_em=nmp_max_em)
    run.table("memorization", df, "memorization")
    run.fig("memorization", memorization_scatter(df), "fig2_memorization_split")
    if "count" in df:
        run.fig("memorization", memorization_scatter(df, color="count"), "fig2_memorization_by_count")
    n = df["split"].value_counts()
    run.r.summary.update(n_paragraphs=len(df), n_mp=int(n.get("memorized", 0)), n_nmp=int(n.get("non-memorized", 0)),
                         n_partial=int(n.get("partial", 0)))
    msg = (f"{len(df)} paragraphs: {n.get('memorized', 0)} memorized (EM = {T}), {n.get('non-memorized', 0)} "
           f"non-memorized (EM <= {nmp_max_em}), {n.get('partial', 0)} partial; mean NLL "
           + " vs ".join(f"{df.loc[df.split == sp, 'nll'].mean():.3f} ({lab})"
                         for sp, lab in (("memorized", "MP"), ("non-memorized", "NMP")) if n.get(sp, 0)))
    if "count" in df and (df["count"] > 0).sum() > 2:
        seen = df[df["count"] > 0]
        rho = seen[["em", "count"]].corr(method="spearman").iloc[0, 1]
        msg += f"; Spearman(EM, duplication count) = {rho:.2f} over the {len(seen)} seen paragraphs"
    run.r.findings["memorization"] = msg
    return df


def _stage_perturbation(run: _Run, tokens: Tensor, prefix_len: int, mp_rows: np.ndarray, nmp_rows: np.ndarray,
                        mem: pd.DataFrame):
    from .perturb import em_drop_by_position, make_pmps, perturbation_profile
    from .plots import perturbation_bars, perturbation_by_position, token_labels

    s = run.s
    mp = mp_rows[:s.n_perturb]
    nmp = nmp_rows[:s.n_perturb]
    rows = np.concatenate([mp, nmp])
    x = tokens[torch.as_tensor(rows)]
    res = run.cache.get("perturbation", _hash(x, prefix_len, s.perturb_samples, s.batch_size),
                        lambda: perturbation_profile(run.model, x, prefix_len, n_samples=s.perturb_samples, seed=0,
                                                     batch_size=s.batch_size, progress_bar=run.pb))
    labels = ["memorized"] * len(mp) + ["non-memorized"] * len(nmp)
    by_pos = em_drop_by_position(res.profile, labels)
    run.table("perturbation", res.profile.assign(group=res.profile["paragraph"].map(dict(enumerate(labels)))),
              "perturbation_profile")
    run.table("perturbation", by_pos, "perturbation_by_position")
    run.fig("perturbation", perturbation_by_position(
        by_pos, title="EM drop per perturbed prefix position, MP vs NMP (Stoehr Fig. 3 bottom)<br><sup>"
                      "EM against the model's own unperturbed continuation</sup>"), "fig3_perturbation_mp_vs_nmp")
    mean = by_pos.groupby("group")["mean"].mean()
    msg = ("mean EM drop per single-token perturbation: "
           + ", ".join(f"{g} {v:.1f}" for g, v in mean.items()))
    pmps = None
    if len(mp):
        prof0 = res.profile[res.profile["paragraph"] == 0]
        ids = x[0, :prefix_len].tolist()
        lab = token_labels(run.model, ids) if getattr(run.model, "tokenizer", None) is not None else None
        run.fig("perturbation", perturbation_bars(
            prof0, lab, title=f"Perturbing each prefix token of MP {int(mem.iloc[mp[0]]['id'])} (Stoehr Fig. 3 top)"),
            "fig3_perturbation_one_mp")
        top = prof0.sort_values("em_drop_mean", ascending=False).iloc[0]
        tok = repr(lab[int(top.position)]) if lab else f"id {int(top.original_token)}"
        msg += (f"; in MP {int(mem.iloc[mp[0]]['id'])} the most disruptive prefix token is position "
                f"{int(top.position)} ({tok}, EM drop {top.em_drop_mean:.0f}), and "
                f"{(prof0.em_drop_mean > 0).sum()} of {len(prof0)} positions change the continuation")
        pmps = make_pmps(run.model, x[:len(mp)], prefix_len, result=_slice_result(res, len(mp)),
                         progress_bar=False)
        if len(pmps):
            run.table("perturbation", pmps.table, "pmps")
            msg += f"; {len(pmps)} PMPs built (mean EM drop {pmps.em_drop.float().mean():.1f})"
    run.r.findings["perturbation"] = msg
    return res, pmps


def _slice_result(res: Any, n: int) -> Any:
    """The PerturbationResult restricted to its first ``n`` paragraphs (the MPs)."""
    keep = lambda df: df[df["paragraph"] < n].reset_index(drop=True)  # noqa: E731
    return dataclasses.replace(res, samples=keep(res.samples), profile=keep(res.profile), clean=keep(res.clean),
                               clean_generation=res.clean_generation[:n], generations=res.generations[:n],
                               replacements=res.replacements[:n])


def _stage_gradients(run: _Run, tokens: Tensor, prefix_len: int, mem: pd.DataFrame, mp_rows, nmp_rows):
    from .gradients import attention_mlp_totals, em_bins, parameter_gradients_by_group
    from .plots import attention_vs_mlp_totals, gradient_heatmaps_by_group

    s = run.s
    rows = np.concatenate([mp_rows, nmp_rows])
    labels = ["MP"] * len(mp_rows) + ["NMP"] * len(nmp_rows)
    x = tokens[torch.as_tensor(rows)]
    g = run.cache.get("gradients_split", _hash(x, labels),
                      lambda: parameter_gradients_by_group(run.model, x, prefix_len, labels, pooling="max",
                                                           batch_size=8, progress_bar=run.pb))
    run.table("gradients", g, "param_gradients_mp_vs_nmp")
    run.fig("gradients", gradient_heatmaps_by_group(
        g, title="Parameter gradient attribution (max |grad|), MP vs NMP (Stoehr Fig. 4 top)"),
        "fig4_param_gradients_mp_vs_nmp")
    # Fig. 9: EM bins, absolute gradient sums
    T = tokens.shape[1] - prefix_len
    bins = em_bins(mem["em"], ((0, 10), (11, 29), (30, T - 1), (T, T)))
    bin_rows = np.concatenate([np.flatnonzero((bins == b).to_numpy())[:s.n_mp] for b in pd.unique(bins.dropna())])
    bin_rows.sort()
    xb = tokens[torch.as_tensor(bin_rows)]
    lb = list(bins.iloc[bin_rows])
    gb = run.cache.get("gradients_bins", _hash(xb, lb),
                       lambda: parameter_gradients_by_group(run.model, xb, prefix_len, lb, pooling="sum",
                                                            batch_size=8, progress_bar=run.pb))
    order = [b for b in ("0-10", "11-29", f"30-{T - 1}", str(T)) if b in set(gb["group"])]
    gb = gb.set_index("group").loc[order].reset_index()
    run.table("gradients", gb, "param_gradients_em_bins")
    run.fig("gradients", gradient_heatmaps_by_group(
        gb, title="Parameter gradients (sum |grad|) by EM bin (Stoehr Fig. 9)"), "fig9_param_gradients_em_bins")
    tot = attention_mlp_totals(gb, by=["group"])
    run.table("gradients", tot, "attention_vs_mlp_totals")
    run.fig("gradients", attention_vs_mlp_totals(tot, "group", title="Attention vs MLP gradient totals per layer "
                                                 "by EM bin (Stoehr Fig. 9)"), "fig9_attention_vs_mlp")
    msg = ""
    if {"MP", "NMP"} <= set(g["group"]):
        m = g.groupby(["group", "block"])["value"].mean().unstack("block")
        lay = g.groupby(["group", "layer"])["value"].mean().unstack("layer")
        ratio = (lay.loc["NMP"] / lay.loc["MP"])
        msg = (f"NMP/MP ratio of the mean max-|grad| score per layer: "
               + ", ".join(f"L{l} {v:.2f}" for l, v in ratio.items())
               + f" (attention MP {m.loc['MP', 'attn']:.3g} vs NMP {m.loc['NMP', 'attn']:.3g}; "
               f"MLP MP {m.loc['MP', 'mlp']:.3g} vs NMP {m.loc['NMP', 'mlp']:.3g})")
    else:
        msg = f"only groups {sorted(set(g['group']))} exist on this model"
    shares = tot.pivot_table(index="group", columns="block", values="total", aggfunc="sum")
    shares = (shares["attn"] / shares.sum(axis=1)).reindex(order)
    msg += "; attention share of the summed |grad| by EM bin: " + ", ".join(f"{b} {v:.2f}" for b, v in shares.items())
    run.r.findings["gradients"] = msg


def _stage_contrastive(run: _Run, mp: Tensor, nmp: Tensor, prefix_len: int) -> pd.DataFrame:
    from .contrastive import contrastive_gradients, top_components
    from .plots import gradient_heatmap

    c = run.cache.get("contrastive", _hash(mp, nmp),
                      lambda: contrastive_gradients(run.model, mp, nmp, prefix_len,
                                                    n_nmp_per_batch=min(8, len(nmp)), seed=0, progress_bar=run.pb))
    run.table("contrastive", c, "contrastive_gradients")
    run.fig("contrastive", gradient_heatmap(
        c, title="Contrastive-objective (CO↓) gradient attribution (Stoehr Fig. 4 bottom)"),
        "fig4_contrastive_gradients")
    top = top_components(c, 3)
    t0 = top.iloc[0]
    name = f"L{int(t0.layer)} {t0.component}" + (f" head {int(t0['head'])}" if t0['head'] >= 0 else "")
    wv = c[c.component == "W_V"].sort_values("value", ascending=False).iloc[0]
    run.r.summary.update(top_contrastive=name, top_wv_head=_fmt_head(wv.layer, wv['head']))
    run.r.findings["contrastive"] = (
        f"top component of the contrastive gradient: {name} ({t0.value:.3g}); next: "
        + ", ".join(f"L{int(r.layer)} {r.label}" for r in top.iloc[1:].itertuples())
        + f"; most salient value matrix W_V: {_fmt_head(wv.layer, wv['head'])} (the paper: L1 W_V head 2)")
    return c


def _stage_finetune(run: _Run, mp: Tensor, nmp: Tensor, prefix_len: int, pmps: Any) -> None:
    from .contrastive import sparse_finetune
    from .plots import finetune_trajectories

    s = run.s
    frames = []
    jobs = [("unlearn", m) for m in s.finetune_masks]
    edit_targets = None
    if pmps is not None and len(pmps) > 0:
        n_edit = min(len(pmps), s.n_finetune)
        edit_mp = pmps.original[:n_edit].to(mp.device)
        edit_targets = pmps.perturbed[:n_edit, prefix_len:].to(mp.device)
        jobs += [("edit", m) for m in s.finetune_masks]
    for objective, mask in progress(jobs, enabled=run.pb, desc="sparse fine-tuning", total=len(jobs)):
        x = mp if objective == "unlearn" else edit_mp
        tgt = None if objective == "unlearn" else edit_targets
        key = _hash(x, nmp, objective, mask, s.finetune_steps, s.finetune_fraction, s.finetune_lr,
                    None if tgt is None else tgt)
        df = run.cache.get("finetune", key, lambda: sparse_finetune(
            run.model, x, nmp, prefix_len, objective=objective, mask=mask, fraction=s.finetune_fraction,
            steps=s.finetune_steps, lr=s.finetune_lr, seed=0, edit_targets=tgt, batch_size=s.batch_size,
            progress_bar=False))
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    run.table("finetune", df, "sparse_finetune")
    run.fig("finetune", finetune_trajectories(df), "fig5_sparse_unlearning_editing")
    last = df[df["step"] == df["step"].max()]
    first = df[df["step"] == 0]
    parts = []
    for objective in ("unlearn", "edit"):
        for mask in s.finetune_masks:
            d = last[(last.objective == objective) & (last["mask"] == mask)]
            d0 = first[(first.objective == objective) & (first["mask"] == mask)]
            if d.empty:
                continue
            mp_em = d[d.split == "memorized"]["em"].mean()
            mp_em0 = d0[d0.split == "memorized"]["em"].mean()
            nmp_em = d[d.split == "non-memorized"]["em"].mean()
            nmp_em0 = d0[d0.split == "non-memorized"]["em"].mean()
            txt = f"{objective}/{mask}: MP EM {mp_em0:.0f}→{mp_em:.1f}, NMP EM {nmp_em0:.0f}→{nmp_em:.1f}"
            if objective == "unlearn" and mask == s.finetune_masks[0]:
                txt = txt.replace("NMP EM", "NMP EM (vs. their original continuation)")
            if objective == "edit" and "edit_em" in d:
                txt += f", edit-target EM {d0[d0.split == 'memorized']['edit_em'].mean():.1f}→" \
                       f"{d[d.split == 'memorized']['edit_em'].mean():.1f}"
            parts.append(txt)
    n_steps = int(df["step"].max())
    run.r.findings["finetune"] = f"after {n_steps} Adam steps on {s.finetune_fraction:.1%} (top/random) or all " \
                                 "weights: " + "; ".join(parts)
    T = mp.shape[1] - prefix_len
    parts = []
    for mask in s.finetune_masks:
        u = last[(last.objective == "unlearn") & (last["mask"] == mask) & (last.split == "memorized")]
        e = last[(last.objective == "edit") & (last["mask"] == mask) & (last.split == "memorized")]
        txt = f"{mask}: unlearning leaves MP EM {u['em'].mean():.1f}/{T}" if not u.empty else f"{mask}:"
        if not e.empty and "edit_em" in e:
            txt += f", editing reaches edit-target EM {e['edit_em'].mean():.1f}/{T}"
        parts.append(txt)
    run.r.summary["unlearn_vs_edit"] = "; ".join(parts)


def _stage_head(run: _Run, mp: Tensor, nmp: Tensor, prefix_len: int, contrastive: pd.DataFrame | None,
                frequencies: Tensor) -> tuple[int, int]:
    from .gradients import activation_gradients
    from .heads import find_memorization_heads, first_token_attention
    from .plots import head_token_heatmaps, token_labels

    s = run.s
    a_mp = run.cache.get("head_act_mp", _hash(mp), lambda: activation_gradients(
        run.model, mp, prefix_len, components=["v"], batch_size=8, progress_bar=run.pb))
    a_nmp = run.cache.get("head_act_nmp", _hash(nmp), lambda: activation_gradients(
        run.model, nmp, prefix_len, components=["v"], batch_size=8, progress_bar=run.pb))
    evidence = ["activation", "rare"] + (["contrastive"] if contrastive is not None else [])
    heads = find_memorization_heads(run.model, mp, nmp, prefix_len, frequencies=frequencies, evidence=evidence,
                                    contrastive=contrastive, activation_memorized=a_mp,
                                    activation_nonmemorized=a_nmp, batch_size=s.batch_size, progress_bar=run.pb)
    run.table("head", heads, "memorization_heads")
    best = heads.iloc[0]
    layer, head = int(best.layer), int(best['head'])
    # Fig. 6 for the first MP (or first paragraph): value gradients [head, position] and attention
    grads = a_mp[(a_mp.paragraph == 0) & (a_mp.layer == layer) & (a_mp.position < prefix_len)]
    att = first_token_attention(run.model, mp[:1], prefix_len, layer=layer, progress_bar=False)[0]
    gmat = grads.pivot_table(index="head", columns="position", values="value").to_numpy()
    labels = token_labels(run.model, mp[0, :prefix_len].tolist()) if getattr(run.model, "tokenizer", None) else None
    fig = head_token_heatmaps({f"value-activation gradients, layer {layer}": gmat,
                               f"attention of the first decoded token, layer {layer}": att},
                              labels, title=f"Layer {layer}: gradients and attention per head; memorization head "
                                            f"{_fmt_head(layer, head)} (Stoehr Fig. 6)")
    run.fig("head", fig, "fig6_memorization_head_layer")
    run.r.summary["memorization_head"] = _fmt_head(layer, head)
    ev = ", ".join(f"{k} rank {int(best[f'rank_{k}'])}" for k in evidence)
    run.r.findings["head"] = (f"memorization head (combined rank of {', '.join(evidence)} evidence): "
                              f"{_fmt_head(layer, head)} ({ev}); its value-gradient MP/NMP ratio "
                              f"{best.activation_ratio:.2f}, rare-token correlation {best.rare_corr:.2f}; "
                              f"runner-up {_fmt_head(heads.iloc[1].layer, heads.iloc[1]['head'])}")
    return layer, head


def _stage_rare(run: _Run, x: Tensor, prefix_len: int, frequencies: Tensor, highlight: tuple[int, int] | None,
                freq_note: str) -> None:
    from .heads import rare_token_attention, rare_token_correlation
    from .plots import rank_attention

    ranks = run.cache.get("rare_tokens", _hash(x, frequencies), lambda: rare_token_attention(
        run.model, x, prefix_len, frequencies, batch_size=run.s.batch_size, progress_bar=run.pb))
    corr = rare_token_correlation(ranks)
    run.table("rare_tokens", ranks, "rare_token_attention")
    run.table("rare_tokens", corr, "rare_token_correlation")
    low = corr.sort_values("correlation").iloc[0]
    if highlight is None:
        highlight = (int(low.layer), int(low['head']))
    run.fig("rare_tokens", rank_attention(ranks, highlight, correlations=corr,
                                          title="First-token attention per token-frequency rank (Stoehr Fig. 7)"),
            "fig7_rare_token_attention")
    hl = corr[(corr.layer == highlight[0]) & (corr["head"] == highlight[1])].iloc[0]
    run.r.findings["rare_tokens"] = (
        f"most rare-token-focused head: {_fmt_head(low.layer, low['head'])} (r = {low.correlation:.2f}); the "
        f"memorization head {_fmt_head(*highlight)} has r = {hl.correlation:.2f} (the paper: -0.97 for L1H2); "
        f"median over heads {corr.correlation.median():.2f}; {len(x)} paragraphs, {freq_note}")


def _stage_inj(run: _Run) -> None:
    from .benchmarks import inj_benchmark, inj_table
    from .plots import inj_recall_bars

    s = run.s
    kwargs = s.method_kwargs(run.tuned)
    df = run.cache.get("inj", _hash(list(s.methods), kwargs, s.inj_n, list(s.inj_ratios), s.inj_max_steps),
                       lambda: inj_benchmark(run.model, list(s.methods), n=s.inj_n, ratios=list(s.inj_ratios),
                                             method_kwargs=kwargs, max_steps=s.inj_max_steps,
                                             cache_dir=run.score_cache, progress_bar=run.pb))
    t = inj_table(df)
    run.table("inj", t, "inj_table2", index=True)
    run.table("inj", inj_table(df, selection="across_layers"), "inj_table6_across_layers", index=True)
    run.fig("inj", inj_recall_bars(df, title="INJ benchmark: Recall@k% of injected neurons, top-k per layer "
                                             "(Chang et al. Table 2)"), "table2_inj_recall")
    r = max(s.inj_ratios)
    col = t.columns[0]
    rank = t.loc[r][col].sort_values(ascending=False)
    conv = df.drop_duplicates(["seq_id", "ratio"])["inj_converged"]
    run.r.summary["inj_best"] = " = ".join(_tied_best(rank, ascending=False, fmt="{:.0f}")) + f" ({rank.iloc[0]:.0f})"
    run.r.findings["inj"] = (f"{df.seq_id.nunique()} ECBD sequences injected ({int(conv.sum())}/{len(conv)} "
                             f"injections reached loss < 0.05); Recall@{r * 100:g}% (x100, top-k per layer): "
                             + _ranking(rank, ascending=False, fmt="{:.0f}"))


def _stage_del(run: _Run, tokens: Tensor, prefix_len: int, ids: list) -> None:
    from .benchmarks import del_benchmark, del_table
    from .plots import del_confusion_heatmap, del_table_figure

    s = run.s
    kwargs = s.method_kwargs(run.tuned)
    random_tokens = None
    if int(run.model.cfg.d_vocab) == 4096:
        from .data import random_sequences

        random_tokens = random_sequences("tiny")[:32]
    res = run.cache.get("del", _hash(tokens, list(s.methods), kwargs, s.del_targets, list(s.del_ratios)),
                        lambda: del_benchmark(run.model, list(s.methods), tokens, prefix_len, ids=ids,
                                              n_targets=s.del_targets, ratios=list(s.del_ratios),
                                              method_kwargs=kwargs, random_tokens=random_tokens,
                                              batch_size=s.batch_size, cache_dir=run.score_cache,
                                              progress_bar=run.pb))
    t = del_table(res)
    flat = t.copy()
    flat.columns = [f"{m} @{r:g}" for m, r in flat.columns]
    run.table("del", flat, "del_table3", index=True)
    run.table("del", res.confusion_long(), "del_confusion")
    table_fig = del_table_figure(t, title="DEL benchmark (Chang et al. Table 3)")
    table_fig.update_layout(height=220 + 50 * len(t))  # room for wrapped method names
    run.fig("del", table_fig, "table3_del")
    r = max(s.del_ratios)
    best = t[("ΔSelf-Acc %", r)].sort_values()
    # the paper's Fig. 2 shows the strongest method's confusion matrix
    run.fig("del", del_confusion_heatmap(res.matrices[(best.index[0], r)], title=(
        f"DEL confusion (Chang et al. Fig. 2): {best.index[0]}, {r * 100:g}% of the neurons per layer<br><sup>rows: "
        "the target whose located neurons are dropped; columns: ΔAcc of every memorized sequence</sup>")),
        "fig2_del_confusion")
    neg = t[("ΔNeg-Acc %", r)]
    run.r.summary["del_best"] = " = ".join(_tied_best(best, ascending=True, fmt="{:+.1f}")) + \
        f" (ΔSelf-Acc {best.iloc[0]:+.1f}% at {r * 100:g}% per layer)"
    msg = (f"{len(res.ids)} memorized sequences, {res.rows.target_id.nunique()} targets; dropping {r * 100:g}% of "
           f"the neurons per layer, ΔSelf-Acc (%): " + _ranking(best, ascending=True, fmt="{:+.1f}")
           + f"; ΔNeg-Acc of {best.index[0]}: {neg[best.index[0]]:+.1f}%")
    if best.abs().max() < 0.05:
        msg += " — no method's dropout changes the memorized continuations at this ratio"
    for ratio in s.del_ratios:
        if ratio != r:
            msg += f"; at {ratio * 100:g}% the largest ΔSelf-Acc is {t[('ΔSelf-Acc %', ratio)].min():+.1f}%"
    run.r.findings["del"] = msg


def _stage_patching(run: _Run, pmps: Any, prefix_len: int) -> None:
    from .patching import activation_patching
    from .plots import patching_heatmap

    n = min(len(pmps), run.s.n_patching)
    args = (pmps.original[:n], pmps.perturbed[:n], pmps.position[:n], pmps.first_impacted[:n])
    df = run.cache.get("patching", _hash(*args), lambda: activation_patching(
        run.model, *args, prefix_len, components=("resid_pre", "attn_out", "mlp_out", "z"),
        batch_size=run.s.batch_size, progress_bar=run.pb))
    run.table("patching", df, "activation_patching")
    run.fig("patching", patching_heatmap(df), "fig11_activation_patching")
    m = df[df.component != "resid_pre"].groupby(["direction", "layer", "component", "head"])["value"].mean()
    parts = []
    for d in m.index.get_level_values(0).unique():
        top = m.loc[d].sort_values(ascending=False)
        (l, c, h), v = top.index[0], top.iloc[0]
        parts.append(f"{d}: largest NLL increase from L{l} {c}{'' if h < 0 else f' H{h}'} ({v:+.2f})")
    run.r.findings["patching"] = f"{n} PMPs; " + "; ".join(parts)


# ------------------------------------------------------------------------------------ report

_TITLES = {
    "memorization": "Memorized vs non-memorized paragraphs (Stoehr et al. Fig. 2)",
    "perturbation": "Prefix-token perturbation (Stoehr et al. Fig. 3)",
    "gradients": "Parameter gradients, MP vs NMP and EM bins (Stoehr et al. Fig. 4 top, Fig. 9)",
    "contrastive": "Contrastive-objective gradients (Stoehr et al. Fig. 4 bottom)",
    "finetune": "Sparse unlearning and editing (Stoehr et al. Fig. 5)",
    "head": "The memorization head: activation gradients and attention (Stoehr et al. Fig. 6)",
    "rare_tokens": "Rare-token attention (Stoehr et al. Fig. 7)",
    "inj": "INJ benchmark (Chang et al. Table 2)",
    "del": "DEL benchmark (Chang et al. Table 3, Fig. 2)",
    "patching": "Activation patching (Stoehr et al. Fig. 11)",
}


def _write_report(r: ReproduceResult, model_name: str, settings: Settings, notes: list[str], quick: bool) -> None:
    lines = [f"# memloc reproduce: {model_name}", "",
             f"Generated by `memloc reproduce --model {model_name}{' --quick' if quick else ''}`; every sentence "
             "below is computed from this run's results.", ""]
    s = r.summary
    head = [f"- paragraphs: {s.get('n_paragraphs', '?')} ({s.get('n_mp', '?')} MPs, {s.get('n_nmp', '?')} NMPs)"]
    for key, label in (("memorization_head", "memorization head"), ("top_contrastive", "top contrastive component"),
                       ("inj_best", "best INJ method (Recall@r, per layer)"),
                       ("del_best", "best DEL method (largest ΔSelf-Acc drop)"), ("unlearn_vs_edit", "unlearning vs editing")):
        if key in s:
            head.append(f"- {label}: {s[key]}")
    lines += ["## Headline", ""] + head + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for stage in STAGES:
        lines += [f"## {_TITLES[stage]}", ""]
        if stage in r.skipped:
            lines += [f"*Skipped:* {r.skipped[stage]}", ""]
            continue
        if stage in r.findings:
            lines += [f"**Finding:** {r.findings[stage]}", ""]
        for p in r.figures.get(stage, []):
            if p.suffix == ".png":
                lines += [f"![{p.stem}]({p.name})", ""]
        html = [p for p in r.figures.get(stage, []) if p.suffix == ".html"]
        if html:
            lines += ["Interactive: " + ", ".join(f"[{p.stem}]({p.name})" for p in html), ""]
        if r.tables.get(stage):
            lines += ["Tables: " + ", ".join(f"[{p.name}]({p.name})" for p in r.tables[stage]), ""]
        if stage in r.timings:
            cached = " — results read from the cache" if stage in r.summary.get("cached_stages", []) else ""
            lines += [f"*({r.timings[stage]:.0f} s{cached})*", ""]
    lines += ["## Settings", "", "```", json.dumps(dataclasses.asdict(settings), indent=1), "```", ""]
    r.report.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------ entry point

def reproduce(model: Any, out_dir: str | Path = "figures", *, quick: bool = False, settings: Settings | None = None,
              paragraphs: ParagraphSet | None = None, non_memorized_max_em: int | None = None,
              frequencies: Int[Tensor, "vocab"] | None = None, stages: Sequence[str] | None = None,
              cache_dir: str | Path | None = ".memloc_cache", png: bool = True, model_name: str = "model",
              progress_bar: bool = True) -> ReproduceResult:
    """Run the reproduction pipeline of both papers on ``model`` and write figures, tables and REPORT.md.

    Args:
        model: a TransformerBridge (borrowed; left exactly as found).
        out_dir: output directory (created).
        quick: use :data:`QUICK` sizes instead of :data:`DEFAULT` (ignored when ``settings`` is given).
        settings: explicit stage sizes.
        paragraphs: the paragraph pool (default :func:`default_paragraphs` by vocabulary).
        non_memorized_max_em: NMP threshold (default 10 for the embedded set, 29 for GPT-Neo sets).
        frequencies: corpus unigram counts for the rare-token analysis (default: the embedded
            model's training counts; otherwise counted from the paragraphs, a stand-in noted in
            the report).
        stages: subset of :data:`STAGES` (default all).
        cache_dir: cache of stage results and attribution scores (None: no cache).
        png: also write PNGs (HTML is always written; without Chromium the PNGs are skipped with a
            note in the report).
        model_name: the name shown in the report.
        progress_bar: progress bars (also silenced by ``MEMLOC_PROGRESS=0``).

    Returns:
        :class:`ReproduceResult`.

    Raises:
        ValueError: bad arguments (before any work), or no bundled paragraph set for the model.
    """
    settings = settings if settings is not None else (QUICK if quick else DEFAULT)
    if not isinstance(settings, Settings):
        raise ValueError(f"settings must be a memloc.reproduce.Settings, got {type(settings).__name__}")
    stages = list(STAGES) if stages is None else list(stages)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages}")
    if "memorization" not in stages:
        stages.insert(0, "memorization")  # everything depends on the split
    if paragraphs is not None and not isinstance(paragraphs, ParagraphSet):
        raise ValueError(f"paragraphs must be a memloc.data.ParagraphSet, got {type(paragraphs).__name__}")
    for name in ("n_mp", "n_nmp", "n_perturb", "n_finetune", "inj_n", "del_set_size", "del_targets", "n_patching",
                 "batch_size"):
        check_positive_int(getattr(settings, name), f"settings.{name}")
    notes: list[str] = []
    if paragraphs is None:
        paragraphs, default_max, note = default_paragraphs(model)
        notes.append(f"paragraphs: {note}")
    else:
        default_max = 10
        notes.append(f"paragraphs: {paragraphs.name} ({len(paragraphs)} paragraphs)")
    nmp_max_em = default_max if non_memorized_max_em is None else non_memorized_max_em
    T = paragraphs.tokens.shape[1] - paragraphs.prefix_len
    if isinstance(nmp_max_em, bool) or not isinstance(nmp_max_em, int) or not 0 <= nmp_max_em < T:
        raise ValueError(f"non_memorized_max_em must be an int in 0..{T - 1}, got {non_memorized_max_em!r}")
    if frequencies is not None and (not isinstance(frequencies, Tensor) or frequencies.ndim != 1
                                    or len(frequencies) != int(model.cfg.d_vocab)):
        raise ValueError(f"frequencies must be a 1-D tensor of {int(model.cfg.d_vocab)} unigram counts, got "
                         f"{type(frequencies).__name__} {tuple(getattr(frequencies, 'shape', ()))}")
    tokens = check_tokens(model, paragraphs.tokens, paragraphs.prefix_len, name="paragraphs.tokens")
    prefix_len = paragraphs.prefix_len
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .benchmarks import model_fingerprint

    result = ReproduceResult(out_dir=out, report=out / "REPORT.md")
    with borrowed(model):
        cache = _Cache(cache_dir, model_fingerprint(model) if cache_dir is not None else "")
        score_cache = Path(cache_dir) / "scores" if cache_dir is not None else None
        run = _Run(model, out, settings, cache, png, progress_bar, result, score_cache)
        dev_ids: list[int] = []
        if int(model.cfg.d_vocab) == 4096 and paragraphs.tokenizer == "tiny" and ({"inj", "del"} & set(stages)):
            from .data import tuned_hyperparameters, tuning_dev_ids

            run.tuned, dev_ids = tuned_hyperparameters("tiny"), tuning_dev_ids("tiny")
            notes.append("SLIMMING / HARD CONCRETE hyperparameters: the embedded model's dev-set selection "
                         "(Chang et al. A.7, scripts/tune_tiny.py): " + "; ".join(
                             f"{m} " + ", ".join(f"{k}={v:g}" for k, v in kw.items() if k != "max_steps")
                             for m, kw in run.tuned.items())
                         + f"; the {len(dev_ids)} dev paragraphs are left out of the DEL set")

        n_neurons = int(model.cfg.n_layers) * int(model.cfg.d_mlp)
        if quick and "zero_out" in settings.methods and n_neurons > QUICK_ZERO_OUT_MAX_NEURONS:
            run.s = settings = dataclasses.replace(settings, methods=tuple(m for m in settings.methods
                                                                          if m != "zero_out"))
            notes.append(f"--quick: ZERO-OUT left out of INJ and DEL: exact ZERO-OUT runs one pass per neuron and "
                         f"this model has {n_neurons:,} FFN neurons (> {QUICK_ZERO_OUT_MAX_NEURONS:,}); Chang et al. "
                         "skip it for Pythia-6.9B too. Run without --quick to include it.")

        def timed(stage: str, fn: Callable[[], Any]) -> Any:
            t0 = time.perf_counter()
            logger.info("reproduce: stage %s", stage)
            try:
                return fn()
            finally:
                result.timings[stage] = time.perf_counter() - t0

        mem = timed("memorization", lambda: _stage_memorization(run, paragraphs, nmp_max_em))
        sub_idx = _subset_evenly(len(paragraphs), settings.max_paragraphs)
        sub_tokens = tokens[torch.as_tensor(sub_idx, device=tokens.device)]
        mp_rows, nmp_rows = select_groups(mem, settings.n_mp, settings.n_nmp)
        result.results["memorization"] = mem
        mp = sub_tokens[torch.as_tensor(mp_rows, device=tokens.device)]
        nmp = sub_tokens[torch.as_tensor(nmp_rows, device=tokens.device)]
        no_mp = len(mp_rows) == 0
        if no_mp:
            notes.append("no paragraph is memorized (EM = T) by this model: the stages that need memorized "
                         "paragraphs are skipped and the others run on the non-memorized ones")
        if len(nmp_rows) == 0:
            notes.append("no paragraph is non-memorized by this model: NMP-dependent stages are skipped")
        freq_note = "corpus unigram counts of the embedded model's training stream"
        if frequencies is None:
            if int(model.cfg.d_vocab) == 4096 and paragraphs.tokenizer == "tiny":
                from .data import unigram_counts

                frequencies = unigram_counts("tiny")
            else:
                from .heads import unigram_counts_from_tokens

                frequencies = unigram_counts_from_tokens(tokens.cpu(), int(model.cfg.d_vocab))
                freq_note = ("token frequencies counted from the paragraph pool (a stand-in: the training corpus "
                             "counts are not bundled)")
        else:
            freq_note = "the given corpus frequencies"

        def skip(stage: str, reason: str) -> None:
            result.skipped[stage] = reason
            logger.info("reproduce: skipping %s (%s)", stage, reason)

        pert = pmps = None
        if "perturbation" in stages:
            if no_mp and len(nmp_rows) == 0:
                skip("perturbation", "no memorized or non-memorized paragraphs")
            else:
                pert, pmps = timed("perturbation", lambda: _stage_perturbation(run, sub_tokens, prefix_len, mp_rows,
                                                                               nmp_rows, mem))
        if "gradients" in stages:
            timed("gradients", lambda: _stage_gradients(run, sub_tokens, prefix_len, mem, mp_rows, nmp_rows))
        contrastive = None
        if "contrastive" in stages:
            if no_mp or len(nmp_rows) == 0:
                skip("contrastive", "needs memorized and non-memorized paragraphs")
            else:
                contrastive = timed("contrastive", lambda: _stage_contrastive(run, mp, nmp, prefix_len))
        if "finetune" in stages:
            if no_mp or len(nmp_rows) == 0:
                skip("finetune", "needs memorized paragraphs to unlearn/edit and non-memorized ones for the KL term")
            else:
                timed("finetune", lambda: _stage_finetune(run, mp[:settings.n_finetune], nmp, prefix_len, pmps))
        highlight = None
        if "head" in stages:
            a, b = (mp, nmp) if not no_mp else (nmp[: len(nmp) // 2], nmp[len(nmp) // 2:])
            if len(a) == 0 or len(b) == 0:
                skip("head", "needs two non-empty paragraph groups")
            else:
                if no_mp:
                    notes.append("memorization head: without MPs the two halves of the NMPs stand in for MP/NMP")
                highlight = timed("head", lambda: _stage_head(run, a, b, prefix_len, contrastive, frequencies))
        if "rare_tokens" in stages:
            x = torch.cat([mp, nmp])
            timed("rare_tokens", lambda: _stage_rare(run, x, prefix_len, frequencies, highlight, freq_note))
        if "inj" in stages:
            if getattr(model, "tokenizer", None) is None:
                skip("inj", "the model has no tokenizer to encode the ECBD sequences")
            else:
                timed("inj", lambda: _stage_inj(run))
        if "del" in stages:
            # the dev paragraphs the hyperparameters were selected on are not evaluated (A.7)
            full = mem.index[(mem["split"] == "memorized") & ~mem["id"].isin(dev_ids)].to_numpy()
            if len(full) < 2:
                skip("del", f"needs at least 2 memorized paragraphs, found {len(full)}")
            else:
                rows = full[_subset_evenly(len(full), settings.del_set_size)]
                x = sub_tokens[torch.as_tensor(rows, device=tokens.device)]
                timed("del", lambda: _stage_del(run, x, prefix_len, mem.iloc[rows]["id"].tolist()))
        if "patching" in stages:
            if pmps is None or len(pmps) == 0:
                skip("patching", "needs perturbed memorized paragraphs (PMPs), i.e. memorized paragraphs")
            else:
                timed("patching", lambda: _stage_patching(run, pmps, prefix_len))
        for stage in STAGES:
            if stage not in stages and stage not in result.skipped:
                result.skipped[stage] = "not requested (--stages)"
    if run.png_error:
        notes.append(f"PNG export failed ({run.png_error}); only HTML figures were written. Install Chromium "
                     "(`make browser`) for PNGs.")
    result.summary["seconds"] = sum(result.timings.values())
    result.summary["cached_stages"] = sorted({st for st in STAGES for hit in cache.hits if hit.startswith(st)})
    _write_report(result, model_name, settings, notes, quick)
    return result
