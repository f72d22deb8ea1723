"""Performance benchmark of the localization methods: a script entry point for ``memloc perf``
(the benchmark lives in :mod:`memloc.perf`, its reference loops in :mod:`memloc.localize.reference`).

Run ``python -m benchmarks.perf [--json out.json] [--models tiny,gpt-neo-125m-random] [--quick]
[--dtype float32,bfloat16]`` from the repository root; see :mod:`memloc.perf` for the columns.
"""

from __future__ import annotations

import argparse
import logging
import sys

from memloc.commands.perf import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(run(parser.parse_args()))
