"""Turn one DICOM image series into a :class:`~segmap.volume.Volume`.

The result is ``[1, z, y, x]`` (x = DICOM column, y = DICOM row, z = slice) with a RAS affine built from the
slices' own geometry:

- slices are ordered along the slice normal (row cosine x column cosine of ImageOrientationPatient) by their
  ImagePositionPatient projected on it; file names, Instance Number and file-system order play no part;
- the slice spacing comes from those positions (SliceThickness is the thickness of the slab, not the distance
  between slices) and must be uniform; a gap larger than the others (missing slices) is refused with the gap named;
- oblique series are fine (the affine carries the direction cosines); gantry-tilted series (positions that do not
  follow the slice normal) are refused, because one affine cannot describe them;
- two slices at the same position (a copied or re-sent instance, two acquisitions in one series): the one with the
  highest Instance Number is kept (ties: the smallest SOP Instance UID) and a warning says how many were dropped;
- RescaleSlope/RescaleIntercept (or a Modality LUT) are applied per slice, so the values are Hounsfield units for
  CT. The array is ``int16`` when every slice's values are integers that fit (the usual CT case), else ``float32``;
- multi-frame (enhanced) images are not supported: a clear error says so.

``volume.meta`` holds provenance only, never patient identity: ``series_instance_uid``, ``study_instance_uid``,
``frame_of_reference_uid``, ``modality``, ``series_description``, ``sop_instance_uids`` and ``source_paths`` (both in
slice order, z = 0 first). The header data sets (which do hold patient identity) are given by
:func:`source_datasets` in the same order, for the DICOM SEG writer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale

from ..errors import InputError
from ..volume import Volume, affine_from_dicom
from .loading import DicomInstance, DicomSeries

log = logging.getLogger(__name__)

#: Allowed deviation of a slice gap from the median gap, as a fraction of the median gap (plus 0.01 mm).
SPACING_TOLERANCE = 0.05
#: Slices whose positions along the normal differ by less than this (mm) are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: Largest sideways drift of slice positions from the slice normal, as a fraction of the smallest pixel spacing.
TILT_TOLERANCE = 0.1
#: Largest difference between the orientation cosines of two slices of one volume.
ORIENTATION_TOLERANCE = 1e-3


@dataclass
class _Slice:
    instance: DicomInstance
    position: np.ndarray  # ImagePositionPatient, LPS mm
    along: float  # position projected on the slice normal

    @property
    def label(self) -> str:
        n = self.instance.instance_number
        return f"instance {n}" if n is not None else f"SOP instance {self.instance.sop_instance_uid}"


def series_to_volume(series: DicomSeries) -> Volume:
    """Decode ``series`` into a one-channel volume (see the module docstring for ordering, spacing and dtype).

    Raises :class:`~segmap.errors.InputError` naming the series for anything that prevents a faithful volume.
    """
    name = f"series {series.series_instance_uid} ({series.modality} {series.description!r})"
    if not series.instances:
        raise InputError(f"{name} has no instances")
    if not series.is_image:
        raise InputError(f"{name} is not an image series (a {series.modality or 'non-image'} object); "
                         "it cannot be segmented")
    multi = [inst for inst in series.instances if inst.number_of_frames > 1]
    if multi:
        raise InputError(f"{name}: multi-frame (enhanced) images are not supported ({multi[0].path.name} has "
                         f"{multi[0].number_of_frames} frames); export the series as single-frame images")

    first = series.instances[0].dataset
    row, col, pixel_spacing, shape = _grid_of(first, series.instances[0], name)
    for inst in series.instances[1:]:
        r, c, ps, sh = _grid_of(inst.dataset, inst, name)
        if not (np.allclose(r, row, atol=ORIENTATION_TOLERANCE) and np.allclose(c, col, atol=ORIENTATION_TOLERANCE)):
            raise InputError(f"{name}: slices have different orientations ({inst.path.name} differs from "
                             f"{series.instances[0].path.name}); a series of one 3D stack was expected "
                             "(is it a localizer?)")
        if sh != shape:
            raise InputError(f"{name}: slices have different sizes ({inst.path.name} is {sh[1]}x{sh[0]}, "
                             f"{series.instances[0].path.name} is {shape[1]}x{shape[0]})")
        if not np.allclose(ps, pixel_spacing, rtol=1e-4, atol=1e-6):
            raise InputError(f"{name}: slices have different PixelSpacing ({inst.path.name}: {list(ps)}, "
                             f"{series.instances[0].path.name}: {list(pixel_spacing)})")

    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    slices = [_Slice(inst, pos := _position(inst, name), float(pos @ normal)) for inst in series.instances]
    slices.sort(key=lambda s: (s.along, _number_key(s.instance), s.instance.sop_instance_uid))
    slices = _drop_duplicate_positions(slices, name)
    _refuse_gantry_tilt(slices, normal, min(pixel_spacing), name)
    step = _slice_step(slices, name, first)

    array = _decode(slices, shape, name)
    affine = affine_from_dicom(slices[0].position, row, col, normal * step, pixel_spacing)
    meta = {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "") or ""),
        "modality": series.modality,
        "series_description": series.description,
        "sop_instance_uids": [s.instance.sop_instance_uid for s in slices],
        "source_paths": [str(s.instance.path) for s in slices],
    }
    log.info("%s: volume of %d x %d x %d voxels (x, y, z), spacing %.4g x %.4g x %.4g mm, %s", name, shape[1],
             shape[0], len(slices), pixel_spacing[1], pixel_spacing[0], step, array.dtype)
    return Volume(array[None], affine, meta)


def source_datasets(series: DicomSeries, volume: Volume) -> list[Dataset]:
    """The header data sets of ``series`` in the slice order of ``volume`` (made from it by :func:`series_to_volume`).

    The headers carry no pixel data; their UIDs are the repaired/generated ones the scan settled on.
    """
    by_uid = {inst.sop_instance_uid: inst.dataset for inst in series.instances}
    try:
        return [by_uid[uid] for uid in volume.meta["sop_instance_uids"]]
    except KeyError as e:
        raise ValueError(f"volume was not made from series {series.series_instance_uid} "
                         f"(no instance {e.args[0]})") from None


# ---- geometry


def _floats(ds: Dataset, keyword: str, n: int, inst: DicomInstance, name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (n,) or not np.all(np.isfinite(values)):
        raise InputError(f"{name}: {inst.path.name} has no valid {keyword} ({n} numbers expected); "
                         "a 3D image series needs it")
    return values


def _grid_of(ds: Dataset, inst: DicomInstance, name: str):
    iop = _floats(ds, "ImageOrientationPatient", 6, inst, name)
    spacing = _floats(ds, "PixelSpacing", 2, inst, name)
    row, col = iop[:3], iop[3:]
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-6 or np.linalg.norm(np.cross(row, col)) < 1e-3:
        raise InputError(f"{name}: {inst.path.name} has a degenerate ImageOrientationPatient {list(iop)}")
    if np.any(spacing <= 0):
        raise InputError(f"{name}: {inst.path.name} has PixelSpacing {list(spacing)}; positive values expected")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InputError(f"{name}: {inst.path.name} is a colour image ({samples} samples per pixel); "
                         "only greyscale images can be segmented")
    return row / np.linalg.norm(row), col / np.linalg.norm(col), (float(spacing[0]), float(spacing[1])), \
        (int(ds.Rows), int(ds.Columns))


def _position(inst: DicomInstance, name: str) -> np.ndarray:
    return _floats(inst.dataset, "ImagePositionPatient", 3, inst, name)


def _number_key(inst: DicomInstance) -> int:
    n = inst.instance_number
    return n if n is not None else -(2**31)


def _drop_duplicate_positions(slices: list[_Slice], name: str) -> list[_Slice]:
    groups: list[list[_Slice]] = []
    for s in slices:
        if groups and s.along - groups[-1][0].along < DUPLICATE_TOLERANCE_MM:
            groups[-1].append(s)
        else:
            groups.append([s])
    kept = []
    dropped = 0
    for g in groups:
        # highest Instance Number, then smallest SOP Instance UID
        best = min(g, key=lambda s: (-_number_key(s.instance), s.instance.sop_instance_uid))
        kept.append(best)
        dropped += len(g) - 1
    if dropped:
        log.warning("%s: %d slice(s) share a position with another slice; kept the one with the highest Instance "
                    "Number at each position (%d slices left)", name, dropped, len(kept))
    return kept


def _refuse_gantry_tilt(slices: list[_Slice], normal: np.ndarray, pixel: float, name: str) -> None:
    if len(slices) < 2:
        return
    offsets = np.array([s.position - slices[0].position for s in slices])
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.max(np.linalg.norm(sideways, axis=1)))
    if drift > TILT_TOLERANCE * pixel:
        span = float(slices[-1].along - slices[0].along)
        angle = float(np.degrees(np.arctan2(drift, abs(span)))) if span else 90.0
        raise InputError(f"{name}: slice positions drift {drift:.2f} mm sideways from the slice normal (about "
                         f"{angle:.1f} degrees): a gantry-tilted series is not supported; reconstruct it without "
                         "tilt (or resample it) and send that series")


def _slice_step(slices: list[_Slice], name: str, first: Dataset) -> float:
    if len(slices) == 1:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = first.get(keyword)
            if value not in (None, "") and float(value) > 0:
                log.warning("%s has a single slice; using its %s (%s mm) as slice spacing", name, keyword, value)
                return float(value)
        log.warning("%s has a single slice and no slice thickness; using 1 mm as slice spacing", name)
        return 1.0
    along = np.array([s.along for s in slices])
    gaps = np.diff(along)
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > SPACING_TOLERANCE * median + 0.01)
    if bad.size:
        i = int(bad[0])
        hint = "slices missing?" if gaps[i] > median else "slices of another stack mixed in?"
        more = f" ({bad.size} irregular gaps in all)" if bad.size > 1 else ""
        raise InputError(f"{name}: slices are not evenly spaced: {gaps[i]:.3f} mm between {slices[i].label} and "
                         f"{slices[i + 1].label} (at {along[i]:.2f} and {along[i + 1]:.2f} mm along the slice "
                         f"normal) where the usual gap is {median:.3f} mm{more}; {hint}")
    return float((along[-1] - along[0]) / (len(slices) - 1))


# ---- pixels


def _integer_rescale(ds: Dataset) -> bool:
    """Whether the stored values map to integers (the usual CT case: slope 1, integer intercept)."""
    if "ModalityLUTSequence" in ds:
        return False
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return slope.is_integer() and intercept.is_integer()


def _decode(slices: list[_Slice], shape: tuple[int, int], name: str) -> np.ndarray:
    integer = all(_integer_rescale(s.instance.dataset) for s in slices)
    out = np.empty((len(slices), *shape), dtype=np.int16 if integer else np.float32)
    info = np.iinfo(np.int16)
    for k, s in enumerate(slices):
        values = apply_rescale(_pixels(s.instance, name), s.instance.dataset)
        if values.shape != shape:
            raise InputError(f"{name}: {s.instance.path} decodes to {values.shape[1]}x{values.shape[0]} pixels, "
                             f"its header says {shape[1]}x{shape[0]}")
        if out.dtype == np.int16 and (values.min() < info.min or values.max() > info.max):
            out = out.astype(np.float32)  # values beyond int16: keep them exactly in float32 instead
        out[k] = values
    return out


def _pixels(inst: DicomInstance, name: str) -> np.ndarray:
    try:
        ds = pydicom.dcmread(inst.path, force=inst.forced)
    except Exception as e:
        raise InputError(f"{name}: cannot read {inst.path} again ({type(e).__name__}: {_short(e)})") from None
    try:
        return ds.pixel_array
    except Exception as e:  # decoders raise many types; the user needs the file and the transfer syntax
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", None) or "unknown transfer syntax"
        raise InputError(f"{name}: cannot decode the pixel data of {inst.path} ({ts_name}): {_short(e)}") from None


def _short(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
