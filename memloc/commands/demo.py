"""``memloc demo``: the main job on the embedded model: the reproduction pipeline of both papers
(``memloc reproduce --model tiny``), writing figures, tables and ``REPORT.md`` into ``memloc-demo/``.

The demo never writes into the repository's tracked files: its default output directory is
git-ignored.  The committed gallery ``figures/`` is regenerated only by the explicit
``make gallery`` (``memloc reproduce --model tiny --out figures``).
"""

from __future__ import annotations

import argparse

#: Default output directory of ``memloc demo`` (git-ignored in the repository).
DEMO_OUT = "memloc-demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=f"the main job on the embedded model: reproduce the papers' figures into "
                                    f"{DEMO_OUT}/")
    p.add_argument("--out", default=DEMO_OUT, help=f"output directory (default: {DEMO_OUT}, git-ignored)")
    p.add_argument("--quick", action="store_true", help="small sizes (about 1.5 minutes on 2 CPU cores)")
    p.add_argument("--cache-dir", default=".memloc_cache", help="cache directory (default: .memloc_cache)")
    from .reproduce import add_workers_arg

    add_workers_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from . import reproduce

    ns = argparse.Namespace(model="tiny", device=None, out=args.out, quick=args.quick, cache_dir=args.cache_dir,
                            no_cache=False, stages=None, paragraphs=None, no_png=False, threads=getattr(args, "threads", None),
                            max_paragraphs=None, batch_size=None, timings=None,
                            workers=args.workers)
    return reproduce.run(ns)
