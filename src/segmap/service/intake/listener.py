"""The service's DICOM listener: a pynetdicom C-ECHO and C-STORE SCP that writes every instance into the spool.

A C-STORE is answered with success only after the instance is on disk for good (:meth:`Spool.write`) *and* the
service recorded its arrival (``on_arrival``, a store transaction). A crash before the answer makes the sender
retry; a crash after it loses nothing. The instance is stored exactly as it was encoded on the wire (compressed
transfer syntaxes too), behind the file meta pynetdicom derives from the presentation context.

Log lines name the calling AE title, the peer address and the study/series/SOP UIDs -- never a patient's name, ID or
birth date.

What one sender can take is bounded (:class:`_Server`): a peer address not in ``allowed_peers`` is closed at accept,
before any thread exists for it; an accepted connection waits in one selector thread (no thread of its own) until its
first bytes arrive, and is closed when none come within ``first_pdu_timeout_s``; only then does it get an association
thread, at most ``max_associations`` at once (pynetdicom refuses more with "local limit exceeded"), and with TLS
its handshake runs in that thread, bounded by the ACSE timeout. Data sets are received to a temporary file in
chunks (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), read for their UIDs without their pixel data, checked against
``max_instance_bytes`` (a Deflated Explicit VR Little Endian data set by its inflated size, inflated in blocks) and
copied into the spool in blocks: an instance of any size passes through a small buffer.

Why a subclass of pynetdicom's server rather than the server as it is: it starts a thread per accepted connection
(whose reactor wakes a thousand times a second, so 50 idle connections cost 4 CPU-seconds in 5 s and past
``maximum_associations`` lock real senders out), and it does the TLS handshake in its one accept loop, where a peer
that never finishes it stops every other connection. Everything after the first bytes is pynetdicom's own.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import socketserver
import ssl
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, AllTransferSyntaxes, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from segmap.errors import InputError, ServiceConfigError
from segmap.service import schema
from segmap.text import one_line
from segmap.service.spool import ConflictingInstance, Spool
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

#: Largest data set accepted per instance (a deflated one by its inflated size): 2 GiB.
DEFAULT_MAX_INSTANCE_BYTES = 2 << 30

#: Accepted connections waiting for their first bytes, at most; past it the oldest waiting one is closed.
MAX_WAITING_CONNECTIONS = 256

#: Seconds between two log lines about refused connections from one address (a flood is counted, not logged).
_REFUSAL_LOG_INTERVAL_S = 60.0

_BLOCK = 1 << 20
_HEADER_TAGS = [Tag(k) for k in ("SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID")]
_LAST_HEADER_TAG = max(_HEADER_TAGS)

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
                 acse_timeout: float = 10.0, max_associations: int = 16, first_pdu_timeout_s: float = 5.0,
                 max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES, tls_context: ssl.SSLContext | None = None,
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
        self.first_pdu_timeout_s = float(first_pdu_timeout_s)
        self.max_instance_bytes = int(max_instance_bytes)
        self.tls_context = tls_context
        self._ae = AE(ae_title=self.ae_title)
        self._ae.maximum_pdu_size = int(max_pdu)
        self._ae.network_timeout = network_timeout
        self._ae.acse_timeout = acse_timeout  # ARTIM: how long an associating connection holds its thread
        self._ae.dimse_timeout = network_timeout
        self._ae.maximum_associations = max_associations
        # Any called AE title is fine (like Orthanc's DicomCheckCalledAet false): sites mistype it more often than
        # they mean someone else.
        self._ae.require_called_aet = False
        for context in AllStoragePresentationContexts:
            self._ae.add_supported_context(context.abstract_syntax, _TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification, _TRANSFER_SYNTAXES)
        self._server = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Per open association: (stored, refused, series UIDs) for its one summary line when it ends.
        self._tally: dict[int, tuple[int, int, set[str]]] = {}
        self._counters = {"instances_received": 0, "instances_refused": 0, "associations_refused": 0}
        self._refusals_logged: dict[str, float] = {}

    @classmethod
    def from_config(cls, lc, *, spool: Spool, on_arrival: OnArrival, base: Path | None = None,
                    log: logging.Logger | None = None,
                    below_floor: Callable[[], bool] | None = None) -> "DicomListener":
        """The listener the ``listener`` section ``lc`` (:class:`segmap.service.config.ListenerConfig`) describes;
        ``base`` is the configuration file's folder (relative TLS paths)."""
        from segmap.tls import server_context

        tls = server_context(lc.tls.files("listener.tls", base)) if lc.tls is not None else None
        return cls(lc.ae_title, lc.host, lc.port, spool=spool, on_arrival=on_arrival,
                   allowed_calling_ae_titles=lc.allowed_calling_ae_titles, allowed_peers=lc.allowed_peers, log=log,
                   network_timeout=lc.network_timeout_s, acse_timeout=lc.acse_timeout_s,
                   max_associations=lc.max_associations, first_pdu_timeout_s=lc.first_pdu_timeout_s,
                   max_instance_bytes=lc.max_instance_bytes, tls_context=tls, below_floor=below_floor)

    def counters(self) -> dict[str, int]:
        """Totals since start (for /metrics): instances received (stored and recorded), instances refused (any
        failure status), associations refused (peer address, calling AE title, TLS handshake)."""
        with self._lock:
            return dict(self._counters)

    def _add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

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
            # Received data sets go to a temporary file in chunks, not into memory (a process-wide pynetdicom
            # setting; event.dataset still works for any other acceptor in the process).
            _config.STORE_RECV_CHUNKED_DATASET = True
            handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                        (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_RELEASED, self._on_ended),
                        (evt.EVT_ABORTED, self._on_ended), (evt.EVT_CONN_CLOSE, self._on_ended)]
            server = self._ae.make_server((self.host, self.port), ssl_context=self.tls_context,
                                          evt_handlers=handlers, server_class=_Server)
            server.listener = self
            server.gate = _Gate(server, self.first_pdu_timeout_s)
            self._ae._servers.append(server)
            self._thread = threading.Thread(target=server.serve_forever, name=f"dicom-listener-{self.ae_title}",
                                            daemon=True)
            self._thread.start()
            self._server = server
        host, port = self.address
        self.log.debug("DICOM listener %s bound to %s:%d%s", self.ae_title, host, port,
                       " (TLS)" if self.tls_context else "")

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
        server.gate.close()
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        aborted = list(server.active_associations)
        for assoc in aborted:
            assoc.abort()
        server.shutdown()  # pynetdicom's: closes the socket and joins the association threads
        self.log.info("DICOM listener %s stopped%s", self.ae_title,
                      f" ({len(aborted)} open association(s) aborted)" if aborted else "")

    def _refused_connection(self, address: str, why: str) -> None:
        """Count a connection closed before it associated; log it at most once a minute per address."""
        self._add("associations_refused")
        now = time.monotonic()
        with self._lock:
            last = self._refusals_logged.get(address)
            if last is not None and now - last < _REFUSAL_LOG_INTERVAL_S:
                return
            if len(self._refusals_logged) > 1024:
                self._refusals_logged.clear()
            self._refusals_logged[address] = now
        self.log.warning("connection from %s refused: %s (further refusals from it for a minute are counted, not "
                         "logged)", address, why)

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
        self._add("associations_refused")
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
        status = self._store(event, calling, peer)
        if status != SUCCESS:
            self._add("instances_refused")
        return status

    def _store(self, event, calling: str, peer: str) -> int:
        received = Path(event.dataset_path)  # preamble, file meta and the data set as received (chunked receive)
        affected = str(event.request.AffectedSOPInstanceUID or "")
        try:
            header = read_header(received, self.max_instance_bytes)
        except InstanceTooLarge as exc:
            self.log.warning("C-STORE from %s (calling AE %s), SOP %s: %s: answered out of resources", peer, calling,
                             affected or "?", exc)
            self._count(event.assoc, 0, 1)
            return OUT_OF_RESOURCES
        except Exception as exc:  # anything pydicom cannot parse is "cannot understand", never a crash
            self.log.warning("C-STORE from %s (calling AE %s): the dataset cannot be decoded (%s): refused",
                             peer, calling, type(exc).__name__)
            self._count(event.assoc, 0, 1)
            return CANNOT_UNDERSTAND
        uids = {key: header.get(key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        modality = str(header.get("Modality", "") or "")
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
            path = self.spool.write_file(received, study, series, sop)
        except ConflictingInstance as exc:
            self.log.warning("C-STORE from %s (calling AE %s), study %s: %s: refused, the stored instance is kept",
                             peer, calling, study, exc)
            self._count(event.assoc, 0, 1, series)
            return CANNOT_UNDERSTAND
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
        self._add("instances_received")
        return SUCCESS


class InstanceTooLarge(InputError):
    """A received data set over ``listener.max_instance_bytes``."""


def read_header(path: Path, max_bytes: int):
    """SOP Instance, Study and Series Instance UIDs and Modality of the DICOM file at ``path``, read without the
    rest of the data set; :class:`InstanceTooLarge` when the data set (inflated, when it is deflated) is over
    ``max_bytes``. Never holds more than a block of the file in memory."""
    meta, offset = split_dataset(path)
    size = path.stat().st_size - offset
    if size > max_bytes:
        raise InstanceTooLarge(f"the data set is {size} bytes, over listener.max_instance_bytes ({max_bytes})")
    syntax = UID(str(meta.get("TransferSyntaxUID", "") or ""))
    with open(path, "rb") as fp:
        fp.seek(offset)
        if syntax == DeflatedExplicitVRLittleEndian:
            with tempfile.TemporaryFile() as inflated:
                _inflate(fp, inflated, max_bytes)
                inflated.seek(0)
                return _read_header(inflated, implicit=False, little=True)
        return _read_header(fp, implicit=syntax.is_implicit_VR, little=syntax.is_little_endian)


def _read_header(fp, *, implicit: bool, little: bool):
    # The header tags come first in a data set (ascending tag order): stop after the last of them, so neither the
    # pixel data nor anything else large is read.
    return read_dataset(fp, implicit, little, stop_when=lambda tag, vr, length: tag > _LAST_HEADER_TAG,
                        specific_tags=_HEADER_TAGS)


def _inflate(source, target, max_bytes: int) -> None:
    """Inflate the raw deflate stream ``source`` into ``target`` a block at a time, stopping past ``max_bytes``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending = b""
    while True:
        if not pending:
            pending = source.read(_BLOCK)
            if not pending:
                break
        out = inflater.decompress(pending, _BLOCK)
        pending = inflater.unconsumed_tail
        total += len(out)
        if total > max_bytes:
            raise InstanceTooLarge(f"the deflated data set inflates to more than listener.max_instance_bytes "
                                   f"({max_bytes} bytes)")
        target.write(out)
        if inflater.eof:
            break
    out = inflater.flush()
    if total + len(out) > max_bytes:
        raise InstanceTooLarge(f"the deflated data set inflates to more than listener.max_instance_bytes "
                               f"({max_bytes} bytes)")
    target.write(out)


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with the listener's gate: see the module docstring. ``listener`` and ``gate``
    are set right after it is made."""

    listener: DicomListener
    gate: "_Gate"

    def __init__(self, *args, **kwargs):
        kwargs["request_handler"] = _Handler
        super().__init__(*args, **kwargs)

    def get_request(self):
        # The plain socket: a TLS handshake here would make the accept loop wait for one slow peer.
        return self.socket.accept()

    def verify_request(self, request, client_address) -> bool:
        allowed = self.listener.allowed_peers
        if allowed and not _peer_allowed(client_address[0], allowed):
            self.listener._refused_connection(client_address[0], "peer address not allowed")
            return False  # socketserver closes it: no thread, no association
        return True

    def process_request(self, request, client_address) -> None:
        self.gate.wait_for_data(request, client_address)

    def start_association(self, request, client_address) -> None:
        """The connection sent its first bytes: serve it in a thread of its own (pynetdicom's)."""
        ThreadedAssociationServer.process_request(self, request, client_address)


class _Handler(RequestHandler):
    """pynetdicom's request handler, doing the TLS handshake (bounded by the ACSE timeout) in the association's own
    thread first."""

    def handle(self) -> None:
        context = self.server.ssl_context
        if context is not None:
            raw = self.request
            try:
                raw.settimeout(self.server.ae.acse_timeout)
                wrapped = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                wrapped.do_handshake()
                wrapped.settimeout(None)
            except (OSError, ValueError) as exc:
                self.server.listener._refused_connection(self.client_address[0], f"TLS handshake failed "
                                                         f"({_tls_reason(exc)})")
                raw.close()
                return
            self.request = wrapped
        super().handle()


def _tls_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.__class__.__name__).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


class _Gate:
    """Holds accepted connections in one selector thread until their first bytes arrive (then
    :meth:`_Server.start_association`), closing those that stay silent for ``timeout_s`` seconds and the oldest
    when more than :data:`MAX_WAITING_CONNECTIONS` wait."""

    def __init__(self, server: _Server, timeout_s: float):
        self.server = server
        self.timeout_s = timeout_s
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, tuple[tuple, float]] = {}  # insertion order: oldest first
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dicom-listener-gate", daemon=True)
        self._thread.start()

    def wait_for_data(self, sock: socket.socket, address) -> None:
        with self._lock:
            if self._closed:
                _close(sock)
                return
            self._waiting[sock] = (address, time.monotonic() + self.timeout_s)
            self._selector.register(sock, selectors.EVENT_READ)
            while len(self._waiting) > MAX_WAITING_CONNECTIONS:
                self._drop(next(iter(self._waiting)))
            self._wake()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for sock in list(self._waiting):
                self._drop(sock)
            self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the gate has ended; nothing waits to be woken
            pass

    def _drop(self, sock: socket.socket) -> tuple | None:
        entry = self._waiting.pop(sock, None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        if entry is not None:
            _close(sock)
        return entry

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
                first_deadline = min((d for _, d in self._waiting.values()), default=None)
            wait = None if first_deadline is None else max(0.0, first_deadline - time.monotonic())
            ready = self._selector.select(wait)
            start = []
            with self._lock:
                for key, _ in ready:
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    entry = self._waiting.pop(key.fileobj, None)
                    if entry is not None:
                        self._selector.unregister(key.fileobj)
                        start.append((key.fileobj, entry[0]))
                now = time.monotonic()
                for sock, (address, deadline) in list(self._waiting.items()):
                    if deadline <= now:
                        self._drop(sock)
            for sock, address in start:
                try:
                    self.server.start_association(sock, address)
                except Exception:  # a thread that cannot start: drop this connection, keep the gate
                    _close(sock)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


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

