"""The Ray executor: a benchmark sweep's tasks on Ray actors (see :mod:`memloc.executors`).

:class:`RayExecutor` starts one Ray actor per worker; each loads the model once from a picklable
:class:`ModelSpec`, declares ``num_cpus`` / ``num_gpus``, pins its torch threads to its CPUs, and
takes one task at a time from the driver (a ``ray.wait`` loop, so a slow task never blocks a free
worker).  A worker that dies is restarted by Ray (``max_restarts``) and its task retried
(``max_task_retries``).  Ray is an optional dependency (:func:`require_ray`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .models import Model
from .tasks import Executor, OnDone, Task, task_kind

logger = logging.getLogger(__name__)

__all__ = ["ModelSpec", "RayExecutor", "require_ray"]

RAY_EXTRA = "pip install 'memloc[ray]'"


def require_ray() -> Any:
    """Import and return :mod:`ray`, or raise ImportError naming the ``memloc[ray]`` extra."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"the Ray executor needs Ray, which is not installed; install the extra: {RAY_EXTRA} "
                          f"({exc})") from exc
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: the arguments of :func:`memloc.load_model`.

    ``name_or_path=None`` is the embedded model.  :meth:`from_model` reads the arguments that
    :func:`memloc.load_model` recorded for a model it returned; a model built another way (or
    copied) has none, and the Ray executor then needs ``RayExecutor(model_spec=...)``.  With
    ``device_map`` (a model placed across a node's GPUs) each worker boots the model with that map
    and the worker's device is ignored; give such a worker the node's GPUs (``num_gpus_per_worker``).
    """

    name_or_path: str | None = None
    dtype: torch.dtype = torch.float32
    device: str | None = None
    process_weights: bool = False
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None
    fused_gelu: bool = True

    def load(self, device: str | None = None) -> Any:
        from .models import load_model

        if self.device_map is not None:
            return load_model(self.name_or_path, dtype=self.dtype, process_weights=self.process_weights,
                              device_map=self.device_map, max_memory=self.max_memory,
                              offload_folder=self.offload_folder, fused_gelu=self.fused_gelu)
        return load_model(self.name_or_path, device=device or self.device, dtype=self.dtype,
                          process_weights=self.process_weights, fused_gelu=self.fused_gelu)

    @classmethod
    def from_model(cls, model: Model) -> "ModelSpec":
        from .models import load_args

        args = load_args(model)
        if args is None:
            raise ValueError("model: the Ray executor loads the model once in every worker and needs to know how; "
                             "this model was not returned by memloc.load_model (or was copied). Pass "
                             "RayExecutor(model_spec=ModelSpec(name_or_path, dtype=..., process_weights=...)).")
        return cls(**args)


class _Worker:
    """A Ray actor's state: the model, loaded once per worker process (and again after a restart)."""

    def __init__(self, spec: ModelSpec, device: str | None, num_threads: int, env: dict):
        os.environ.update(env)
        torch.set_num_threads(max(1, int(num_threads)))
        from .benchmarks._scores import model_fingerprint

        self.model = spec.load(device)
        self.fingerprint = model_fingerprint(self.model)

    def ready(self) -> tuple[int, str, int]:
        return os.getpid(), self.fingerprint, torch.get_num_threads()

    def run(self, func: Callable, *args: Any) -> tuple[int, Any]:
        from .borrow import borrowed

        with borrowed(self.model):
            return os.getpid(), func(self.model, *args)

    def noop(self) -> None:
        return None


_LOCAL_TOKEN: list[str] = []


def _local_token() -> str:
    """One token per process: Ray keeps the first token it reads for the life of the process."""
    if not _LOCAL_TOKEN:
        _LOCAL_TOKEN.append(secrets.token_hex(32))
    return _LOCAL_TOKEN[0]


def _check_address(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at ``address`` (ray.init would keep retrying for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"ray_address {address!r} must be 'host:port', 'ray://host:port' or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(f"ray_address {address!r}: cannot reach a Ray cluster there within {timeout:g} s "
                         f"({type(exc).__name__}: {exc}); is the head node running (`ray start --head`)?") from exc


class RayExecutor(Executor):
    """Run the tasks on Ray actors: a local Ray instance (``address=None``) or a running cluster.

    Args:
        address: a Ray cluster address (``host:port``, ``ray://host:port`` or ``auto``); None starts
            a local instance (all CPUs of this machine, no dashboard, a temporary directory) for
            the sweep and shuts it down afterwards.  If Ray is already initialized in this process
            the executor uses that instance and leaves it running.
        num_workers: number of actors (default: as many as the cluster's CPUs, or GPUs when
            ``num_gpus_per_worker`` > 0, can hold).
        num_cpus_per_worker: CPUs each actor declares; its torch threads are pinned to this number.
        num_gpus_per_worker: GPUs each actor declares (fractions allowed); workers then load the
            model on ``device`` (default ``"cuda"``).
        device: device of the workers' models (default: the model spec's, or ``"cuda"`` with GPUs).
        model_spec: how workers load the model (default: read from a :func:`memloc.load_model` model).
        max_restarts, max_task_retries: Ray's restart budget for a worker that dies and retry
            budget for its task.
        connect_timeout: seconds to wait for ``address`` to answer before failing.
        stop_after: stop (raise :class:`SweepStopped`) after this many computed tasks.
        on_task_done: called with the executor after every completed task (tests, monitoring).

    Use it as a context manager to keep one Ray connection, and its workers with their loaded
    models, over several sweeps (``with RayExecutor(num_workers=2) as ex: del_benchmark(...,
    executor=ex); inj_benchmark(..., executor=ex)``): a later sweep on the same model (same spec,
    device, threads and weights) reuses the workers instead of loading the model again.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_workers: int | None = None, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, device: str | None = None, model_spec: ModelSpec | None = None,
                 max_restarts: int = 3, max_task_retries: int = 3, connect_timeout: float = 5.0,
                 stop_after: int | None = None, on_task_done: Callable[["RayExecutor"], None] | None = None):
        super().__init__(stop_after=stop_after, on_task_done=on_task_done)
        self._ray = require_ray()
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ValueError(f"address must be a Ray cluster address string or None, got {address!r}")
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 1):
            raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
        for name, v, lo in (("num_cpus_per_worker", num_cpus_per_worker, 0), ("num_gpus_per_worker", num_gpus_per_worker, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if num_cpus_per_worker <= 0 and num_gpus_per_worker <= 0:
            raise ValueError("a worker must declare some resources: num_cpus_per_worker or num_gpus_per_worker > 0")
        for name, v in (("max_restarts", max_restarts), ("max_task_retries", max_task_retries)):
            if isinstance(v, bool) or not isinstance(v, int) or v < -1:
                raise ValueError(f"{name} must be an int >= -1 (-1: unlimited), got {v!r}")
        if model_spec is not None and not isinstance(model_spec, ModelSpec):
            raise ValueError(f"model_spec must be a memloc.executors.ModelSpec, got {type(model_spec).__name__}")
        self.address = address.strip() if address else None
        self.num_workers = num_workers
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self.device = device
        self.model_spec = model_spec
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries
        self.connect_timeout = float(connect_timeout)
        self.start_attempts = 2
        self.actors: list = []
        self._actors_for: tuple | None = None  # (spec, device, threads, weights digest) the actors hold
        self._busy: dict = {}
        self._owned = False
        self._depth = 0
        self._temp_dir: str | None = None
        self._env_set: dict[str, str | None] = {}

    # -- connection ---------------------------------------------------------------------------
    def preflight(self) -> None:
        if self.address is not None:
            _check_address(self.address, self.connect_timeout)

    def __enter__(self) -> "RayExecutor":
        self._connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._disconnect()

    def _setenv(self, key: str, value: str) -> None:
        if key not in self._env_set:
            self._env_set[key] = os.environ.get(key)
        os.environ[key] = value

    def _connect(self) -> None:
        ray = self._ray
        if self.address is not None:
            _check_address(self.address, self.connect_timeout)
        self._depth += 1
        if self._depth > 1 or ray.is_initialized():
            return
        if os.environ.get("RAY_USAGE_STATS_ENABLED") is None:
            self._setenv("RAY_USAGE_STATS_ENABLED", "0")
        kw = dict(logging_level=logging.WARNING, log_to_driver=False)
        t0 = time.perf_counter()
        if self.address is not None:
            try:
                ray.init(address=self.address, **kw)
            except Exception as exc:
                self._depth -= 1
                raise ValueError(f"ray_address {self.address!r}: could not join the Ray cluster "
                                 f"({type(exc).__name__}: {exc})") from exc
        else:
            # Ray >= 2.59 authenticates with a token and, for a local instance, writes one to
            # ~/.ray/auth_token if none exists; give this private instance its own token instead
            # (workers inherit the environment), so nothing is written outside the temp dir.
            if (os.environ.get("RAY_AUTH_MODE", "") != "disabled" and not os.environ.get("RAY_AUTH_TOKEN")
                    and not os.environ.get("RAY_AUTH_TOKEN_PATH")
                    and not os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
                self._setenv("RAY_AUTH_TOKEN", _local_token())
            self._temp_dir = tempfile.mkdtemp(prefix="memloc-ray-")
            for attempt in range(1, self.start_attempts + 1):
                try:
                    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, _temp_dir=self._temp_dir, **kw)
                    break
                except Exception as exc:
                    ray.shutdown()  # stop what the failed start left running
                    if attempt == self.start_attempts:
                        self._depth -= 1
                        logs, self._temp_dir = self._temp_dir, None  # keep the logs
                        self._cleanup_env()
                        raise RuntimeError(
                            f"could not start a local Ray instance in {self.start_attempts} attempts ({exc}). Ray's "
                            "raylet gives its Python agents about 15 s to start; on an overloaded machine they miss "
                            f"it (logs: {logs}/session_latest/logs/raylet.out). Retry when the machine is less "
                            "busy, or start a cluster with `ray start --head` and pass its address.") from exc
                    # Ray's start-up waits are fixed (about 30 s); on an overloaded machine its
                    # agents can miss them, and a second start usually succeeds
                    logger.warning("starting a local Ray instance failed (%s: %s); retrying (%d of %d)",
                                   type(exc).__name__, str(exc).splitlines()[0][:200], attempt + 1,
                                   self.start_attempts)
        self._owned = True
        logger.info("Ray %s in %.1f s", "joined at " + self.address if self.address else "started locally",
                    time.perf_counter() - t0)

    def _cleanup_env(self) -> None:
        for key, old in self._env_set.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._env_set = {}
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def _disconnect(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._stop_actors()
            if self._owned:
                self._ray.shutdown()
                self._owned = False
                self._cleanup_env()

    # -- workers ------------------------------------------------------------------------------
    def busy_actors(self) -> list:
        """Actors that hold a task right now (tests kill one of them)."""
        return list(self._busy.values())

    def _n_workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        res = self._ray.cluster_resources()
        by = [res.get("CPU", 0) / self.num_cpus_per_worker] if self.num_cpus_per_worker > 0 else []
        if self.num_gpus_per_worker > 0:
            by.append(res.get("GPU", 0) / self.num_gpus_per_worker)
        n = int(min(by)) if by else 0
        if n < 1:
            raise ValueError(f"the Ray cluster ({res}) cannot hold one worker of {self.num_cpus_per_worker} CPU and "
                             f"{self.num_gpus_per_worker} GPU")
        return n

    def _start_actors(self, model: Model, n_tasks: int) -> bool:
        """Start the workers (True), or keep those of an earlier sweep of this session (False):
        inside ``with RayExecutor(...) as ex:`` the workers, with their loaded models, live until
        the block ends, so a second sweep on the same model pays no start-up."""
        from .benchmarks._scores import model_fingerprint

        ray = self._ray
        spec = self.model_spec or ModelSpec.from_model(model)
        device = self.device or ("cuda" if self.num_gpus_per_worker > 0 and spec.device in (None, "cpu") else None)
        threads = max(1, int(self.num_cpus_per_worker))
        want = model_fingerprint(model)
        n = min(self._n_workers(), n_tasks)
        if self.actors and self._actors_for == (spec, device, threads, want) and len(self.actors) >= n:
            return False
        self._stop_actors()
        env = {"MEMLOC_PROGRESS": "0", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cls = ray.remote(_Worker).options(num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker,
                                          max_restarts=self.max_restarts, max_task_retries=self.max_task_retries)
        self.actors = [cls.remote(spec, device, threads, env) for _ in range(n)]
        for pid, fp, _ in ray.get([a.ready.remote() for a in self.actors]):
            if fp != want:
                self._stop_actors()
                raise ValueError(f"model: the Ray workers loaded {spec} and got other weights than the model passed "
                                 "(was it changed after loading?); pass a model_spec that loads these weights")
        self._actors_for = (spec, device, threads, want)
        return True

    def _stop_actors(self) -> None:
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        self._busy = {}
        self._actors_for = None

    def run(self, model: Model, tasks: Sequence[Task], on_done: OnDone, *, desc: str = "tasks",
            progress_bar: bool = True) -> None:
        if not tasks:
            return
        ray = self._ray
        queue = deque(tasks)
        self._connect()
        try:
            t0 = time.perf_counter()
            if self._start_actors(model, len(tasks)):
                logger.info("%d Ray workers loaded the model in %.1f s", len(self.actors), time.perf_counter() - t0)
            else:
                logger.info("reusing the %d Ray workers of this session", len(self.actors))
            idle = deque(self.actors)
            inflight: dict = {}
            with self._bar(tasks, desc, progress_bar) as update:
                while queue or inflight:
                    while queue and idle and not self._should_stop():
                        task, actor = queue.popleft(), idle.popleft()
                        ref = actor.run.remote(task.func, *task.args)
                        inflight[ref] = (task, actor)
                        self._busy[ref] = actor
                    if not inflight:
                        break
                    done, _ = ray.wait(list(inflight), num_returns=1)
                    ref = done[0]
                    task, actor = inflight.pop(ref)
                    self._busy.pop(ref, None)
                    pid, result = ray.get(ref)  # a task's exception is re-raised here (as its own type)
                    idle.append(actor)
                    self._after_task(task_kind(task), pid)
                    new = list(on_done(task, result))
                    queue.extendleft(reversed(new))  # finish a target's evaluations first
                    update(1, len(new) - task.spawns)
                    if self._should_stop() and not inflight:
                        break
            if queue:
                raise self._stopped()
        finally:
            self._disconnect()  # stops the workers unless a `with` block keeps them for the next sweep

    def task_overhead(self, n: int = 200) -> float:
        """Median seconds of a no-op actor task's round trip (submit, run, fetch) on one worker."""
        ray = self._ray
        self._connect()
        try:
            actor = ray.remote(_Noop).options(num_cpus=self.num_cpus_per_worker or 0.01).remote()
            ray.get(actor.noop.remote())
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                ray.get(actor.noop.remote())
                times.append(time.perf_counter() - t0)
            ray.kill(actor)
            times.sort()
            return times[len(times) // 2]
        finally:
            self._disconnect()


class _Noop:
    def noop(self) -> None:
        return None
