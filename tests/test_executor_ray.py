"""Benchmark sweeps on a local Ray instance (issue 14): identical to a serial run, a killed worker is
survived, a stopped sweep resumes computing only the missing tasks, bad input fails before any
task is submitted."""

from __future__ import annotations

import json
import socket
import sys

import pandas as pd
import pytest
import torch

from memloc.benchmarks import del_benchmark, inj_benchmark, memorized_set
from memloc.executors import ModelSpec, RayExecutor, SerialExecutor, SweepStopped, resolve_executor

#: Ray starts processes; keep these tests on one xdist worker, one Ray instance for the module.
pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]

METHODS = ["activations", "random", "hard_concrete"]
KWARGS = {"hard_concrete": {"max_steps": 20, "check_every": 10, "progress_bar": False}}
RATIOS = (0.01, 0.1)
N_SEQ = 3
#: DEL tasks: one attribution per (method, target), one evaluation per (method, target, ratio).
N_DEL_TASKS = len(METHODS) * N_SEQ * (1 + len(RATIOS))
INJ_TEXTS = ["The Delta variant is a variant of SARS-CoV-2", "Python is a programming language by Guido"]
INJ_METHODS = ["activations", "random"]
N_INJ_TASKS = len(INJ_TEXTS) * (1 + len(INJ_METHODS))  # one injection, then one attribution per method


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module (own temp dir and token), shut down at teardown."""
    ray = pytest.importorskip("ray")
    with RayExecutor() as ex:
        assert ray.is_initialized()
        yield ex
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def del_set(tiny):
    tokens, prefix_len, table = memorized_set(tiny, n=N_SEQ + 1)
    return tokens, prefix_len, table["id"].tolist()


def _del(tiny, del_set, executor, cache_dir=None):
    tokens, prefix_len, ids = del_set
    return del_benchmark(tiny, METHODS, tokens, prefix_len, ids=ids, targets=list(range(N_SEQ)), ratios=RATIOS,
                         n_random=4, method_kwargs=KWARGS, cache_dir=cache_dir, progress_bar=False, executor=executor)


@pytest.fixture(scope="module")
def del_serial(tiny, del_set, tmp_path_factory):
    ex = SerialExecutor()
    res = _del(tiny, del_set, ex, tmp_path_factory.mktemp("serial_cache"))
    assert ex.stats.n_computed == N_DEL_TASKS and ex.stats.computed == {"scores": 9, "eval": 18}
    return res


def _assert_same_del(a, b):
    pd.testing.assert_frame_equal(a.rows, b.rows)  # same values, same row order
    assert a.matrices.keys() == b.matrices.keys()
    for key in a.matrices:
        pd.testing.assert_frame_equal(a.matrices[key], b.matrices[key])
        pd.testing.assert_frame_equal(a.dist_matrices[key], b.dist_matrices[key])


def test_del_ray_equals_serial(tiny, del_set, del_serial, ray_session, unchanged, tmp_path):
    ex = RayExecutor(num_workers=2)
    with unchanged(tiny):
        res = _del(tiny, del_set, ex, tmp_path)
    _assert_same_del(del_serial, res)
    assert ex.stats.n_computed == N_DEL_TASKS and ex.stats.n_cached == 0
    assert len(ex.stats.worker_pids) == 2
    assert ex.actors == []  # the workers are gone after the sweep
    # the cache holds what a serial run writes: a serial rerun on it computes nothing
    serial = SerialExecutor()
    again = _del(tiny, del_set, serial, tmp_path)
    assert serial.stats.n_computed == 0 and serial.stats.n_cached == len(METHODS) * N_SEQ * (1 + len(RATIOS))
    _assert_same_del(del_serial, again)


def test_del_survives_a_killed_worker(tiny, del_set, del_serial, ray_session, tmp_path):
    import ray

    killed = []

    def kill_one(ex):
        if ex.stats.n_computed == 3 and not killed:
            victim = ex.busy_actors()[0]
            killed.append(victim)
            ray.kill(victim, no_restart=False)  # dies with a task in flight; Ray restarts it

    ex = RayExecutor(num_workers=2, on_task_done=kill_one)
    res = _del(tiny, del_set, ex, tmp_path)
    assert killed
    _assert_same_del(del_serial, res)
    # every task came back exactly once, and a third process (the restarted worker) computed some
    assert ex.stats.n_computed == N_DEL_TASKS
    assert len(ex.stats.worker_pids) == 3


def test_del_stopped_sweep_resumes_only_missing_tasks(tiny, del_set, del_serial, ray_session, tmp_path):
    first = RayExecutor(num_workers=2, stop_after=10)
    with pytest.raises(SweepStopped, match="stopped after"):
        _del(tiny, del_set, first, tmp_path)
    done = first.stats.n_computed
    assert 10 <= done < N_DEL_TASKS
    second = RayExecutor(num_workers=2)
    res = _del(tiny, del_set, second, tmp_path)
    assert second.stats.n_computed == N_DEL_TASKS - done
    _assert_same_del(del_serial, res)
    # a finished sweep run again computes nothing and does not even start workers
    third = RayExecutor(num_workers=2)
    third._start_actors = lambda *a: pytest.fail("no task left, no worker needed")
    _assert_same_del(del_serial, _del(tiny, del_set, third, tmp_path))
    assert third.stats.n_computed == 0


def _inj(tiny, executor, cache_dir=None):
    return inj_benchmark(tiny, INJ_METHODS, sequences=INJ_TEXTS, ratios=(0.01,), max_len=12, cache_dir=cache_dir,
                         progress_bar=False, executor=executor)


def test_inj_ray_equals_serial_and_resumes(tiny, ray_session, unchanged, tmp_path):
    serial = SerialExecutor()
    expected = _inj(tiny, serial)
    assert serial.stats.computed == {"inject": 2, "scores": 4}
    first = RayExecutor(num_workers=2, stop_after=2)
    with unchanged(tiny), pytest.raises(SweepStopped):
        _inj(tiny, first, tmp_path)
    done = first.stats.n_computed
    assert 2 <= done < N_INJ_TASKS
    second = RayExecutor(num_workers=2)
    with unchanged(tiny):
        df = _inj(tiny, second, tmp_path)
    assert second.stats.n_computed == N_INJ_TASKS - done
    pd.testing.assert_frame_equal(expected, df)
    # a serial rerun on the Ray run's cache injects nothing and localizes nothing
    again = SerialExecutor()
    pd.testing.assert_frame_equal(expected, _inj(tiny, again, tmp_path))
    assert again.stats.n_computed == 0 and again.stats.n_cached == N_INJ_TASKS


def test_cli_executor_ray(tmp_path, ray_session, capsys):
    from memloc.cli import main

    args = ["-q", "bench", "del", "--methods", "activations", "--n", "2", "--set-size", "3", "--n-random", "2",
            "--ratio", "0.01"]
    assert main(args + ["--json", str(tmp_path / "serial.json")]) == 0
    assert main(args + ["--executor", "ray", "--json", str(tmp_path / "ray.json")]) == 0
    serial = json.loads((tmp_path / "serial.json").read_text())
    ray_run = json.loads((tmp_path / "ray.json").read_text())
    assert len(serial["rows"]) == 2 and ray_run["rows"] == serial["rows"] and ray_run["table"] == serial["table"]
    capsys.readouterr()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_fast_naming_it(tiny, del_set, capsys):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    ex = RayExecutor(address, connect_timeout=2)
    ex._start_actors = lambda *a: pytest.fail("must fail before starting workers")
    with pytest.raises(ValueError, match=f"ray_address '{address}': cannot reach a Ray cluster"):
        _del(tiny, del_set, ex)
    from memloc.cli import main

    assert main(["-q", "bench", "del", "--methods", "activations", "--n", "1", "--set-size", "2",
                 "--executor", "ray", "--ray-address", address]) == 2
    assert address in capsys.readouterr().err
    with pytest.raises(ValueError, match="ray_address"):
        RayExecutor("no-port-here")._connect()


def test_bad_method_or_hyperparameter_fails_before_any_task(tiny, del_set, unchanged):
    pytest.importorskip("ray")
    tokens, prefix_len, ids = del_set

    class Watch(RayExecutor):
        def run(self, *a, **k):
            pytest.fail("a task was submitted")

        def _connect(self):
            pytest.fail("Ray was started")

    with unchanged(tiny):
        with pytest.raises(ValueError, match="unknown method names"):
            del_benchmark(tiny, ["activations", "nope"], tokens, prefix_len, executor=Watch(), progress_bar=False)
        with pytest.raises(ValueError, match=r"method_kwargs\['activations'\].*steps"):
            del_benchmark(tiny, ["activations"], tokens, prefix_len, method_kwargs={"activations": {"steps": 3}},
                          executor=Watch(), progress_bar=False)
        with pytest.raises(ValueError, match=r"method_kwargs\['random'\]"):
            inj_benchmark(tiny, ["random"], sequences=INJ_TEXTS, method_kwargs={"random": {"sed": 1}},
                          executor=Watch(), progress_bar=False)
        with pytest.raises(ValueError, match="executor must be one of"):
            del_benchmark(tiny, ["activations"], tokens, prefix_len, executor="dask")


def test_missing_ray_names_the_extra(tiny, del_set, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"memloc\[ray\]"):
        RayExecutor()
    tokens, prefix_len, ids = del_set
    with pytest.raises(ImportError, match=r"memloc\[ray\]"):
        del_benchmark(tiny, ["activations"], tokens, prefix_len, executor="ray")
    assert isinstance(resolve_executor("serial"), SerialExecutor)  # serial needs no Ray
    from memloc.cli import main

    assert main(["-q", "bench", "del", "--methods", "activations", "--n", "1", "--executor", "ray"]) == 2
    assert "pip install 'memloc[ray]'" in capsys.readouterr().err


def test_model_spec(tiny):
    from transformers.activations import NewGELUActivation

    from memloc import load_model
    from memloc.cache import model_fingerprint

    assert ModelSpec.from_model(tiny) == ModelSpec(None, torch.float32, "cpu", False)
    # workers load the model exactly as it was loaded here, the activation included
    plain = load_model("tiny", fused_gelu=False)
    spec = ModelSpec.from_model(plain)
    assert spec.fused_gelu is False
    again = spec.load()
    assert type(again.blocks[0].mlp.original_component.act) is NewGELUActivation
    assert model_fingerprint(again) == model_fingerprint(plain) != model_fingerprint(tiny)
    with pytest.raises(ValueError, match="model_spec"):
        ModelSpec.from_model(torch.nn.Linear(2, 2))


def test_serial_stop_and_resume(tiny, del_set, del_serial, tmp_path):
    """The resumption logic needs no Ray: a serial sweep stopped after 5 tasks computes the rest on rerun."""
    first = SerialExecutor(stop_after=5)
    with pytest.raises(SweepStopped):
        _del(tiny, del_set, first, tmp_path)
    assert first.stats.n_computed == 5
    second = SerialExecutor()
    _assert_same_del(del_serial, _del(tiny, del_set, second, tmp_path))
    assert second.stats.n_computed == N_DEL_TASKS - 5
    # corrupt one evaluation entry: it is recomputed (with a warning), the table unchanged
    entry = next((tmp_path / "del_eval").glob("*.safetensors"))
    entry.write_bytes(b"not a safetensors file")
    third = SerialExecutor()
    _assert_same_del(del_serial, _del(tiny, del_set, third, tmp_path))
    assert third.stats.computed == {"eval": 1}


def test_session_keeps_its_workers_for_the_next_sweep(tiny, del_set, del_serial, ray_session, unchanged):
    """Inside ``with RayExecutor(...)`` the workers (and their loaded models) serve every sweep of
    the block: the second sweep runs on the same worker processes, both equal the serial table,
    and the workers are gone when the block ends."""
    with RayExecutor(num_workers=2) as ex:
        first = _del(tiny, del_set, ex)
        actors, pids = list(ex.actors), set(ex.stats.worker_pids)
        second = _del(tiny, del_set, ex)
        assert ex.actors == actors and ex.stats.worker_pids and ex.stats.worker_pids <= pids
        assert ex.stats.n_computed == N_DEL_TASKS
    assert ex.actors == []
    _assert_same_del(first, del_serial)
    _assert_same_del(second, del_serial)
