"""Every signal segmap handles, handled here: SIGTERM and SIGINT, in one of three ways that suit the entry point.

``docker stop`` and Kubernetes stop a container with SIGTERM (then SIGKILL after a grace period). Python's default
for SIGTERM is to die on the spot: no ``finally`` block runs, so a run stopped while writing left a hidden
``.segmap-staging-*`` folder with empty files, and printed nothing. Every way below ends with one line on stderr
and the exit code shells and orchestrators expect (:data:`SIGNALS`: 143 for SIGTERM, 130 for SIGINT).

1. :func:`install_sigterm_handler` -- between Python statements (most commands): SIGTERM raises
   :class:`Terminated` in the main thread, so every ``with``/``finally`` clean-up runs (the staging folder of
   :func:`segmap.outputs.atomic.atomic_outputs` is removed, the output folder is left as it was). :class:`Terminated`
   derives from :class:`SystemExit`, not :class:`Exception`: ``except Exception`` handlers (an operator recording an
   error, a decoder fallback) do not swallow it, and an entry point that does not catch it still exits with 143.
   Further SIGTERMs during the clean-up are ignored, so a second signal cannot cut it short.

2. :func:`install` -- while Holoscan or torch hold the main thread (``segmap run``, the MAP application). Holoscan
   runs the graph from C++, and a Python signal handler only runs when the interpreter gets the main thread back
   (after the graph, or after Holoscan's own forced shutdown: exit 1 after 3 s with no segmap line); a long torch
   call holds the main thread the same way. :func:`install` therefore blocks SIGTERM and SIGINT in the calling (main)
   thread *before* torch, OpenMP or Holoscan start their threads, so that every thread created afterwards inherits
   the blocked mask and the kernel delivers the signal to no thread but one: a daemon thread sitting in
   :func:`signal.sigwait`. That thread removes the staging folders of the output folders this process has claimed
   (:func:`segmap.outputs.atomic.claim_output_folder`; the committed outputs of an earlier run stay), prints one line
   and ends the process with ``os._exit`` without waiting for the graph. The output folder's lock goes with the
   process. Child processes inherit the blocked mask; segmap starts none while it runs.

3. :func:`stop_event` -- a long-running loop (``segmap serve``): the signal sets an event the loop checks between
   ticks; the loop finishes its tick and returns (the service's state is in its store, so nothing needs undoing).

Call the chosen one first thing in an entry point, from the main thread.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_CODE = 128 + signal.SIGTERM
MESSAGE = "segmap: terminated (SIGTERM)"
#: Each signal segmap handles -> (exit code, the one line printed).
SIGNALS = {signal.SIGTERM: (EXIT_CODE, MESSAGE), signal.SIGINT: (128 + signal.SIGINT, "segmap: interrupted")}

log = logging.getLogger("segmap")
_installed = False


# ------------------------------------------------------------------------------------ 1. an exception in main


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives; its exit code is 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up must not be interrupted again
    print(MESSAGE, file=sys.stderr, flush=True)
    raise Terminated()


def install_sigterm_handler() -> bool:
    """Make SIGTERM end the process like Ctrl-C (way 1 of the module docstring). Call it early in an entry point's
    main thread; returns False (and changes nothing) from another thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


# ------------------------------------------------------------------------------------ 2. a thread in sigwait


def install() -> bool:
    """Block SIGTERM/SIGINT here and stop on them from a dedicated thread (way 2); False (nothing done) when called
    from another thread than the main one or a second time."""
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


# ------------------------------------------------------------------------------------ 3. an event for a loop


def stop_event(what: str, logger: logging.Logger = log) -> threading.Event:
    """An event that SIGTERM and SIGINT set (way 3), logging ``signal N: <what>`` to ``logger``; call it from the
    main thread."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        logger.info("signal %d: %s", signum, what)
        stop.set()

    for signum in SIGNALS:
        signal.signal(signum, on_signal)
    return stop
