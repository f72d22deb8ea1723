"""``memloc demo``: the main job on the embedded model: the reproduction pipeline of both papers
(``memloc reproduce --model tiny --out figures``), writing figures, tables and ``figures/REPORT.md``."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded model: reproduce the papers' figures into figures/")
    p.add_argument("--out", default="figures", help="output directory (default: figures)")
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--cache-dir", default=".memloc_cache", help="cache directory (default: .memloc_cache)")
    p.set_defaults(run=run)


def run(args) -> int:
    from . import reproduce

    ns = argparse.Namespace(model="tiny", device=None, out=args.out, quick=args.quick, cache_dir=args.cache_dir,
                            no_cache=False, stages=None, paragraphs=None, no_png=False, threads=getattr(args, "threads", None),
                            max_paragraphs=None, batch_size=None)
    return reproduce.run(ns)
