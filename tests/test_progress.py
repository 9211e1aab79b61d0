"""The sliding window's progress: a one-line bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import io
import logging
import os
import select

import numpy as np
import torch

from segmap.engine.progress import TileProgress, bar_line, format_seconds
from segmap.engine.sliding_window import sliding_window_logits


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_format_seconds():
    assert format_seconds(0) == "0:00"
    assert format_seconds(75.4) == "1:15"
    assert format_seconds(3725) == "1:02:05"


def test_bar_eta_extrapolates_from_the_tiles_done():
    line = bar_line(16, 64, 20.0, width=8)
    assert line.startswith("tiles [##......] 16/64")
    assert "0:20 elapsed" in line and "ETA 1:00" in line
    assert "ETA ?" in bar_line(0, 64, 0.0)


def test_terminal_gets_one_line_redrawn_in_place():
    master, slave = os.openpty()  # a real terminal, so isatty() is the operating system's answer
    out = b""
    try:
        with open(slave, "w", closefd=True) as tty:
            clock = Clock()
            progress = TileProgress(tty, clock=clock)
            assert progress.tty
            for done in range(0, 5):
                progress(done, 4)
                clock.now += 2.0
            while select.select([master], [], [], 0.5)[0]:  # read while the terminal is open; it comes in chunks
                out += os.read(master, 4096)
    finally:
        os.close(master)
    text = out.decode()
    lines = text.replace("\r\n", "\n").split("\n")
    # Every update starts with a carriage return; only the final one ends the line.
    assert text.count("\r") >= 5 and lines[-1] == "" and len(lines) == 2, repr(text)
    assert "4/4" in lines[0].split("\r")[-1] and "0:08 elapsed" in lines[0] and "ETA 0:00" in lines[0]


def test_non_terminal_gets_periodic_log_lines_and_no_bar(caplog):
    stream = io.StringIO()
    clock = Clock()
    progress = TileProgress(stream, interval=5.0, clock=clock)
    assert not progress.tty
    with caplog.at_level(logging.INFO, logger="segmap.engine"):
        for done in range(0, 11):
            progress(done, 10)
            clock.now += 1.0
    assert stream.getvalue() == ""
    messages = [r.getMessage() for r in caplog.records]
    # 0 s start (silent), the first tile, a line every 5 s after the last one, and always the last tile.
    assert messages == ["sliding window: 1/10 tiles, 0:01 elapsed", "sliding window: 6/10 tiles, 0:06 elapsed",
                        "sliding window: 10/10 tiles, 0:10 elapsed"]


def test_sliding_window_reports_every_tile_from_zero():
    seen = []
    data = np.zeros((1, 20, 20, 20), np.float32)
    sliding_window_logits(data, [lambda x: torch.zeros((x.shape[0], 2, *x.shape[2:]))], (10, 10, 10), 2,
                          device=torch.device("cpu"), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 27) for k in range(28)]
