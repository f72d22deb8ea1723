"""``memloc perf``: speed and exactness of the localization methods against the papers' loops
(:mod:`memloc.perf`; the loops are :mod:`memloc.localize.reference`), in one or more dtypes."""

from __future__ import annotations

import argparse
import sys
import warnings

from . import write_json


class _ModelsAlias(argparse.Action):
    """``--model`` (as in every other subcommand); the old ``--models`` still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--models":
            warnings.warn("memloc perf --models is deprecated; use --model", DeprecationWarning, stacklevel=2)
            print("memloc perf: --models is deprecated; use --model", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..perf import DTYPES, MODELS

    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--model", "--models", dest="models", action=_ModelsAlias, default=",".join(MODELS),
                   metavar="LIST", help=f"comma-separated subset of {','.join(MODELS)} (default: all; --models is a "
                                        "deprecated spelling)")
    p.add_argument("--quick", action="store_true", help="smaller subsets (a few minutes on 2 CPU cores)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32",
                   help=f"comma-separated model dtypes among {','.join(DTYPES)}; float32 always runs as the "
                        "baseline, other dtypes get speedup_over_fp32 and spearman_vs_fp32 columns")


def add_parser(sub) -> None:
    p = sub.add_parser("perf", help="benchmark ZERO-OUT, IG, SLIMMING, HARD CONCRETE and attribution patching "
                                    "against the reference loops (optionally in bfloat16/float16)")
    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..perf import format_table, run_perf

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [t.strip() for t in args.dtype.split(",") if t.strip()]
    df = run_perf(models, quick=args.quick, device=args.device, dtypes=dtypes,
                  on_rows=lambda part: write_json(part.to_dict(orient="records"), args.json))
    print(format_table(df))
    return 0
