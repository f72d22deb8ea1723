"""Writing figures: HTML always, PNG through plotly's static export."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go


def save(fig: go.Figure, path: str | Path, *, png: bool = True, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` to ``path.html`` and (if ``png``) ``path.png``; returns the written paths.

    ``path`` may carry a suffix; it is replaced.
    """
    if not isinstance(fig, go.Figure):
        raise ValueError(f"fig must be a plotly Figure, got {type(fig).__name__}")
    base = Path(path).with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    html = base.with_suffix(".html")
    fig.write_html(html, include_plotlyjs="cdn")
    out = [html]
    if png:
        out.append(_write_png(fig, base.with_suffix(".png"), scale))
    return out


def _write_png(fig: go.Figure, path: Path, scale: float) -> Path:
    try:
        fig.write_image(path, scale=scale)
    except Exception as exc:  # kaleido raises several types, e.g. when no Chromium is installed
        raise RuntimeError(f"PNG export of {path.name} failed ({type(exc).__name__}: {exc}). plotly's static export "
                           "(kaleido) drives a headless Chromium: install one with `make browser` (Debian's "
                           "chromium), or call save(..., png=False) for HTML only") from exc
    return path
