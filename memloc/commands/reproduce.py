"""``memloc reproduce``: the figures and tables of both papers on one model (see memloc.reproduce)."""

from __future__ import annotations

from . import add_model_arg


def add_parser(sub) -> None:
    from ..reproduce import STAGES

    p = sub.add_parser("reproduce", help="reproduce the papers' figures and tables on a model (figures, CSVs, REPORT.md)")
    add_model_arg(p)
    p.add_argument("--out", default="memloc-out",
                   help="output directory (default: memloc-out; `make gallery` writes the committed figures/)")
    p.add_argument("--timings", default=None, metavar="PATH",
                   help="where stage times are written as JSON (default: OUT/timings.json; REPORT.md holds none)")
    p.add_argument("--quick", action="store_true", help="small sizes: every stage, about 1.5 minutes on 2 CPU cores")
    p.add_argument("--cache-dir", default=".memloc_cache",
                   help="cache of stage results and attribution scores (default: .memloc_cache)")
    p.add_argument("--no-cache", action="store_true", help="recompute everything, write no cache")
    p.add_argument("--stages", nargs="+", default=None, choices=list(STAGES), metavar="STAGE",
                   help=f"run only these stages (memorization always runs): {', '.join(STAGES)}")
    p.add_argument("--paragraphs", default=None,
                   help="bundled paragraph set name (default: the model's bundled profile, memloc.data.bundled_profile)")
    p.add_argument("--max-paragraphs", type=int, default=None,
                   help="score at most this many paragraphs in the memorization stage (evenly spaced subset)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of the forward passes")
    p.add_argument("--no-png", action="store_true", help="write HTML figures only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the embedded model, whose small matrix products only "
                        "lose to thread overhead and oversubscription; torch's default otherwise)")
    add_workers_arg(p)
    p.set_defaults(run=run)


WORKERS_HELP = ("processes computing independent stages side by side, each loading the model once and sharing "
                "the torch threads (default 1: on the 2-core VM the embedded model's default run took 11 min 56 s "
                "with 2 workers of 1 thread vs 10 min 14 s in one process with 2 threads)")


def add_workers_arg(p) -> None:
    p.add_argument("--workers", type=int, default=None, metavar="N", help=WORKERS_HELP)


def default_workers(args) -> int:
    """``--workers`` (checked), else 1."""
    if args.workers is not None:
        if isinstance(args.workers, bool) or args.workers <= 0:
            raise ValueError(f"--workers must be a positive int, got {args.workers}")
        return args.workers
    return 1


def run(args) -> int:
    import dataclasses
    import logging
    import time

    import torch

    from ..data import load_paragraphs
    from ..models import load_model
    from ..reproduce import DEFAULT, QUICK, reproduce

    # validate every option before any work
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be a positive int, got {args.threads}")
    settings = QUICK if args.quick else DEFAULT
    workers = default_workers(args)
    for flag in ("max_paragraphs", "batch_size"):
        value = getattr(args, flag, None)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be a positive int, got {value}")
            settings = dataclasses.replace(settings, **{flag: value})
    paragraphs = load_paragraphs(args.paragraphs) if args.paragraphs else None
    for noisy in ("kaleido", "choreographer", "logistro", "asyncio"):  # PNG export chatter at INFO level
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threads = args.threads if args.threads is not None else (1 if args.model in (None, "tiny") else None)
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # stage lines print above the progress bars
        res = reproduce(model, args.out, settings=settings, quick=args.quick, paragraphs=paragraphs, stages=args.stages,
                        cache_dir=None if args.no_cache else args.cache_dir, png=not args.no_png,
                        model_name=args.model, timings_path=getattr(args, "timings", None), workers=workers)
    for stage, finding in res.findings.items():
        print(f"[{stage}] {finding}")
    for stage, why in res.skipped.items():
        print(f"[{stage}] skipped: {why}")
    for row in res.claims.itertuples():
        print(f"[claim] {row.id}: {row.verdict}" + (f" — {row.statistic}" if row.statistic else f" ({row.reason})"))
    print(f"report: {res.report}  ({time.perf_counter() - t0:.0f} s in total)")
    return 0
