"""Where the portal's images come from: uploads in a bounded local cache, or a DICOMweb server (Orthanc's plugin).

- :class:`LocalDatastore`: NIfTI images uploaded with ``PUT /datastore/?image=ID`` (or a session, ``PUT /session/``)
  are kept under ``cache_dir`` and cleaned by age, count and size, least recently used first; an image a request is
  using is never removed under it.
- :class:`DicomwebDatastore`: the image ID is a SeriesInstanceUID (that series is fetched) or a StudyInstanceUID
  (the whole study is fetched and the task's rules pick the series); instances are fetched with dicomweb-client in
  their stored transfer syntax, and the SEG is stored back with STOW-RS when configured.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, SegmapError
from ..privacy import redact
from ..text import first_line
from .config import DatastoreConfig

log = logging.getLogger("segmap.portal")

#: An image ID as it may appear in a file name: DICOM UIDs, MONAI Label's file-name IDs.
IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class ImageNotFound(SegmapError):
    """The datastore has no image with that ID (HTTP 404)."""


class DatastoreError(SegmapError):
    """The DICOMweb server cannot be reached or refused a request (HTTP 502)."""


def check_image_id(image_id: str) -> str:
    if not IMAGE_ID.match(image_id or ""):
        raise InputError(f"image ID {image_id[:80]!r} must be 1-128 letters, digits, '.', '_' or '-' (a DICOM UID "
                         f"or a file name without its suffix)")
    return image_id


def nifti_suffix(filename: str) -> str:
    """``.nii.gz`` or ``.nii`` from an uploaded file's name, else :class:`InputError`."""
    name = filename.lower()
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"uploaded file '{Path(filename).name[:80]}' is not a NIfTI image (.nii or .nii.gz); send a "
                     f"DICOM series by its UID through a DICOMweb datastore instead")


@dataclass(frozen=True)
class LocalImage:
    image_id: str
    path: Path


class LocalDatastore:
    """Uploaded NIfTI images in ``cache_dir/images/<id>/image.nii[.gz]``, bounded and cleaned."""

    kind = "local"

    def __init__(self, cfg: DatastoreConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.cache_dir) / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self._pins: dict[str, int] = {}
        self._mutex = threading.Lock()
        self.clean()

    def add(self, upload: Path, filename: str, image_id: str | None = None) -> str:
        """Move an uploaded file into the cache under ``image_id`` (made from the file name when none); the ID."""
        suffix = nifti_suffix(filename)
        if not image_id:
            image_id = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename).name[: -len(suffix)]).lstrip("._-") or \
                uuid.uuid4().hex
        check_image_id(image_id)
        folder = self.root / image_id
        staging = self.root / f".{image_id}.{uuid.uuid4().hex}"
        staging.mkdir()
        shutil.move(str(upload), staging / f"image{suffix}")
        with self._mutex:
            if self._pins.get(image_id):
                shutil.rmtree(staging, ignore_errors=True)
                raise InputError(f"image {image_id} is being segmented; upload it under another ID or retry later")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        self.clean(keep=image_id)
        return image_id

    def has(self, image_id: str) -> bool:
        return self._path(check_image_id(image_id)) is not None

    def _path(self, image_id: str) -> Path | None:
        folder = self.root / image_id
        found = [p for p in folder.glob("image.nii*")] if folder.is_dir() else []
        return found[0] if found else None

    @contextlib.contextmanager
    def use(self, image_id: str) -> Iterator[LocalImage]:
        """The cached image, kept from cleaning while the block runs; :class:`ImageNotFound` when absent."""
        check_image_id(image_id)
        with self._mutex:
            path = self._path(image_id)
            if path is None:
                raise ImageNotFound(f"image {image_id} is not in the portal's datastore; upload it first "
                                    f"(PUT /datastore/?image=ID) or send it as the request's file")
            self._pins[image_id] = self._pins.get(image_id, 0) + 1
            path.parent.touch()  # least recently used goes first
        try:
            yield LocalImage(image_id, path)
        finally:
            with self._mutex:
                self._pins[image_id] -= 1
                if not self._pins[image_id]:
                    del self._pins[image_id]

    def remove(self, image_id: str) -> bool:
        check_image_id(image_id)
        with self._mutex:
            if self._pins.get(image_id) or not (self.root / image_id).is_dir():
                return False
            shutil.rmtree(self.root / image_id, ignore_errors=True)
            return True

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for folder in self.root.iterdir():
            try:
                size = sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0
                entries.append((folder.stat().st_mtime, size, folder))
            except FileNotFoundError:  # removed meanwhile
                continue
        return sorted(entries)

    def clean(self, keep: str | None = None) -> list[str]:
        """Remove expired, then least recently used images until count and size fit (never one in use, nor
        ``keep``: the image just added); the removed IDs."""
        removed = []
        with self._mutex:
            entries = self._entries()
            now = time.time()
            max_age = self.cfg.cache_max_age_h * 3600
            max_bytes = self.cfg.cache_max_mb * 1024 * 1024
            count = sum(1 for _, _, f in entries if not f.name.startswith("."))
            total = sum(size for _, size, _ in entries)
            for mtime, size, folder in entries:
                name = folder.name
                if self._pins.get(name) or name == keep:
                    continue
                stale_staging = name.startswith(".") and now - mtime > 3600
                if not stale_staging and not name.startswith(".") and (
                        now - mtime > max_age or count > self.cfg.cache_max_images or total > max_bytes):
                    count -= 1
                elif not stale_staging:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
                removed.append(name)
        if removed:
            log.info("datastore: removed %d cached image(s)", len(removed))
        return removed

    def listing(self, output: str) -> dict[str, Any]:
        """``GET /datastore/``: MONAI Label's stats by default, its datastore model for ``output=all``."""
        ids = sorted(f.name for f in self.root.iterdir() if f.is_dir() and not f.name.startswith("."))
        if output == "all":
            objects = {}
            for i in ids:
                path = self._path(i)
                if path is not None:
                    objects[i] = {"image": {"ext": "".join(path.suffixes), "info": {"bytes": path.stat().st_size}},
                                  "labels": {}}
            return {"name": "segmap portal", "description": "uploaded images (cached)", "images_dir": "",
                    "labels_dir": "labels", "objects": objects}
        if output == "train":
            return {"training": [], "validation": []}
        return {"total": len(ids), "completed": 0, "label_tags": {}}


class DicomwebDatastore:
    """Series and studies on a DICOMweb server, fetched per request; SEGs stored back with STOW-RS."""

    kind = "dicomweb"

    def __init__(self, cfg: DatastoreConfig) -> None:
        self.cfg = cfg
        self.url = cfg.dicomweb_url or ""
        self._local = threading.local()

    def _client(self):
        """One dicomweb-client per thread (its requests session is not shared across threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            from dicomweb_client.api import DICOMwebClient
            from dicomweb_client.session_utils import create_session_from_user_pass
            import requests

            session = requests.Session()
            if self.cfg.username:
                password = self.cfg.password_file.read_text().strip() if self.cfg.password_file else ""
                session = create_session_from_user_pass(self.cfg.username, password)
            client = self._local.client = DICOMwebClient(self.url, session=session)
        return client

    def _call(self, what: str, fn):
        try:
            return fn()
        except SegmapError:
            raise
        except Exception as e:
            raise DatastoreError(redact(f"DICOMweb server {self.url}: {what} failed ({first_line(e)})")) from None

    def fetch(self, image_id: str, folder: Path) -> str:
        """Write the instances of a series (or of every series of a study) into ``folder``; ``series``/``study``."""
        check_image_id(image_id)
        client = self._client()
        series = self._call("searching the series", lambda: client.search_for_series(
            search_filters={"SeriesInstanceUID": image_id}, fields=["StudyInstanceUID"]))
        if series:
            study_uid = series[0]["0020000D"]["Value"][0]
            datasets = self._call("retrieving the series", lambda: client.retrieve_series(
                study_uid, image_id, media_types=(("application/dicom", "*"),)))
            level = "series"
        else:
            studies = self._call("searching the study", lambda: client.search_for_studies(
                search_filters={"StudyInstanceUID": image_id}))
            if not studies:
                raise ImageNotFound(f"image {image_id} is neither a SeriesInstanceUID nor a StudyInstanceUID on the "
                                    f"DICOMweb server")
            datasets = self._call("retrieving the study", lambda: client.retrieve_study(
                image_id, media_types=(("application/dicom", "*"),)))
            level = "study"
        folder.mkdir(parents=True, exist_ok=True)
        for i, ds in enumerate(datasets):
            ds.save_as(folder / f"{i:06d}.dcm", enforce_file_format=True)
        return level

    def store(self, path: Path) -> None:
        """STOW-RS one DICOM file (the SEG) to the server."""
        import pydicom

        dataset = pydicom.dcmread(path)
        self._call("storing the SEG (STOW-RS)", lambda: self._client().store_instances([dataset]))

    def listing(self, output: str) -> dict[str, Any]:
        client = self._client()
        series = self._call("listing the series", lambda: client.search_for_series(
            fields=["StudyInstanceUID", "Modality"], limit=1000))

        def value(item: dict, tag: str) -> Any:
            return (item.get(tag, {}).get("Value") or [None])[0]

        if output == "all":
            objects = {value(s, "0020000E"): {"image": {"ext": "", "info": {
                "StudyInstanceUID": value(s, "0020000D"), "Modality": value(s, "00080060")}}, "labels": {}}
                for s in series}
            return {"name": "segmap portal", "description": f"DICOMweb {self.url}", "images_dir": "",
                    "labels_dir": "", "objects": objects}
        if output == "train":
            return {"training": [], "validation": []}
        return {"total": len(series), "completed": sum(1 for s in series if value(s, "00080060") == "SEG"),
                "label_tags": {}}

