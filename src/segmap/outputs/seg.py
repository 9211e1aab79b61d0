"""DICOM Segmentation (SEG) output: a label map on the grid of a source CT/MR series, written with highdicom.

The label map is ``[z, y, x]`` with ``labels_zyx[k]`` lying on ``source_datasets[k]`` pixel for pixel (the order the
loader sorted the series in); label value ``i`` is ``segments[i - 1]``. The SEG is BINARY by default (what older
PACS, DCMTK and most viewers understand); LABELMAP (one frame per slice, newer standard) is available on request.

What the SEG carries, all from highdicom's own construction: the source's patient/study modules and Frame of
Reference, the referenced series (every source instance), per-frame derivation references and plane positions,
segments numbered 1..N with their coded category/type (plus type modifier, anatomic region and display colour when
the task file gives them) and ``AUTOMATIC`` algorithm identification (family "Artificial Intelligence").

Behaviour worth knowing:

- Every segment of the task is listed in the SegmentSequence even when the model found nothing for it.
  highdicom keeps segment descriptions for absent label values; with ``omit_empty_frames`` such a segment simply
  has no frames.
- Empty frames are kept by default: omitting them makes smaller files but has shifted overlays in some viewers.
  When the whole label map is empty, frames are always kept (a SEG without frames is not valid; highdicom would
  fall back to that with a warning anyway).
- Source datasets need no PixelData (headers read with ``stop_before_pixels`` suffice); highdicom only reads
  geometry and identifiers from them.
- Speed (``bench/bench_seg.py``): the writer adds one ``max()`` pass (and one cast when the labels are not already
  uint8/uint16) to highdicom's work; highdicom's construction (per-frame functional groups, attribute validation)
  and pydicom's serialisation of the per-frame sequences are the cost, so time follows the number of frames.
  BINARY has one frame per segment per slice, LABELMAP one per slice. Measured (512x512 slices, empty frames
  kept): 300 slices x 2 segments BINARY 0.68 s / 19 MiB, LABELMAP 0.36 s / 75 MiB (8 bits per pixel against 1 bit
  per segment); 100 slices x 100 segments BINARY 6.4 s / 317 MiB / 10 000 frames, LABELMAP 0.14 s / 25 MiB.
- ``segmentation_type`` ``"LABELMAP"`` writes the Label Map Segmentation IOD (DICOM 2024; highdicom adds a
  "Background" segment 0 there). Only newer viewers read it and older validators (dicom3tools 2022) do not know
  the IOD; BINARY stays the default.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from .. import __version__
from ..errors import InputError, OutputError
from ..tasks import Code, Segment
from ..uids import seeded_uid
from .formats import OMIT_EMPTY_FRAMES, SEG_TYPES, Provenance, SourceImage

log = logging.getLogger(__name__)

#: Manufacturer (0008,0070) of every SEG segmap writes: how a receiver (the job service's routing) recognises them.
MANUFACTURER = "segmap"

#: Type 2 attributes of the Patient and General Study modules: present (possibly empty) in every valid SEG, even
#: when the source lacked them (anonymised or repaired sample data).
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: Identifiers every source instance must carry for the SEG's references to mean anything.
_REQUIRED_SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                         "FrameOfReferenceUID")
_SEGMENTATION_TYPES = tuple(t.upper() for t in SEG_TYPES)
_LO_MAX = 64  # DICOM LO value length


def write_seg(
    labels_zyx: np.ndarray,
    source_datasets: Sequence[pydicom.Dataset],
    segments: Sequence[Segment],
    path: str | Path,
    *,
    omit_empty_frames: bool = OMIT_EMPTY_FRAMES,
    series_description: str | None = None,
    series_number: int = 900,
    manufacturer: str = MANUFACTURER,
    manufacturer_model_name: str = "segmap",
    software_version: str | Sequence[str] = __version__,
    device_serial: str = "segmap",
    content_creator: str | None = None,
    segmentation_type: str = SEG_TYPES[0],
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    other_input_series: Sequence[Sequence[pydicom.Dataset]] = (),
) -> Path:
    """Write ``labels_zyx`` as a DICOM SEG instance referencing ``source_datasets``; return the written path.

    ``labels_zyx``: integer (or bool) array ``[z, y, x]``; 0 is background, ``i`` is ``segments[i - 1]``.
    ``source_datasets``: the source series' instances in the label map's z order (``len == z``, Rows == y,
    Columns == x); headers without PixelData are enough.
    ``series_description`` defaults to ``"segmap: <algorithm name>"``. New Series and SOP Instance UIDs are
    generated unless given. ``segmentation_type`` is ``"BINARY"`` (default) or ``"LABELMAP"``.
    ``other_input_series``: the instance headers of the other series the label map was computed from (a
    multi-modality model's further inputs, e.g. T2 and FLAIR beside T1); each is listed in the SEG's Referenced
    Series Sequence (Common Instance Reference module), so the SEG names every series it was derived from, while
    its frames reference the source series' slices.

    Raises ``ValueError`` for a label map that does not fit the source or the segments (naming the offending
    value or shape), :class:`~segmap.errors.InputError` when the source instances lack the identifiers a SEG must
    reference, and :class:`~segmap.errors.OutputError` when ``path`` cannot be written.
    """
    path = Path(path)
    segments = tuple(segments)
    seg_type = segmentation_type.upper()
    if seg_type not in _SEGMENTATION_TYPES:
        raise ValueError(f"segmentation_type must be one of {_SEGMENTATION_TYPES}, got {segmentation_type!r}")
    _check_source(source_datasets)
    pixel_array = _checked_labels(labels_zyx, source_datasets, len(segments))
    if series_description is None:
        series_description = _default_series_description(segments)
    elif len(series_description) > _LO_MAX:
        raise ValueError(f"series_description is {len(series_description)} characters; DICOM allows {_LO_MAX}")

    # highdicom would omit every frame of an empty label map, find that invalid and fall back with a warning.
    if omit_empty_frames and not pixel_array.any():
        log.debug("label map is empty: keeping all frames in the SEG")
        omit_empty_frames = False

    seg = hd.seg.Segmentation(
        source_images=_with_type2_patient_study(source_datasets),
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=[segment_description(i, s) for i, s in enumerate(segments, start=1)],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_version,
        device_serial_number=device_serial,
        content_description=_clip(", ".join(_unique(s.algorithm_name for s in segments)), _LO_MAX) or None,
        content_creator_name=content_creator,
        content_label="SEGMENTATION",
        omit_empty_frames=omit_empty_frames,
        workers=0,
    )
    _reference_other_series(seg, other_input_series)
    seg.SeriesDescription = series_description
    now = datetime.datetime.now()
    seg.SeriesDate = now.strftime("%Y%m%d")
    seg.SeriesTime = now.strftime("%H%M%S")

    try:
        seg.save_as(path, enforce_file_format=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the DICOM SEG ({e.strerror or e})") from e
    return path


def _reference_other_series(seg: pydicom.Dataset, other_input_series: Sequence[Sequence[pydicom.Dataset]]) -> None:
    """Append each further input series (same study) to the SEG's Referenced Series Sequence, once per series."""
    listed = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    for datasets in other_input_series:
        datasets = list(datasets)
        if not datasets:
            continue
        _check_source(datasets)
        series_uid = str(datasets[0].SeriesInstanceUID)
        if series_uid in listed:
            continue
        listed.add(series_uid)
        item = pydicom.Dataset()
        item.SeriesInstanceUID = series_uid
        instances = []
        for ds in datasets:
            ref = pydicom.Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            instances.append(ref)
        item.ReferencedInstanceSequence = instances
        seg.ReferencedSeriesSequence.append(item)


def segment_description(number: int, segment: Segment) -> hd.seg.SegmentDescription:
    """highdicom's description of segment ``number`` (label value) from a task file :class:`Segment`."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=segment.algorithm_name,
        version=segment.algorithm_version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.label,
        segmented_property_category=_coded(segment.category),
        segmented_property_type=_coded(segment.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_coded(segment.anatomic_region)] if segment.anatomic_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*segment.color_rgb) if segment.color_rgb else None,
    )
    if segment.type_modifier is not None:
        # The modifier lives inside the property type item (PS3.3 C.8.20.2); highdicom has no argument for it.
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(segment.type_modifier)]
    return description


def read_seg_labels(path: str | Path, source_sop_uids_in_z_order: Sequence[str]) -> np.ndarray:
    """Read a SEG back as a ``[z, y, x]`` label map on the source slices given by their SOP Instance UIDs.

    Frames are placed by the source instance each one references, so the result lines up with the source series
    whatever order the SEG stores its frames in and whether or not empty frames were omitted. Label value ``i`` is
    segment number ``i``. Raises ``ValueError`` when a UID is not among the instances the SEG references.
    """
    uids = [str(u) for u in source_sop_uids_in_z_order]
    seg = hd.seg.segread(path)
    referenced = {
        str(inst.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for inst in series.ReferencedInstanceSequence
    }
    missing = [u for u in uids if u not in referenced]
    if missing:
        raise ValueError(f"{path}: the SEG does not reference source instance {missing[0]} "
                         f"({len(missing)} of {len(uids)} given UIDs are not referenced)")
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )


# ----------------------------------------------------------------------------------------------------- helpers


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _unique(values) -> list[str]:
    return list(dict.fromkeys(values))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_series_description(segments: Sequence[Segment]) -> str:
    names = ", ".join(_unique(s.algorithm_name for s in segments)) or "segmentation"
    return _clip(f"segmap: {names}", _LO_MAX)


def _check_source(source_datasets: Sequence[pydicom.Dataset]) -> None:
    if len(source_datasets) == 0:
        raise ValueError("source_datasets is empty: a DICOM SEG must reference its source images")
    first = source_datasets[0]
    for keyword in _REQUIRED_SOURCE_UIDS:
        if not str(first.get(keyword, "") or ""):
            series = str(first.get("SeriesInstanceUID", "") or "") or "<no SeriesInstanceUID>"
            raise InputError(f"source series {series}: {keyword} is missing or empty; a DICOM SEG needs it")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        expected = first.get(keyword)
        for k, ds in enumerate(source_datasets):
            if ds.get(keyword) != expected:
                raise InputError(f"source series {first.SeriesInstanceUID}: slice {k} has {keyword} "
                                 f"{ds.get(keyword)!r}, slice 0 has {expected!r}; one SEG references one series")
    sop_uids = [str(ds.get("SOPInstanceUID", "") or "") for ds in source_datasets]
    if not all(sop_uids) or len(set(sop_uids)) != len(sop_uids):
        raise InputError(f"source series {first.SeriesInstanceUID}: SOPInstanceUIDs are missing or repeated")


def _with_type2_patient_study(source_datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source list, its first dataset replaced by a shallow copy when Type 2 patient/study attributes lack.

    highdicom reads these attributes from the first source image unconditionally; anonymised or repaired data may
    not have them. The caller's datasets are never modified.
    """
    sources = list(source_datasets)
    first = sources[0]
    missing = [k for k in _TYPE2_PATIENT_STUDY if k not in first]
    bad_sex = first.get("PatientSex") not in (None, "", "M", "F", "O")
    if missing or bad_sex:
        patched = pydicom.Dataset(dict(first.items()))  # own element dict: Dataset(ds) and copy() share theirs
        if hasattr(first, "file_meta"):
            patched.file_meta = first.file_meta
        for keyword in missing:
            setattr(patched, keyword, None)
        if bad_sex:
            log.warning("source PatientSex is not one of M, F, O: left empty in the SEG")
            del patched.PatientSex  # a new element: assigning would change the one shared with the caller
            patched.PatientSex = None
        sources[0] = patched
    return sources


def _checked_labels(labels_zyx: np.ndarray, source_datasets: Sequence[pydicom.Dataset],
                    n_segments: int) -> np.ndarray:
    """The label map as uint8/uint16 after checking its shape and values against the source and segments."""
    labels = np.asarray(labels_zyx)
    if labels.ndim != 3:
        raise ValueError(f"labels_zyx must be a [z, y, x] array, got shape {labels.shape}")
    first = source_datasets[0]
    expected = (len(source_datasets), int(first.Rows), int(first.Columns))
    if labels.shape != expected:
        raise ValueError(f"labels_zyx has shape {labels.shape}; the source series needs "
                         f"{expected} (slices, Rows, Columns)")
    if n_segments == 0:
        raise ValueError("no segments described: a DICOM SEG needs at least one")
    if labels.dtype == np.bool_:
        return labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels_zyx must hold integer label values, got dtype {labels.dtype}")
    if labels.size == 0:
        raise ValueError(f"labels_zyx is empty (shape {labels.shape})")
    top = int(labels.max())
    if top > n_segments:
        raise ValueError(f"label map holds value {top} but only {n_segments} segments are described "
                         f"(value i is segments[i-1])")
    if np.issubdtype(labels.dtype, np.signedinteger):
        low = int(labels.min())
        if low < 0:
            raise ValueError(f"label map holds negative value {low}")
    if n_segments > 0xFFFF:
        raise ValueError(f"{n_segments} segments: a DICOM SEG holds at most 65535")
    if labels.dtype in (np.uint8, np.uint16):
        return labels  # highdicom's fast path; no copy
    return labels.astype(np.uint8 if n_segments <= 0xFF else np.uint16)


class DicomSegWriter:
    """The ``dicom-seg`` output format: a DICOM SEG referencing the reference modality's series."""

    filename = "segmentation.dcm"

    def __init__(self, task, settings) -> None:
        self.segments = task.segments
        self.omit_empty_frames = settings.omit_empty_frames
        self.segmentation_type = settings.segmentation_type
        #: The job service's seed: the same job writes the same UIDs, so a re-sent SEG replaces rather than adds.
        self.uid_seed = settings.uid_seed

    def write(self, labels, image: SourceImage, folder: Path, provenance: Provenance) -> Path:
        uids = {}
        if self.uid_seed:
            uids = {"series_instance_uid": seeded_uid(self.uid_seed, "series"),
                    "sop_instance_uid": seeded_uid(self.uid_seed, "sop")}
        return write_seg(labels.array[0], image.reference_datasets, self.segments, Path(folder) / self.filename,
                         omit_empty_frames=self.omit_empty_frames, software_version=provenance.software_versions,
                         segmentation_type=self.segmentation_type,
                         other_input_series=image.other_input_datasets or (), **uids)
