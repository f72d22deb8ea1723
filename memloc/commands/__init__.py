"""Subcommands of the ``memloc`` CLI (see memloc.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def add_model_arg(p: Any) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (embedded model, default), a local directory or a hub name")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")


def write_json(obj: Any, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1, default=str))
