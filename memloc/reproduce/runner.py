"""A small generic runner of declared stages: requires/uses, skip with a reason, timing, cache.

A :class:`Stage` declares what it needs; the runner adds the stages it needs to the requested
ones, runs them in pipeline order, skips a stage (with the reason) when a required stage was
skipped or its own rule says so, reads its result from the content-addressed cache or computes
it, lets it render its figures and tables and state its finding, and times it.

A stage's cache address (:func:`stage_key`) is the digest of the model's weights, the run's data
(paragraph pool, thresholds, frequencies, tuning), the settings fields the stage declares, the
source of its ``compute`` function with memloc's version, and the addresses of the results it
was given, so an upstream change reaches every stage downstream of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..cache import code_version, digest
from ._format import fmt_duration
from .context import RunContext
from .settings import STAGES

logger = logging.getLogger("memloc.reproduce")

__all__ = ["Stage", "StageClock", "resolve", "run_stages", "stage_key", "plan_order", "planned_seconds",
           "TYPICAL_SECONDS"]

Inputs = Mapping[str, Any]


@dataclass(frozen=True)
class Stage:
    """One declared stage.

    Attributes:
        name, title: its name (one of :data:`STAGES`) and the report's section title.
        compute: ``(ctx, inputs) -> result`` (the cached part; ``inputs`` maps the names of
            ``requires`` and of the ``uses`` that ran to their results).
        render: ``(ctx, result) -> finding``: writes the figures and tables and returns the
            one-line finding (never cached, so a rerun redraws).
        requires: stages whose results it cannot run without (skipped if one is skipped).
        uses: stages whose results it uses when they ran (both are added to a run that asks
            for this stage, so a stage's result does not depend on which stages were asked for).
        skip: ``(ctx, inputs) -> reason | None``: its own rule for not running.
        settings: the :class:`Settings` fields its result depends on (part of its cache address).
    """

    name: str
    title: str
    compute: Callable[[RunContext, Inputs], Any]
    render: Callable[[RunContext, Any], str]
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    skip: Callable[[RunContext, Inputs], str | None] | None = None
    settings: tuple[str, ...] = ()


#: Seconds of each stage in the default run on the embedded model (``make gallery`` on 2026-11-28, idle
#: 2-core machine, CPU steal 0.7 %, 2 torch threads, README "Gallery"): the shape of the overall
#: estimate, scaled by the stages done so far, and the stage costs the parallel runner plans with.
TYPICAL_SECONDS = {"memorization": 16, "perturbation": 37, "gradients": 5, "contrastive": 9, "finetune": 78,
                   "head": 3, "rare_tokens": 1, "inj": 72, "del": 80, "patching": 5}


#: CPU steal (percent of the machine's CPU time) from which the last console line says that the
#: run was slowed by other guests of a virtual machine's host.
STEAL_NOTE_PERCENT = 5.0


def cpu_steal_counter() -> tuple[float, float] | None:
    """(steal, total) CPU seconds of the whole machine since boot (psutil; Linux reports ``steal``,
    the time the hypervisor ran other guests on this VM's cores), or None where not reported."""
    import psutil  # an accelerate dependency

    t = psutil.cpu_times()
    return (float(t.steal), float(sum(t))) if hasattr(t, "steal") else None


class StageClock:
    """One console line per stage, ``[3/10] gradients … 10 s (about 4 min left)``, on the
    ``memloc.reproduce`` logger (stderr at INFO via the CLI; ``memloc -q`` silences it).

    The estimate of what is left is the typical stage times (``expected``, default
    :data:`TYPICAL_SECONDS`) of the stages still to run, scaled by how the stages done so far
    compared with their typical times, and divided among ``workers`` processes.  The last line
    also gives the CPU steal of the run (:meth:`steal_percent`) when it reaches
    :data:`STEAL_NOTE_PERCENT`: on a shared virtual machine it, not memloc, explains a run much
    slower than :data:`TYPICAL_SECONDS` (measured here: perturbation 86 s instead of 37 s in a run
    during which `top` showed 29 % steal).
    """

    def __init__(self, stages: Sequence[str], expected: Mapping[str, float] | None = None, *, workers: int = 1) -> None:
        self.stages = list(stages)
        self.workers = workers
        expected = expected or TYPICAL_SECONDS
        self.expected = {st: float(expected.get(st, TYPICAL_SECONDS.get(st, 10.0))) for st in self.stages}
        self.spent: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self._steal0 = cpu_steal_counter()
        logger.info("reproduce: %d stages (%s)", len(self.stages), ", ".join(self.stages))

    def _left(self) -> float:
        done_expected = sum(self.expected[st] for st in self.spent)
        scale = sum(self.spent.values()) / done_expected if done_expected > 0 else 1.0
        return scale * sum(self.expected[st] for st in self.stages if st not in self.spent) / self.workers

    def steal_percent(self) -> float | None:
        """Percent of the machine's CPU time stolen by the hypervisor since this clock started (None
        where the system does not report steal)."""
        now = cpu_steal_counter()
        if now is None or self._steal0 is None or now[1] <= self._steal0[1]:
            return None
        return 100.0 * (now[0] - self._steal0[0]) / (now[1] - self._steal0[1])

    def begin(self, stage: str) -> None:
        logger.info("[%d/%d] %s …", self.stages.index(stage) + 1, len(self.stages), stage)

    def end(self, stage: str, seconds: float, note: str = "") -> None:
        self.spent[stage] = seconds
        left = self._left()
        tail = f"about {fmt_duration(left)} left" if left > 0 else f"done in {fmt_duration(time.perf_counter() - self.t0)}"
        steal = self.steal_percent() if left <= 0 else None
        if steal is not None and steal >= STEAL_NOTE_PERCENT:
            tail += (f"; CPU steal {steal:.0f}%: this virtual machine's host ran other guests on its cores, so "
                     "the stages took longer than on an idle machine")
        logger.info("[%d/%d] %s … %s%s (%s)", self.stages.index(stage) + 1, len(self.stages), stage,
                    fmt_duration(seconds), f", {note}" if note else "", tail)


def resolve(requested: Sequence[str], registry: Mapping[str, Stage]) -> list[str]:
    """``requested`` plus every stage they require or use, in pipeline order."""
    need, todo = set(), list(requested)
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend((*registry[name].requires, *registry[name].uses))
    return [s for s in STAGES if s in need]


def stage_key(ctx: RunContext, stage: Stage, input_keys: Mapping[str, str]) -> str:
    """The stage's content address (see the module docstring)."""
    return digest(stage.name, code_version(stage.compute), ctx.fingerprint, ctx.data_key,
                  {f: getattr(ctx.settings, f) for f in stage.settings}, sorted(input_keys.items()))


def _skip_reason(ctx: RunContext, stage: Stage, results: Mapping[str, Any], inputs: Inputs) -> str | None:
    missing = [d for d in stage.requires if d not in results]
    if missing:
        return f"needs the {missing[0]} stage, which was skipped ({ctx.result.skipped.get(missing[0], '')})"
    return stage.skip(ctx, inputs) if stage.skip is not None else None


def stage_inputs(stage: Stage, results: Mapping[str, Any]) -> dict[str, Any]:
    """The results ``stage`` is given: those of its ``requires`` and of the ``uses`` that ran."""
    return {d: results[d] for d in (*stage.requires, *stage.uses) if d in results}


def save_stage(ctx: RunContext, name: str, key: str, value: Any) -> None:
    """Store a computed stage result in the run's cache (if it has one)."""
    if ctx.cache is not None:
        ctx.cache.save(f"reproduce/{name}", key, value)


def settle_stage(ctx: RunContext, stage: Stage, results: dict[str, Any], keys: dict[str, str]) -> str | None:
    """Settle ``stage`` without computing it when possible: ``"skipped"`` (the reason goes to
    ``ctx.result.skipped``) or ``"cached"`` (its result read into ``results``); None when it must be
    computed.  Sets ``keys[stage.name]`` unless skipped."""
    inputs = stage_inputs(stage, results)
    reason = _skip_reason(ctx, stage, results, inputs)
    if reason is not None:
        ctx.result.skipped[stage.name] = reason
        return "skipped"
    keys[stage.name] = key = stage_key(ctx, stage, {d: keys[d] for d in inputs})
    if ctx.cache is not None:
        hit, value = ctx.cache.load(f"reproduce/{stage.name}", key)
        if hit:
            results[stage.name] = value
            ctx.result.cached.append(stage.name)
            return "cached"
    return None


def render_stage(ctx: RunContext, stage: Stage, results: dict[str, Any], seconds: float, clock: StageClock) -> None:
    """Record a settled stage: render it (figures, tables, finding) unless it was skipped, time it
    (``seconds`` of computing or reading it, plus rendering), and print its console line."""
    name = stage.name
    if name in ctx.result.skipped:
        clock.end(name, seconds, f"skipped: {ctx.result.skipped[name]}")
        return
    t0 = time.perf_counter()
    ctx.result.results[name] = results[name]
    ctx.result.findings[name] = stage.render(ctx, results[name])
    seconds += time.perf_counter() - t0
    ctx.result.timings[name] = seconds
    clock.end(name, seconds, "from the cache" if name in ctx.result.cached else "")


def _run_one(ctx: RunContext, stage: Stage, results: dict[str, Any], keys: dict[str, str], clock: StageClock) -> None:
    clock.begin(stage.name)
    t0 = time.perf_counter()
    if settle_stage(ctx, stage, results, keys) is None:
        results[stage.name] = stage.compute(ctx, stage_inputs(stage, results))
        save_stage(ctx, stage.name, keys[stage.name], results[stage.name])
    render_stage(ctx, stage, results, time.perf_counter() - t0, clock)


def _timing_record(ctx: RunContext) -> tuple[str, dict[str, float]]:
    """The stage times of the last uncached run with these settings (the console estimate)."""
    key = digest("timings", ctx.settings, ctx.data_key, size=8)
    if ctx.cache is None:
        return key, {}
    hit, value = ctx.cache.load("reproduce/timings", key)
    return key, (value if hit and isinstance(value, dict) else {})


def run_stages(ctx: RunContext, requested: Sequence[str], registry: Mapping[str, Stage], *, workers: int = 1,
               spec: Any = None, threads: int = 1) -> None:
    """Run ``requested`` (and what they need) on ``ctx``; fills ``ctx.result``.  With ``workers > 1``
    the stages are computed on that many processes that load the model from ``spec`` with
    ``threads`` torch threads each (:mod:`memloc.reproduce.parallel`); the results, files and report
    are the same as a serial run's."""
    order = resolve(requested, registry)
    record_key, previous = _timing_record(ctx)
    expected = {**TYPICAL_SECONDS, **previous}
    workers = min(workers, len(order))
    clock = StageClock(order, expected, workers=workers)
    results: dict[str, Any] = {}
    keys: dict[str, str] = {}
    if workers > 1:
        from .parallel import run_parallel

        run_parallel(ctx, order, registry, clock, expected, workers=workers, spec=spec, threads=threads,
                     results=results, keys=keys)
    else:
        for name in order:
            _run_one(ctx, registry[name], results, keys, clock)
    ctx.result.cpu_steal_percent = clock.steal_percent()
    for name in STAGES:
        if name not in order:
            ctx.result.skipped[name] = "not requested (--stages)"
    fresh = {s: round(t, 1) for s, t in ctx.result.timings.items() if s not in ctx.result.cached}
    if ctx.cache is not None and fresh:
        ctx.cache.save("reproduce/timings", record_key, {**previous, **fresh})
