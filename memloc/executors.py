"""Where the work of a benchmark sweep runs: in this process (serial, the default) or on Ray.

A DEL or INJ sweep is a small task graph: one *attribution* task per (model, sequence, method,
hyperparameters) -- a localization method's neuron scores, :func:`memloc.localize` -- and, for
DEL, one *evaluation* task per (target, method, ratio) that drops the located neurons out and
measures the memorized set again (INJ's evaluation, Recall@k of the injected neurons, takes
microseconds and runs on the driver; its injections are tasks of their own).  The benchmark
functions (:func:`memloc.benchmarks.del_benchmark`, :func:`memloc.benchmarks.inj_benchmark`)
build the graph, skip every task whose result is already in the content-addressed cache
(``cache_dir``), and hand the rest to an executor:

* :class:`SerialExecutor` runs the tasks one after the other on the model it was given, in the
  order the serial loops always used (a target's evaluations right after its attribution).
* :class:`RayExecutor` starts one Ray actor per worker; each loads the model once from a
  picklable :class:`ModelSpec`, declares ``num_cpus`` / ``num_gpus``, pins its torch threads to
  its CPUs, and takes one task at a time from the driver (a ``ray.wait`` loop, so a slow task
  never blocks a free worker).  A worker that dies is restarted by Ray (``max_restarts``) and its
  task retried (``max_task_retries``).  The driver writes every result into the cache as it
  arrives (so no shared file system is needed), and the final table is assembled in the serial
  order from the same per-task functions: it is identical to a serial run's on the same device
  and thread count.

A sweep that stops (Ctrl-C, a lost driver, ``stop_after``) is resumed by running the same call
again with the same ``cache_dir``: only the missing tasks are computed.

Homes: the tasks, the executor protocol and :class:`SerialExecutor` live in :mod:`memloc.tasks`,
:class:`RayExecutor` and :class:`ModelSpec` in :mod:`memloc.ray_executor`; every name keeps
working as ``memloc.executors.<name>``.
"""

from __future__ import annotations

from typing import Any, Callable

from .ray_executor import RAY_EXTRA, ModelSpec, RayExecutor, require_ray  # noqa: F401 (re-exported)
from .tasks import Executor, OnDone, SerialExecutor, SweepStats, SweepStopped, Task  # noqa: F401 (re-exported)

__all__ = ["ModelSpec", "Task", "SweepStats", "SweepStopped", "Executor", "SerialExecutor", "RayExecutor",
           "resolve_executor", "require_ray", "check_calls", "EXECUTORS"]

#: Names accepted as ``executor=`` by the benchmark functions and ``memloc bench --executor``.
EXECUTORS = ("serial", "ray")


def check_calls(fns: dict[str, Callable], kwargs: dict[str, dict]) -> None:
    """Check that every method accepts ``(model, tokens, prefix_len, **kwargs[name])`` -- before any task
    is submitted, so that a misspelt hyperparameter fails at once rather than in a worker."""
    import inspect

    for name, fn in fns.items():
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin or C callable: nothing to check
            continue
        try:
            sig.bind(None, None, 0, **kwargs.get(name, {}))
        except TypeError as exc:
            params = [p for p in sig.parameters if p not in ("model", "tokens", "prefix_len")]
            raise ValueError(f"method_kwargs[{name!r}] = {kwargs.get(name, {})} does not fit the method "
                             f"{getattr(fn, '__name__', fn)}({', '.join(params)}): {exc}") from exc


def resolve_executor(executor: Any, *, ray_address: str | None = None) -> Executor:
    """``"serial"`` (or None) -> :class:`SerialExecutor`, ``"ray"`` -> :class:`RayExecutor` (``ray_address``
    joins a cluster); an executor instance passes through.  Runs the executor's cheap pre-flight
    checks (an unreachable cluster address fails here, in seconds, before any work)."""
    if isinstance(executor, Executor):
        if ray_address is not None:
            raise ValueError("ray_address only applies with executor='ray'; set address on the RayExecutor instead")
    elif executor is None or executor == "serial":
        if ray_address is not None:
            raise ValueError("ray_address needs executor='ray'")
        executor = SerialExecutor()
    elif executor == "ray":
        executor = RayExecutor(ray_address)
    else:
        raise ValueError(f"executor must be one of {list(EXECUTORS)} or an executor instance, got {executor!r}")
    executor.preflight()
    return executor
