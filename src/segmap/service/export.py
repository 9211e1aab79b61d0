"""Where a job's result goes: a DICOM node (C-STORE), an Orthanc (REST) or a DICOMweb server (STOW-RS).

A job is done only when its destination *confirmed* every instance, so each destination has two steps: ``send``
delivers the files and ``confirm`` checks that every SOP Instance UID among them is there. Failures come in two
kinds the service treats differently: :class:`~segmap.errors.DestinationUnavailable` (connection refused, timeout,
association rejected, 5xx, out of resources) is retried later with back-off; :class:`~segmap.errors.ExportError` (a
DICOM failure status, a 4xx) fails the job, because sending the same file again gives the same answer.

pynetdicom and dicomweb-client are imported by the destination that uses them, when it sends or confirms: reading
a configuration (which checks its destinations) loads neither.

Re-sending is harmless: a job's SEG carries UIDs derived from the job key (:func:`segmap.service.keys.seg_uids`),
so a receiver that already holds it keeps one copy (Orthanc answers ``AlreadyStored``).

How each kind confirms:

- ``dicom``, ``confirm: store-status`` (the default): by the C-STORE responses this destination object received
  for these files (success or warning status for every instance). A generic storage SCP (DCMTK's storescp, many
  routers) offers no query service, so there is nothing else to ask. The service sends and confirms in one step and
  records the delivery in the job store (the only lasting record); a new destination object confirms nothing it
  did not send itself (sending again is harmless: same UIDs).
- ``dicom``, ``confirm: c-find``: a Study Root C-FIND at IMAGE level for each SOP Instance UID, for a PACS that
  answers queries (Orthanc does): what the archive holds, also after a restart.
- ``orthanc``: ``POST /tools/lookup`` of each SOP Instance UID finds an instance.
- ``stow``: a QIDO-RS ``search_for_instances`` by SOP Instance UID finds each one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from segmap.dimse import CFindFailed, application_entity, c_find
from segmap.errors import DestinationUnavailable, ExportError
from segmap.orthanc import OrthancClient, OrthancRequestError, is_temporary
from segmap.text import one_line

from . import schema
from .schema import read_section, setting

log = logging.getLogger(__name__)


class Destination(Protocol):
    """One configured destination (``destinations.<name>`` of the service configuration)."""

    name: str
    kind: str

    def send(self, files: Sequence[Path]) -> None:
        """Deliver every file; raises DestinationUnavailable (retry later) or ExportError (permanent)."""

    def confirm(self, files: Sequence[Path]) -> bool:
        """Whether every SOP Instance UID of ``files`` is present at the destination."""


def make_destination(name: str, cfg: Mapping[str, Any]) -> Destination:
    """The destination ``destinations.<name>`` describes; its keys are checked (:class:`ServiceConfigError`, by the
    one configuration reader, :func:`segmap.service.schema.read_section`)."""
    where = f"destinations.{name}"
    kinds = ", ".join(DESTINATIONS)
    if not isinstance(cfg, Mapping):
        schema.fail(None, where, f"must be a mapping with a 'kind' ({kinds}), got {cfg!r}")
    problem = schema.one_of(tuple(DESTINATIONS))(cfg.get("kind"))
    if problem:
        schema.fail(None, f"{where}.kind", problem)
    return read_section(DESTINATIONS[cfg["kind"]], cfg, where, None, ignore=("kind",), name=name)


# ------------------------------------------------------------------------------------------------ instances


@dataclass(frozen=True)
class Instance:
    """What a destination needs to know about one file to send and find it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str


def read_instances(files: Sequence[Path]) -> list[Instance]:
    """The identifying UIDs of each file (headers only); a file that is not DICOM is an :class:`ExportError`."""
    out = []
    for f in files:
        path = Path(f)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out.append(Instance(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID)))
        except (OSError, InvalidDicomError, AttributeError) as e:
            raise ExportError(f"{path}: not a DICOM instance that can be sent ({one_line(e)})") from e
    return out


# ------------------------------------------------------------------------------------------------ DICOM C-STORE

#: DICOM Part 7 C-STORE statuses: 0x0000 success; 0xB000/0xB006/0xB007 warnings (stored, with coercion or
#: elements discarded). 0xA7xx means "out of resources": the peer may have room later, so it is retried.
_WARNINGS = (0xB000, 0xB006, 0xB007)


@dataclass
class DicomDestination:
    """A DICOM storage SCP reached by C-STORE (pynetdicom), one association per ``send``."""

    CONFIRMS: ClassVar[tuple[str, ...]] = ("store-status", "c-find")
    kind: ClassVar[str] = "dicom"

    name: str
    host: str = setting(help="the peer's host name or address", check=schema.text, convert=str.strip)
    port: int = setting(help="the peer's DICOM port", check=schema.port)
    ae_title: str = setting(help="the peer's AE title", check=schema.ae_title)
    calling_ae_title: str = setting("SEGMAP", "our AE title", check=schema.ae_title)
    timeout_s: float = setting(30.0, "seconds to wait for each answer", check=schema.positive)
    confirm_by: str = setting("store-status", "store-status (the C-STORE answers) or c-find (ask the archive)",
                              key="confirm", check=schema.one_of(CONFIRMS))
    tls: schema.TlsConfig | None = setting(None, "DICOM TLS: ca (verifies the peer), cert and key (ours, when the "
                                                 "peer asks for one)")
    #: SOP Instance UIDs the peer answered success/warning for to this object's sends.
    _stored: set[str] = field(default_factory=set, init=False, repr=False)
    _tls_context: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.tls is not None:  # the files are checked with the configuration, not at the first export
            from segmap.tls import client_context

            self._tls_context = client_context(self.tls.files(f"destinations.{self.name}.tls"))

    def send(self, files: Sequence[Path]) -> None:
        instances = read_instances(files)
        if not instances:
            return
        ae = application_entity(self.calling_ae_title, self.timeout_s)
        for sop_class in sorted({i.sop_class_uid for i in instances}):
            syntaxes = sorted({i.transfer_syntax for i in instances if i.sop_class_uid == sop_class})
            ae.add_requested_context(sop_class, list(dict.fromkeys(
                [*syntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        peer = self._peer
        assoc = self._associate(ae)
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            refused = sorted({i.sop_class_uid for i in instances} - accepted)
            if refused:  # the peer will never store this kind of object: retrying does not help
                raise ExportError(f"destination {self.name}: {peer} does not accept SOP Class "
                                  f"{', '.join(refused)} (no presentation context accepted)")
            for inst in instances:
                # A dataset rather than the path: pynetdicom may then re-encode between uncompressed transfer
                # syntaxes when the peer accepted another one than the file's.
                status = assoc.send_c_store(pydicom.dcmread(inst.path))
                code = getattr(status, "Status", None)
                if code is None:  # no answer: connection lost, DIMSE timeout, peer aborted
                    raise DestinationUnavailable(f"destination {self.name}: {peer} gave no C-STORE response for "
                                                 f"SOP Instance {inst.sop_instance_uid} (connection lost or timeout)")
                if code == 0x0000 or code in _WARNINGS:
                    self._stored.add(inst.sop_instance_uid)
                    continue
                self._stored.discard(inst.sop_instance_uid)
                text = f"destination {self.name}: {peer} answered C-STORE status 0x{code:04X} for SOP Instance " \
                       f"{inst.sop_instance_uid}"
                if code & 0xFF00 == 0xA700:
                    raise DestinationUnavailable(text + " (out of resources; will retry)")
                raise ExportError(text)
        except (DestinationUnavailable, ExportError):
            raise
        except (OSError, ValueError, RuntimeError) as e:  # a transfer syntax no accepted context fits, a socket error
            raise DestinationUnavailable(f"destination {self.name}: sending to {peer} failed: {one_line(e)}") from e
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("destination %s: %d instance(s) stored at %s", self.name, len(instances), peer)

    @property
    def _peer(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def _associate(self, ae):
        """An established association with the peer, or DestinationUnavailable / ExportError saying why not."""
        from pynetdicom import evt

        connected: list[bool] = []  # pynetdicom reports a refused connection as an abort; the open event tells
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=self._tls_args(),
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))])
        if assoc.is_established:
            return assoc
        refused = sorted(str(cx.abstract_syntax) for cx in assoc.rejected_contexts)
        if connected and refused and not assoc.accepted_contexts:
            # pynetdicom aborts when the peer accepted none of our contexts: it will never take this kind of object
            raise ExportError(f"destination {self.name}: {self._peer} does not accept SOP Class "
                              f"{', '.join(dict.fromkeys(refused))} (no presentation context accepted)")
        raise DestinationUnavailable(f"destination {self.name}: {self._peer} {_association_failure(assoc, connected)}")

    def _tls_args(self):
        """(context, None) for pynetdicom when ``tls`` is set: the peer's certificate must be signed by ``ca``."""
        return None if self._tls_context is None else (self._tls_context, None)

    def confirm(self, files: Sequence[Path]) -> bool:
        instances = read_instances(files)
        if self.confirm_by == "store-status":
            return all(i.sop_instance_uid in self._stored for i in instances)
        return self._find(instances)

    def _find(self, instances: Sequence[Instance]) -> bool:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        ae = application_entity(self.calling_ae_title, self.timeout_s)
        ae.add_requested_context(FIND)
        peer = self._peer
        assoc = self._associate(ae)
        try:
            for inst in instances:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID, query.SeriesInstanceUID = inst.study_uid, inst.series_uid
                query.SOPInstanceUID = inst.sop_instance_uid
                try:
                    found = any(str(match.get("SOPInstanceUID", "")) == inst.sop_instance_uid
                                for match in list(c_find(assoc, query, FIND)))
                except CFindFailed as e:
                    if e.status is None:
                        raise DestinationUnavailable(f"destination {self.name}: C-FIND to {peer} got no answer") \
                            from None
                    raise ExportError(f"destination {self.name}: {peer} answered C-FIND status 0x{e.status:04X} "
                                      f"(set confirm: store-status if it does not answer queries)") from None
                if not found:
                    return False
        finally:
            if assoc.is_established:
                assoc.release()
        return True


def _association_failure(assoc, connected: Sequence[bool]) -> str:
    """Why an association did not come up, in the peer's terms when it said something."""
    if not connected:
        return "cannot be reached (connection refused or timed out)"
    if assoc.is_rejected:
        prim = getattr(assoc.acceptor, "primitive", None)
        result = getattr(prim, "result_str", None) or "rejected"
        reason = getattr(prim, "reason_str", None) or ""
        return f"rejected the association ({result}{': ' + reason if reason else ''})"
    if assoc.is_aborted:
        return "aborted the association"
    return "did not answer the association request in time"


# ------------------------------------------------------------------------------------------------ HTTP helpers


def _http_failure(name: str, what: str, error: Exception) -> Exception:
    """A requests error as DestinationUnavailable (no answer, 5xx, 429) or ExportError (any other 4xx)."""
    response = getattr(error, "response", None)
    if response is None or not isinstance(error, requests.HTTPError):
        return DestinationUnavailable(f"destination {name}: {what} failed: {one_line(error)}")
    code = response.status_code
    detail = one_line(response.text[:200]) if response.text else response.reason
    text = f"destination {name}: {what} answered HTTP {code} ({detail})"
    return DestinationUnavailable(text) if is_temporary(code) else ExportError(text)


# ------------------------------------------------------------------------------------------------ Orthanc REST


@dataclass
class _HttpDestination:
    """What the HTTP destinations share: a base URL, optional basic-auth credentials, a per-request timeout."""

    name: str
    url: str = setting(help="the server's base URL", check=schema.url, convert=lambda v: v.strip().rstrip("/"))
    username: str | None = setting(None, "HTTP basic-auth user")
    password: str | None = setting(None, "HTTP basic-auth password")
    timeout_s: float = setting(30.0, "seconds to wait for each answer", check=schema.positive)

    def confirm(self, files: Sequence[Path]) -> bool:
        client = self._client()
        return all(self._present(client, inst) for inst in read_instances(files))

    def _client(self) -> Any:
        """The server's client library object, made for one send or confirm."""
        raise NotImplementedError

    def _present(self, client: Any, inst: Instance) -> bool:
        """Whether the server holds ``inst``."""
        raise NotImplementedError


@dataclass
class OrthancDestination(_HttpDestination):
    """An Orthanc server: ``POST /instances`` per file, confirmed by ``POST /tools/lookup`` of each SOP UID."""

    kind: ClassVar[str] = "orthanc"

    def _client(self) -> OrthancClient:
        return OrthancClient(self.url, self.username, self.password, timeout=self.timeout_s)

    def send(self, files: Sequence[Path]) -> None:
        instances = read_instances(files)
        client = self._client()
        for inst in instances:
            what = f"POST {self.url}/instances (SOP Instance {inst.sop_instance_uid})"
            try:
                status = client.upload(inst.path.read_bytes()).get("Status")
            except OrthancRequestError as e:
                raise _orthanc_failure(self.name, what, e) from e
            if status not in ("Success", "AlreadyStored"):
                raise ExportError(f"destination {self.name}: {what}: Orthanc answered status {status!r}")
        log.info("destination %s: %d instance(s) stored in Orthanc %s", self.name, len(instances), self.url)

    def _present(self, client: OrthancClient, inst: Instance) -> bool:
        try:
            found = client.lookup(inst.sop_instance_uid)
        except OrthancRequestError as e:
            raise _orthanc_failure(self.name, f"POST {self.url}/tools/lookup", e) from e
        return any(m.get("Type") == "Instance" for m in found if isinstance(m, dict))


def _orthanc_failure(name: str, what: str, error: OrthancRequestError) -> Exception:
    """An Orthanc client error as DestinationUnavailable (no answer, 5xx, 408, 429) or ExportError (any other)."""
    if error.status is None:
        return DestinationUnavailable(f"destination {name}: {what} failed: {error.detail}")
    text = f"destination {name}: {what} answered HTTP {error.status} ({one_line(error.detail, 200)})"
    return DestinationUnavailable(text) if error.temporary else ExportError(text)


# ------------------------------------------------------------------------------------------------ DICOMweb


@dataclass
class StowDestination(_HttpDestination):
    """A DICOMweb server: STOW-RS of the files (dicomweb-client), confirmed by QIDO-RS per SOP Instance UID."""

    timeout_s: float = setting(60.0, "seconds to wait for each answer", check=schema.positive)
    kind: ClassVar[str] = "stow"

    def _client(self):
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session

        session: requests.Session = create_session()
        if self.username is not None:
            session.auth = (self.username, self.password or "")
        # dicomweb-client has no timeout of its own; a session-wide default keeps a hung server from hanging us.
        request = session.request
        session.request = lambda *a, **kw: request(*a, **{"timeout": self.timeout_s, **kw})  # type: ignore
        return DICOMwebClient(url=self.url, session=session)

    def send(self, files: Sequence[Path]) -> None:
        instances = read_instances(files)
        client = self._client()
        for study_uid in sorted({i.study_uid for i in instances}):
            group = [i for i in instances if i.study_uid == study_uid]
            what = f"STOW-RS to {self.url} ({len(group)} instance(s) of study {study_uid})"
            try:
                response = client.store_instances([pydicom.dcmread(i.path) for i in group],
                                                  study_instance_uid=study_uid)
            except requests.RequestException as e:
                raise _http_failure(self.name, what, e) from e
            failed = response.get("FailedSOPSequence") if response is not None else None
            if failed:
                items = [f"{item.get('ReferencedSOPInstanceUID', '?')} "
                         f"(reason 0x{int(item.get('FailureReason', 0)):04X})" for item in failed]
                raise ExportError(f"destination {self.name}: {what}: refused {', '.join(items)}")
        log.info("destination %s: %d instance(s) stored by STOW-RS at %s", self.name, len(instances), self.url)

    def _present(self, client, inst: Instance) -> bool:
        try:
            found = client.search_for_instances(study_instance_uid=inst.study_uid,
                                                search_filters={"SOPInstanceUID": inst.sop_instance_uid})
        except requests.RequestException as e:
            raise _http_failure(self.name, f"QIDO-RS at {self.url}", e) from e
        return any(_qido_value(m, "00080018") == inst.sop_instance_uid for m in found)


def _qido_value(match: Mapping[str, Any], tag: str) -> str | None:
    values = (match.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


# ------------------------------------------------------------------------------------------------ the registry

#: Destination kinds: the ``kind`` of a ``destinations.<name>`` entry -> its class, whose fields are its keys.
DESTINATIONS: dict[str, type] = {cls.kind: cls for cls in (DicomDestination, OrthancDestination, StowDestination)}
