"""The JSON run report (``run_report.json``) written next to a run's outputs.

It records what a run used and produced so a result can be traced without re-running it: segmap version, start and
end time, status (and the one-line error of a failed run), inputs (series UIDs, description, modality, instance and
file counts), model (path, configuration, folds, sha256 and size of every model file), task (name, file), device,
per-stage timings in seconds, per-segment voxel counts and volumes in mL, and the output files.

It never holds patient identity. Inputs are described from a fixed list of series-level DICOM attributes
(:data:`INPUT_ATTRIBUTES`), and as a second line of defence every key naming patient identity
(:data:`PHI_KEYS`) is dropped from the whole document before it is written, wherever it came from.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, MutableSequence, Sequence

import numpy as np

from .. import __version__
from ..errors import OutputError
from .atomic import STAGING_PREFIX
from ..model.digest import sha256_file

REPORT_NAME = "run_report.json"
#: Series-level attributes copied into the report for each DICOM input.
INPUT_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SeriesDescription",
                    "Modality", "SeriesNumber")
#: Keys that are never written, at any depth (DICOM keywords for patient identity and a few plain spellings).
PHI_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientMotherBirthName", "PatientTelephoneNumbers",
    "IssuerOfPatientID", "MedicalRecordLocator", "patient_name", "patient_id", "birth_date",
})
#: Facts about a loaded input that its :class:`~segmap.volume.Volume` carries in ``meta`` and the report records
#: (see :func:`input_notes`): voxels that were not finite, lossy compression, the stack chosen from a 4D series.
NOTED_META_KEYS = ("nonfinite_voxels_replaced", "lossy_compression", "stack")
#: Inputs with at most this many files list each path; larger ones (DICOM series) give the count and folder.
MAX_LISTED_FILES = 8


def segment_statistics(labels_zyx: np.ndarray, affine: np.ndarray, segment_names: Sequence[str]) -> list[dict]:
    """Voxel count and volume of each label value 1..N, in one pass over the label map.

    ``labels_zyx``: non-negative integer ``[z, y, x]`` array, value ``i`` meaning ``segment_names[i - 1]``.
    ``affine``: voxel ``(x, y, z)`` -> mm; the voxel volume is ``|det(affine[:3, :3])|`` mm^3, so any spacing,
    orientation or shear is handled. Returns one dict per segment: ``label_value``, ``name``, ``voxels``,
    ``volume_ml``. Raises ``ValueError`` for label values outside ``0..N``.
    """
    labels = np.asarray(labels_zyx)
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels_zyx must hold integer label values, got dtype {labels.dtype}")
    n = len(segment_names)
    counts = _bincount(labels, n)
    if len(counts) > n + 1:
        extra = int(np.flatnonzero(counts[n + 1:])[0]) + n + 1
        raise ValueError(f"label map holds value {extra} but only {n} segment names are given")
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return [
        {"label_value": i, "name": str(name), "voxels": int(counts[i]), "volume_ml": float(counts[i]) * voxel_ml}
        for i, name in enumerate(segment_names, start=1)
    ]


def _bincount(labels: np.ndarray, n: int) -> np.ndarray:
    """np.bincount over the whole array, slab by slab: bincount casts to intp, and a whole CT as int64 is large."""
    flat = labels.reshape(-1)
    if flat.size and np.issubdtype(labels.dtype, np.signedinteger):
        low = int(flat.min())
        if low < 0:
            raise ValueError(f"label map holds negative value {low}")
    counts = np.zeros(n + 1, dtype=np.int64)
    step = 1 << 22  # 4 Mi voxels (32 MiB as intp) per bincount
    for start in range(0, flat.size, step):
        part = np.bincount(flat[start:start + step], minlength=n + 1)
        if len(part) > len(counts):
            counts = np.pad(counts, (0, len(part) - len(counts)))
        counts[: len(part)] += part
    return counts


def input_notes(volume_meta: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`NOTED_META_KEYS` a volume's ``meta`` holds, ready for :meth:`RunReport.add_input` ``**details``."""
    return {k: _plain(volume_meta[k]) for k in NOTED_META_KEYS if volume_meta.get(k) not in (None, 0, "")}


#: Image identity a MAP image carries in its environment (set at build time; the digest can only be passed at run
#: time, e.g. ``docker run -e SEGMAP_IMAGE_DIGEST=$(docker inspect -f '{{.Id}}' IMAGE)``).
IMAGE_ENV = {"ref": "SEGMAP_IMAGE_REF", "digest": "SEGMAP_IMAGE_DIGEST", "revision": "SEGMAP_IMAGE_REVISION",
             "created": "SEGMAP_IMAGE_CREATED"}


def image_provenance(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The container image a run ran in (None for each item outside an image, or when not known)."""
    environ = os.environ if environ is None else environ
    return {key: (environ.get(var) or None) if environ.get(var) != "unknown" else None
            for key, var in IMAGE_ENV.items()}


def output_identity(path: str | Path) -> dict[str, str]:
    """The DICOM identity of an output file (Series and SOP Instance UIDs of a SEG); empty for other files."""
    if not str(path).endswith(".dcm"):
        return {}
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
    return {"series_instance_uid": str(ds.SeriesInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID)}


def describe_series(datasets: Sequence[Any]) -> dict:
    """Series-level description of DICOM instances (first instance's series attributes, instance count)."""
    first = datasets[0] if len(datasets) else None
    out: dict[str, Any] = {}
    for keyword in INPUT_ATTRIBUTES:
        value = first.get(keyword) if first is not None else None
        out[keyword] = _plain(value) if value is not None and value != "" else None
    out["instances"] = len(datasets)
    return out


class RunReport:
    """Collects what a run did and writes it as ``run_report.json``.

    Typical use::

        report = RunReport(task_name="Spleen", task_file=task_path)
        with report.stage("load"):
            ...
        report.add_input("image", files=paths, datasets=series)
        report.set_model(model_files, configuration="3d_fullres", folds=[0])
        report.set_segments(labels_zyx, affine, task.segments)
        report.add_output(seg_path)
        report.finish("succeeded")
        report.write(out / "run_report.json")
    """

    def __init__(self, *, task_name: str | None = None, task_file: str | Path | None = None,
                 device: str | None = None) -> None:
        self._started = _now()
        self._finished: datetime.datetime | None = None
        self._t0 = time.perf_counter()
        self.status = "running"
        self.error: str | None = None
        self.task = {"name": task_name, "file": str(task_file) if task_file is not None else None}
        self.device = device
        self.inputs: list[dict] = []
        self.model: dict[str, Any] = {}
        self.timings_s: dict[str, float] = {}
        self.segments: list[dict] = []
        self.outputs: list[dict] = []
        self.extra: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------- recording

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (seconds; repeated stages add up; recorded on failure too)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[name] = self.timings_s.get(name, 0.0) + (time.perf_counter() - t)

    def set_device(self, device: str) -> None:
        self.device = str(device)

    def add_input(self, key: str, *, files: Iterable[str | Path] = (), datasets: Sequence[Any] | None = None,
                  **details: Any) -> None:
        """Record one model input (modality ``key``): its files and, for DICOM, the series it came from.

        ``files``: recorded as a count and their common folder, plus the paths themselves when there are at most
        :data:`MAX_LISTED_FILES` (a NIfTI input; a DICOM series is identified by its UIDs instead).
        ``datasets``: the series' pydicom datasets; only :data:`INPUT_ATTRIBUTES` and the instance count are
        taken from them. ``details``: extra JSON-able facts (e.g. ``shape_zyx``, ``spacing_zyx``).
        """
        paths = [str(f) for f in files]
        entry: dict[str, Any] = {"key": key, "files": len(paths)}
        if paths:
            entry["folder"] = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
            if len(paths) <= MAX_LISTED_FILES:
                entry["paths"] = paths
        if datasets is not None:
            entry.update(describe_series(datasets))
        entry.update({k: _plain(v) for k, v in details.items()})
        self.inputs.append(entry)

    def set_model(self, files: Iterable[str | Path], *, path: str | Path | None = None,
                  configuration: str | None = None, folds: Sequence[Any] | None = None,
                  **details: Any) -> None:
        """Record the model: its ``path`` (file or folder), nnU-Net configuration, folds and each file's sha256."""
        files = [Path(f) for f in files]
        self.model = {
            "path": str(path) if path is not None else (str(files[0]) if len(files) == 1 else None),
            "configuration": configuration,
            "folds": [_plain(f) for f in folds] if folds is not None else None,
            "files": [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files],
            **{k: _plain(v) for k, v in details.items()},
        }

    def set_segments(self, labels_zyx: np.ndarray, affine: np.ndarray, segments: Sequence[Any]) -> None:
        """Per-segment voxel counts and volumes (mL); ``segments``: task :class:`~segmap.tasks.Segment` or names."""
        names = [getattr(s, "label", s) for s in segments]
        stats = segment_statistics(labels_zyx, affine, names)
        for entry, segment in zip(stats, segments):
            code = getattr(segment, "type", None)
            if code is not None:
                entry["property_type"] = {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}
        self.segments = stats

    def add_output(self, path: str | Path, kind: str | None = None, **identity: Any) -> None:
        """Record an output file (kind e.g. ``"dicom-seg"``, ``"nifti"``); its size is taken when writing;
        ``identity``: e.g. the SEG's Series and SOP Instance UIDs (:func:`output_identity`)."""
        self.outputs.append({"path": str(path), "kind": kind, **{k: _plain(v) for k, v in identity.items()}})

    def finish(self, status: str = "succeeded", error: BaseException | str | None = None) -> None:
        """Mark the run finished with ``status`` (``"succeeded"`` or ``"failed"``) and the error's first line."""
        self._finished = _now()
        self.status = status
        if error is not None:
            text = str(error).strip().splitlines()
            self.error = text[0] if text else type(error).__name__

    # ---------------------------------------------------------------------------------------------- output

    def to_dict(self, relative_to: str | Path | None = None, *, staged_in: str | Path | None = None) -> dict:
        """The report as plain JSON-able data, with PHI keys removed; output paths relative to ``relative_to``.

        ``staged_in``: the staging folder of :func:`segmap.outputs.atomic.atomic_outputs` the outputs are still in
        (their recorded paths are the final ones, in its parent folder); sizes are then taken from the staged
        files, since the final paths do not exist yet or still hold an earlier run's files.
        """
        finished = self._finished or _now()
        outputs = []
        for out in self.outputs:
            p = Path(out["path"])
            entry = dict(out)
            entry["bytes"] = _size(_staged_copy(p, Path(staged_in)) if staged_in is not None else p)
            if relative_to is not None:
                entry["path"] = _relative(p, Path(relative_to))
            outputs.append(entry)
        doc = {
            "segmap_version": __version__,
            "status": self.status,
            "error": self.error,
            "started_at": self._started.isoformat(timespec="milliseconds"),
            "finished_at": finished.isoformat(timespec="milliseconds"),
            "duration_s": round((finished - self._started).total_seconds(), 3),
            "task": self.task,
            "device": self.device,
            "model": self.model,
            "inputs": self.inputs,
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.items()},
            "segments": self.segments,
            "outputs": outputs,
            **self.extra,
        }
        return _scrub(doc)

    def write(self, path: str | Path) -> Path:
        """Write the report atomically (temporary file + rename) to ``path``; output paths relative to its folder.

        Written into a staging folder of :func:`~segmap.outputs.atomic.atomic_outputs` (the usual case), the output
        paths are relative to the output folder and the sizes those of the staged files that will be moved there.
        """
        path = Path(path)
        staging = path.parent if path.parent.name.startswith(STAGING_PREFIX) else None
        doc = self.to_dict(relative_to=staging.parent if staging is not None else path.parent, staged_in=staging)
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is unusable; nothing was written
            raise OutputError(f"{path}: cannot write the run report ({e.strerror or e})") from e
        return path


# ------------------------------------------------------------------------------------------------------ helpers


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).astimezone()


def _staged_copy(final: Path, staging: Path) -> Path:
    try:
        return staging / final.absolute().relative_to(staging.absolute().parent)
    except ValueError:
        return final  # not an output of this staging folder


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.absolute().relative_to(base.absolute()))
    except ValueError:
        return str(path)


def _plain(value: Any) -> Any:
    """JSON-able form of pydicom values (IS, DS, UID, MultiValue), numpy scalars/arrays, paths and tuples."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, MutableSequence)):
        return [_plain(v) for v in value]
    return str(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _scrub(v) for k, v in value.items() if k not in PHI_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value
