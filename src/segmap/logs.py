"""Logging set-up shared by the ``segmap`` command and the application."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``; highdicom's per-module INFO chatter is kept out of the run log."""
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level)
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
