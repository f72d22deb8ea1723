"""Stages on several worker processes: the plan (which ready stage a free worker takes) and the pool.

When it pays, measured: on the 2-core VM the embedded model's default run took 11 min 56 s with two
workers of one thread each against 10 min 14 s in one process with two threads (fresh clone, idle
machine): its batched stages run more than 2× slower on one thread than on two (fine-tuning 321 s
vs 143 s, INJ 357 s vs 133 s, DEL 464 s vs 201 s), so ``workers`` defaults to 1.  Stages that
scale badly with threads (single-sequence mask training: 1.05× from a second thread) and machines
with more cores than one model's forward passes can use are where several workers help.  Why
processes and not Ray: ten stages of minutes each form a small DAG (``requires`` / ``uses``), which
the standard library's ``multiprocessing`` pool runs without Ray's start-up (seconds) or an extra
dependency; :mod:`memloc.executors` (Ray) is for sweeps across machines.

Each worker loads the model once from its :class:`~memloc.ray_executor.ModelSpec` (the arguments
of the :func:`memloc.load_model` call that returned it), pins its torch threads, and receives a
copy of the run context without the model; it computes one stage at a time and sends the result
back.  The driver (this process) computes the first stage itself (the memorization split, which
the others need) while the workers start, and keeps everything else: skip rules, the content-addressed cache
(reads before submitting, writes on arrival), rendering in pipeline order (so ``REPORT.md``, the
CSVs and the notes are the same bytes as a serial run's), and the console lines.

Which stage a free worker takes: list scheduling with a priority order chosen by
:func:`plan_order`: the order, among the critical-path order, the longest-first order and the
pipeline order each improved by pairwise swaps, whose simulated makespan (:func:`planned_seconds`,
with the expected stage times) is shortest.  With three long stages (DEL, fine-tuning, INJ) on two
workers, the plain critical-path rule queues fine-tuning behind INJ (on the default run's stage
times: a 330 s plan against 307 s for the chosen order, where 306 s is the bound; see the tests).
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import queue
import time
from typing import Any, Mapping, Sequence

import torch

from .context import RunContext
from .settings import ReproduceResult

logger = logging.getLogger("memloc.reproduce")

__all__ = ["plan_order", "planned_seconds", "run_parallel"]

#: The worker process's state: the run context (with its own model) and the stage registry.
_WORKER: dict[str, Any] = {}


def _deps(registry: Mapping[str, Any], order: Sequence[str]) -> dict[str, tuple[str, ...]]:
    present = set(order)
    return {s: tuple(d for d in (*registry[s].requires, *registry[s].uses) if d in present) for s in order}


def planned_seconds(priority: Sequence[str], deps: Mapping[str, Sequence[str]], cost: Mapping[str, float],
                    workers: int) -> float:
    """Simulated makespan of list scheduling: whenever a worker is free, it takes the first stage of
    ``priority`` whose dependencies have finished (waiting for the next finish when none has)."""
    free = [0.0] * workers
    finish: dict[str, float] = {}
    todo = list(priority)
    while todo:
        w = min(range(workers), key=free.__getitem__)
        now = free[w]
        ready = next((s for s in todo if all(d in finish and finish[d] <= now for d in deps[s])), None)
        if ready is None:
            later = [f for f in finish.values() if f > now]
            if not later:
                raise ValueError(f"stages {todo} wait on stages that never run")
            free[w] = min(later)
            continue
        finish[ready] = now + float(cost[ready])
        free[w] = finish[ready]
        todo.remove(ready)
    return max(finish.values(), default=0.0)


def _improve(priority: list[str], deps: Mapping[str, Sequence[str]], cost: Mapping[str, float],
             workers: int) -> tuple[float, list[str]]:
    best = planned_seconds(priority, deps, cost, workers)
    improved = True
    while improved:
        improved = False
        for i in range(len(priority)):
            for j in range(i + 1, len(priority)):
                cand = priority.copy()
                cand[i], cand[j] = cand[j], cand[i]
                t = planned_seconds(cand, deps, cost, workers)
                if t < best - 1e-9:
                    best, priority, improved = t, cand, True
    return best, priority


def plan_order(order: Sequence[str], registry: Mapping[str, Any], expected: Mapping[str, float],
               workers: int) -> list[str]:
    """The priority order in which free workers take ready stages (module docstring)."""
    deps = _deps(registry, order)
    cost = {s: float(expected.get(s, 10.0)) for s in order}
    children: dict[str, list[str]] = {s: [] for s in order}
    for s, ds in deps.items():
        for d in ds:
            children[d].append(s)
    level: dict[str, float] = {}
    for s in reversed(list(order)):  # pipeline order is a topological order
        level[s] = cost[s] + max((level[c] for c in children[s]), default=0.0)
    starts = [sorted(order, key=lambda s: -level[s]), sorted(order, key=lambda s: -cost[s]), list(order)]
    return min((_improve(p, deps, cost, workers) for p in starts), key=lambda tp: tp[0])[1]


def _init_worker(spec: Any, ctx: RunContext, registry: Mapping[str, Any], threads: int, level: int) -> None:
    import os

    import torch

    os.environ["MEMLOC_PROGRESS"] = "0"  # several workers' bars would garble one console
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(message)s")
    ctx.model = spec.load()
    _WORKER.update(ctx=ctx, registry=registry)


def _compute(name: str, inputs: dict[str, Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = _WORKER["registry"][name].compute(_WORKER["ctx"], inputs)
    return value, time.perf_counter() - t0


def run_parallel(ctx: RunContext, order: Sequence[str], registry: Mapping[str, Any], clock: Any,
                 expected: Mapping[str, float], *, workers: int, spec: Any, threads: int,
                 results: dict[str, Any], keys: dict[str, str]) -> None:
    """Compute the stages of ``order`` on ``workers`` processes (module docstring); fills ``ctx.result``,
    ``results`` and ``keys`` exactly as the serial runner does."""
    from .runner import render_stage, save_stage, settle_stage, stage_inputs

    priority = plan_order(order, registry, expected, workers)
    deps = _deps(registry, order)
    logger.info("reproduce: %d worker processes (%d torch thread%s each), stages taken in the order %s", workers,
                threads, "" if threads == 1 else "s", ", ".join(priority))
    worker_ctx = copy.copy(ctx)  # what a worker needs, without the model (each loads its own)
    worker_ctx.model, worker_ctx.progress_bar, worker_ctx.notes = None, False, []
    worker_ctx.result = ReproduceResult(out_dir=ctx.out, report=ctx.result.report)
    arrived: queue.Queue = queue.Queue()
    seconds: dict[str, float] = {}  # settled stages: seconds computing (in a worker) or reading the cache
    waiting: list[str] = []  # ready, not settled without a worker, not yet submitted
    running: set[str] = set()
    seen: set[str] = set()
    rendered = 0

    def store(name: str, value: Any, secs: float) -> None:
        results[name], seconds[name] = value, secs
        save_stage(ctx, name, keys[name], value)

    # spawn, not fork: a forked child would inherit torch's thread pools and locks
    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker,
        initargs=(spec, worker_ctx, dict(registry), threads, logging.getLogger("memloc").getEffectiveLevel()))
    try:
        while True:
            progressed = True
            while progressed:  # settle whatever needs no worker, in priority order
                progressed = False
                for name in priority:
                    if name in seen or any(d not in seconds for d in deps[name]):
                        continue
                    seen.add(name)
                    t0 = time.perf_counter()
                    if settle_stage(ctx, registry[name], results, keys) is None:
                        waiting.append(name)
                    else:
                        clock.begin(name)
                        seconds[name] = time.perf_counter() - t0
                        progressed = True
            waiting.sort(key=priority.index)
            while len(running) < workers and (queued := [w for w in waiting if w != order[0] or deps[w]]):
                name = queued[0]
                waiting.remove(name)
                clock.begin(name)
                running.add(name)
                pool.apply_async(_compute, (name, stage_inputs(registry[name], results)), callback=lambda v, n=name: arrived.put((n, v, None)),
                                 error_callback=lambda e, n=name: arrived.put((n, None, e)))
            if order[0] in waiting and not deps[order[0]]:
                # the first stage (the memorization split, which the others need): computed here
                # while the workers start (each imports torch and loads the model, ~10 s)
                name = order[0]
                waiting.remove(name)
                clock.begin(name)
                t0, before = time.perf_counter(), torch.get_num_threads()
                torch.set_num_threads(threads)  # as a worker: the cores are theirs
                try:
                    store(name, registry[name].compute(ctx, {}), time.perf_counter() - t0)
                finally:
                    torch.set_num_threads(before)
                continue
            for name in order[rendered:]:  # in pipeline order: the same bytes as a serial run
                if name not in seconds:
                    break
                render_stage(ctx, registry[name], results, seconds[name], clock)
                rendered += 1
            if rendered == len(order):
                return
            name, value, error = arrived.get()
            if error is not None:
                raise error
            running.discard(name)
            store(name, *value)
    finally:
        pool.terminate()  # a failed or interrupted run leaves nothing computing in the background
        pool.join()
