"""The service's DICOM listener: a pynetdicom C-ECHO and C-STORE SCP that writes every instance into the spool.

A C-STORE is answered with success only after the instance is on disk for good (:meth:`Spool.write`) *and* the
service recorded its arrival (``on_arrival``, a store transaction). A crash before the answer makes the sender
retry; a crash after it loses nothing. The instance is stored exactly as it was encoded on the wire (compressed
transfer syntaxes too), behind the file meta pynetdicom derives from the presentation context.

Log lines name the calling AE title, the peer address and the study/series/SOP UIDs -- never a patient's name, ID or
birth date.
"""

from __future__ import annotations

import ipaddress
import logging
import socketserver
import threading
import time
from typing import Callable, Iterable

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from segmap.errors import InputError, ServiceConfigError
from segmap.service import schema
from segmap.text import one_line
from segmap.service.spool import Spool
from segmap.service.store import Arrival

#: DIMSE status codes of the C-STORE answers (PS3.4 B.2.3 and PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

#: A-ASSOCIATE-RJ: rejected permanent, by the service user; diagnostics "no reason given" / "calling AE not
#: recognised" (there is no code for a peer address, so that one says no reason).
_REJECTED_PERMANENT = 0x01
_SERVICE_USER = 0x01
_NO_REASON = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03

#: Largest PDU we offer to receive; 0 would mean unlimited, which lets a peer make us allocate arbitrarily large PDUs.
DEFAULT_MAX_PDU = 262_144

# Every transfer syntax pynetdicom or pydicom knows: the instance is stored as received, never decoded here, so
# accepting HTJ2K or a video syntax costs nothing and a modality that proposes only that one still gets through.
_TRANSFER_SYNTAXES = list(dict.fromkeys([*ALL_TRANSFER_SYNTAXES, *(str(u) for u in AllTransferSyntaxes)]))

OnArrival = Callable[[Arrival], object]


class DicomListener:
    """C-ECHO + C-STORE SCP on ``host:port`` answering to ``ae_title``, writing into ``spool``.

    ``on_arrival(arrival)`` runs in the association's thread for each stored instance, before the C-STORE answer; it
    must be thread-safe (several associations run at once) and raise to make the sender retry later.
    ``allowed_calling_ae_titles`` / ``allowed_peers`` (IP addresses or networks) empty: anyone may associate.
    """

    def __init__(self, ae_title: str, host: str, port: int, *, spool: Spool, on_arrival: OnArrival,
                 allowed_calling_ae_titles: Iterable[str] = (), allowed_peers: Iterable[str] = (),
                 max_pdu: int = DEFAULT_MAX_PDU, log: logging.Logger | None = None, network_timeout: float = 60.0,
                 acse_timeout: float = 30.0, max_associations: int = 16,
                 below_floor: Callable[[], bool] | None = None):
        self.ae_title = _check_ae_title(ae_title, "listener.ae_title")
        self.host = host
        self.port = int(port)
        self.spool = spool
        self.on_arrival = on_arrival
        self.below_floor = below_floor  # True: free space under the floor, instances are refused (0xA700)
        self.allowed_calling = frozenset(_check_ae_title(t, "listener.allowed_calling_ae_titles")
                                         for t in allowed_calling_ae_titles)
        self.allowed_peers = tuple(_parse_peer(p) for p in allowed_peers)
        self.log = log or logging.getLogger("segmap.service.listener")
        self._ae = AE(ae_title=self.ae_title)
        self._ae.maximum_pdu_size = int(max_pdu)
        self._ae.network_timeout = network_timeout
        self._ae.acse_timeout = acse_timeout  # also how long a connection that never associates holds a thread
        self._ae.dimse_timeout = network_timeout
        self._ae.maximum_associations = max_associations
        # Any called AE title is fine (like Orthanc's DicomCheckCalledAet false): sites mistype it more often than
        # they mean someone else.
        self._ae.require_called_aet = False
        for context in AllStoragePresentationContexts:
            self._ae.add_supported_context(context.abstract_syntax, _TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification, _TRANSFER_SYNTAXES)
        self._server = None
        self._lock = threading.Lock()
        # Per open association: (stored, refused, series UIDs) for its one summary line when it ends.
        self._tally: dict[int, tuple[int, int, set[str]]] = {}

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when ``port`` was 0."""
        if self._server is None:
            return self.host, self.port
        return self._server.server_address[:2]

    @property
    def open_associations(self) -> int:
        """How many connections the listener is serving now (associated or still negotiating)."""
        server = self._server
        return len(server.active_associations) if server is not None else 0

    def start(self) -> None:
        """Listen in background threads; returns once the port is bound (OSError when it cannot be)."""
        with self._lock:
            if self._server is not None:
                return
            handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                        (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_RELEASED, self._on_ended),
                        (evt.EVT_ABORTED, self._on_ended), (evt.EVT_CONN_CLOSE, self._on_ended)]
            self._server = self._ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        host, port = self.address
        self.log.debug("DICOM listener %s bound to %s:%d", self.ae_title, host, port)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop listening; associations still open after ``grace_s`` seconds are aborted.

        An aborted sender retries later; every instance it was already answered success for is on disk and recorded.
        Without the abort, closing the server would wait for a long transfer to end on its own.
        """
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        socketserver.BaseServer.shutdown(server)  # no new associations; the open ones go on for now
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        aborted = list(server.active_associations)
        for assoc in aborted:
            assoc.abort()
        server.shutdown()  # pynetdicom's: closes the socket and joins the association threads
        self.log.info("DICOM listener %s stopped%s", self.ae_title,
                      f" ({len(aborted)} open association(s) aborted)" if aborted else "")

    def __enter__(self) -> "DicomListener":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- event handlers (run in the association threads) --------------------------------------------------------

    def _on_requested(self, event) -> None:
        """Refuse an association from a peer address or calling AE title that is not allowed."""
        assoc = event.assoc
        peer = assoc.requestor.address
        # The requestor's AE title is filled in by the negotiation that follows; the request itself has it now.
        calling = _ae_text(assoc.requestor.primitive.calling_ae_title)
        if self.allowed_peers and not _peer_allowed(peer, self.allowed_peers):
            why, diagnostic = "peer address not allowed", _NO_REASON
        elif self.allowed_calling and calling not in self.allowed_calling:
            why, diagnostic = "calling AE title not recognised", _CALLING_AE_NOT_RECOGNISED
        else:
            return
        self.log.warning("association from %s (calling AE %s) rejected: %s", peer, calling, why)
        assoc.acse.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, diagnostic)
        assoc.kill()

    def _count(self, assoc, stored: int, refused: int, series_uid: str | None = None) -> None:
        with self._lock:
            done, failed, series = self._tally.get(id(assoc), (0, 0, set()))
            if series_uid:
                series.add(series_uid)
            self._tally[id(assoc)] = (done + stored, failed + refused, series)

    def _on_ended(self, event) -> None:
        """One line per association that stored something: what an operator looks for first."""
        with self._lock:
            tally = self._tally.pop(id(event.assoc), None)
        if tally is None:
            return
        stored, refused, series = tally
        how = {evt.EVT_RELEASED.name: "released", evt.EVT_ABORTED.name: "aborted"}.get(event.event.name, "closed")
        self.log.info("association from %s (calling AE %s) %s: %d instance(s) stored, %d refused; series %s",
                      event.assoc.requestor.address, _ae_text(event.assoc.requestor.ae_title), how, stored, refused,
                      ", ".join(sorted(series)) or "-")

    def _on_echo(self, event) -> int:
        self.log.debug("C-ECHO from %s (calling AE %s)", event.assoc.requestor.address,
                       _ae_text(event.assoc.requestor.ae_title))
        return SUCCESS

    def _on_store(self, event) -> int:
        calling = _ae_text(event.assoc.requestor.ae_title)
        peer = event.assoc.requestor.address
        try:
            dataset = event.dataset
            uids = {key: dataset.get(key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
            modality = str(dataset.get("Modality", "") or "")
        except Exception as exc:  # anything pydicom cannot parse is "cannot understand", never a crash
            self.log.warning("C-STORE from %s (calling AE %s): the dataset cannot be decoded (%s): refused",
                             peer, calling, type(exc).__name__)
            self._count(event.assoc, 0, 1)
            return CANNOT_UNDERSTAND
        affected = str(event.request.AffectedSOPInstanceUID or "")
        try:
            target = self.spool.path(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
            if affected and affected != str(uids["SOPInstanceUID"]).strip():
                raise InputError(f"SOPInstanceUID {uids['SOPInstanceUID']} differs from the request's Affected SOP "
                                 f"Instance UID {affected}")
        except InputError as exc:
            self.log.warning("C-STORE from %s (calling AE %s), SOP %s: %s: refused", peer, calling, affected or "?",
                             exc)
            self._count(event.assoc, 0, 1)
            return CANNOT_UNDERSTAND
        study, series, sop = target.parent.parent.name, target.parent.name, target.stem
        if self.below_floor is not None and self.below_floor():
            self.log.debug("C-STORE from %s (calling AE %s), study %s series %s SOP %s: free space is below the "
                           "floor: answered out of resources", peer, calling, study, series, sop)
            self._count(event.assoc, 0, 1, series)
            return OUT_OF_RESOURCES
        try:
            path = self.spool.write(event.encoded_dataset(include_meta=True), study, series, sop)
        except OSError as exc:
            self.log.error("C-STORE from %s (calling AE %s), study %s series %s SOP %s: cannot be written (%s): "
                           "answered out of resources", peer, calling, study, series, sop, exc.strerror or exc)
            self._count(event.assoc, 0, 1, series)
            return OUT_OF_RESOURCES
        arrival = Arrival(source="listener", study_uid=study, series_uid=series, sop_uid=sop, modality=modality,
                          path=str(path), calling_ae=calling)
        try:
            self.on_arrival(arrival)
        except Exception as exc:
            self.log.error("C-STORE from %s (calling AE %s), study %s series %s SOP %s: not recorded (%s: %s): "
                           "answered out of resources", peer, calling, study, series, sop, type(exc).__name__,
                           one_line(exc, 200))
            self._count(event.assoc, 0, 1, series)
            return OUT_OF_RESOURCES
        self.log.debug("C-STORE from %s (calling AE %s): study %s series %s SOP %s stored", peer, calling, study,
                       series, sop)
        self._count(event.assoc, 1, 0, series)
        return SUCCESS


def _ae_text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _check_ae_title(value, key: str) -> str:
    text = _ae_text(value)
    problem = schema.ae_title(text)
    if problem:
        schema.fail(None, key, problem)
    return text


def _parse_peer(value) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ServiceConfigError(f"listener.allowed_peers: {value!r} is not an IP address or network") from None


def _peer_allowed(address: str, allowed) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in allowed)

