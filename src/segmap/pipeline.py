"""The steps of a segmap run as plain functions over plain values.

The application's operators (``operators/``) each call one of these and pass the result on along a named port;
``segmap run`` (:func:`run`) calls them in sequence. Both give the same result.

DICOM input::

    scan_study(input) -> Study -> choose_series(study) -> SeriesChoice -> load_series(choice) -> InputImage

NIfTI input::

    load_nifti(input) -> InputImage

then ``Inference.segment(image) -> labels`` (a label :class:`~segmap.volume.Volume` on the image's grid) and
``ResultWriter.write(labels, image)`` (the chosen output format plus ``run_report.json``, committed atomically).

Every value carries the seconds its steps took (``timings_s``), so the report is assembled from what reaches the
writer rather than from state shared between steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from .errors import InputError
from .model import MonetModel, load_model, model_digest
from .settings import Settings
from .tasks import SegmentationTask, load_task
from .validate import check_agreement
from .volume import Volume

log = logging.getLogger("segmap")
#: The picture a person checks the result with (settings.overlay).
OVERLAY_NAME = "overlay.png"
T = TypeVar("T")


def _timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    t = time.perf_counter()
    try:
        return fn()
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


# --------------------------------------------------------------------------------------------- values


@dataclass
class Study:
    """A scanned DICOM input folder (headers only)."""

    scan: Any  # segmap.dicom.loading.DicomScan
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class SeriesChoice:
    """The series chosen for each modality of the task, in task order."""

    selections: dict[str, Any]  # modality key -> segmap.dicom.selection.SeriesSelection
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class InputImage:
    """The model input of one run and where it came from."""

    #: ``[c, z, y, x]`` in the task's (= model's) modality order, on the reference modality's grid.
    volume: Volume
    #: modality key -> the volume as loaded (before resampling onto the reference grid).
    per_modality: dict[str, Volume]
    #: ``"dicom"`` or ``"nifti"``.
    kind: str
    #: DICOM only: the reference series' instance headers in the volume's z order (a DICOM SEG references them).
    reference_datasets: list | None = None
    #: DICOM only: modality key -> segmap.dicom.selection.SeriesSelection.
    selections: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- loading


def detect_input_kind(input_path: Path) -> str:
    """``nifti`` when the input is a NIfTI file or a folder holding one at its top level, else ``dicom``."""
    from .nifti_input import NIFTI_SUFFIXES

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
    from .dicom.loading import scan_dicom_folder

    timings: dict[str, float] = {}
    scan = _timed(timings, "load.scan", lambda: scan_dicom_folder(Path(input_path)))
    return Study(scan, timings)


def choose_series(study: Study, task: SegmentationTask) -> SeriesChoice:
    """One series per modality of the task, chosen by its Rules_Text (see segmap.dicom.selection)."""
    from .dicom.selection import select_for_task

    missing = [m.key for m in task.modalities if not m.rules]
    if missing:
        raise InputError(f"task '{task.name}' modality(ies) {', '.join(missing)} have no Rules_Text, so the task "
                         f"cannot select DICOM series (use NIfTI input)")
    timings = dict(study.timings_s)
    selections = _timed(timings, "load.select",
                        lambda: select_for_task(study.scan, {m.key: m.rules for m in task.modalities}))
    for key, sel in selections.items():
        log.info("modality '%s': series %s (%s, '%s', %d instances) selected by '%s'", key,
                 sel.series.series_instance_uid, sel.series.modality, sel.series.description,
                 len(sel.series.instances), sel.selection_name)
    return SeriesChoice(selections, timings)


def load_series(choice: SeriesChoice, task: SegmentationTask) -> InputImage:
    """Decode the chosen series into volumes and stack them on the reference modality's grid."""
    from .dicom.series_volume import series_to_volume, source_datasets

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

    image = _timed(timings, "load.volume", load)
    image.timings_s = timings
    return image


def load_nifti(input_path: Path, task: SegmentationTask) -> InputImage:
    """Each modality's NIfTI file, found by its File_Pattern, stacked on the reference modality's grid."""
    from .nifti_input import find_modality_files, read_nifti

    timings: dict[str, float] = {}

    def load() -> InputImage:
        volumes = {}
        for key, path in find_modality_files(Path(input_path), task).items():
            volumes[key] = read_nifti(path)
            volumes[key].meta["modality_key"] = key
            _log_volume(key, volumes[key], path.name)
        return InputImage(combine_modalities(volumes, task), volumes, "nifti")

    image = _timed(timings, "load", load)
    image.timings_s = timings
    return image


def load_image(input_path: Path, task: SegmentationTask, kind: str) -> InputImage:
    """The whole loading sequence of one input kind (what the graph's input operators do, in one call)."""
    if kind == "nifti":
        return load_nifti(input_path, task)
    return load_series(choose_series(scan_study(input_path), task), task)


def _log_volume(key: str, volume: Volume, name: str | None = None) -> None:
    log.info("modality '%s': %s%s voxels (z, y, x) at %s mm", key, f"{name}, " if name else "", volume.shape_zyx,
             tuple(round(s, 3) for s in volume.spacing_zyx))


def combine_modalities(volumes: dict[str, Volume], task: SegmentationTask) -> Volume:
    """Stack modalities in task order, resampling each non-reference one onto the reference grid (linear)."""
    from .volume import same_grid

    reference = volumes[task.reference_modality]
    if len(volumes) == 1:
        return reference
    from .dicom.resample import resample_to_reference

    channels = []
    for m in task.modalities:
        v = volumes[m.key]
        if not same_grid(v, reference):
            log.info("resampling modality '%s' onto the grid of '%s'", m.key, task.reference_modality)
            v = resample_to_reference(v, reference, order=1)
        channels.append(v.array[0].astype(np.float32, copy=False))
    return Volume(np.stack(channels), reference.affine.copy(), {**reference.meta, "modalities": task.modality_keys})


# --------------------------------------------------------------------------------------------- model and task


def resolve_model_path(path: Path) -> Path:
    """A model file, fold folder or results folder; a folder holding exactly one of those (a MAP's models/<name>/)
    is entered."""
    from .model import is_results_folder

    def is_model(d: Path) -> bool:
        return (d / "model.ts").exists() or any(d.glob("fold_*/model.ts")) or is_results_folder(d)

    path = Path(path)
    if path.is_dir() and not is_model(path):
        subdirs = [d for d in path.iterdir() if d.is_dir() and is_model(d)]
        if len(subdirs) == 1:
            return subdirs[0]
    return path


def prepare(settings: Settings) -> tuple[MonetModel, SegmentationTask]:
    """Load and cross-check the model and the task (fails before any input is read)."""
    from .settings import validate_settings

    validate_settings(settings)
    task = load_task(settings.task_file, settings.task_name)
    model_path = resolve_model_path(settings.model_path)
    from .model import parse_folds

    model = load_model(model_path, folds=parse_folds(settings.folds), checkpoint=settings.checkpoint)
    check_agreement(task, model.spec, task_source=settings.task_file, model_source=model_path)
    return model, task


class Inference:
    """The model, loaded once onto its device, turning an :class:`InputImage` into a label map on its grid."""

    def __init__(self, model: MonetModel, settings: Settings) -> None:
        from .resources import apply_threads

        self.model = model
        self.settings = settings
        self._segmenter = None
        log.info("using %d CPU thread(s)", apply_threads(settings.threads))

    def segment(self, image: InputImage) -> Volume:
        """The label map ``[1, z, y, x]`` on the image's grid; ``meta`` holds device and timings."""
        from .engine import EngineOptions, Segmenter

        timings: dict[str, float] = {}
        check_memory_for(image, self.model)
        if self._segmenter is None:
            self._segmenter = _timed(timings, "load_model", lambda: Segmenter(self.model, EngineOptions(
                device=self.settings.device, mirroring=self.settings.mirroring, precision=self.settings.precision,
                openvino=self.settings.openvino)))
        labels = _timed(timings, "inference", lambda: self._segmenter.segment(image.volume))
        for k in ("preprocess", "network", "postprocess"):
            timings[f"inference.{k}"] = self._segmenter.timings.get(k, 0.0)
        return Volume(labels.array, labels.affine, {
            "device": str(self._segmenter.device), "timings_s": timings,
            "engine": {"precision": self.settings.precision, "arithmetic": self._segmenter.precision_used,
                       "network_path": self._segmenter.network_path}})


def check_memory_for(image: InputImage, model: MonetModel) -> int:
    """Estimate the run's peak memory (:func:`segmap.engine.memory.peak_memory_for`), log it, and refuse the run
    with :class:`~segmap.errors.MemoryLimitError` when it exceeds the container's memory limit."""
    from .engine.memory import peak_memory_for
    from .resources import check_memory

    shape = image.volume.array.shape
    estimate = peak_memory_for(model.spec, shape, image.volume.spacing_zyx,
                               model_bytes=sum(f.stat().st_size for f in model.fold_files))
    check_memory(estimate, what=f"segmenting a {' x '.join(str(v) for v in shape[1:])} volume")
    return estimate


# --------------------------------------------------------------------------------------------- writing


class ResultWriter:
    """Writes a run's label map in its output format and the run report, all or nothing, into the output folder.

    Owns the run report: it is started when the writer is made (the start of the run) and filled from what
    arrives (the image's provenance and timings, the label map's device and timings).
    """

    def __init__(self, settings: Settings, model: MonetModel, task: SegmentationTask, kind: str) -> None:
        from .outputs.atomic import claim_output_folder
        from .outputs.formats import output_format
        from .outputs.report import RunReport

        self.t0 = time.perf_counter()
        self.umask = settings.umask
        self.format = output_format(settings.output_format, kind)
        self.writer = self.format.make_writer(task, settings)
        self.task = task
        self.overlay = settings.overlay
        self.out_dir = claim_output_folder(settings.output, input_path=settings.input)
        self.report = RunReport(task_name=task.name, task_file=settings.task_file)
        self.report.set_model(model.fold_files, path=settings.model_path, configuration=model.spec.configuration,
                              folds=[f.parent.name for f in model.fold_files])
        from .outputs.report import image_provenance

        files = self.report.model["files"]
        self.report.model["sha256"] = digest = model_digest([f["path"] for f in files], [f["sha256"] for f in files])
        self.report.extra["image"] = image_provenance()
        if hasattr(self.writer, "software_versions"):  # the SEG names the model it came from
            self.writer.software_versions = [self.writer.software_versions[0], f"model sha256:{digest[:16]}"]

    def write(self, labels: Volume, image: InputImage) -> Path:
        """Commit the outputs and the report; returns the report's path."""
        import os

        from .errors import OutputError
        from .outputs.atomic import atomic_outputs
        from .outputs.report import REPORT_NAME, output_identity
        from .resources import apply_umask

        report = self.report
        _record_inputs(report, image)
        report.timings_s.update(image.timings_s)
        report.timings_s.update(labels.meta.get("timings_s", {}))
        report.set_device(labels.meta.get("device"))
        report.extra["engine"] = labels.meta.get("engine")
        report.set_segments(labels.array[0], labels.affine, self.task.segments)
        old_umask = apply_umask(self.umask)  # the outputs hold patient data: 0640 by default; only while writing
        try:
            with atomic_outputs(self.out_dir) as staging:
                with report.stage("write"):
                    path = self.writer.write(labels, image, staging.dir)
                    report.add_output(staging.final_path(path), self.format.name, **output_identity(path))
                    if self.overlay:
                        from .outputs.overlay import write_overlay

                        png = write_overlay(image.volume, labels, self.task.segments, staging.dir / OVERLAY_NAME,
                                            volumes_ml=[s["volume_ml"] for s in report.segments])
                        report.add_output(staging.final_path(png), "overlay-png")
                report.finish("succeeded")
                report.write(staging.dir / REPORT_NAME)
        except (OSError, OutputError) as e:  # disk full, quota, I/O error; atomic_outputs has removed the staging
            reason = _os_error_reason(e)
            if reason is None:
                raise
            raise OutputError(f"{self.out_dir}: cannot write the outputs ({reason})") from e
        finally:
            os.umask(old_umask)
        for seg in report.segments:
            log.info("segment %s: %s voxels, %.1f mL", seg["name"], seg["voxels"], seg["volume_ml"])
        log.info("done in %.1f s: %s", time.perf_counter() - self.t0, ", ".join(str(p) for p in staging.committed))
        return self.out_dir / REPORT_NAME


def _os_error_reason(error: BaseException) -> str | None:
    """The system's words for the first errno along an exception's chain ("No space left on device"), or None.
    Writers wrap OSErrors (pydicom as "With tag ... got exception: [Errno 28] ..."); the user needs the reason."""
    import os

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.strerror or os.strerror(e.errno)
        e = e.__cause__ or e.__context__
    return None


def _record_inputs(report, image: InputImage) -> None:
    from .outputs.report import input_notes

    for key, vol in image.per_modality.items():
        details = {"shape_zyx": list(vol.shape_zyx), "spacing_zyx": [round(s, 4) for s in vol.spacing_zyx],
                   **input_notes(vol.meta)}
        sel = image.selections.get(key)
        if sel is not None:
            report.add_input(key, files=vol.meta.get("source_paths", []), datasets=sel.series.datasets,
                             selected_by=sel.selection_name, passed_over=list(sel.passed_over), **details)
        else:
            report.add_input(key, files=vol.meta.get("source_files", []), **details)


def run(settings: Settings) -> Path:
    """One complete run; returns the path of the run report (of ``run_summary.json`` for a DICOM input of several
    studies, see :func:`run_studies`). Nothing is written unless the run (the study) succeeds."""
    kind = input_kind(settings)
    model, task = prepare(settings)
    writer = ResultWriter(settings, model, task, kind)
    inference = Inference(model, settings)
    if kind == "dicom":
        return run_studies(scan_study(settings.input), settings, model, task, writer, inference)
    image = load_image(settings.input, task, kind)
    return writer.write(inference.segment(image), image)


def study_settings(settings: Settings, folder: Path) -> Settings:
    """The settings of one study of a multi-study input, written into ``folder`` (``study-<hash>``): a ``uid_seed``
    is made per study, or every study's SEG would carry the same UIDs and a receiver would keep only one."""
    seed = f"{settings.uid_seed}/{Path(folder).name}" if settings.uid_seed else None
    return settings.with_values(output=folder, uid_seed=seed)


def run_studies(study: Study, settings: Settings, model: MonetModel, task: SegmentationTask, writer: ResultWriter,
                inference: Inference) -> Path:
    """A DICOM input study by study (:mod:`segmap.dicom.studies`): one study is written with ``writer`` at the top
    of the output folder as always; several go into ``study-<hash>/`` subfolders, each with its own report, then
    ``run_summary.json``; any failed study ends the run with one line (exit code 2) after the others are done."""
    from .dicom.studies import process_studies, raise_if_any_failed, write_summary

    def one(scan, folder: Path) -> Path:
        study_writer = writer if folder == writer.out_dir else \
            ResultWriter(study_settings(settings, folder), model, task, "dicom")
        image = load_series(choose_series(Study(scan, dict(study.timings_s)), task), task)
        return study_writer.write(inference.segment(image), image)

    results = process_studies(study.scan, writer.out_dir, one)
    if len(results) == 1:
        return results[0].report
    summary = write_summary(results, writer.out_dir)
    raise_if_any_failed(results)
    return summary
