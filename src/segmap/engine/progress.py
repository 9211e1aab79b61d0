"""Sliding-window progress: a one-line bar on a terminal, periodic log lines everywhere else.

A bar in a log file or a container's captured stderr is noise (one carriage-return-separated line per update), so
the bar is drawn only when the stream is a TTY; otherwise the same facts go to the log every ``interval`` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("segmap.engine")


def format_seconds(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss`` from one hour on)."""
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def bar_line(done: int, total: int, elapsed: float, width: int = 30) -> str:
    """``tiles [#####.....]  12/64  0:12 elapsed, ETA 0:52``; the ETA assumes the remaining tiles cost the same."""
    total = max(total, 1)
    filled = int(width * done / total)
    eta = elapsed / done * (total - done) if done else None
    return (f"tiles [{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total}  "
            f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta) if eta is not None else '?'}")


class TileProgress:
    """A ``progress(done, total)`` callback for :func:`~segmap.engine.sliding_window.sliding_window_logits`."""

    def __init__(self, stream: TextIO | None = None, *, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.clock = clock
        self.log = logger
        self.start: float | None = None
        self.last_log = float("-inf")
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # closed or not a real stream
            self.tty = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.start is None:
            # The sliding window reports 0 tiles before the first one, so the clock covers every tile.
            self.start = self.last_log = now
        elapsed = now - self.start
        if self.tty:
            end = "\n" if done >= total else ""
            self.stream.write("\r" + bar_line(done, total, elapsed) + end)
            self.stream.flush()
        elif done >= total or done == 1 or (done and now - self.last_log >= self.interval):
            # The first tile is always reported: it says the network runs and how long a tile takes.
            self.last_log = now
            self.log.info("sliding window: %d/%d tiles, %s elapsed", done, total, format_seconds(elapsed))
