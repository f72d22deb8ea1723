"""The ``memloc`` command.  Each subcommand lives in ``memloc/commands/<name>.py`` with
``add_parser(subparsers)`` and ``run(args) -> int``.

Options shared by every subcommand are applied here, before any torch work: ``-q`` (no progress
bars, no INFO logging, no Hugging Face loading bars) and ``--threads`` (one thread policy for all
subcommands, see :func:`apply_threads`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

#: Subcommand modules under memloc.commands, in help order.
COMMANDS = ["demo", "info", "memorization", "bench", "perf", "reproduce"]

THREADS_HELP = ("torch CPU threads (default for the embedded model: the cores idle at start, the cores minus "
                "those busy over a quarter second, at least 1 - on an idle 2-core machine 2 threads ran its batched forwards "
                "1.55-1.73x faster than 1, while on a busy one `memorization` took 4 min 13 s with torch's default "
                "threads and 27 s with one; torch's default for other models)")

EPILOG = """examples:
  memloc info
  memloc --threads 2 memorization --model tiny --json /tmp/memorization.json
  memloc -q bench del --methods hard_concrete,random --n 2 --ratio 0.1
  memloc perf --quick --model tiny
  memloc reproduce --model tiny --out /tmp/fig --quick
  memloc demo --quick --out /tmp/demo
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memloc", description="Localize memorized data in language models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (memloc's and Hugging Face's) and no INFO logging")
    parser.add_argument("--threads", dest="global_threads", type=int, default=None, metavar="N",
                        help=THREADS_HELP + "; also accepted after the subcommand")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"memloc.commands.{name}").add_parser(sub)
        p = sub.choices[name]
        if "--threads" not in p._option_string_actions:  # one policy: every subcommand takes --threads
            p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    return parser


def idle_cores() -> int:
    """CPU cores this process may use that are idle now: the cores it may run on minus the cores
    busy over the last quarter second (rounded), at least 1.  Why: torch's one-thread-per-core
    default oversubscribes a shared machine (`memorization` on the embedded model: 4 min 13 s with
    torch's default threads, 27 s with one, on a busy 2-core machine), while on an idle one a second
    thread makes the embedded model's batched forwards 1.55-1.73x faster (ZERO-OUT, sparse
    fine-tuning, teacher forcing; single-sequence mask training 1.05x; measured in one run on 2 cores).

    Busy is measured now (:func:`_busy_cores`), not with the 1-minute load average, which lags: it
    still counted the install step of `make demo` (or a test run that had just ended), so a fresh
    clone's demo ran on one thread and took 20 min 51 s against 10 min 14 s with two."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = list(range(os.cpu_count() or 1))
    busy = _busy_cores(cores)
    return max(1, min(len(cores), len(cores) - round(busy)))


def _busy_cores(cores: list[int], interval: float = 0.25) -> float:
    """Busy cores among ``cores`` over the next ``interval`` seconds (psutil's per-CPU utilisation;
    psutil is an accelerate dependency), or the 1-minute load average where that is unavailable."""
    try:
        import psutil

        percent = psutil.cpu_percent(interval=interval, percpu=True)
        return sum(percent[c] for c in cores if c < len(percent)) / 100.0
    except Exception:  # no psutil / no per-CPU counters: the load average
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return float(len(cores)) - 1.0


def default_threads(args: argparse.Namespace) -> int | None:
    """The thread count a command runs with: ``--threads`` (after the subcommand, else before it),
    else :func:`idle_cores` if it runs only the embedded model, else None (torch's default)."""
    explicit = getattr(args, "threads", None)
    if explicit is None:
        explicit = getattr(args, "global_threads", None)
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit <= 0:
            raise ValueError(f"--threads must be a positive int, got {explicit!r}")
        return explicit
    if args.command == "demo":
        return idle_cores()
    if args.command == "perf":
        models = {m.strip() for m in str(getattr(args, "models", "")).split(",") if m.strip()}
        return idle_cores() if models <= {"tiny"} else None
    return idle_cores() if getattr(args, "model", "tiny") in (None, "tiny") else None


def apply_threads(args: argparse.Namespace) -> int | None:
    """Set ``torch.set_num_threads`` from :func:`default_threads`; returns the count set (or None)."""
    threads = default_threads(args)
    args.threads = threads
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads


def silence() -> None:
    """``-q``: no memloc progress bars, and no Hugging Face download / weight-loading bars."""
    os.environ["MEMLOC_PROGRESS"] = "0"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency; be quiet anyway if it is broken
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.quiet:
            silence()
        apply_threads(args)
        return int(args.run(args) or 0)
    except ValueError as exc:
        print(f"memloc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
