"""Writing figures: HTML always, PNG through plotly's static export (kaleido 1.x, which drives a
headless Chromium).

Each ``fig.write_image`` outside a session starts and stops its own Chromium: about 4 s per figure on
a 2-core machine, a minute for the 15 figures of ``memloc reproduce``.  :func:`png_session` keeps
one browser for every PNG written inside the block (kaleido's own ``start_sync_server``):
measured 20.1 s vs 5.4 s for 5 figures, byte-identical PNGs (``tests/test_plots.py`` checks the
bytes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import plotly.graph_objects as go

__all__ = ["save", "png_session", "PNG_SESSION_START_TIMEOUT"]

logger = logging.getLogger(__name__)

#: Seconds :func:`png_session` waits for the browser to render a first (blank) figure.
PNG_SESSION_START_TIMEOUT = 60.0


def save(fig: go.Figure, path: str | Path, *, png: bool = True, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` to ``path.html`` and (if ``png``) ``path.png``; returns the written paths.

    ``path`` may carry a suffix; it is replaced.  Inside :func:`png_session` the PNG reuses the
    session's browser.
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
        with _server_ignores_kopts():
            fig.write_image(path, scale=scale)
    except Exception as exc:  # kaleido raises several types, e.g. when no Chromium is installed
        raise RuntimeError(f"PNG export of {path.name} failed ({type(exc).__name__}: {exc}). plotly's static export "
                           "(kaleido) drives a headless Chromium: install one with `make browser` (Debian's "
                           "chromium), or call save(..., png=False) for HTML only") from exc
    return path


@contextlib.contextmanager
def _server_ignores_kopts() -> Iterator[None]:
    """Silence kaleido's warning that a running server (png_session) ignores the options plotly
    passes on every export."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The kopts argument is ignored if using a server")
        yield


def _server() -> object:
    import kaleido

    return kaleido._global_server  # the singleton behind kaleido.start_sync_server (no public accessor)


@contextlib.contextmanager
def png_session() -> Iterator[bool]:
    """Keep one headless Chromium for every PNG that :func:`save` (or ``fig.write_image``) writes
    inside the block; yields whether the session is on.

    It is on when the browser renders a first blank figure within
    :data:`PNG_SESSION_START_TIMEOUT` seconds; otherwise (no Chromium, a kaleido error) a WARNING
    says so and each PNG starts its own browser as without a session (where it fails the same way,
    which :func:`save` reports).  A server the caller already started is used and left running;
    one started here is stopped on exit, also on exceptions."""
    import kaleido

    server = _server()
    if server.is_running():
        yield True
        return
    died: list[BaseException] = []
    default_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        # the server thread dies when the browser cannot start: report that in one WARNING, not a traceback
        if args.thread is getattr(server, "_thread", None):
            died.append(args.exc_value)
        else:
            default_hook(args)

    threading.excepthook = hook
    try:
        kaleido.start_sync_server(silence_warnings=True)
        state = _warm_up(server, died)
    finally:
        threading.excepthook = default_hook
    ok = state == "ok"
    if state == "dead":
        _stop(server)
    elif state == "timeout":
        # the browser thread may be stuck mid-render, and kaleido's close() would join it: abandon the
        # (daemon) thread and mark the singleton stopped, so later exports start their own browser
        server._initialized = False
    try:
        yield ok
    finally:
        if ok:
            _stop(server)


def _warm_up(server: object, died: list[BaseException]) -> str:
    """Render a blank figure through the freshly started server, watching its thread: a browser
    that cannot start kills that thread, and kaleido's call would then wait forever."""
    import plotly.io as pio

    done: dict[str, object] = {}

    def call() -> None:
        try:
            with _server_ignores_kopts():
                pio.to_image(go.Figure(), format="png", width=10, height=10)
            done["ok"] = True
        except Exception as exc:  # reported below
            done["error"] = exc

    helper = threading.Thread(target=call, daemon=True)
    helper.start()
    t0 = time.perf_counter()
    while helper.is_alive() and server._thread.is_alive() and time.perf_counter() - t0 < PNG_SESSION_START_TIMEOUT:
        helper.join(0.05)
    if done.get("ok"):
        return "ok"
    reason = (f"{type(done['error']).__name__}: {done['error']}".splitlines()[0] if "error" in done else
              "the browser did not start" + (f" ({type(died[0]).__name__}: {died[0]})".splitlines()[0] if died else "")
              if not server._thread.is_alive() else
              f"no figure within {PNG_SESSION_START_TIMEOUT:g} s")
    logger.warning("png_session: could not keep one browser for the PNG exports (%s); each PNG starts its own "
                   "(about 4 s per figure instead of about 1 s)", reason)
    return "timeout" if helper.is_alive() and server._thread.is_alive() else "dead"


def _stop(server: object) -> None:
    with contextlib.suppress(Exception):
        server.close(silence_warnings=True)
