"""Stop promptly on SIGTERM/SIGINT at any moment of a run, even while Holoscan or torch hold the main thread.

:mod:`segmap.signals` turns SIGTERM into an exception in the main thread. That is enough for ``segmap run`` between
two Python statements, but not in the MONAI Deploy application: Holoscan runs the graph from C++, and a Python
signal handler only runs when the interpreter gets the main thread back (after the graph, or after Holoscan's own
forced shutdown: exit 1 after 3 s with no segmap line). A long torch call holds the main thread the same way.

:func:`install` therefore blocks SIGTERM and SIGINT in the calling (main) thread *before* torch, OpenMP or Holoscan
start their threads, so that every thread created afterwards inherits the blocked mask and the kernel delivers the
signal to no thread but one: a daemon thread sitting in :func:`signal.sigwait`. That thread removes the staging
folders of the output folders this process has claimed (:func:`segmap.outputs.atomic.claim_output_folder`; the
committed outputs of an earlier run stay), prints one line and ends the process with ``os._exit`` (143 for SIGTERM,
130 for SIGINT) without waiting for the graph. The output folder's lock goes with the process.

Call :func:`install` first thing in an entry point (``app/__main__.py``, ``segmap.cli.main``), from the main thread.
Child processes inherit the blocked mask; segmap starts none while it runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from .signals import EXIT_CODE as SIGTERM_EXIT, MESSAGE as SIGTERM_MESSAGE

SIGNALS = {signal.SIGTERM: (SIGTERM_EXIT, SIGTERM_MESSAGE), signal.SIGINT: (128 + signal.SIGINT, "segmap: interrupted")}
_installed = False


def install() -> bool:
    """Block SIGTERM/SIGINT here and stop on them from a dedicated thread; False (nothing done) when called from
    another thread than the main one or a second time."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
    threading.Thread(target=_wait_and_stop, name="segmap-stop", daemon=True).start()
    _installed = True
    return True


def _wait_and_stop() -> None:
    signum = signal.sigwait(set(SIGNALS))
    code, message = SIGNALS[signal.Signals(signum)]
    try:
        remove_staging()
    finally:
        try:
            print(message, file=sys.stderr, flush=True)
        finally:
            os._exit(code)


def remove_staging() -> list[Path]:
    """Remove the ``.segmap-staging-*`` folders of every output folder this process holds (and one level down, the
    per-study folders). A writer may still be adding files while this runs, so each folder is removed until it is
    gone (a few tries within a fraction of a second)."""
    atomic = sys.modules.get("segmap.outputs.atomic")
    if atomic is None:  # nothing imported the writer yet: nothing can be staged
        return []
    removed = []
    for folder in atomic.claimed_folders():
        for staged in atomic.staging_folders(Path(folder)):
            for _ in range(20):
                shutil.rmtree(staged, ignore_errors=True)
                if not os.path.lexists(staged):
                    break
                time.sleep(0.01)
            removed.append(staged)
    return removed
