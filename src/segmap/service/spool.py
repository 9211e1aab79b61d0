"""The service's durable copy of every received instance: ``<root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.

An instance is acknowledged to its sender (C-STORE success) or its Orthanc change is marked read only after it is on
disk for good, so :meth:`Spool.write` writes a temporary file in the target folder, flushes and fsyncs it, renames it
into place (a hard link, atomic on POSIX, that never replaces a file) and fsyncs the folder so that the new name itself
survives a power loss. A crash leaves at most a ``.tmp`` file behind, never a truncated ``.dcm``;
:meth:`Spool.remove_partial` clears those at start-up.

A SOP Instance UID names one instance for good (PS3.3 C.12.1.1.1): an instance whose UID is already in the spool is
accepted again only with the same bytes (a retry, a re-send: nothing changes); different bytes under that UID raise
:class:`ConflictingInstance` and the stored file, which series versions and jobs may already use, stays as it was.

The UIDs become path components, so they are checked against the DICOM UID grammar first: a sender cannot write
outside the spool with a UID such as ``..``.
"""

from __future__ import annotations

import filecmp
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from pydicom.dataset import Dataset

from segmap.errors import InputError

#: DICOM UID grammar (PS3.5 9.1): digit components separated by single dots, at most 64 characters.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_PREAMBLE_AND_PREFIX = 132
TEMP_SUFFIX = ".tmp"


class ConflictingInstance(InputError):
    """An instance whose SOP Instance UID the spool holds already, with different content."""


def check_uid(value: object, what: str) -> str:
    """``value`` as a UID string, or :class:`InputError` naming ``what`` (e.g. "SeriesInstanceUID")."""
    text = str(value).strip() if value is not None else ""
    if not text:
        raise InputError(f"{what} is missing")
    if len(text) > 64 or not _UID.fullmatch(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InputError(f"{what} {shown!r} is not a DICOM UID (digits and single dots, at most 64 characters)")
    return text


def is_part10(data: bytes) -> bool:
    """True when ``data`` starts with the DICOM file preamble and the ``DICM`` prefix."""
    return len(data) > _PREAMBLE_AND_PREFIX and data[128:132] == b"DICM"


class Spool:
    """Instance files under ``root``, one folder per study and series, one file per SOP Instance UID."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where the instance is (or will be) stored; raises :class:`InputError` for a UID that is not one."""
        return (self.root / check_uid(study_uid, "StudyInstanceUID") / check_uid(series_uid, "SeriesInstanceUID")
                / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / check_uid(study_uid, "StudyInstanceUID") / check_uid(series_uid, "SeriesInstanceUID")

    def has(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        return self.path(study_uid, series_uid, sop_uid).is_file()

    def write(self, dataset_or_bytes: Dataset | bytes, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Store one instance durably and return its path.

        ``bytes`` must already be a DICOM Part 10 file (preamble, ``DICM``, file meta): they are written unchanged, so
        a compressed instance stays exactly as the sender encoded it. A :class:`~pydicom.dataset.Dataset` must carry
        its ``file_meta`` and is written in the DICOM file format. An instance already there (the same SOP Instance UID
        sent again) is kept: the same bytes again change nothing, different bytes raise
        :class:`ConflictingInstance`. Raises :class:`InputError` for bad UIDs or bytes that are not a DICOM file, and
        lets :class:`OSError` (disk full, permissions) through for the caller to answer "out of resources".
        """
        target = self.path(study_uid, series_uid, sop_uid)
        if isinstance(dataset_or_bytes, (bytes, bytearray, memoryview)):
            data = bytes(dataset_or_bytes)
            if not is_part10(data):
                raise InputError(f"instance {sop_uid} of series {series_uid}: the data is not a DICOM Part 10 file "
                                 "(no preamble and DICM prefix)")
        elif isinstance(dataset_or_bytes, Dataset):
            buffer = io.BytesIO()
            dataset_or_bytes.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
        else:
            raise TypeError(f"expected a pydicom Dataset or bytes, got {type(dataset_or_bytes).__name__}")
        return self._commit(target, lambda out: out.write(data))

    def write_file(self, source: str | Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Like :meth:`write` for a DICOM Part 10 file already on disk (a data set received in chunks), copied in
        blocks: an instance of any size passes through a small buffer, never whole through memory."""
        target = self.path(study_uid, series_uid, sop_uid)
        with open(source, "rb") as src:
            if not is_part10(src.read(_PREAMBLE_AND_PREFIX + 1)):
                raise InputError(f"instance {sop_uid} of series {series_uid}: the data is not a DICOM Part 10 file "
                                 "(no preamble and DICM prefix)")
            src.seek(0)
            return self._commit(target, lambda out: shutil.copyfileobj(src, out, 1 << 20))

    def _commit(self, target: Path, fill: Callable[[BinaryIO], object]) -> Path:
        """Write a temporary file with ``fill``, make it durable and give it the name ``target`` unless that name
        exists: then the same content is a no-op and different content :class:`ConflictingInstance`."""
        self._make_dirs(target.parent)
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=TEMP_SUFFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(temp_name, target)  # unlike a rename, never replaces what is there
                linked = True
            except FileExistsError:
                linked = False
            if not linked and not filecmp.cmp(temp_name, target, shallow=False):
                raise ConflictingInstance(
                    f"SOP Instance {target.stem} of series {target.parent.name} is already stored with different "
                    f"content (a changed instance needs a new SOP Instance UID)")
        finally:
            try:
                os.unlink(temp_name)
            except FileNotFoundError:
                pass
        _fsync_dir(target.parent)
        return target

    def series_files(self, study_uid: str, series_uid: str) -> list[Path]:
        """The series' stored instance files (sorted by name; temporary files left out)."""
        folder = self.series_dir(study_uid, series_uid)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))

    def remove_partial(self) -> int:
        """Delete the temporary files a crash left behind (never a complete ``.dcm``); returns how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for temp in self.root.glob(f"*/*/.*{TEMP_SUFFIX}"):
            try:
                temp.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and its parents, fsyncing each new entry's parent so the folder survives a crash."""
        missing = []
        current = folder
        while not current.is_dir():
            missing.append(current)
            current = current.parent
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:  # another association created it meanwhile
                continue
            _fsync_dir(new.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
