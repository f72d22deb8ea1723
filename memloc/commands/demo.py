"""``memloc demo``: the main job on the embedded model.

Until the full pipeline exists it prints the embedded model's facts and memorization summary.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded model")
    p.add_argument("--json", default=None)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models import load_model, model_facts
    from .memorization import compute, summarize

    model = load_model("tiny")
    print(json.dumps(model_facts(model), indent=1))
    summary = summarize("tiny", "tiny", compute(model, "tiny"))
    for k, v in summary.items():
        print(f"{k:>22}: {v}")
    return 0
