"""The DICOM network calls segmap makes as a client (pynetdicom), written once: an application entity with one
timeout for every step, and C-FIND that yields the matches and says plainly when the peer refused or went away.

Used by the service's DICOM destination (confirming by C-FIND) and by ``segmap submit`` (finding the SEG series).
pynetdicom is imported when a call is made: it belongs to the job service's extra, and ``segmap`` builds its
command line (which names ``submit``) for every command.
"""

from __future__ import annotations

from typing import Any, Iterator

from segmap.errors import SegmapError

#: C-FIND statuses that carry a match (pending, pending with optional keys unsupported).
PENDING = (0xFF00, 0xFF01)


class CFindFailed(SegmapError):
    """A C-FIND that did not complete: ``status`` is the peer's failure status, None when it gave no answer
    (aborted the association, timed out)."""

    def __init__(self, status: int | None):
        super().__init__("no C-FIND answer" if status is None else f"C-FIND status 0x{status:04X}")
        self.status = status


def application_entity(ae_title: str, timeout_s: float):
    """A pynetdicom AE calling as ``ae_title`` whose connection, association, DIMSE and network waits are each
    bounded by ``timeout_s`` seconds."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    return ae


def c_find(assoc, query, model) -> Iterator[Any]:
    """The identifiers matching ``query`` on an established association (information ``model``, e.g. Study Root
    Find); raises :class:`CFindFailed` when the peer refuses or gives no answer."""
    for status, identifier in assoc.send_c_find(query, model):
        code = getattr(status, "Status", None)
        if code is None:
            raise CFindFailed(None)
        if code in PENDING:
            if identifier is not None:
                yield identifier
        elif code != 0x0000:
            raise CFindFailed(code)
