"""The command line: one --threads policy and -q for every subcommand, hyperparameters checked
before any work, help examples that parse and are valid, ``python -m memloc``."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memloc import cli

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"bench": ["del"]}  # positional arguments a subcommand needs


@pytest.fixture
def restore_globals(monkeypatch):
    """main() sets threads, env variables and transformers' progress bars: put them back."""
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    for key in ("MEMLOC_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(key, os.environ.get(key, ""))
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def _capture_run(monkeypatch, name):
    """Replace the subcommand's run() by one recording the namespace and torch's thread count."""
    seen = {}

    def fake_run(args):
        seen.update(threads=torch.get_num_threads(), args=args)
        return 0

    monkeypatch.setattr(importlib.import_module(f"memloc.commands.{name}"), "run", fake_run)
    return seen


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_every_subcommand_takes_threads_and_applies_it(name, monkeypatch, restore_globals):
    seen = _capture_run(monkeypatch, name)
    torch.set_num_threads(1)
    assert cli.main([name, *REQUIRED.get(name, []), "--threads", "2"]) == 0
    assert seen["threads"] == 2  # applied before the command's own work
    torch.set_num_threads(1)
    assert cli.main(["--threads", "2", name, *REQUIRED.get(name, [])]) == 0  # the global spelling
    assert seen["threads"] == 2
    # default when only the embedded model runs: the idle cores (busy 2-core machine: one thread)
    monkeypatch.setattr(cli, "_busy_cores", lambda cores: 1.7)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    torch.set_num_threads(2)
    assert cli.main([name, *REQUIRED.get(name, [])] + (["--model", "tiny"] if name == "perf" else [])) == 0
    assert seen["threads"] == 1 and seen["args"].threads == 1
    monkeypatch.setattr(cli, "_busy_cores", lambda cores: 0.2)  # idle: both cores
    torch.set_num_threads(1)
    assert cli.main([name, *REQUIRED.get(name, [])] + (["--model", "tiny"] if name == "perf" else [])) == 0
    assert seen["threads"] == 2 and seen["args"].threads == 2


@pytest.mark.parametrize("cores,load,expected", [(2, 0.0, 2), (2, 0.6, 1), (2, 1.4, 1), (2, 5.0, 1), (8, 2.2, 6),
                                                 (1, 0.0, 1)])
def test_idle_cores(monkeypatch, cores, load, expected):
    monkeypatch.setattr(cli, "_busy_cores", lambda c: load)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cli.idle_cores() == expected


def test_busy_cores_is_measured_now_not_the_lagging_load_average(monkeypatch):
    """A 1-minute load average of 2 (say, the install step that just ended) does not count when the
    cores are idle now; the load average is only the fallback without psutil."""
    import builtins

    import psutil

    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [3.0, 10.0, 95.0])
    assert cli._busy_cores([0, 1]) == pytest.approx(0.13)
    assert cli._busy_cores([0, 1, 2]) == pytest.approx(1.08)
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "psutil" else real_import(name, *a, **k))
    assert cli._busy_cores([0, 1]) == 2.0


def test_threads_default_leaves_other_models_alone(monkeypatch, restore_globals):
    seen = _capture_run(monkeypatch, "info")
    torch.set_num_threads(2)
    assert cli.main(["info", "--model", "some/model"]) == 0
    assert seen["threads"] == 2 and seen["args"].threads is None
    seen = _capture_run(monkeypatch, "perf")
    assert cli.main(["perf"]) == 0  # tiny and gpt-neo-125m-random: torch's default
    assert seen["threads"] == 2


def test_bad_threads(capsys, monkeypatch, restore_globals):
    _capture_run(monkeypatch, "info")
    assert cli.main(["info", "--threads", "0"]) == 2
    assert "--threads must be a positive int" in capsys.readouterr().err


def _no_model_load(monkeypatch):
    import memloc.models

    def boom(*a, **k):
        raise AssertionError("the options must be rejected before a model is loaded")

    monkeypatch.setattr(memloc.models, "load_model", boom)


@pytest.mark.parametrize("argv,match", [
    (["--methods", "hard_concrete", "--method-kwargs", '{"hard_concrete": {"steps": 200}}'],
     r"does not take \['steps'\]; its hyperparameters are \[.*'max_steps'"),
    (["--methods", "nope"], r"--methods: .*unknown method names \['nope'\]"),
    (["--methods", "random", "--method-kwargs", '{"slimming": {}}'], r"not among methods \['random'\]"),
    (["--method-kwargs", "[1]"], "JSON object"),
    (["--methods", "ig,integrated_gradients"], "more than once"),
])
def test_bench_checks_methods_and_hyperparameters_before_loading(argv, match, monkeypatch, capsys,
                                                                 restore_globals):
    _no_model_load(monkeypatch)
    for bench in ("del", "inj"):
        assert cli.main(["bench", bench, *argv]) == 2
        assert re.search(match, capsys.readouterr().err)


def _example_lines(parser) -> list[str]:
    text = parser.epilog or ""
    return [line.strip() for line in text.splitlines() if line.strip().startswith("memloc ")]


def _all_examples() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    lines = _example_lines(parser)
    for p in sub.choices.values():
        lines += _example_lines(p)
    return lines


def test_every_help_has_examples():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert _example_lines(parser)
    for name in ("info", "memorization", "bench"):
        assert _example_lines(sub.choices[name]), name


@pytest.mark.parametrize("line", _all_examples())
def test_help_examples_parse_and_are_valid(line, capsys):
    """Every ``memloc ...`` example in a --help epilog parses, and a bench example's methods and
    --method-kwargs pass the same checks the command runs before any work."""
    argv = shlex.split(line)[1:]
    args = cli.build_parser().parse_args(argv)  # SystemExit (a test error) if it does not parse
    cli.default_threads(args)
    if args.command == "bench":
        from memloc.commands import bench

        methods, kwargs = bench.check_args(args)
        assert methods
        if args.method_kwargs:
            assert set(kwargs) >= set(json.loads(args.method_kwargs))


def test_method_kwargs_help_example_is_valid():
    from memloc.benchmarks import check_method_kwargs, resolve_methods

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["bench"]._option_string_actions["--method-kwargs"].help
    example = json.loads(re.search(r"'(\{.*?\}\})'", text).group(1))
    check_method_kwargs(example, resolve_methods(list(example)))


def test_option_help_texts():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"memloc {name} {action.option_strings[0]} has no help text"


def test_perf_model_option_and_deprecated_models():
    parser = cli.build_parser()
    assert parser.parse_args(["perf", "--model", "tiny"]).models == "tiny"
    with pytest.warns(DeprecationWarning, match="--models is deprecated; use --model"):
        assert parser.parse_args(["perf", "--models", "tiny"]).models == "tiny"


def test_quiet_silences_memloc_and_loading_bars(tmp_path, capfd, restore_globals):
    assert cli.main(["-q", "info", "--json", str(tmp_path / "f.json")]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err
    assert os.environ["MEMLOC_PROGRESS"] == "0"


def test_python_dash_m_memloc():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "memloc", "--help"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: memloc" in out.stdout and "--threads" in out.stdout and "bench" in out.stdout
