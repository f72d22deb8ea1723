"""Performance benchmark of the localization methods (memloc.localize) against the papers' loops.

Run ``python -m benchmarks.perf --json out.json [--models tiny,gpt-neo-125m-random] [--quick]`` from
the repository root, or ``memloc perf`` (same options).  Everything is measured in the same run
on the same machine; each row has ``method, model, seconds, reference_seconds, speedup,
max_abs_diff`` plus method-specific columns:

* ``zero_out``: fast (recompute layers > l, logits at suffix positions only) vs the authors'
  one-full-forward-per-batch-of-one-hot-masks loop (tests/reference_localize.py), with the same
  batch size.  ``bound`` is the best speedup obtainable by skipping layers < l alone, counting
  layers: ``n_layers / mean_l (n_layers - l)`` (layer l itself counted as needed; embedding and
  unembedding ignored), and ``achieved_over_bound = speedup / bound``.
* ``integrated_gradients``: the fast path ``implementation="auto"`` chooses (on GPT-Neo / GPT-2 the
  direct single-token pass over the clean keys/values; elsewhere the KV-cache path) vs the authors'
  loop (one forward+backward of ``[p, s_<t]`` per layer and position, all 20 Riemann steps batched).
* ``slimming`` / ``hard_concrete``: seconds per optimization step (difference of a long and a short
  run, so setup is excluded) vs one plain forward+backward of the memorization loss with respect
  to the model's parameters (``reference_seconds``); ``speedup`` is then plain / step (≥ 1/1.2 is
  the target) and ``step_over_plain`` its inverse.
* ``attribution_patching``: seconds vs fast ZERO-OUT (``reference_seconds``), and the Spearman
  correlation of its scores with ZERO-OUT's on the neurons both scored.

Pipeline rows (``--models`` containing ``tiny``, ``method`` starting with ``pipeline/``): the speedups of
the library functions the ``memloc reproduce`` stages call, each fast path against its slow reference in
the same run on the embedded model (``seconds`` fast, ``reference_seconds`` slow, ``speedup`` their
ratio, ``max_abs_diff`` between their results):

* ``pipeline/exact_match``: EM from one teacher-forced pass vs T greedy steps (memorization, finetune).
* ``pipeline/perturbation``: ``perturbation_profile`` (teacher-forced EM, decoding only the prefixes that
  do not reproduce the continuation) vs its old inner loop (greedy-decode and teacher-force every
  perturbed prefix), 2 MPs + 2 NMPs, every prefix position.
* ``pipeline/sparse_finetune``: one fine-tuning run with EMs read off the teacher-forced pass vs
  greedy decoding at every step (``em_via``), 8 MPs, 16 NMPs, 3 steps.
* ``pipeline/slimming_start_layer_1``: SLIMMING with the DEL setting (masks from layer 1) re-running
  only blocks 1.. from the cached input, unembedding the suffix only, vs full forwards.
* ``pipeline/del``: ``del_benchmark`` with the batched partial-forward dropout measurement and ZERO-OUT
  on the non-excluded layers vs ``fast=False`` and ZERO-OUT on every layer (ZERO-OUT on 128 neurons
  per layer, 2 targets, 3 ratios, 16 memorized sequences).

Extrapolation (``extrapolated`` column): on the GPT-Neo-125M-shaped random model the exhaustive
runs are too long for a CPU, so ZERO-OUT (fast and reference) is timed on the same subset of
neurons in every layer and both times are scaled by ``d_mlp / subset`` (per-neuron cost does not
depend on which neurons); IG fast is timed on a few evenly spaced suffix positions for all layers
and scaled by ``T / positions``, and the reference on the middle suffix position for a subset of
layers (its cost per (layer, position) does not depend on the layer and grows linearly with the
position, so the middle position is the average) and scaled by ``n_layers * T / calls``.  In
``--quick`` mode the embedded model uses such subsets too.  ``max_abs_diff`` always compares the
fast and reference scores on exactly the neurons/positions/layers both computed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from memloc import localize as loc  # noqa: E402
from memloc.borrow import borrowed  # noqa: E402
from memloc.localize._common import memorization_loss, suffix_positions  # noqa: E402
from memloc.models import load_model  # noqa: E402
from tests.reference_localize import (reference_integrated_gradients, reference_zero_out)  # noqa: E402

logger = logging.getLogger(__name__)

MODELS = ("tiny", "gpt-neo-125m-random")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _load(name: str, device: str | None, workdir: Path) -> tuple[Any, torch.Tensor, int]:
    from memloc.data import load_paragraphs

    if name == "tiny":
        model = load_model("tiny", device=device)
        para = load_paragraphs("tiny")
        t = para.table
        best = t[t["em_ref"] >= 50].sort_values("count", ascending=False)["id"].tolist() or [0]
        return model, para.tokens[best[0]], para.prefix_len
    if name == "gpt-neo-125m-random":
        from tests.factories import build_random_model

        path = build_random_model("gpt-neo-125m", workdir / "gpt-neo-125m")
        model = load_model(path, device=device)
        para = load_paragraphs("gpt-neo-125m")
        return model, para.tokens[0], para.prefix_len
    raise ValueError(f"models must be among {MODELS}, got {name!r}")


def _plain_fwd_bwd(model: Any, tokens: torch.Tensor, prefix_len: int, repeats: int) -> float:
    """Median seconds of one forward + backward of the memorization loss w.r.t. the parameters."""
    times = []
    with borrowed(model):
        for p in model.parameters():
            p.requires_grad_(True)
        x = tokens.reshape(1, -1).to(next(model.parameters()).device)
        pos = suffix_positions(x.shape[1], prefix_len)
        for _ in range(repeats):
            t = time.perf_counter()
            loss = memorization_loss(model(x)[:, pos], x[:, prefix_len:])[0]
            loss.backward()
            times.append(time.perf_counter() - t)
            for p in model.parameters():
                p.grad = None
    return float(torch.tensor(times).median())


def bench_model(name: str, *, quick: bool, device: str | None, workdir: Path) -> list[dict]:
    model, tokens, prefix_len = _load(name, device, workdir)
    tokens = tokens.reshape(1, -1)
    L, d = model.cfg.n_layers, model.cfg.d_mlp
    seq = tokens.shape[1]
    T = seq - prefix_len
    big = name != "tiny"
    rows: list[dict] = []
    pb = dict(progress_bar=False)
    bound = L / (sum(L - l for l in range(L)) / L)

    # ---- ZERO-OUT
    batch = 32 if big else 64
    n_sub = (16 if quick else 32) if big else (128 if quick else d)
    gen = torch.Generator().manual_seed(0)
    sub = torch.randperm(d, generator=gen)[:n_sub].sort().values
    fast, t_fast = _timed(lambda: loc.zero_out(model, tokens, prefix_len, batch_size=batch, neurons=sub, **pb))
    ref, t_ref = _timed(lambda: reference_zero_out(model, tokens.to(fast.device), prefix_len, neurons=sub,
                                                   batch_size=batch))
    scale = d / n_sub
    zo_sub = fast[:, sub].cpu()
    speed = t_ref / t_fast
    rows.append(dict(method="zero_out", model=name, seconds=t_fast * scale, reference_seconds=t_ref * scale,
                     speedup=speed, max_abs_diff=float((zo_sub - ref[:, sub]).abs().max()), bound=bound,
                     achieved_over_bound=speed / bound, batch_size=batch, extrapolated=scale != 1,
                     note=f"{n_sub} of {d} neurons in every layer, times scaled x{scale:g}"))
    logger.info("zero_out %s: %.1fs vs %.1fs", name, t_fast * scale, t_ref * scale)

    # ---- attribution patching (vs fast zero-out on the same neurons)
    ap, t_ap = _timed(lambda: loc.attribution_patching(model, tokens, prefix_len))
    from scipy.stats import spearmanr

    rho = float(spearmanr(ap[:, sub].cpu().flatten(), zo_sub.flatten())[0])
    rho_layers = [float(spearmanr(ap[l, sub].cpu(), zo_sub[l])[0]) for l in range(L)]
    rows.append(dict(method="attribution_patching", model=name, seconds=t_ap, reference_seconds=t_fast * scale,
                     speedup=t_fast * scale / t_ap, max_abs_diff=float((ap[:, sub].cpu() - zo_sub).abs().max()),
                     spearman=rho, spearman_per_layer=[round(r, 3) for r in rho_layers],
                     note="reference = fast ZERO-OUT (all neurons); spearman over the scored neurons"))

    # ---- IG
    all_pos = list(range(prefix_len - 1, seq - 1))
    mid = [prefix_len - 1 + T // 2]
    if big or quick:
        n_pos = 3 if big and quick else (5 if big else 10)
        fast_pos = [all_pos[round(i * (T - 1) / (n_pos - 1))] for i in range(n_pos)]
        ref_layers = [L - 1] if (big and quick) else ([0, L - 1] if big else list(range(L)))
        ref_pos = mid if big else fast_pos
    else:
        fast_pos, ref_layers, ref_pos = all_pos, list(range(L)), all_pos
    _, t_ig = _timed(lambda: loc.integrated_gradients(model, tokens, prefix_len, positions=fast_pos, **pb))
    t_ig_total = t_ig * T / len(fast_pos)
    ref_ig, t_rig = _timed(lambda: reference_integrated_gradients(model, tokens.to(fast.device), prefix_len,
                                                                  layers=ref_layers, positions=ref_pos))
    t_rig_total = t_rig * (L * T) / (len(ref_layers) * len(ref_pos))
    same = loc.integrated_gradients(model, tokens, prefix_len, positions=ref_pos, layers=ref_layers, **pb).cpu()
    diff = float((same[ref_layers] - ref_ig[ref_layers]).abs().max())
    rel = diff / float(ref_ig[ref_layers].abs().max())
    rows.append(dict(method="integrated_gradients", model=name, seconds=t_ig_total, reference_seconds=t_rig_total,
                     speedup=t_rig_total / t_ig_total, max_abs_diff=diff, max_rel_diff=rel,
                     extrapolated=len(fast_pos) != T or len(ref_pos) * len(ref_layers) != T * L,
                     note=f"fast timed on {len(fast_pos)} of {T} positions (all layers); reference on "
                          f"{len(ref_pos)} positions x {len(ref_layers)} layers; 20 steps"))
    logger.info("ig %s: %.1fs vs %.1fs", name, t_ig_total, t_rig_total)

    # ---- SLIMMING / HARD CONCRETE: seconds per step vs plain forward+backward
    plain = _plain_fwd_bwd(model, tokens, prefix_len, repeats=3 if big else 10)
    short, long_ = (2, 6) if big else ((5, 25) if quick else (10, 60))
    for meth in ("slimming", "hard_concrete"):
        fn = getattr(loc, meth)
        _, t_short = _timed(lambda: fn(model, tokens, prefix_len, max_steps=short, stop_loss=0.0, **pb))
        _, t_long = _timed(lambda: fn(model, tokens, prefix_len, max_steps=long_, stop_loss=0.0, **pb))
        step = (t_long - t_short) / (long_ - short)
        rows.append(dict(method=meth, model=name, seconds=step, reference_seconds=plain, speedup=plain / step,
                         max_abs_diff=float("nan"), step_over_plain=step / plain,
                         note=f"per step: ({long_}-step run - {short}-step run) / {long_ - short}; reference = "
                              "one plain forward+backward w.r.t. the parameters"))
    return rows


def bench_pipeline(quick: bool, device: str | None) -> list[dict]:
    """Same-run fast vs slow timings of the speedups the reproduce stages use (embedded model)."""
    import numpy as np

    from memloc.benchmarks import del_benchmark
    from memloc.contrastive import sparse_finetune
    from memloc.data import load_paragraphs, random_sequences
    import memloc.localize._masks as masks_mod
    from memloc.metrics import (exact_match, exact_match_teacher_forced, greedy_decode, teacher_forced)
    from memloc.perturb import _vocab_size, perturbation_profile, random_replacements

    model = load_model("tiny", device=device)
    para = load_paragraphs("tiny")
    em_ref = para.table["em_ref"].to_numpy()
    mp = para.tokens[np.flatnonzero(em_ref == 50)]
    nmp = para.tokens[np.flatnonzero(em_ref <= 10)]
    p = para.prefix_len
    T = para.tokens.shape[1] - p
    pb = dict(progress_bar=False)
    rows: list[dict] = []

    def row(name, fast, t_fast, slow, t_slow, note):
        diff = float((torch.as_tensor(fast).double() - torch.as_tensor(slow).double()).abs().max())
        rows.append(dict(method=f"pipeline/{name}", model="tiny", seconds=t_fast, reference_seconds=t_slow,
                         speedup=t_slow / t_fast, max_abs_diff=diff, note=note))
        logger.info("%s: %.2fs vs %.2fs (x%.2f)", name, t_fast, t_slow, t_slow / t_fast)

    # EM: teacher forcing vs greedy decoding
    x = para.tokens[:: (12 if quick else 6)][:64]
    fast, t_fast = _timed(lambda: exact_match_teacher_forced(model, x, p))
    slow, t_slow = _timed(lambda: exact_match(model, x, p))
    row("exact_match", fast, t_fast, slow, t_slow, f"{len(x)} paragraphs")

    # perturbation: new profile vs the old inner loop (decode + teacher-force every perturbed prefix)
    xp = torch.cat([mp[:2], nmp[:2]])
    res, t_fast = _timed(lambda: perturbation_profile(model, xp, p, batch_size=64, **pb))

    def old_loop():
        n = len(xp)
        repl = random_replacements(xp[:, :p], 1, _vocab_size(model), seed=0)
        prefixes = xp[:, :p].unsqueeze(1).repeat(1, p, 1)
        prefixes[:, torch.arange(p), torch.arange(p)] = repl[..., 0]
        flat = prefixes.reshape(-1, p)
        gens = greedy_decode(model, flat, T, batch_size=64)
        teacher_forced(model, torch.cat([flat, xp[:, p:].repeat_interleave(p, 0)], 1), p, batch_size=64)
        greedy_decode(model, xp[:, :p], T)
        teacher_forced(model, xp, p)
        return gens.view(n, p, 1, T)

    gens, t_slow = _timed(old_loop)
    row("perturbation", res.generations, t_fast, gens, t_slow, "2 MPs + 2 NMPs x 50 positions")

    # sparse fine-tuning: EM from the teacher-forced pass vs greedy decoding every step
    kw = dict(mask="top", fraction=0.001, steps=3, lr=1e-3, seed=0, **pb)
    a, t_fast = _timed(lambda: sparse_finetune(model, mp[:8], nmp[:16], p, **kw))
    b, t_slow = _timed(lambda: sparse_finetune(model, mp[:8], nmp[:16], p, em_via="greedy", **kw))
    row("sparse_finetune", a["em"].to_numpy(), t_fast, b["em"].to_numpy(), t_slow, "8 MPs, 16 NMPs, 3 steps")

    # mask training above layer 0 (DEL): partial forwards vs full forwards, per step
    steps = (5, 15) if quick else (10, 40)

    def per_step():
        t = [_timed(lambda: loc.slimming(model, mp[:1], p, max_steps=n, stop_loss=0.0, start_layer=1, **pb))
             for n in steps]
        return t[1][0], (t[1][1] - t[0][1]) / (steps[1] - steps[0])

    s_fast, t_fast = per_step()
    real = masks_mod.partial_forward
    masks_mod.partial_forward = lambda *a, **k: None
    try:
        s_slow, t_slow = per_step()
    finally:
        masks_mod.partial_forward = real
    row("slimming_start_layer_1", s_fast, t_fast, s_slow, t_slow, "seconds per step")

    # DEL: batched partial-forward measurement + ZERO-OUT above the excluded layer vs the old loop
    zo = {"progress_bar": False, "neurons": list(range(0, int(model.cfg.d_mlp), 8))}
    dkw = dict(targets=[0, 1], ratios=(0.005, 0.02, 0.1), random_tokens=random_sequences("tiny")[:32], **pb)
    fast_res, t_fast = _timed(lambda: del_benchmark(model, ["zero_out", "random"], mp[:16], p,
                                                    method_kwargs={"zero_out": zo}, **dkw))
    zo_all = dict(zo, layers=list(range(int(model.cfg.n_layers))))
    slow_res, t_slow = _timed(lambda: del_benchmark(model, ["zero_out", "random"], mp[:16], p, fast=False,
                                                    method_kwargs={"zero_out": zo_all}, **dkw))
    cols = ["d_self_acc", "d_neg_acc", "d_self_dist", "d_rand_ppl"]
    row("del", fast_res.rows[cols].to_numpy(), t_fast, slow_res.rows[cols].to_numpy(), t_slow,
        "ZERO-OUT (128 neurons/layer) + RANDOM, 2 targets x 3 ratios, 16 sequences")
    return rows


def run_perf(models: list[str] | tuple[str, ...] = MODELS, *, quick: bool = False,
             device: str | None = None) -> pd.DataFrame:
    """Run the benchmark on ``models`` and return one row per (method, model)."""
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"models must be a non-empty subset of {MODELS}, got {list(models)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            rows.extend(bench_model(name, quick=quick, device=device, workdir=Path(tmp)))
        if "tiny" in models:
            rows.extend(bench_pipeline(quick, device))
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame) -> str:
    cols = [c for c in ("method", "model", "seconds", "reference_seconds", "speedup", "max_abs_diff", "max_rel_diff",
                        "bound", "achieved_over_bound", "step_over_plain", "spearman") if c in df]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--quick", action="store_true", help="smaller subsets (a few minutes on 2 CPU cores)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")


def main(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    df = run_perf(models, quick=args.quick, device=args.device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(df.to_dict(orient="records"), indent=1, default=str))
    print(format_table(df))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(parser.parse_args()))
