"""Small formatting helpers shared by the stages, the claims ledger and the report."""

from __future__ import annotations

from typing import SupportsInt

import pandas as pd


def fmt_head(layer: SupportsInt, head: SupportsInt) -> str:
    """``L1H2``."""
    return f"L{int(layer)}H{int(head)}"


def fmt_duration(seconds: float | int) -> str:
    """``42 s`` or ``3 min 05 s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"


def ranking(values: pd.Series, *, ascending: bool, fmt: str) -> str:
    """``a 80 = b 80 > c 78``: names in order, ties (equal after formatting) joined by ``=``."""
    v = values.sort_values(ascending=ascending, kind="stable")
    out, prev = "", None
    sep = " < " if ascending else " > "
    for name, x in v.items():
        txt = fmt.format(x)
        out += ("" if prev is None else (" = " if txt == prev else sep)) + f"{name} {txt}"
        prev = txt
    return out


def tied_best(values: pd.Series, *, ascending: bool, fmt: str) -> list[str]:
    """Names of the best entries (all that tie with the best after formatting)."""
    v = values.sort_values(ascending=ascending, kind="stable")
    top = fmt.format(v.iloc[0])
    return [str(n) for n, x in v.items() if fmt.format(x) == top]
