"""``memloc memorization``: per-paragraph metrics of a paragraph set and the MP/NMP split."""

from __future__ import annotations

import argparse

from . import add_model_arg, write_json

EPILOG = """examples:
  memloc memorization
  memloc memorization --model tiny --batch-size 32 --json /tmp/memorization.json
  memloc memorization --model path/to/gpt-neo-125M --paragraphs gpt-neo-125m --threads 4
"""


def add_parser(sub) -> None:
    p = sub.add_parser("memorization", help="per-paragraph memorization metrics and MP/NMP split counts",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--paragraphs", default=None,
                   help="paragraph set (default: 'tiny' for the embedded model, 'gpt-neo-125m' otherwise)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="paragraphs per forward pass of teacher forcing and greedy decoding (default 64; "
                        "lower it if memory is short)")
    p.add_argument("--json", default=None, help="write rows and the split summary to this JSON file")
    p.set_defaults(run=run)


def summarize(model_name: str, paragraphs: str, df) -> dict:
    split = df["split"].value_counts().to_dict()
    out = {"model": model_name, "paragraphs": paragraphs, "n": int(len(df)),
           "memorized": int(split.get("memorized", 0)), "non_memorized": int(split.get("non-memorized", 0)),
           "partial": int(split.get("partial", 0)), "mean_em": float(df["em"].mean())}
    if "count" in df:
        seen = df["count"] > 0
        out["never_seen_max_em"] = int(df.loc[~seen, "em"].max()) if (~seen).any() else None
        out["spearman_em_vs_count"] = float(df.loc[seen, ["em", "count"]].corr(method="spearman").iloc[0, 1])
    return out


def compute(model, name: str, batch_size: int = 64):
    from ..data import load_paragraphs
    from ..metrics import memorization, split_memorization

    ps = load_paragraphs(name)
    counts = ps.table["count"].to_numpy() if "count" in ps.table else None
    df = memorization(model, ps.tokens, ps.prefix_len, counts=counts, batch_size=batch_size)
    df["split"] = split_memorization(df, memorized_min_em=ps.tokens.shape[1] - ps.prefix_len)
    return df


def run(args) -> int:
    from ..models import load_model

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}")
    model = load_model(args.model, device=args.device)
    name = args.paragraphs
    if name is None:  # the model's bundled profile (memloc.data.bundled_profile) picks the set
        from ..data import bundled_profile

        name = bundled_profile(model, required="pass --paragraphs").paragraph_sets[0]
    df = compute(model, name, args.batch_size)
    summary = summarize(args.model, name, df)
    write_json({"summary": summary, "rows": df.to_dict(orient="records")}, args.json)
    for k, v in summary.items():
        print(f"{k:>22}: {v}")
    return 0
