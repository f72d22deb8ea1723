"""``memloc perf``: speed and exactness of the localization methods against the papers' loops
(runs benchmarks/perf.py of the source checkout, which also holds the reference implementations)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path


class _ModelsAlias(argparse.Action):
    """``--model`` (as in every other subcommand); the old ``--models`` still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--models":
            warnings.warn("memloc perf --models is deprecated; use --model", DeprecationWarning, stacklevel=2)
            print("memloc perf: --models is deprecated; use --model", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_parser(sub) -> None:
    p = sub.add_parser("perf", help="benchmark ZERO-OUT, IG, SLIMMING, HARD CONCRETE and attribution patching "
                                    "against the reference loops")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--model", "--models", dest="models", action=_ModelsAlias, default="tiny,gpt-neo-125m-random",
                   metavar="LIST",
                   help="comma-separated subset of tiny,gpt-neo-125m-random (default: both; --models is a "
                        "deprecated spelling)")
    p.add_argument("--quick", action="store_true", help="smaller subsets (a few minutes on 2 CPU cores)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.set_defaults(run=run)


def _benchmark_module():
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "perf.py").exists() or not (root / "tests" / "reference_localize.py").exists():
        raise ValueError(f"memloc perf needs the source checkout (benchmarks/perf.py and tests/ next to the "
                         f"memloc package); not found under {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.perf")


def run(args) -> int:
    return _benchmark_module().main(args)
