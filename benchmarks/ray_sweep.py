"""Wall time of a DEL sweep: serial (this process, one torch thread) vs Ray with two single-threaded
workers on a local Ray instance, measured in one run; plus Ray's per-task overhead.

    OMP_NUM_THREADS=1 python benchmarks/ray_sweep.py [--n 8] [--methods activations,integrated_gradients,hard_concrete]
                                                     [--json benchmarks/results/ray_sweep.json]

Every run computes everything (no cache).  The first Ray time includes starting the two workers
(each imports torch and loads the model) but not starting the Ray instance itself (a cluster is
started once and reused for many sweeps); the second is the same sweep again in the same
``with RayExecutor(...)`` session, whose workers keep their loaded models.  The script also checks that both runs give
the same table.  Target: serial / Ray >= 1.6 on 2 cores (the bound is 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MEMLOC_PROGRESS", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import memloc  # noqa: E402
from memloc.benchmarks import del_benchmark, memorized_set  # noqa: E402
from memloc.executors import RayExecutor, SerialExecutor  # noqa: E402

#: Mask steps: the embedded model's dev-set-tuned cap (``memloc.data.tuned_hyperparameters()``: 300), so
#: the sweep is the size of the DEL stage of ``memloc reproduce`` (a few minutes serial); ``--max-steps 60``
#: gives the one-minute sweep of the first measurement (1.21x: there, starting the two workers - each
#: imports torch and loads the model - is a fifth of the Ray run).
MAX_STEPS = 300


def method_kwargs(max_steps: int) -> dict[str, dict]:
    # stop_mask_mean=None: every mask training runs its max_steps (the library default would stop it
    # after 50-100 steps), so the sweep keeps the size of the earlier measurements
    return {"hard_concrete": {"max_steps": max_steps, "check_every": 20, "stop_mask_mean": None, "progress_bar": False},
            "slimming": {"max_steps": max_steps, "check_every": 20, "stop_mask_mean": None, "progress_bar": False},
            "integrated_gradients": {"progress_bar": False}, "zero_out": {"progress_bar": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="DEL targets (memorized paragraphs), default 8")
    ap.add_argument("--methods", default="activations,integrated_gradients,hard_concrete,random")
    ap.add_argument("--ratios", default="0.01,0.1")
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS, help=f"SLIMMING / HARD CONCRETE step cap (default {MAX_STEPS})")
    ap.add_argument("--overhead-n", type=int, default=200, help="no-op round trips for the per-task overhead")
    ap.add_argument("--json", default="benchmarks/results/ray_sweep.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    methods = [m for m in args.methods.split(",") if m]
    ratios = tuple(float(r) for r in args.ratios.split(","))
    model = memloc.load_model()
    tokens, prefix_len, table = memorized_set(model, n=args.n + 1)
    kw = dict(ids=table["id"].tolist(), targets=list(range(args.n)), ratios=ratios, n_random=16,
              method_kwargs={m: kw for m, kw in method_kwargs(args.max_steps).items() if m in methods}, progress_bar=False)

    serial = SerialExecutor()
    t0 = time.perf_counter()
    a = del_benchmark(model, methods, tokens, prefix_len, executor=serial, **kw)
    t_serial = time.perf_counter() - t0

    with RayExecutor() as session:  # starts the local instance once
        t0 = time.perf_counter()
        overhead = session.task_overhead(args.overhead_n)
        t_overhead = time.perf_counter() - t0
        with RayExecutor(num_workers=2, num_cpus_per_worker=1) as ray_ex:  # workers live for both sweeps
            t0 = time.perf_counter()
            b = del_benchmark(model, methods, tokens, prefix_len, executor=ray_ex, **kw)
            t_ray = time.perf_counter() - t0
            pids_cold = sorted(ray_ex.stats.worker_pids)
            t0 = time.perf_counter()
            c = del_benchmark(model, methods, tokens, prefix_len, executor=ray_ex, **kw)
            t_warm = time.perf_counter() - t0
    identical = True
    try:
        pd.testing.assert_frame_equal(a.rows, b.rows)
        pd.testing.assert_frame_equal(a.rows, c.rows)
    except AssertionError:
        identical = False
    n_tasks = serial.stats.n_computed
    out = {
        "sweep": {"benchmark": "del", "n_targets": args.n, "methods": methods, "ratios": list(ratios),
                  "method_kwargs": kw["method_kwargs"], "tasks": serial.stats.computed},
        "serial_s": round(t_serial, 2), "ray_two_workers_s": round(t_ray, 2),
        "speedup": round(t_serial / t_ray, 3), "ray_warm_workers_s": round(t_warm, 2),
        "speedup_warm_workers": round(t_serial / t_warm, 3),
        "ray_noop_task_round_trip_ms": round(overhead * 1000, 3),
        "ray_overhead_measurement_s": round(t_overhead, 2),
        "identical_tables": identical, "ray_workers_pids": pids_cold,
        "ray_warm_workers_pids": sorted(ray_ex.stats.worker_pids),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs; load average before the run "
                   f"{load_before:.1f}, after {os.getloadavg()[0]:.1f}", "torch_threads": 1,
    }
    print(f"DEL sweep: {args.n} targets x {len(methods)} methods ({', '.join(methods)}) x ratios {list(ratios)} "
          f"= {n_tasks} tasks ({serial.stats.computed})")
    print(f"serial (1 thread):            {t_serial:8.1f} s")
    print(f"Ray, 2 workers x 1 thread:    {t_ray:8.1f} s   (includes starting the workers)")
    print(f"speed-up serial / Ray:        {t_serial / t_ray:8.2f}x   (target >= 1.6x, bound 2x)")
    print(f"Ray, same 2 workers again:    {t_warm:8.1f} s   (a second sweep of the session: models loaded)")
    print(f"speed-up serial / warm Ray:   {t_serial / t_warm:8.2f}x")
    print(f"Ray no-op task round trip:    {overhead * 1000:8.2f} ms (median of {args.overhead_n})")
    print(f"identical tables:             {identical}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
