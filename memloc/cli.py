"""The ``memloc`` command.  Each subcommand lives in ``memloc/commands/<name>.py`` with
``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Subcommand modules under memloc.commands, in help order.
COMMANDS = ["demo", "info", "memorization", "bench", "perf", "reproduce"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memloc", description="Localize memorized data in language models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"memloc.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        import os

        os.environ["MEMLOC_PROGRESS"] = "0"
    try:
        return int(args.run(args) or 0)
    except ValueError as exc:
        print(f"memloc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
