"""``segmap submit``: send a study to a DICOM node, wait for the SEG the service makes of it, save it locally.

What MAIA's ``MONet_inference_dicom`` and its query/retrieve script do, with what they lack: the folder is checked
before anything is sent (one study, DICOM present), every C-STORE status is checked, the wait has a deadline and
reports progress, and only a SEG that really references a sent series is taken. Two kinds of query node:

- ``orthanc+http://HOST:PORT`` (or ``orthanc+https://USER:PASSWORD@HOST:PORT``): Orthanc's REST API — the study's
  SEG series are found with ``/tools/find`` and each instance is read with ``/instances/{id}/file``;
- ``dicom://HOST:PORT/AE``: C-FIND at SERIES level (Modality SEG in the study), then C-GET of those series. C-GET
  brings the instances back on the same association, so the node needs no route back to this machine; the node
  must accept C-GET from our calling AE title (Orthanc: list it in ``DicomModalities``).

A SEG that was already at the node before sending is taken only when it references exactly the instances sent
(the service does not run the same input twice, so for an unchanged study that SEG is the answer); otherwise only
a SEG that appeared after sending counts, so a study sent again with one more instance waits for its new SEG.

One study may make several jobs (one per MAP whose rules select a series of it, one per study for a
multi-modality MAP), each with its own SEG series: the client waits until ``expect`` SEG series answered.
:func:`expected_results` counts them with the service's own routing, from its configuration file.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from segmap.dimse import CFindFailed, application_entity, c_find
from segmap.errors import OrthancError, SubmitError
from segmap.orthanc import OrthancClient, OrthancRequestError

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: A DICOM association may propose at most 128 presentation contexts.
_MAX_CONTEXTS = 128
#: C-STORE statuses that mean "stored" (0x0000) or "stored with a warning" (coercion, elements discarded).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Node:
    """A DICOM node to send to: ``HOST:PORT[/AE]`` (AE title defaults to the service's, SEGMAP)."""

    host: str
    port: int
    ae_title: str = "SEGMAP"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.ae_title}"


@dataclass
class Study:
    """The instances of one study found in the submitted folder, grouped by series (headers only)."""

    study_uid: str
    series: dict[str, list[Path]] = field(default_factory=dict)       # series UID -> files
    sop_uids: dict[str, set[str]] = field(default_factory=dict)       # series UID -> SOP Instance UIDs
    modality: dict[str, str] = field(default_factory=dict)            # series UID -> Modality
    contexts: dict[Path, tuple[str, str]] = field(default_factory=dict)  # file -> (SOP Class, Transfer Syntax)
    skipped: dict[str, str] = field(default_factory=dict)             # series UID -> modality, not sent

    @property
    def files(self) -> list[Path]:
        return [f for uid in self.series for f in self.series[uid]]


def parse_node(text: str) -> Node:
    """``HOST:PORT`` or ``HOST:PORT/AE`` -> :class:`Node`; anything else is a :class:`SubmitError`."""
    address, _, ae = text.partition("/")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SubmitError(f"--to {text!r}: expected HOST:PORT or HOST:PORT/AE_TITLE")
    if ae and (len(ae) > 16 or not ae.isascii() or "\\" in ae):
        raise SubmitError(f"--to {text!r}: the AE title must be 1-16 ASCII characters")
    return Node(host, int(port), ae or "SEGMAP")


def scan_study(folder: str | Path, modality_filter: Sequence[str] = ("CT", "MR")) -> Study:
    """Read the headers of every DICOM file under ``folder``; refuse no DICOM or several studies with one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SubmitError(f"{folder}: not a folder")
    by_study: dict[str, Study] = {}
    unidentified: list[tuple[Path, list[str]]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (a README, a DICOMDIR's companions): not ours to send
        study_uid, series_uid = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
        sop_uid = ds.get("SOPInstanceUID")
        sop_class = ds.get("SOPClassUID")  # C-STORE takes it from the data set: the file meta's copy is not enough
        if ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
            continue  # a DICOMDIR: an index of the files, not an instance to store
        missing = [name for name, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                                            ("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class)) if not value]
        if missing:
            unidentified.append((path, missing))
            continue
        study = by_study.setdefault(str(study_uid), Study(str(study_uid)))
        modality = str(ds.get("Modality", "") or "")
        if modality not in modality_filter:
            study.skipped[str(series_uid)] = modality or "no Modality"
            continue
        study.series.setdefault(str(series_uid), []).append(path)
        study.sop_uids.setdefault(str(series_uid), set()).add(str(sop_uid))
        study.modality[str(series_uid)] = modality
        study.contexts[path] = (str(sop_class), str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    if unidentified:
        # De-identification that blanks the UIDs leaves nothing a node can file the instance under, and inventing
        # UIDs here would send data the user's files do not describe: refused, naming a file.
        path, missing = unidentified[0]
        raise SubmitError(f"{path}: {len(unidentified)} DICOM file(s) under {folder} have no {', '.join(missing)} "
                          f"(blanked by de-identification?); a DICOM node files instances by these UIDs, so they "
                          f"cannot be sent -- give the files UIDs first")
    if not by_study:
        raise SubmitError(f"{folder}: no DICOM files found")
    if len(by_study) > 1:
        raise SubmitError(f"{folder}: holds {len(by_study)} studies ({', '.join(sorted(by_study))}); "
                          f"submit one study per folder")
    study = next(iter(by_study.values()))
    if not study.series:
        found = ", ".join(sorted(set(study.skipped.values())))
        raise SubmitError(f"{folder}: no {'/'.join(modality_filter)} series in study {study.study_uid} "
                          f"(found: {found})")
    return study


def send_study(study: Study, to: Node, *, calling_ae: str, progress: Progress, timeout_s: float = 30) -> int:
    """C-STORE every file of ``study`` to ``to`` in one association, checking each status; return the count."""
    from pynetdicom import build_context

    pairs = sorted(set(study.contexts.values()))
    if len(pairs) > _MAX_CONTEXTS:
        raise SubmitError(f"study {study.study_uid}: {len(pairs)} SOP class / transfer syntax pairs; "
                          f"one association allows {_MAX_CONTEXTS}")
    ae = application_entity(calling_ae, timeout_s)
    assoc = ae.associate(to.host, to.port, [build_context(c, t) for c, t in pairs], ae_title=to.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "is unreachable or aborted the association"
        raise SubmitError(f"{to}: {why} (calling AE {calling_ae})")
    files = study.files
    try:
        for n, path in enumerate(files, start=1):
            ds = pydicom.dcmread(path)
            try:
                status = assoc.send_c_store(ds)
            except ValueError as e:  # no accepted presentation context for this SOP class / transfer syntax
                raise SubmitError(f"{path}: {to} does not accept {ds.SOPClassUID.name} in "
                                  f"{ds.file_meta.TransferSyntaxUID.name} ({e})") from e
            code = getattr(status, "Status", None)
            if code is None:
                raise SubmitError(f"{path}: no C-STORE response from {to} (association lost)")
            if code not in _STORED:
                raise SubmitError(f"{path}: {to} refused the instance (C-STORE status 0x{code:04X})")
            if n == len(files) or n % 10 == 0:
                progress(f"sent {n}/{len(files)}")
    finally:
        if assoc.is_established:
            assoc.release()
    return len(files)


def references(seg: Dataset) -> dict[str, set[str]]:
    """series UID -> SOP Instance UIDs a SEG's ReferencedSeriesSequence names."""
    refs: dict[str, set[str]] = defaultdict(set)
    for item in seg.get("ReferencedSeriesSequence", []):
        uid = str(item.get("SeriesInstanceUID", ""))
        refs[uid] |= {str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedInstanceSequence", [])
                      if "ReferencedSOPInstanceUID" in r}
    return dict(refs)


def answers(seg: Dataset, study: Study, preexisting: bool) -> bool:
    """Whether ``seg`` is the result for the sent study (see the module docstring for the rule)."""
    if str(seg.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        return False
    refs = references(seg)
    sent = {uid for uid in refs if uid in study.sop_uids}
    if not sent:
        return False
    if not preexisting:
        return True
    return all(refs[uid] == study.sop_uids[uid] for uid in sent)


class OrthancQuery:
    """SEGs of one study at an Orthanc, over REST (:class:`segmap.orthanc.OrthancClient`)."""

    def __init__(self, url: str, timeout_s: float = 30):
        try:
            self.client = OrthancClient(url.removeprefix("orthanc+"), timeout=timeout_s)
        except OrthancError as e:
            raise SubmitError(f"--query {url!r}: {e}") from None
        self.where = f"orthanc+{self.client.url}"
        self._seen: set[str] = set()  # instance ids already read

    def _ask(self, call, *args):
        try:
            return call(*args)
        except OrthancRequestError as e:
            if e.status is None:
                raise SubmitError(f"{self.where}: cannot reach Orthanc ({e.detail})") from e
            raise SubmitError(f"{self.where}: {e}") from e

    def seg_instances(self, study_uid: str) -> list[str]:
        """Orthanc ids of the SEG instances in the study."""
        return self._ask(self.client.find, "Instance", {"StudyInstanceUID": study_uid, "Modality": "SEG"})

    def snapshot(self, study_uid: str) -> set[str]:
        return set(self.seg_instances(study_uid))

    def poll(self, study: Study, before: set[str]) -> list[Dataset]:
        results = []
        for instance in self.seg_instances(study.study_uid):
            if instance in self._seen:
                continue
            ds = pydicom.dcmread(BytesIO(self._ask(self.client.instance_file, instance)))
            self._seen.add(instance)
            if answers(ds, study, preexisting=instance in before):
                results.append(ds)
        return results


class DicomQuery:
    """SEGs of one study at a DICOM node: C-FIND (series level) then C-GET on one association."""

    def __init__(self, url: str, calling_ae: str, timeout_s: float = 30):
        parts = urlsplit(url)
        ae_title = parts.path.strip("/")
        if not parts.hostname or not parts.port or not ae_title:
            raise SubmitError(f"--query {url!r}: expected dicom://HOST:PORT/AE_TITLE")
        self.node = Node(parts.hostname, parts.port, ae_title)
        self.calling_ae = calling_ae
        self.timeout = timeout_s
        self.where = f"dicom://{self.node}"
        self._seen: set[str] = set()  # SOP Instance UIDs already examined

    def _associate(self):
        from pynetdicom import build_role
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet)

        ae = application_entity(self.calling_ae, self.timeout)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        # C-GET sends the instances back to us as C-STOREs: we act as the Storage SCP for SEG.
        ae.add_requested_context(SEGMENTATION_STORAGE)
        received: list[Dataset] = []

        def store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            received.append(ds)
            return 0x0000

        from pynetdicom import evt

        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title,
                             ext_neg=[build_role(SEGMENTATION_STORAGE, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, store)])
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "is unreachable or aborted the association"
            raise SubmitError(f"{self.where}: {why} (calling AE {self.calling_ae})")
        return assoc, received

    def _find_series(self, assoc, study_uid: str) -> dict[str, int | None]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = "SEG"
        query.NumberOfSeriesRelatedInstances = ""
        series: dict[str, int | None] = {}
        try:
            for identifier in c_find(assoc, query, StudyRootQueryRetrieveInformationModelFind):
                count = identifier.get("NumberOfSeriesRelatedInstances")
                series[str(identifier.SeriesInstanceUID)] = int(count) if count not in (None, "") else None
        except CFindFailed as e:
            if e.status is None:
                # Orthanc aborts the association when the calling AE is not one of its DicomModalities.
                raise SubmitError(f"{self.where}: the node aborted the C-FIND; is AE {self.calling_ae} allowed "
                                  f"to query and retrieve there (Orthanc: DicomModalities)?") from None
            raise SubmitError(f"{self.where}: C-FIND refused (status 0x{e.status:04X}; is AE "
                              f"{self.calling_ae} allowed to query there?)") from None
        return series

    def _get_series(self, assoc, study_uid: str, series_uid: str, received: list[Dataset]) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        start = len(received)
        final = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            final = getattr(status, "Status", None)
            if final is None:
                raise SubmitError(f"{self.where}: the node aborted the C-GET of series {series_uid}; is AE "
                                  f"{self.calling_ae} allowed to retrieve there (Orthanc: DicomModalities)?")
        if final not in (0x0000, 0xB000) and len(received) == start:
            raise SubmitError(f"{self.where}: the node refused C-GET of series {series_uid} (status "
                              f"0x{final:04X}); it must accept C-GET from AE {self.calling_ae} "
                              f"(Orthanc: add it to DicomModalities)")
        return received[start:]

    def snapshot(self, study_uid: str) -> set[str]:
        assoc, _ = self._associate()
        try:
            return set(self._find_series(assoc, study_uid))
        finally:
            assoc.release()

    def poll(self, study: Study, before: set[str]) -> list[Dataset]:
        assoc, received = self._associate()
        results = []
        try:
            for series_uid, count in self._find_series(assoc, study.study_uid).items():
                if series_uid in self._seen and count is not None and count <= 1:
                    continue  # a one-instance SEG series already read: nothing new can be in it
                for ds in self._get_series(assoc, study.study_uid, series_uid, received):
                    if str(ds.SOPInstanceUID) in self._seen:
                        continue
                    self._seen.add(str(ds.SOPInstanceUID))
                    if answers(ds, study, preexisting=series_uid in before):
                        results.append(ds)
                self._seen.add(series_uid)
        finally:
            if assoc.is_established:
                assoc.release()
        return results


def make_query(query: str, calling_ae: str):
    scheme = urlsplit(query).scheme
    if scheme in ("orthanc+http", "orthanc+https"):
        return OrthancQuery(query)
    if scheme == "dicom":
        return DicomQuery(query, calling_ae)
    raise SubmitError(f"--query {query!r}: expected orthanc+http://HOST:PORT or dicom://HOST:PORT/AE_TITLE")


def save(datasets: Iterable[Dataset], out_dir: Path) -> list[Path]:
    """Write each SEG as ``out_dir/seg-<SOP Instance UID>.dcm`` (temp file, then rename: never half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"seg-{ds.SOPInstanceUID}.dcm"
        fd, tmp = tempfile.mkstemp(prefix=".seg-", suffix=".tmp", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                ds.save_as(f, enforce_file_format=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


@contextmanager
def _quiet_pynetdicom():
    """pynetdicom logs each refused or failed association at ERROR over several lines; our one-line error says it,
    naming the node, so its chatter would only bury that line. Restored afterwards (a service in the same process
    keeps its own logging)."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(max(level, logging.CRITICAL))
    try:
        yield
    finally:
        logger.setLevel(level)


def expected_results(config_path: str | Path, study_folder: str | Path) -> dict[str, int]:
    """MAP name -> how many SEGs the service configured in ``config_path`` makes of the study in ``study_folder``
    (MAPs that make none left out): its routing of each series, and each multi-modality MAP's study decision."""
    from segmap.dicom.loading import scan_dicom_folder
    from segmap.errors import SegmapError
    from segmap.service.config import load_config
    from segmap.service.routing import load_routable_tasks, route
    from segmap.service.studies import COMPLETE, decide, is_study_map

    try:
        config = load_config(config_path)
        tasks = load_routable_tasks(config.maps)
        scan = scan_dicom_folder(study_folder)
    except SegmapError as e:
        raise SubmitError(f"--config {config_path}: {e}") from None
    counts: dict[str, int] = {}
    for series in scan.series:
        one = type(scan)(folder=scan.folder, series=[series])
        for r in route(one, config.maps, tasks, lambda uid: False):
            if r.matched:
                counts[r.map_name] = counts.get(r.map_name, 0) + 1
    for m in config.maps:
        if is_study_map(tasks[m.name]) and scan.series and decide(scan, tasks[m.name], m).state == COMPLETE:
            counts[m.name] = 1
    return counts


def submit(study_folder: str | Path, to: str, *, calling_ae: str = "SEGMAP-SUBMIT", query: str,
           out_dir: str | Path, timeout_s: float = 600, poll_s: float = 2,
           modality_filter: Sequence[str] = ("CT", "MR"), progress: Progress | None = None,
           expect: int = 1) -> list[Path]:
    """Send the study in ``study_folder`` to ``to``, wait for its SEG at ``query``, save it in ``out_dir``.

    ``to`` is ``HOST:PORT[/AE]``; ``query`` is ``orthanc+http://HOST:PORT`` or ``dicom://HOST:PORT/AE``. Only
    series whose Modality is in ``modality_filter`` are sent. ``timeout_s`` bounds the wait for the SEG (seconds,
    from the end of sending); the query node is asked every ``poll_s`` seconds, until ``expect`` SEG series (one
    per job the study makes, see :func:`expected_results`) answered. Returns the saved SEG files (every SEG that
    referenced a sent series by then). Raises :class:`SubmitError` with one line
    for a folder without DICOM or with several studies, a refused or unreachable node, a refused instance, and
    for a wait that ran out.
    """
    say = progress or (lambda line: None)
    if expect < 1:
        raise SubmitError(f"expect {expect}: must wait for at least one SEG")
    node = parse_node(to)
    if not calling_ae or len(calling_ae) > 16:
        raise SubmitError(f"calling AE title {calling_ae!r}: must be 1-16 characters")
    finder = make_query(query, calling_ae)
    study = scan_study(study_folder, modality_filter)
    for uid, modality in sorted(study.skipped.items()):
        say(f"not sending series {uid} ({modality})")
    described = ", ".join(f"{study.modality[uid]} {uid} ({len(files)})" for uid, files in study.series.items())
    say(f"study {study.study_uid}: {len(study.files)} instances, series {described}")

    with _quiet_pynetdicom():
        return _send_and_wait(study, node, finder, calling_ae, Path(out_dir), timeout_s, poll_s, say, expect)


def _send_and_wait(study: Study, node: Node, finder, calling_ae: str, out_dir: Path, timeout_s: float,
                   poll_s: float, say: Progress, expect: int = 1) -> list[Path]:
    before = finder.snapshot(study.study_uid)
    send_study(study, node, calling_ae=calling_ae, progress=say)
    say(f"waiting up to {timeout_s:g} s for {expect} SEG series at {finder.where}")
    deadline = time.monotonic() + timeout_s
    last_note = time.monotonic()
    paths: list[Path] = []
    seg_series: set[str] = set()
    while True:
        found = finder.poll(study, before)
        if found:
            saved = save(found, out_dir)
            for ds, path in zip(found, saved):
                say(f"found SEG {ds.SOPInstanceUID} (series {ds.SeriesInstanceUID}): {path}")
                seg_series.add(str(ds.SeriesInstanceUID))
            paths += saved
            if len(seg_series) >= expect:
                return paths
        now = time.monotonic()
        if now >= deadline:
            what = f"only {len(seg_series)} of {expect} SEG series" if seg_series else "no SEG"
            raise SubmitError(f"{what} referencing series {', '.join(study.series)} appeared at {finder.where} "
                              f"within {timeout_s:g} s")
        if now - last_note >= 30:
            say(f"waiting ({deadline - now:.0f} s left)")
            last_note = now
        time.sleep(min(poll_s, max(0.0, deadline - now)))
