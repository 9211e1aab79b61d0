"""Find the DICOM instances under a folder and group them into series.

:func:`scan_dicom_folder` walks the folder recursively and reads every file's header with pydicom. Pixel data is not
decoded here (that happens in :mod:`segmap.dicom.series_volume`, for the selected series only); it is only checked to
be present and complete, so a truncated slice is reported at once instead of breaking the volume later. Where
uncompressed pixel data lie in the file is recorded, so the volume step reads them without parsing the file again.

Files without preamble and file meta (a raw data set, as some old modalities and scripts write them) are read with
pydicom's ``force=True`` when they start like a data set; the transfer syntax they were parsed with (implicit or
explicit VR, byte order) is recorded in their file meta (:func:`infer_transfer_syntax`), so their pixel data decode.

Tolerance: hospital exports mix DICOM with other files (``DICOMDIR``, reports, ``.DS_Store``, half-copied slices).
Every file that cannot be used is skipped, recorded in :attr:`DicomScan.skipped` with the reason, and logged as a
warning naming it. Only when nothing usable is left does the scan fail with :class:`~segmap.errors.InputError`.

A series whose slice positions repeat because it holds several 3D stacks (phases, echoes, b-values) is split into
one :class:`DicomSeries` per stack (:mod:`segmap.dicom.stacks`).

Blank UIDs (seen in de-identified data, e.g. the sample CT whose data sets carry empty Study, Series and SOP Instance
UIDs and an empty SOP Class UID). A hospital user expects the series to be segmented and the result to be usable,
not a refusal over an anonymiser's mistake, as long as nothing is guessed silently. So:

- SOP Class UID and SOP Instance UID are *repaired* from the file meta information (Media Storage SOP Class/Instance
  UID), which is the same fact recorded twice; if both are blank, the instance UID is generated from the file's
  content (a hash of its bytes), so it is stable for that file.
- A missing Study Instance UID cannot be recovered. Files without one are grouped by the study attributes they share
  (Patient ID, Study Date/Time, Study ID, Accession Number) and the group gets a *generated* UID.
- A missing Series Instance UID likewise: files are grouped by study, containing folder, Modality, Series Number,
  Series Description, Series Date/Time and Frame of Reference UID, and each group gets a generated UID.
- Generated UIDs come from :func:`pydicom.uid.generate_uid` with entropy from the grouping attributes and the sorted
  SOP Instance UIDs of the group's files, never from the clock or the folder's absolute path: scanning the same files
  twice (or mounted elsewhere) gives the same UIDs, and different files give different UIDs. Each generated UID is
  announced in a warning, because a DICOM SEG made from such a series references a UID the PACS does not know.
- The repaired and generated values are written into the header data sets kept in :class:`DicomInstance`, so every
  later step (selection, volume, SEG references) sees one consistent set of UIDs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, generate_uid)

from ..errors import InputError
from .stacks import Stack, split_stacks

log = logging.getLogger(__name__)

#: Elements larger than this are not read into memory while scanning (in practice: the pixel data).
DEFER_SIZE = 64 * 1024
#: Per-file warnings logged before the rest are only counted.
MAX_FILE_WARNINGS = 50

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Transfer syntaxes whose Pixel Data value is the plain little-endian pixels at a fixed place in the file.
_NATIVE_IN_FILE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})

#: Modalities of objects that are not images to segment (they may carry pixels, but not a patient image).
NON_IMAGE_MODALITIES = frozenset({
    "SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "RTIMAGE", "PR", "KO", "DOC", "REG", "FID", "RWV",
    "AU", "ECG", "HD", "PLAN", "RESP",
})


class _Skip(Exception):
    """A file that is not a usable DICOM instance; the message is the reason."""


@dataclass(eq=False)
class DicomInstance:
    """One DICOM file: where it is and its header (no pixel data)."""

    path: Path
    #: The header as read, with blank SOP/Study/Series UIDs repaired or generated (see module docstring).
    dataset: Dataset
    #: Read although the file lacks the DICOM preamble/file meta (raw data set); pixel decoding needs the same.
    forced: bool = False
    #: What segmap repaired or generated in this header, e.g. "SOPInstanceUID from file meta".
    repairs: list[str] = field(default_factory=list)
    #: ``(byte offset, length)`` of the Pixel Data value in the file when it is stored uncompressed in little-endian
    #: byte order (so the volume step can read the pixels without parsing the file again); ``None`` otherwise
    #: (encapsulated or deflated data, a file without file meta, no Pixel Data).
    pixel_data_at: tuple[int, int] | None = None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def instance_number(self) -> int | None:
        return _int_or_none(self.dataset.get("InstanceNumber"))

    @property
    def number_of_frames(self) -> int:
        return _int_or_none(self.dataset.get("NumberOfFrames")) or 1


@dataclass(eq=False)
class DicomSeries:
    """The instances of one series (one Series Instance UID within one study), ordered by Instance Number."""

    series_instance_uid: str
    study_instance_uid: str
    instances: list[DicomInstance]
    #: Names of the UIDs segmap generated for this series ("StudyInstanceUID", "SeriesInstanceUID"); empty if none.
    generated_uids: tuple[str, ...] = ()
    #: Set when the series holds several 3D stacks (phases, echoes) and this is one of them (see
    #: :mod:`segmap.dicom.stacks`); then other DicomSeries share the Series Instance UID.
    stack: Stack | None = None

    def _first(self, keyword: str, default=None):
        for inst in self.instances:
            value = inst.dataset.get(keyword)
            if value not in (None, ""):
                return value
        return default

    @property
    def modality(self) -> str:
        return str(self._first("Modality", ""))

    @property
    def description(self) -> str:
        return str(self._first("SeriesDescription", ""))

    @property
    def series_number(self) -> int | None:
        return _int_or_none(self._first("SeriesNumber"))

    @property
    def datasets(self) -> list[Dataset]:
        return [inst.dataset for inst in self.instances]

    @property
    def is_image(self) -> bool:
        """Whether the series can be an image to segment (not SEG/SR/RT/... and its instances have rows/columns)."""
        if self.modality.upper() in NON_IMAGE_MODALITIES:
            return False
        return all("Rows" in inst.dataset and "Columns" in inst.dataset for inst in self.instances)

    def summary(self) -> str:
        """A one-line description without patient identity, for logs and error messages."""
        n = len(self.instances)
        number = f" #{self.series_number}" if self.series_number is not None else ""
        stack = f" [{self.stack.describe()}]" if self.stack is not None else ""
        return (f"{self.modality or '?'}{number} {self.description!r}{stack} ({n} instance{'s' if n != 1 else ''}, "
                f"UID {self.series_instance_uid})")


@dataclass
class DicomScan:
    """Everything :func:`scan_dicom_folder` found under one folder."""

    folder: Path
    #: Series ordered by study UID, Series Number, series UID (independent of the file system's order).
    series: list[DicomSeries]
    #: Files that were not used, with the reason (not DICOM, unreadable, truncated, duplicate, DICOMDIR).
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    #: How many files were looked at.
    files_seen: int = 0

    @property
    def study_uids(self) -> list[str]:
        return sorted({s.study_instance_uid for s in self.series})

    def get(self, series_instance_uid: str) -> DicomSeries:
        for s in self.series:
            if s.series_instance_uid == series_instance_uid:
                return s
        raise KeyError(series_instance_uid)


def scan_dicom_folder(folder: str | os.PathLike) -> DicomScan:
    """Read the headers of all DICOM files under ``folder`` (recursively) and group them into series.

    Raises :class:`~segmap.errors.InputError` when the folder does not exist or holds no usable DICOM file.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"input folder {root} does not exist")
    files = [root] if root.is_file() else list(_walk_files(root))
    base = root.parent if root.is_file() else root

    skipped: list[tuple[Path, str]] = []
    found: list[DicomInstance] = []
    for path in files:
        try:
            ds, forced, pixel_data_at = _read_header(path)
        except _Skip as why:
            skipped.append((path, str(why)))
            continue
        found.append(DicomInstance(path, ds, forced, _repair_sop_uids(ds, path), pixel_data_at))

    if not found:
        _report_skipped(skipped, base)
        raise InputError(f"no DICOM files found in {root} ({len(files)} file{'s' if len(files) != 1 else ''} "
                         f"looked at, {len(skipped)} skipped{_skip_summary(skipped, base)})")

    _fill_study_uids(found)
    series = [stack for s in _group_series(found, base, skipped) for stack in split_stacks(s)]
    _report_skipped(skipped, base)
    series.sort(key=lambda s: (s.study_instance_uid, _sort_number(s.series_number), s.series_instance_uid))  # stable
    n_studies = len({s.study_instance_uid for s in series})
    log.info("found %d series in %d stud%s under %s (%d files looked at, %d skipped)", len(series), n_studies,
             "y" if n_studies == 1 else "ies", root, len(files), len(skipped))
    for s in series:
        log.info("  %s", s.summary())
    return DicomScan(root, series, skipped, len(files))


# ---- reading one file


def _walk_files(root: Path) -> Iterator[Path]:
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                yield path


def _looks_like_raw_dataset(path: Path) -> bool:
    """A data set written without preamble and file meta usually starts with a group 0x0008 (or 0x0002) tag."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[2:4] != b"\x00\x00"


def _read_header(path: Path) -> tuple[Dataset, bool, tuple[int, int] | None]:
    """The header (pixel data dropped), whether it was read without file meta, and where native pixels lie."""
    forced = False
    try:
        try:
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        except InvalidDicomError:
            if not _looks_like_raw_dataset(path):
                raise _Skip("not a DICOM file") from None
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=True)
            forced = True
            infer_transfer_syntax(ds)
    except _Skip:
        raise
    except OSError as e:
        raise _Skip(f"cannot be read ({e.strerror or e})") from None
    except Exception as e:  # pydicom raises many types on corrupt input
        raise _Skip(f"corrupt DICOM ({type(e).__name__}: {_short(e)})") from None

    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        raise _Skip("DICOMDIR (an index of the files, not an image)")
    if len(ds) == 0:
        raise _Skip("no data elements (an empty or truncated file)")
    if forced and not (_text(ds, "SOPClassUID") or _text(ds, "Modality")):
        raise _Skip("not a DICOM file")
    # A deflated data set is parsed from its inflated copy: offsets there are not offsets in the file.
    deflated = meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    pixel_data_at = _check_and_drop_pixels(ds, path, offsets_in_file=not deflated)
    if forced or meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_IN_FILE:
        pixel_data_at = None
    return ds, forced, pixel_data_at


def infer_transfer_syntax(ds: Dataset) -> None:
    """Give a data set read without file meta (``force=True``) the transfer syntax it was actually parsed with.

    Such files (written by old modalities and some scripts, no preamble and no group 0002) can only be uncompressed:
    an encapsulated transfer syntax would need the file meta to be recognised. pydicom found out while parsing
    whether the VR is implicit or explicit and the byte order; recording that as the Transfer Syntax UID lets the
    pixel data be decoded like any other file (GDCM does the same). A file meta that names one is left alone.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                              else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _is_image_storage(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    for uid in (ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID") if meta is not None else None):
        if uid and "Image Storage" in getattr(uid, "name", ""):
            return True
    return "Rows" in ds and "Columns" in ds


def _check_and_drop_pixels(ds: Dataset, path: Path, offsets_in_file: bool = True) -> tuple[int, int] | None:
    """Make sure an image's pixel data is there and complete, then drop it from the header (decoded later).

    Returns ``(offset, length)`` of a defined-length Pixel Data value in the file, else ``None``. Without
    ``offsets_in_file`` (a deflated file) neither is checked nor returned; decoding it later finds any damage.
    """
    tags = [t for t in _PIXEL_TAGS if t in ds]
    if not tags:
        if _is_image_storage(ds):
            raise _Skip("truncated or damaged: the image has no pixel data")
        return None
    elem = ds.get_item(tags[0], keep_deferred=True)
    length = getattr(elem, "length", None)
    offset = getattr(elem, "value_tell", None)
    location = None
    if offsets_in_file and length is not None and offset is not None and length != _UNDEFINED_LENGTH:
        size = path.stat().st_size
        if offset + length > size:
            raise _Skip(f"truncated: pixel data needs {offset + length} bytes, the file has {size}")
        if tags[0] == _PIXEL_TAGS[0]:
            location = (int(offset), int(length))
    for t in tags:
        del ds[t]
    return location


def _repair_sop_uids(ds: Dataset, path: Path) -> list[str]:
    repairs = []
    meta = getattr(ds, "file_meta", None)
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not _text(ds, keyword):
            value = _text(meta, meta_keyword) if meta is not None else ""
            if value:
                setattr(ds, keyword, value)
                repairs.append(f"{keyword} from file meta")
    if not _text(ds, "SOPInstanceUID"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["segmap:SOPInstanceUID", digest])
        repairs.append("SOPInstanceUID generated")
    return repairs


# ---- grouping


def _fill_study_uids(found: list[DicomInstance]) -> None:
    groups: dict[tuple[str, ...], list[DicomInstance]] = defaultdict(list)
    for inst in found:
        if not _text(inst.dataset, "StudyInstanceUID"):
            key = tuple(_text(inst.dataset, k) for k in ("PatientID", "StudyDate", "StudyTime", "StudyID",
                                                          "AccessionNumber"))
            groups[key].append(inst)
    for key, members in groups.items():
        sops = sorted(m.sop_instance_uid for m in members)
        uid = generate_uid(entropy_srcs=["segmap:StudyInstanceUID", *key, *sops])
        for m in members:
            m.dataset.StudyInstanceUID = uid
            m.repairs.append("StudyInstanceUID generated")
        log.warning("%d file(s) have no StudyInstanceUID; grouped them by their study attributes and gave them the "
                    "generated UID %s (the same on every run for these files)", len(members), uid)


_SERIES_GROUP_KEYWORDS = ("Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
                          "FrameOfReferenceUID")


def _group_series(found: list[DicomInstance], base: Path, skipped: list[tuple[Path, str]]) -> list[DicomSeries]:
    by_uid: dict[tuple[str, str], list[DicomInstance]] = defaultdict(list)
    blank: dict[tuple[str, ...], list[DicomInstance]] = defaultdict(list)
    for inst in found:
        study = _text(inst.dataset, "StudyInstanceUID")
        uid = _text(inst.dataset, "SeriesInstanceUID")
        if uid:
            by_uid[(study, uid)].append(inst)
        else:
            folder = _relative(inst.path.parent, base)
            blank[(study, folder, *(_text(inst.dataset, k) for k in _SERIES_GROUP_KEYWORDS))].append(inst)

    generated: set[tuple[str, str]] = set()
    for key, members in blank.items():
        study, folder, *attrs = key
        sops = sorted(m.sop_instance_uid for m in members)
        uid = generate_uid(entropy_srcs=["segmap:SeriesInstanceUID", study, *attrs, *sops])
        for m in members:
            m.dataset.SeriesInstanceUID = uid
            m.repairs.append("SeriesInstanceUID generated")
        by_uid[(study, uid)].extend(members)
        generated.add((study, uid))
        modality, description = attrs[0], attrs[2]
        log.warning("%d %s file(s) in '%s' (series %r) have no SeriesInstanceUID; grouped them by folder and series "
                    "attributes and gave them the generated UID %s (the same on every run for these files; a SEG made "
                    "from them references this UID, which the PACS does not know)", len(members), modality or "?",
                    folder, description, uid)

    series = []
    for (study, uid), members in by_uid.items():
        members = _drop_duplicate_sops(members, base, skipped)
        members.sort(key=lambda m: (_sort_number(m.instance_number), m.sop_instance_uid, str(m.path)))
        repairs = [r for m in members for r in m.repairs]
        names = tuple(k for k in ("StudyInstanceUID", "SeriesInstanceUID") if f"{k} generated" in repairs)
        s = DicomSeries(uid, study, members, names)
        for what in ("SOPClassUID from file meta", "SOPInstanceUID from file meta", "SOPInstanceUID generated"):
            n = repairs.count(what)
            if n:
                keyword, _, how = what.partition(" ")
                log.warning("series %s %r: %s blank in %d file(s); %s", uid, s.description, keyword, n,
                            "taken from the file meta information" if "meta" in how
                            else "generated from each file's content")
        series.append(s)
    return series


def _drop_duplicate_sops(members: list[DicomInstance], base: Path,
                         skipped: list[tuple[Path, str]]) -> list[DicomInstance]:
    kept: dict[str, DicomInstance] = {}
    for m in sorted(members, key=lambda m: str(m.path)):
        first = kept.setdefault(m.sop_instance_uid, m)
        if first is not m:
            skipped.append((m.path, f"same SOPInstanceUID as {_relative(first.path, base)} (a copy); ignored"))
    return list(kept.values())


# ---- reporting and small helpers


def _report_skipped(skipped: list[tuple[Path, str]], base: Path) -> None:
    warned = 0
    for path, reason in skipped:
        if reason.startswith("DICOMDIR"):
            log.info("skipped %s: %s", _relative(path, base), reason)
        elif warned < MAX_FILE_WARNINGS:
            log.warning("skipped %s: %s", _relative(path, base), reason)
            warned += 1
    rest = sum(1 for _, r in skipped if not r.startswith("DICOMDIR")) - warned
    if rest > 0:
        log.warning("skipped %d more file(s) (not listed)", rest)


def _skip_summary(skipped: list[tuple[Path, str]], base: Path, limit: int = 3) -> str:
    if not skipped:
        return ""
    shown = "; ".join(f"{_relative(p, base)}: {r}" for p, r in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f": {shown}{more}"


def _relative(path: Path, base: Path) -> str:
    try:
        rel = path.relative_to(base)
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else "."


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int_or_none(value) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _sort_number(n: int | None) -> tuple[int, int]:
    return (0, n) if n is not None else (1, 0)


def _short(e: Exception, limit: int = 120) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
