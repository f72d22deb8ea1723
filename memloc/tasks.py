"""The tasks of a benchmark sweep and the loop that runs them: the executor protocol and the
serial executor (see :mod:`memloc.executors` for the whole picture).

A sweep hands an executor a list of :class:`Task` (``func(model, *args)``) and an ``on_done``
callback that may add tasks (a DEL target's evaluations after its attribution).  Every executor
shares :class:`Executor`'s bookkeeping (:class:`SweepStats`, the progress bar, ``stop_after``
with :class:`SweepStopped`); :class:`SerialExecutor` runs the tasks in this process, depth first,
in the order the serial loops always used.  The Ray executor is :mod:`memloc.ray_executor`.
"""

from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ._progress import progress
from .models import Model

__all__ = ["Task", "SweepStats", "SweepStopped", "Executor", "SerialExecutor", "task_kind"]


@dataclass
class Task:
    """One unit of work: ``func(model, *args)`` with ``func`` a module-level function (pickled by
    reference to the workers).  ``key`` is the driver's label for it; ``spawns`` is how many tasks
    its completion may add (used for the progress bar's total)."""

    func: Callable
    args: tuple
    key: Any = None
    spawns: int = 0


@dataclass
class SweepStats:
    """What the last sweep of an executor did: ``n_cached`` results read from the cache,
    ``n_computed`` tasks computed (by kind: ``computed``), ``worker_pids`` of the processes that
    computed them (a restarted Ray worker shows up with a new pid)."""

    n_cached: int = 0
    n_computed: int = 0
    computed: dict = field(default_factory=dict)
    worker_pids: set = field(default_factory=set)

    def count(self, kind: str, pid: int) -> None:
        self.n_computed += 1
        self.computed[kind] = self.computed.get(kind, 0) + 1
        self.worker_pids.add(pid)


class SweepStopped(RuntimeError):
    """Raised when a sweep stops after ``stop_after`` tasks; everything computed so far is cached."""


OnDone = Callable[[Task, Any], Sequence[Task]]


class Executor:
    """Common part: the task loop's bookkeeping, the progress bar and ``stop_after``."""

    name = "executor"

    def __init__(self, *, stop_after: int | None = None, on_task_done: Callable[["Executor"], None] | None = None):
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                       or stop_after < 0):
            raise ValueError(f"stop_after must be a non-negative int or None, got {stop_after!r}")
        if on_task_done is not None and not callable(on_task_done):
            raise ValueError("on_task_done must be a callable(executor) or None")
        self.stop_after = stop_after
        self.on_task_done = on_task_done
        self.stats = SweepStats()

    def preflight(self) -> None:
        """Cheap checks before a sweep does any work (the Ray executor: is the cluster address reachable)."""

    def start_sweep(self) -> SweepStats:
        self.stats = SweepStats()
        return self.stats

    def run(self, model: Model, tasks: Sequence[Task], on_done: OnDone, *, desc: str = "tasks",
            progress_bar: bool = True) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextmanager
    def _bar(self, tasks: Sequence[Task], desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
        total = [len(tasks) + sum(t.spawns for t in tasks)]
        bar = progress(iter(()), enabled=enabled, desc=desc, total=total[0])

        def update(done_delta: int, total_delta: int = 0) -> None:
            if hasattr(bar, "update"):
                if total_delta:
                    bar.total += total_delta
                    bar.refresh()
                bar.update(done_delta)

        try:
            yield update
        finally:
            if hasattr(bar, "close"):
                bar.close()

    def _after_task(self, kind: str, pid: int) -> None:
        self.stats.count(kind, pid)
        if self.on_task_done is not None:
            self.on_task_done(self)

    def _should_stop(self) -> bool:
        return self.stop_after is not None and self.stats.n_computed >= self.stop_after

    def _stopped(self) -> SweepStopped:
        return SweepStopped(f"sweep stopped after {self.stats.n_computed} tasks (stop_after={self.stop_after}); "
                            "run the same call again with the same cache_dir to compute only the missing tasks")


def task_kind(task: Task) -> str:
    """The kind a task is counted under in :class:`SweepStats`: the first element of its ``key``
    when that is a tuple starting with a string (``("eval", ...)``, ``("scores", ...)``), else ``"task"``."""
    return task.key[0] if isinstance(task.key, tuple) and task.key and isinstance(task.key[0], str) else "task"


class SerialExecutor(Executor):
    """Run every task in this process on the model passed to the benchmark (the default)."""

    name = "serial"

    def run(self, model: Model, tasks: Sequence[Task], on_done: OnDone, *, desc: str = "tasks",
            progress_bar: bool = True) -> None:
        queue = deque(tasks)
        with self._bar(tasks, desc, progress_bar) as update:
            while queue:
                if self._should_stop():
                    raise self._stopped()
                task = queue.popleft()
                result = task.func(model, *task.args)
                self._after_task(task_kind(task), os.getpid())
                new = list(on_done(task, result))
                queue.extendleft(reversed(new))  # depth first: the serial loops' order
                update(1, len(new) - task.spawns)
