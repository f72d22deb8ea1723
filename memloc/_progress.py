"""Progress bars (tqdm) that every long loop uses; silence them per call or with MEMLOC_PROGRESS=0."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """False when progress bars are switched off for the process (``MEMLOC_PROGRESS=0``, ``memloc -q``)."""
    return os.environ.get("MEMLOC_PROGRESS", "1") != "0"


def progress(iterable: Iterable[T], *, enabled: bool = True, desc: str | None = None,
             total: int | None = None, leave: bool = False) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar unless disabled here or by ``MEMLOC_PROGRESS=0``."""
    if not enabled or not progress_enabled():
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=leave)
