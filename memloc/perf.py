"""Performance benchmark of the localization methods (:mod:`memloc.localize`) against the papers'
loops (:mod:`memloc.localize.reference`), in one or several dtypes.

Run ``memloc perf [--json out.json] [--models tiny,gpt-neo-125m-random] [--quick]
[--dtype float32,bfloat16]`` (or ``python -m benchmarks.perf`` from a checkout, same options).
Everything is measured in the same run on the same machine; each row has ``method, model, dtype,
seconds, reference_seconds, speedup, max_abs_diff`` plus method-specific columns:

* ``zero_out``: fast (recompute layers > l, logits at suffix positions only) vs the authors'
  one-full-forward-per-batch-of-one-hot-masks loop (:func:`~memloc.localize.reference.reference_zero_out`),
  with the same batch size.  ``bound`` is the best speedup obtainable by skipping layers < l alone,
  counting layers: ``n_layers / mean_l (n_layers - l)`` (layer l itself counted as needed;
  embedding and unembedding ignored), and ``achieved_over_bound = speedup / bound``.
* ``integrated_gradients``: the fast path ``implementation="auto"`` chooses (``path`` column; on
  GPT-Neo / GPT-2 the direct single-token pass over the clean keys/values, elsewhere the KV-cache
  path) vs the authors' loop (one forward+backward of ``[p, s_<t]`` per layer and position, all 20
  Riemann steps batched).
* ``ig_kv_cache_vs_direct`` (float32 only): IG's two fast paths on the same positions: ``seconds`` is ``direct``,
  ``reference_seconds`` is ``kv_cache``, ``speedup`` = kv_cache / direct (the measurement that
  decides whether the direct path is worth its code).
* ``activations``: one forward; no reference loop (``speedup`` NaN); present for the dtype comparison.
* ``slimming`` / ``hard_concrete`` (float32 only): seconds per optimization step (difference of a long and a short
  run, so setup is excluded) vs one plain forward+backward of the memorization loss with respect
  to the model's parameters (``reference_seconds``); ``speedup`` is then plain / step (≥ 1/1.2 is
  the target) and ``step_over_plain`` its inverse.
* ``attribution_patching``: seconds vs fast ZERO-OUT (``reference_seconds``), and the Spearman
  correlation of its scores with ZERO-OUT's on the neurons both scored.

Dtypes: ``--dtype`` takes one or more of float32, bfloat16, float16, float64; float32 is always
measured first as the baseline.  Rows of another dtype carry ``speedup_over_fp32`` (their speedup
divided by the float32 row's speedup of the same method and model) and ``spearman_vs_fp32`` (the
Spearman correlation of their scores with the float32 scores on the same neurons).  Issue 11's
target for bfloat16: ``speedup_over_fp32 >= 0.8`` for ZERO-OUT and IG, ``spearman_vs_fp32 >= 0.99``
for ZERO-OUT, IG and ACTIVATIONS; ``target_met`` says whether each row meets its part.  ZERO-OUT rows
of another dtype also carry ``reference_spearman_vs_fp32``: the same correlation for the papers'
loop run in that dtype, which separates what the fast path loses from what the dtype itself loses.

Pipeline rows (``pipeline/*``, embedded model, float32): see :mod:`memloc.perf_pipeline`.

Extrapolation (``extrapolated`` column): on the GPT-Neo-125M-shaped random model the exhaustive
runs are too long for a CPU, so ZERO-OUT (fast and reference) is timed on a subset of neurons in
every layer (whole batches) and on its first half, and extrapolated linearly to ``d_mlp``
(:func:`extrapolated_seconds`: the fixed cost of a call - clean forward, self-checks, weight
copies - is counted once, as in the full run; per-neuron cost does not depend on which neurons);
IG fast is timed likewise on a few evenly spaced suffix positions and every other one of them, for
all layers, and extrapolated to ``T``; the reference on the middle suffix position for a subset of
layers (its cost per (layer, position) does not depend on the layer and grows linearly with the
position, so the middle position is the average) and scaled by ``n_layers * T / calls``.  In
``--quick`` mode the embedded model uses such subsets too.  ``max_abs_diff`` always compares the
fast and reference scores on exactly the neurons/positions/layers both computed.  On a GPU every
(model, dtype) starts with two untimed forward+backward passes (CUDA and cuBLAS initialisation).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from . import localize as loc
from .borrow import borrowed
from .localize._common import memorization_loss, suffix_positions
from .localize.reference import reference_integrated_gradients, reference_zero_out
from .models import Model, load_model

__all__ = ["MODELS", "DTYPES", "run_perf", "format_table", "build_random_gpt_neo_125m", "timed",
           "extrapolated_seconds"]

logger = logging.getLogger(__name__)

MODELS = ("tiny", "gpt-neo-125m-random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
#: Issue 11's bfloat16 targets: speedup relative to float32, Spearman with the float32 scores.
SPEEDUP_TARGET, SPEARMAN_TARGET = 0.8, 0.99


def build_random_gpt_neo_125m(path: Path, seed: int = 0) -> Path:
    """Save a random-weight ``GPTNeoForCausalLM`` with GPT-Neo-125M's real configuration (12 layers,
    d_model 768, 12 heads, alternating global/local attention with window 256, vocabulary 50,257)
    and the embedded model's tokenizer files into ``path`` (no hub needed); return ``path``."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    from .models import tiny_model_dir

    torch.manual_seed(seed)
    cfg = GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
                       num_heads=12, intermediate_size=None, window_size=256,
                       attention_types=[[["global", "local"], 6]], activation_function="gelu_new")
    path = Path(path)
    GPTNeoForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    PreTrainedTokenizerFast.from_pretrained(str(tiny_model_dir())).save_pretrained(path)
    return path


#: Clock of every timing: process CPU time on a CPU (set by :func:`run_perf`), wall clock on a GPU.
_CLOCK: list[Callable[[], float]] = [time.process_time]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``: one call of ``fn`` timed with the perf clock (process CPU time on a CPU
    under :func:`run_perf`, wall clock on a GPU, where CUDA is synchronized before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = _CLOCK[0]()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, _CLOCK[0]() - t


def _load(name: str, device: str | None, dtype: torch.dtype, workdir: Path) -> tuple[Any, torch.Tensor, int]:
    from .data import load_paragraphs

    if name == "tiny":
        model = load_model("tiny", device=device, dtype=dtype)
        para = load_paragraphs("tiny")
        t = para.table
        best = t[t["em_ref"] >= 50].sort_values("count", ascending=False)["id"].tolist() or [0]
        return model, para.tokens[best[0]], para.prefix_len
    if name == "gpt-neo-125m-random":
        path = workdir / "gpt-neo-125m"
        if not (path / "config.json").exists():
            build_random_gpt_neo_125m(path)
        model = load_model(path, device=device, dtype=dtype)
        para = load_paragraphs("gpt-neo-125m")
        return model, para.tokens[0], para.prefix_len
    raise ValueError(f"models must be among {MODELS}, got {name!r}")


def _plain_fwd_bwd(model: Model, tokens: torch.Tensor, prefix_len: int, repeats: int) -> float:
    """Median seconds of one forward + backward of the memorization loss w.r.t. the parameters."""
    times = []
    with borrowed(model):
        for p in model.parameters():
            p.requires_grad_(True)
        x = tokens.reshape(1, -1).to(next(model.parameters()).device)
        pos = suffix_positions(x.shape[1], prefix_len)
        for _ in range(repeats):
            _, t = timed(lambda: memorization_loss(model(x)[:, pos], x[:, prefix_len:])[0].backward())
            times.append(t)
            for p in model.parameters():
                p.grad = None
    return float(torch.tensor(times).median())


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    keep = torch.isfinite(a) & torch.isfinite(b)
    return float(spearmanr(a[keep].numpy(), b[keep].numpy())[0])


#: Keyword of every timed localization call: no progress bars.
_PB = dict(progress_bar=False)


@dataclass
class _Bench:
    """One (model, dtype) run of :func:`bench_model`: the model, its sequence ``[1, seq]``, and the
    rows and scores collected so far."""

    name: str
    model: Model
    tokens: torch.Tensor
    prefix_len: int
    quick: bool
    dtype: torch.dtype
    rows: list[dict] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def big(self) -> bool:
        return self.name != "tiny"

    @property
    def dname(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def T(self) -> int:
        return self.tokens.shape[1] - self.prefix_len

    def row(self, **kw: Any) -> dict:
        r = dict(method=kw.pop("method"), model=self.name, dtype=self.dname, **kw)
        self.rows.append(r)
        return r


def bench_model(name: str, *, quick: bool, device: str | None, workdir: Path,
                dtype: torch.dtype = torch.float32) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Rows for one (model, dtype), and the scores compared across dtypes (``zero_out``,
    ``zero_out_reference``, ``integrated_gradients``, ``activations``, on fixed neuron subsets)."""
    model, tokens, prefix_len = _load(name, device, dtype, workdir)
    if str(device or "cpu").startswith("cuda"):  # library/kernel initialisation is not what is measured
        _plain_fwd_bwd(model, tokens, prefix_len, 2)
    b = _Bench(name, model, tokens.reshape(1, -1), prefix_len, quick, dtype)
    sub, zo_sub, t_zero_out, score_device = _bench_zero_out(b)
    _bench_attribution_patching(b, sub, zo_sub, t_zero_out)
    _bench_activations(b)
    ig_fast, t_ig, fast_pos, paths = _bench_integrated_gradients(b, score_device)
    if dtype != torch.float32:  # the dtype comparison needs ZERO-OUT, IG and ACTIVATIONS only
        return b.rows, b.scores
    if paths and paths[0] == "direct":
        _bench_ig_paths(b, ig_fast, t_ig, fast_pos)
    _bench_mask_training(b)
    return b.rows, b.scores


def extrapolated_seconds(t_small: float, n_small: int, t_large: float, n_large: int, n_total: int) -> float:
    """Seconds of a run over ``n_total`` units (neurons, positions) from timed runs over ``n_small``
    and ``n_large`` of them: ``t_large + (n_total - n_large) * per_unit`` with ``per_unit = (t_large -
    t_small) / (n_large - n_small)``, so a run's fixed cost (the clean forward, self-checks, weight
    copies) is counted once, as in the full run, instead of being scaled with the units.  When noise
    makes ``per_unit`` non-positive, the proportional estimate ``t_large * n_total / n_large``."""
    if n_total == n_large:
        return t_large
    per_unit = (t_large - t_small) / (n_large - n_small)
    return t_large + (n_total - n_large) * per_unit if per_unit > 0 else t_large * n_total / n_large


def _bench_zero_out(b: _Bench) -> tuple[torch.Tensor, torch.Tensor, float, torch.device]:
    """ZERO-OUT fast vs the authors' loop on a seeded subset of neurons in every layer, timed on its
    first half and on all of it and extrapolated to all neurons (:func:`extrapolated_seconds`; a
    subset is whole batches, so each half is too).  Returns the subset, the fast scores on it
    (CPU), the extrapolated fast seconds and the device of the scores."""
    model, tokens, prefix_len = b.model, b.tokens, b.prefix_len
    L, d = model.cfg.n_layers, model.cfg.d_mlp
    bound = L / (sum(L - l for l in range(L)) / L)
    batch = (16 if b.quick else 32) if b.big else 64
    n_sub = (2 if b.quick else 4) * batch if b.big else (128 if b.quick else d)  # whole batches, or all
    gen = torch.Generator().manual_seed(0)
    sub = torch.randperm(d, generator=gen)[:n_sub].sort().values
    half = sub[: n_sub // 2]

    def fast_run(neurons):
        return loc.zero_out(model, tokens, prefix_len, batch_size=batch, neurons=neurons, **_PB)

    def ref_run(neurons):
        return reference_zero_out(model, tokens.to(score_device), prefix_len, neurons=neurons, batch_size=batch)

    fast, t_fast = timed(lambda: fast_run(sub))
    score_device = fast.device
    ref, t_ref = timed(lambda: ref_run(sub))
    if n_sub < d:
        t_fast = extrapolated_seconds(timed(lambda: fast_run(half))[1], len(half), t_fast, n_sub, d)
        t_ref = extrapolated_seconds(timed(lambda: ref_run(half))[1], len(half), t_ref, n_sub, d)
    zo_sub = fast[:, sub].cpu()
    b.scores["zero_out"], b.scores["zero_out_reference"] = zo_sub, ref[:, sub]
    speed = t_ref / t_fast
    b.row(method="zero_out", seconds=t_fast, reference_seconds=t_ref, speedup=speed,
          max_abs_diff=float((zo_sub - ref[:, sub]).abs().max()), bound=bound, achieved_over_bound=speed / bound,
          batch_size=batch, extrapolated=n_sub != d,
          note=f"timed on {n_sub // 2} and {n_sub} of {d} neurons in every layer, extrapolated linearly"
          if n_sub != d else "all neurons")
    logger.info("zero_out %s %s: %.1fs vs %.1fs", b.name, b.dname, t_fast, t_ref)
    return sub, zo_sub, t_fast, score_device


def _bench_attribution_patching(b: _Bench, sub: torch.Tensor, zo_sub: torch.Tensor, t_zero_out: float) -> None:
    """Attribution patching vs fast ZERO-OUT (all neurons): time, and Spearman on the scored neurons."""
    ap, t_ap = timed(lambda: loc.attribution_patching(b.model, b.tokens, b.prefix_len))
    rho_layers = [_spearman(ap[l, sub], zo_sub[l]) for l in range(b.model.cfg.n_layers)]
    b.row(method="attribution_patching", seconds=t_ap, reference_seconds=t_zero_out, speedup=t_zero_out / t_ap,
          max_abs_diff=float((ap[:, sub].cpu() - zo_sub).abs().max()), spearman=_spearman(ap[:, sub], zo_sub),
          spearman_per_layer=[round(r, 3) for r in rho_layers],
          note="reference = fast ZERO-OUT (all neurons); spearman over the scored neurons")


def _bench_activations(b: _Bench) -> None:
    """ACTIVATIONS: one forward, no reference loop (for the dtype comparison)."""
    act, t_act = timed(lambda: loc.activations(b.model, b.tokens, b.prefix_len))
    b.scores["activations"] = act.cpu()
    b.row(method="activations", seconds=t_act, reference_seconds=float("nan"), speedup=float("nan"),
          max_abs_diff=float("nan"), note="one forward; no reference loop")


def _ig_positions(b: _Bench) -> tuple[list[int], list[int], list[int]]:
    """The positions fast IG is timed on, and the layers and positions of the reference loop (subsets
    on the big model and in quick mode, see the module docstring's extrapolation)."""
    L, T, prefix_len = b.model.cfg.n_layers, b.T, b.prefix_len
    all_pos = list(range(prefix_len - 1, b.tokens.shape[1] - 1))
    mid = [prefix_len - 1 + T // 2]
    if b.big or b.quick:
        n_pos = 4 if b.big and b.quick else (6 if b.big else 10)
        fast_pos = [all_pos[round(i * (T - 1) / (n_pos - 1))] for i in range(n_pos)]
        ref_layers = [L - 1] if (b.big and b.quick) else ([0, L - 1] if b.big else list(range(L)))
        ref_pos = mid if b.big else fast_pos
        return fast_pos, ref_layers, ref_pos
    return all_pos, list(range(L)), all_pos


def _timed_ig_with_path(b: _Bench, positions: list[int]) -> tuple[torch.Tensor, float, list[str]]:
    """Timed fast IG (``implementation="auto"``) on ``positions``, and the path(s) it logged choosing."""
    paths: list[str] = []

    class _PathLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "memloc_path"):
                paths.append(record.memloc_path)

    ig_logger = logging.getLogger("memloc.localize.integrated_gradients")
    handler, old_level = _PathLog(level=logging.INFO), ig_logger.level
    ig_logger.addHandler(handler)
    ig_logger.setLevel(logging.INFO)
    try:
        ig_fast, t_ig = timed(lambda: loc.integrated_gradients(b.model, b.tokens, b.prefix_len, positions=positions,
                                                                **_PB))
    finally:
        ig_logger.removeHandler(handler)
        ig_logger.setLevel(old_level)
    return ig_fast, t_ig, paths


def _bench_integrated_gradients(b: _Bench, score_device: torch.device
                                ) -> tuple[torch.Tensor, float, list[int], list[str]]:
    """IG fast (the path ``"auto"`` picks) vs the authors' loop, both extrapolated to all positions
    and layers.  Returns the fast scores, their seconds, the positions they cover and the path."""
    model, tokens, prefix_len, L, T = b.model, b.tokens, b.prefix_len, b.model.cfg.n_layers, b.T
    fast_pos, ref_layers, ref_pos = _ig_positions(b)
    ig_fast, t_ig, paths = _timed_ig_with_path(b, fast_pos)
    b.scores["integrated_gradients"] = ig_fast.cpu()
    t_ig_total = t_ig
    if len(fast_pos) < T:  # fixed cost (clean run, self-check, weights) counted once
        half = fast_pos[::2]
        t_half = _timed_ig_with_path(b, half)[1]
        t_ig_total = extrapolated_seconds(t_half, len(half), t_ig, len(fast_pos), T)
    ref_ig, t_rig = timed(lambda: reference_integrated_gradients(model, tokens.to(score_device), prefix_len,
                                                                  layers=ref_layers, positions=ref_pos))
    t_rig_total = t_rig * (L * T) / (len(ref_layers) * len(ref_pos))
    same = loc.integrated_gradients(model, tokens, prefix_len, positions=ref_pos, layers=ref_layers, **_PB).cpu()
    diff = float((same[ref_layers] - ref_ig[ref_layers]).abs().max())
    rel = diff / float(ref_ig[ref_layers].abs().max())
    b.row(method="integrated_gradients", seconds=t_ig_total, reference_seconds=t_rig_total,
          speedup=t_rig_total / t_ig_total, max_abs_diff=diff, max_rel_diff=rel, path=paths[0] if paths else None,
          extrapolated=len(fast_pos) != T or len(ref_pos) * len(ref_layers) != T * L,
          note=f"fast timed on {len(fast_pos[::2])} and {len(fast_pos)} of {T} positions (all layers), extrapolated "
               f"linearly; reference on "
               f"{len(ref_pos)} positions x {len(ref_layers)} layers; 20 steps")
    logger.info("ig %s %s: %.1fs vs %.1fs (%s path)", b.name, b.dname, t_ig_total, t_rig_total, paths[:1])
    return ig_fast, t_ig, fast_pos, paths


def _bench_ig_paths(b: _Bench, ig_fast: torch.Tensor, t_ig: float, fast_pos: list[int]) -> None:
    """IG's direct path vs its KV-cache path on the same positions (``ig_kv_cache_vs_direct``)."""
    T = b.T
    kv, t_kv = timed(lambda: loc.integrated_gradients(b.model, b.tokens, b.prefix_len, positions=fast_pos,
                                                       implementation="kv_cache", **_PB))
    kv = kv.cpu()
    b.row(method="ig_kv_cache_vs_direct", seconds=t_ig * T / len(fast_pos),
          reference_seconds=t_kv * T / len(fast_pos), speedup=t_kv / t_ig,
          max_abs_diff=float((kv - ig_fast.cpu()).abs().max()),
          max_rel_diff=float((kv - ig_fast.cpu()).abs().max() / ig_fast.abs().max().cpu()),
          note="seconds = direct path, reference_seconds = kv_cache path, same positions; speedup = kv_cache/direct")


def _bench_mask_training(b: _Bench) -> None:
    """SLIMMING / HARD CONCRETE: seconds per optimization step vs one plain forward+backward."""
    model, tokens, prefix_len = b.model, b.tokens, b.prefix_len
    plain = _plain_fwd_bwd(model, tokens, prefix_len, repeats=3 if b.big else 10)
    short, long_ = (2, 6) if b.big else ((5, 25) if b.quick else (10, 60))
    for meth in ("slimming", "hard_concrete"):
        fn = getattr(loc, meth)
        _, t_short = timed(lambda: fn(model, tokens, prefix_len, max_steps=short, stop_loss=0.0, stop_mask_mean=None, **_PB))
        _, t_long = timed(lambda: fn(model, tokens, prefix_len, max_steps=long_, stop_loss=0.0, stop_mask_mean=None, **_PB))
        step = (t_long - t_short) / (long_ - short)
        b.row(method=meth, seconds=step, reference_seconds=plain, speedup=plain / step, max_abs_diff=float("nan"),
              step_over_plain=step / plain,
              note=f"per step: ({long_}-step run - {short}-step run) / {long_ - short}; reference = "
                   "one plain forward+backward w.r.t. the parameters")


def _compare_dtypes(rows: list[dict], scores: dict[tuple[str, str], dict[str, torch.Tensor]]) -> None:
    """Add ``speedup_over_fp32``, ``spearman_vs_fp32`` (and ``reference_spearman_vs_fp32`` for
    ZERO-OUT) and ``target_met`` to the rows of dtypes other than float32."""
    base = {(r["method"], r["model"]): r for r in rows if r["dtype"] == "float32"}
    for r in rows:
        if r["dtype"] == "float32" or (r["method"], r["model"]) not in base:
            continue
        b = base[(r["method"], r["model"])]
        mine, ref = scores.get((r["model"], r["dtype"]), {}), scores.get((r["model"], "float32"), {})
        checks = []
        if r["method"] in ("zero_out", "integrated_gradients"):
            r["speedup_over_fp32"] = r["speedup"] / b["speedup"]
            checks.append(r["speedup_over_fp32"] >= SPEEDUP_TARGET)
        if r["method"] in ("zero_out", "integrated_gradients", "activations"):
            r["spearman_vs_fp32"] = _spearman(mine[r["method"]], ref[r["method"]])
            checks.append(r["spearman_vs_fp32"] >= SPEARMAN_TARGET)
        if r["method"] == "zero_out":
            r["reference_spearman_vs_fp32"] = _spearman(mine["zero_out_reference"], ref["zero_out_reference"])
        if checks:
            r["target_met"] = all(checks)


def run_perf(models: list[str] | tuple[str, ...] = MODELS, *, quick: bool = False, device: str | None = None,
             dtypes: list[str] | tuple[str, ...] = ("float32",),
             on_rows: Callable[[pd.DataFrame], None] | None = None, pipeline: bool = True) -> pd.DataFrame:
    """Run the benchmark on ``models`` in ``dtypes`` (float32 is always added first as the baseline)
    and return one row per (method, model, dtype); ``on_rows`` receives the rows so far after each
    (model, dtype) (e.g. to save partial results of a long run).  With ``pipeline`` (and the embedded
    model among ``models``) the float32 run adds the ``pipeline/*`` rows of :mod:`memloc.perf_pipeline`."""
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"models must be a non-empty subset of {MODELS}, got {list(models)}")
    bad = [t for t in dtypes if t not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of {sorted(DTYPES)}, got {list(dtypes)}")
    order = ["float32"] + [t for t in dict.fromkeys(dtypes) if t != "float32"]
    _CLOCK[0] = time.process_time if str(device or "cpu").startswith("cpu") else time.perf_counter
    rows: list[dict] = []
    scores: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for t in order:
                r, s = bench_model(name, quick=quick, device=device, workdir=Path(tmp), dtype=DTYPES[t])
                rows.extend(r)
                scores[(name, t)] = s
                _compare_dtypes(rows, scores)
                if name == "tiny" and t == "float32" and pipeline:
                    from .perf_pipeline import bench_pipeline

                    rows.extend(dict(r, dtype=t) for r in bench_pipeline(quick, device))
                if on_rows is not None:
                    on_rows(pd.DataFrame(rows))
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame) -> str:
    cols = [c for c in ("method", "model", "dtype", "path", "seconds", "reference_seconds", "speedup", "max_abs_diff",
                        "max_rel_diff", "bound", "achieved_over_bound", "step_over_plain", "spearman",
                        "speedup_over_fp32", "spearman_vs_fp32", "reference_spearman_vs_fp32", "target_met")
            if c in df]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
