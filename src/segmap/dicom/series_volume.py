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
- speed: uncompressed little-endian pixel data (the usual export) are read straight from where the scan found them,
  from all files at once on a few threads, into one buffer that pydicom's decoder turns into the ``[z, y, x]`` stored
  values in a single call; the rescale is then done on blocks of slices. Anything else (compressed or deflated data,
  files without file meta, differing pixel formats, a Modality LUT) takes the per-file path: read the file again with
  pydicom, ``pixel_array``, ``apply_rescale``. Both paths give the same values;
- the declared image size is checked against the pixel data present and the available memory before anything is
  allocated; non-finite values (possible after a float rescale) are replaced as in
  :func:`segmap.input_checks.replace_nonfinite`; lossy compression (LossyImageCompression "01" or a lossy transfer
  syntax) is logged as a warning and recorded in ``meta["lossy_compression"]``;
- multi-frame (enhanced) images are not supported: a clear error says so.

``volume.meta`` holds provenance only, never patient identity: ``series_instance_uid``, ``study_instance_uid``,
``frame_of_reference_uid``, ``modality``, ``series_description``, ``sop_instance_uids`` and ``source_paths`` (both in
slice order, z = 0 first). The header data sets (which do hold patient identity) are given by
:func:`source_datasets` in the same order, for the DICOM SEG writer.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale, get_decoder

from ..errors import InputError
from ..input_checks import check_allocation, replace_nonfinite
from ..volume import Volume, affine_from_dicom
from .loading import DicomInstance, DicomSeries, infer_transfer_syntax

log = logging.getLogger(__name__)

#: Allowed deviation of a slice gap from the median gap, as a fraction of the median gap (plus 0.01 mm).
SPACING_TOLERANCE = 0.05
#: Slices whose positions along the normal differ by less than this (mm) are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: Largest sideways drift of slice positions from the slice normal, as a fraction of the smallest pixel spacing:
#: below half a pixel, placing every slice on the untilted grid misplaces no voxel by more than half a voxel, which
#: is the precision of any voxel grid (a 0.1 degree tilt drifts 0.25 mm over 140 mm: accepted at 0.7 mm pixels).
TILT_TOLERANCE = 0.5
#: Largest difference between the orientation cosines of two slices of one volume.
ORIENTATION_TOLERANCE = 1e-3
#: Threads that read pixel data from the files (reads release the GIL; helps most on network or cold storage).
READ_THREADS = min(8, 2 * (os.cpu_count() or 1))
#: Slices rescaled together (bounds the temporary int32/float64 block to a few tens of MB for 512 x 512 slices).
RESCALE_BLOCK = 32


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
    same_as_first = _as_stored(first, _GRID_TAGS)  # before _grid_of converts the first slice's values
    row, col, pixel_spacing, shape = _grid_of(first, series.instances[0], name)
    for inst in series.instances[1:]:
        if _as_stored(inst.dataset, _GRID_TAGS) == same_as_first:
            continue  # the same attribute values as the first slice, so the same grid
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

    _check_declared_size(slices, shape, name)
    array = _decode(slices, shape, name)
    array, replaced = replace_nonfinite(array, name)
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
    if replaced:
        meta["nonfinite_voxels_replaced"] = replaced
    lossy = lossy_compression([s.instance.dataset for s in slices])
    if lossy:
        meta["lossy_compression"] = lossy
        log.warning("%s: lossy-compressed input (%s): the model sees compression artefacts, check the result "
                    "with that in mind", name, lossy)
    if series.stack is not None:
        meta["stack"] = series.stack.describe()
    log.info("%s: volume of %d x %d x %d voxels (x, y, z), spacing %.4g x %.4g x %.4g mm, %s", name, shape[1],
             shape[0], len(slices), pixel_spacing[1], pixel_spacing[0], step, array.dtype)
    return Volume(array[None], affine, meta)


#: Transfer syntaxes that always lose information: JPEG baseline/extended, MPEG-2/4 and HEVC video.
LOSSY_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1",
    "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.101.1", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1", "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.104.1",
    "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1", "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1",
    "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108",
})
#: Transfer syntaxes that may be lossy or lossless (JPEG-LS near-lossless, JPEG 2000, HTJ2K); lossy unless the
#: images say LossyImageCompression "00".
MAYBE_LOSSY_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
})


def lossy_compression(datasets) -> str | None:
    """Why the pixel data of these instances are lossy-compressed, or ``None`` when they are not (as far as the
    headers tell): LossyImageCompression "01" on any instance (compressed lossily at some point, even when stored
    uncompressed now), or a lossy transfer syntax."""
    reasons = set()
    for ds in datasets:
        flag = str(ds.get("LossyImageCompression", "") or "").strip()
        if flag == "01":
            ratio = ds.get("LossyImageCompressionRatio")
            reasons.add("LossyImageCompression 01" + (f", ratio {ratio}" if ratio not in (None, "") else ""))
            continue
        ts = getattr(getattr(ds, "file_meta", None), "get", lambda _k: None)("TransferSyntaxUID")
        if ts in LOSSY_TRANSFER_SYNTAXES or (ts in MAYBE_LOSSY_TRANSFER_SYNTAXES and flag != "00"):
            reasons.add(f"transfer syntax {getattr(ts, 'name', ts)}")
    return "; ".join(sorted(reasons)) or None


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


_GRID_TAGS = (0x00200037, 0x00280030, 0x00280010, 0x00280011, 0x00280002)  # IOP, PixelSpacing, Rows, Columns, SPP


def _as_stored(ds: Dataset, tags: tuple[int, ...]) -> tuple:
    """The values of ``tags`` as stored: raw bytes while pydicom has not converted them yet, else their text.

    Comparing these is much cheaper than converting every slice's values (the same work for hundreds of slices):
    equal results mean equal values; different ones are converted and compared properly by the caller.
    """
    key = []
    for tag in tags:
        elem = ds.get_item(tag)
        value = None if elem is None else elem.value
        key.append(value if isinstance(value, (bytes, type(None))) else ("converted", str(value)))
    return tuple(key)


def _position(inst: DicomInstance, name: str) -> np.ndarray:
    # Read while still raw: pydicom's DS conversion (with validation) costs more than the rest of the slice's
    # geometry; anything unusual goes through the converted value and its checks.
    elem = inst.dataset.get_item(0x00200032)
    raw = None if elem is None else elem.value
    if isinstance(raw, bytes):
        try:
            values = np.array([float(v) for v in raw.split(b"\\")], dtype=np.float64)
        except ValueError:
            values = None
        if values is not None and values.shape == (3,) and np.all(np.isfinite(values)):
            return values
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
    repeated = sum(1 for g in groups if len(g) > 1)
    if repeated > 1 and 2 * repeated > len(groups):
        raise InputError(f"{name}: {repeated} of its {len(groups)} slice positions hold more than one slice: it looks "
                         "like several stacks (phases, echoes) in one series, and no attribute (TemporalPosition"
                         "Identifier, AcquisitionNumber, EchoNumbers, ...) tells them apart; export each stack as a "
                         "series of its own")
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
    span = float(slices[-1].along - slices[0].along)
    angle = float(np.degrees(np.arctan2(drift, abs(span)))) if span else 90.0
    tolerance = TILT_TOLERANCE * pixel
    if drift > tolerance:
        raise InputError(f"{name}: slice positions drift {drift:.2f} mm sideways from the slice normal (about "
                         f"{angle:.2f} degrees), more than the tolerance of {tolerance:.2f} mm (half the smallest "
                         f"pixel spacing, {pixel:g} mm): a gantry-tilted series is not supported; reconstruct it "
                         "without tilt (or resample it) and send that series")
    if drift > 0.01:
        log.info("%s: slice positions drift %.3f mm sideways (about %.2f degrees of tilt), within the tolerance of "
                 "%.2f mm; treated as untilted", name, drift, angle, tolerance)


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
    stored = _read_native_stack(slices, shape, name)
    if stored is None:
        return _decode_each(slices, shape, name, lambda k: _pixels(slices[k].instance, name))
    keys = [_as_stored(s.instance.dataset, _RESCALE_TAGS) for s in slices]
    rescales: dict[tuple, tuple] = {}  # the same stored rescale values: the same parameters
    for s, key in zip(slices, keys):
        if key not in rescales:
            rescales[key] = (_rescale_params(s.instance.dataset), _integer_rescale(s.instance.dataset))
    params = [rescales[key] for key in keys]
    if any(p is None for p, _ in params):
        return _decode_each(slices, shape, name, lambda k: stored[k])
    bits, signed = int(slices[0].instance.dataset.BitsStored), stored.dtype.kind == "i"
    stored_range = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return _rescale_stack(stored, [p for p, _ in params], all(integer for _, integer in params), stored_range)


def _decode_each(slices: list[_Slice], shape: tuple[int, int], name: str, stored_values) -> np.ndarray:
    """Rescale slice by slice with pydicom's ``apply_rescale``; ``stored_values(k)`` gives slice k's stored values."""
    integer = all(_integer_rescale(s.instance.dataset) for s in slices)
    out = np.empty((len(slices), *shape), dtype=np.int16 if integer else np.float32)
    info = np.iinfo(np.int16)
    for k, s in enumerate(slices):
        values = apply_rescale(stored_values(k), s.instance.dataset)
        if values.shape != shape:
            raise InputError(f"{name}: {s.instance.path} decodes to {values.shape[1]}x{values.shape[0]} pixels, "
                             f"its header says {shape[1]}x{shape[0]}")
        if out.dtype == np.int16 and (values.min() < info.min or values.max() > info.max):
            out = out.astype(np.float32)  # values beyond int16: keep them exactly in float32 instead
        out[k] = values
    return out


#: The Image Pixel attributes pydicom's decoder needs; slices read as one stack must agree on all of them.
_PIXEL_FORMAT = ("BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation")
_PIXEL_FORMAT_TAGS = (0x00280100, 0x00280101, 0x00280103, 0x00280004)
#: ModalityLUTSequence, RescaleIntercept, RescaleSlope: what _rescale_params and _integer_rescale read.
_RESCALE_TAGS = (0x00283000, 0x00281052, 0x00281053)


def _read_native_stack(slices: list[_Slice], shape: tuple[int, int], name: str) -> np.ndarray | None:
    """The stored values ``[z, y, x]`` of a series of uncompressed little-endian slices, or ``None`` when any slice
    is not one (its pixels then come from :func:`_pixels`).

    Each file's Pixel Data value is read where the scan found it into one buffer holding the slices back to back,
    which is exactly the layout of native multi-frame pixel data, so pydicom's decoder interprets it in one call
    (bit depth, signedness, Bits Stored) as it would each file's ``pixel_array``.
    """
    first = slices[0].instance.dataset
    same_as_first = _as_stored(first, _PIXEL_FORMAT_TAGS)
    try:
        fmt = tuple(first.get(k) for k in _PIXEL_FORMAT)
        bits = int(fmt[0])
    except (TypeError, ValueError):
        return None
    frame_bytes = shape[0] * shape[1] * bits // 8
    if bits not in (8, 16, 32) or any(v in (None, "") for v in fmt):
        return None
    for s in slices:  # (one sample per pixel: series_to_volume has checked that)
        inst = s.instance
        if inst.pixel_data_at is None or inst.pixel_data_at[1] < frame_bytes or inst.forced:
            return None
        if _as_stored(inst.dataset, _PIXEL_FORMAT_TAGS) != same_as_first and \
                any(inst.dataset.get(k) != v for k, v in zip(_PIXEL_FORMAT, fmt)):
            return None

    buffer = np.empty(frame_bytes * len(slices), dtype=np.uint8)  # not zeroed: every byte is read into
    view = memoryview(buffer)

    def read(k: int) -> None:
        inst = slices[k].instance
        try:
            with open(inst.path, "rb", buffering=0) as f:
                f.seek(inst.pixel_data_at[0])
                n = f.readinto(view[k * frame_bytes:(k + 1) * frame_bytes])
        except OSError as e:
            raise InputError(f"{name}: cannot read {inst.path} again ({e.strerror or e})") from None
        if n != frame_bytes:
            raise InputError(f"{name}: {inst.path} has changed since it was scanned (its pixel data end early)")

    if len(slices) > 1 and READ_THREADS > 1:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(read, range(len(slices))))
    else:
        for k in range(len(slices)):
            read(k)
    ts = slices[0].instance.dataset.file_meta.TransferSyntaxUID
    bits_stored, signed = int(fmt[1]), int(fmt[2]) == 1
    try:
        stored, _ = get_decoder(ts).as_array(
            buffer, rows=shape[0], columns=shape[1], number_of_frames=len(slices), samples_per_pixel=1,
            bits_allocated=bits, bits_stored=bits_stored, pixel_representation=int(fmt[2]),
            photometric_interpretation=str(fmt[3]), pixel_keyword="PixelData",
            # Values must lie within Bits Stored (_decode relies on it). pydicom ensures it with two shifts over
            # the whole stack; for unsigned values that is clearing the unused high bits, which scanners leave
            # zero almost always: one pass to look, and a second only when some are set.
            correct_unused_bits=signed)
    except Exception as e:  # pydicom's checks of the pixel format: the user needs the series and the reason
        raise InputError(f"{name}: cannot decode the pixel data ({_short(e)})") from None
    if not signed and 0 < bits_stored < bits:
        mask = (1 << bits_stored) - 1
        if int(stored.max()) > mask:
            np.bitwise_and(stored, stored.dtype.type(mask), out=stored)
    return stored.reshape(len(slices), *shape)


def _rescale_params(ds: Dataset) -> tuple[float, float] | None:
    """(slope, intercept) as pydicom's ``apply_rescale`` uses them, or ``None`` when only that function should do it
    (a Modality LUT, or rescale values that are present but empty)."""
    if "ModalityLUTSequence" in ds:
        return None
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        try:
            return float(ds.RescaleSlope), float(ds.RescaleIntercept)
        except (TypeError, ValueError):
            return None
    return 1.0, 0.0


def _rescale_stack(stored: np.ndarray, params: list[tuple[float, float]], integer: bool,
                   stored_range: tuple[int, int] | None = None) -> np.ndarray:
    """``stored * slope + intercept`` per slice with the values :func:`_decode_each` would give: ``int16`` when
    ``integer`` and every result fits, else ``float32`` computed in float64 as pydicom does.

    ``stored_range``: bounds every stored value is known to lie within (from Bits Stored); when the results of those
    bounds fit, the values themselves need not be searched for their minimum and maximum.
    The usual CT case (16-bit stored values below 32768, slope 1, integer intercept) is done in place in ``stored``'s
    memory, which then is the result (``stored`` must not be used afterwards).
    """
    blocks = []  # runs of consecutive slices with the same rescale, at most RESCALE_BLOCK long
    for k, p in enumerate(params):
        if blocks and blocks[-1][2] == p and k - blocks[-1][0] < RESCALE_BLOCK:
            blocks[-1][1] = k + 1
        else:
            blocks.append([k, k + 1, p])
    if integer:
        info = np.iinfo(np.int16)

        def fits(low: int, high: int, slope: float, intercept: float) -> bool:
            ends = (low * slope + intercept, high * slope + intercept)
            return info.min <= min(ends) and max(ends) <= info.max and high <= info.max

        in_place = stored.dtype in (np.int16, np.uint16)
        for a, b, (slope, intercept) in blocks:
            if stored_range is not None and fits(*stored_range, slope, intercept):
                low, high = stored_range
            else:
                low, high = int(stored[a:b].min()), int(stored[a:b].max())
            ends = (low * slope + intercept, high * slope + intercept)
            if min(ends) < info.min or max(ends) > info.max:
                integer = False  # values beyond int16: keep them exactly in float32 instead
                break
            in_place = in_place and slope == 1 and high <= info.max
        if integer and in_place:
            out = stored.view(np.int16)  # the same values: stored ones are below 32768
            for a, b, (_, intercept) in blocks:
                if intercept:
                    np.add(out[a:b], np.int16(intercept), out=out[a:b])  # results fit int16 (checked above)
            return out
    out = np.empty(stored.shape, dtype=np.int16 if integer else np.float32)
    for a, b, (slope, intercept) in blocks:
        if integer:
            # int32 cannot overflow: |stored| < 2**16 or the result fits int16 with slope and intercept integers
            wide = np.int32 if stored.dtype.itemsize <= 2 and abs(slope) < 2**14 and abs(intercept) < 2**30 \
                else np.int64
            if slope == 1:
                np.add(stored[a:b], int(intercept), out=out[a:b], dtype=wide, casting="unsafe")
            else:
                block = np.multiply(stored[a:b], int(slope), dtype=wide)
                np.add(block, int(intercept), out=out[a:b], casting="unsafe")
        elif (slope, intercept) == (1.0, 0.0):
            out[a:b] = stored[a:b]
        else:
            block = stored[a:b].astype(np.float64)
            block *= slope
            block += intercept
            out[a:b] = block
    return out


def _check_declared_size(slices: list[_Slice], shape: tuple[int, int], name: str) -> None:
    """Refuse a header whose declared image size the file's pixel data cannot hold or the memory cannot take
    (Rows = Columns = 60000 with a few bytes of pixel data), before anything is allocated."""
    first = slices[0].instance
    try:
        bits = int(first.dataset.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError):
        bits = 16
    frame_bytes = (shape[0] * shape[1] * bits + 7) // 8
    for s in slices:
        at = s.instance.pixel_data_at
        if at is not None and at[1] < frame_bytes:
            raise InputError(f"{name}: {s.instance.path.name} declares {shape[1]} x {shape[0]} pixels of {bits} bits "
                             f"({frame_bytes} bytes) but its pixel data hold {at[1]} bytes; its header is damaged")
    # the stored values and the decoded volume (float32 at most) exist together for a moment
    check_allocation(len(slices) * shape[0] * shape[1] * (max(bits, 8) // 8 + 4), name,
                     f"{shape[1]} x {shape[0]} pixels x {len(slices)} slices")


def _pixels(inst: DicomInstance, name: str) -> np.ndarray:
    try:
        ds = pydicom.dcmread(inst.path, force=inst.forced)
    except Exception as e:
        raise InputError(f"{name}: cannot read {inst.path} again ({type(e).__name__}: {_short(e)})") from None
    if inst.forced:
        infer_transfer_syntax(ds)
    try:
        return ds.pixel_array
    except Exception as e:  # decoders raise many types; the user needs the file and the transfer syntax
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", None) or "unknown transfer syntax"
        raise InputError(f"{name}: cannot decode the pixel data of {inst.path} ({ts_name}): {_short(e)}") from None


def _short(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
