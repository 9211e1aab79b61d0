"""SIGTERM handled like Ctrl-C: clean up, one line, exit code 143.

``docker stop`` and Kubernetes stop a container with SIGTERM (then SIGKILL after a grace period). Python's default
for SIGTERM is to die on the spot: no ``finally`` block runs, so a run stopped while writing left a hidden
``.segmap-staging-*`` folder with empty files, and printed nothing. :func:`install_sigterm_handler` makes SIGTERM
raise :class:`Terminated` in the main thread instead, so every ``with``/``finally`` clean-up runs (the staging folder
of :func:`segmap.outputs.atomic.atomic_outputs` is removed, the output folder is left as it was); then one line
``segmap: terminated (SIGTERM)`` goes to stderr and the process exits with 143 (128 + 15, what shells and
orchestrators expect from a process ended by SIGTERM).

:class:`Terminated` derives from :class:`SystemExit`, not :class:`Exception`: ``except Exception`` handlers (an
operator recording an error, a decoder fallback) do not swallow it, and an entry point that does not catch it still
exits with 143. Further SIGTERMs during the clean-up are ignored, so a second signal cannot cut it short.
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_CODE = 128 + signal.SIGTERM
MESSAGE = "segmap: terminated (SIGTERM)"


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives; its exit code is 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up must not be interrupted again
    print(MESSAGE, file=sys.stderr, flush=True)
    raise Terminated()


def install_sigterm_handler() -> bool:
    """Make SIGTERM end the process like Ctrl-C (see the module docstring). Call it early in an entry point's main
    thread; returns False (and changes nothing) from another thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True
