"""Pipeline rows of ``memloc perf``: same-run fast vs slow timings of the library speedups the
``memloc reproduce`` stages use, on the embedded model.

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
"""

from __future__ import annotations

import logging

import torch

from . import localize as loc
from .models import load_model
from .perf import timed

__all__ = ["bench_pipeline"]

logger = logging.getLogger(__name__)


def bench_pipeline(quick: bool, device: str | None) -> list[dict]:
    """Same-run fast vs slow timings of the speedups the reproduce stages use (embedded model).

    (Over 80 lines: one short fast-vs-slow comparison per speedup, each a row of the output, kept
    together so the rows share the loaded model and paragraphs.)"""
    import numpy as np

    from memloc.benchmarks import del_benchmark
    from memloc.contrastive import sparse_finetune
    from memloc.data import load_paragraphs, random_sequences
    import memloc.localize._masks as masks_mod
    from memloc.metrics import (exact_match, exact_match_teacher_forced, greedy_decode, teacher_forced)
    from memloc.perturb import perturbation_profile, random_replacements, replacement_vocab_size

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
    fast, t_fast = timed(lambda: exact_match_teacher_forced(model, x, p))
    slow, t_slow = timed(lambda: exact_match(model, x, p))
    row("exact_match", fast, t_fast, slow, t_slow, f"{len(x)} paragraphs")

    # perturbation: new profile vs the old inner loop (decode + teacher-force every perturbed prefix)
    xp = torch.cat([mp[:2], nmp[:2]])
    res, t_fast = timed(lambda: perturbation_profile(model, xp, p, batch_size=64, **pb))

    def old_loop():
        n = len(xp)
        repl = random_replacements(xp[:, :p], 1, replacement_vocab_size(model), seed=0)
        prefixes = xp[:, :p].unsqueeze(1).repeat(1, p, 1)
        prefixes[:, torch.arange(p), torch.arange(p)] = repl[..., 0]
        flat = prefixes.reshape(-1, p)
        gens = greedy_decode(model, flat, T, batch_size=64)
        teacher_forced(model, torch.cat([flat, xp[:, p:].repeat_interleave(p, 0)], 1), p, batch_size=64)
        greedy_decode(model, xp[:, :p], T)
        teacher_forced(model, xp, p)
        return gens.view(n, p, 1, T)

    gens, t_slow = timed(old_loop)
    row("perturbation", res.generations, t_fast, gens, t_slow, "2 MPs + 2 NMPs x 50 positions")

    # sparse fine-tuning: EM from the teacher-forced pass vs greedy decoding every step
    kw = dict(mask="top", fraction=0.001, steps=3, lr=1e-3, seed=0, **pb)
    a, t_fast = timed(lambda: sparse_finetune(model, mp[:8], nmp[:16], p, **kw))
    b, t_slow = timed(lambda: sparse_finetune(model, mp[:8], nmp[:16], p, em_via="greedy", **kw))
    row("sparse_finetune", a["em"].to_numpy(), t_fast, b["em"].to_numpy(), t_slow, "8 MPs, 16 NMPs, 3 steps")

    # mask training above layer 0 (DEL): partial forwards vs full forwards, per step
    steps = (5, 15) if quick else (10, 40)

    def per_step():
        t = [timed(lambda: loc.slimming(model, mp[:1], p, max_steps=n, stop_loss=0.0, stop_mask_mean=None, start_layer=1, **pb))
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
    fast_res, t_fast = timed(lambda: del_benchmark(model, ["zero_out", "random"], mp[:16], p,
                                                    method_kwargs={"zero_out": zo}, **dkw))
    zo_all = dict(zo, layers=list(range(int(model.cfg.n_layers))))
    slow_res, t_slow = timed(lambda: del_benchmark(model, ["zero_out", "random"], mp[:16], p, fast=False,
                                                    method_kwargs={"zero_out": zo_all}, **dkw))
    cols = ["d_self_acc", "d_neg_acc", "d_self_dist", "d_rand_ppl"]
    row("del", fast_res.rows[cols].to_numpy(), t_fast, slow_res.rows[cols].to_numpy(), t_slow,
        "ZERO-OUT (128 neurons/layer) + RANDOM, 2 targets x 3 ratios, 16 sequences")
    return rows
