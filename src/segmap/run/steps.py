"""The loading steps of a run as plain functions over plain values (:mod:`segmap.run.values`).

The application's operators (``operators/``) each call one of these and pass the result on along a named port;
``segmap run`` calls them in sequence (:func:`segmap.run.orchestration.run_steps`). Both give the same result.

DICOM input::

    scan_study(input) -> Study -> choose_series(study) -> SeriesChoice -> load_series(choice) -> InputImage

NIfTI input::

    load_nifti(input) -> InputImage

then ``Inference.segment(image) -> labels`` (:mod:`segmap.run.inference`) and ``ResultWriter.write(labels, image)``
(:mod:`segmap.run.writer`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..dicom.loading import scan_dicom_folder
from ..dicom.resample import resample_to_reference
from ..dicom.selection import select_for_task
from ..dicom.series_volume import series_to_volume, source_datasets
from ..errors import InputError
from ..nifti_input import NIFTI_SUFFIXES, find_modality_files, read_nifti
from ..settings import Settings
from ..tasks import SegmentationTask
from ..volume import Volume, same_grid
from .values import InputImage, SeriesChoice, Study, timed

log = logging.getLogger("segmap")


def detect_input_kind(input_path: Path) -> str:
    """``nifti`` when the input is a NIfTI file or a folder holding one at its top level, else ``dicom``."""
    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError(f"input {input_path} does not exist")
    if input_path.is_file():
        return "nifti" if input_path.name.endswith(NIFTI_SUFFIXES) else "dicom"
    if any(p.name.endswith(NIFTI_SUFFIXES) for p in input_path.iterdir() if p.is_file()):
        return "nifti"
    return "dicom"


def input_kind(settings: Settings) -> str:
    return detect_input_kind(settings.input) if settings.input_kind == "auto" else settings.input_kind


def scan_study(input_path: Path) -> Study:
    """Read the headers of every DICOM file under ``input_path`` (unreadable and non-DICOM files are skipped)."""
    timings: dict[str, float] = {}
    scan = timed(timings, "load.scan", lambda: scan_dicom_folder(Path(input_path)))
    return Study(scan, timings)


def choose_series(study: Study, task: SegmentationTask) -> SeriesChoice:
    """One series per modality of the task, chosen by its Rules_Text (see segmap.dicom.selection)."""
    missing = [m.key for m in task.modalities if not m.rules]
    if missing:
        raise InputError(f"task '{task.name}' modality(ies) {', '.join(missing)} have no Rules_Text, so the task "
                         f"cannot select DICOM series (use NIfTI input)")
    timings = dict(study.timings_s)
    selections = timed(timings, "load.select",
                       lambda: select_for_task(study.scan, {m.key: m.rules for m in task.modalities}))
    for key, sel in selections.items():
        log.info("modality '%s': series %s (%s, '%s', %d instances) selected by '%s'", key,
                 sel.series.series_instance_uid, sel.series.modality, sel.series.description,
                 len(sel.series.instances), sel.selection_name)
    return SeriesChoice(selections, timings)


def load_series(choice: SeriesChoice, task: SegmentationTask) -> InputImage:
    """Decode the chosen series into volumes and stack them on the reference modality's grid."""
    timings = dict(choice.timings_s)

    def load() -> InputImage:
        volumes = {}
        for key, sel in choice.selections.items():
            volumes[key] = series_to_volume(sel.series)
            volumes[key].meta["modality_key"] = key
            _log_volume(key, volumes[key])
        ref = task.reference_modality
        datasets = source_datasets(choice.selections[ref].series, volumes[ref])
        return InputImage(combine_modalities(volumes, task), volumes, "dicom", datasets, choice.selections)

    image = timed(timings, "load.volume", load)
    image.timings_s = timings
    return image


def load_nifti(input_path: Path, task: SegmentationTask) -> InputImage:
    """Each modality's NIfTI file, found by its File_Pattern, stacked on the reference modality's grid."""
    timings: dict[str, float] = {}

    def load() -> InputImage:
        volumes = {}
        for key, path in find_modality_files(Path(input_path), task).items():
            volumes[key] = read_nifti(path)
            volumes[key].meta["modality_key"] = key
            _log_volume(key, volumes[key], path.name)
        return InputImage(combine_modalities(volumes, task), volumes, "nifti")

    image = timed(timings, "load", load)
    image.timings_s = timings
    return image


def _log_volume(key: str, volume: Volume, name: str | None = None) -> None:
    log.info("modality '%s': %s%s voxels (z, y, x) at %s mm", key, f"{name}, " if name else "", volume.shape_zyx,
             tuple(round(s, 3) for s in volume.spacing_zyx))


def combine_modalities(volumes: dict[str, Volume], task: SegmentationTask) -> Volume:
    """Stack modalities in task order, resampling each non-reference one onto the reference grid (linear)."""
    reference = volumes[task.reference_modality]
    if len(volumes) == 1:
        return reference
    channels = []
    for m in task.modalities:
        v = volumes[m.key]
        if not same_grid(v, reference):
            log.info("resampling modality '%s' onto the grid of '%s'", m.key, task.reference_modality)
            v = resample_to_reference(v, reference, order=1)
        channels.append(v.array[0].astype(np.float32, copy=False))
    return Volume(np.stack(channels), reference.affine.copy(), {**reference.meta, "modalities": task.modality_keys})
