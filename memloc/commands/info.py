"""``memloc info``: architecture facts of a model."""

from __future__ import annotations

import argparse
import json

from . import add_model_arg, write_json

EPILOG = """examples:
  memloc info
  memloc info --model path/to/local/model --json /tmp/facts.json
"""


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="model facts: architecture, layers, heads, d_model, d_mlp, n_ctx, vocab",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--json", default=None, help="write the facts to this JSON file")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..models import load_model, model_facts

    facts = model_facts(load_model(args.model, device=args.device))
    facts["model"] = args.model
    write_json(facts, args.json)
    print(json.dumps(facts, indent=1))
    return 0
