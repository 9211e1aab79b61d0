"""The steps of a segmap run as plain functions: the Holoscan operators in ``operators/`` wrap these, and
``segmap run`` calls them in sequence, so the container and the command line give the same result.

load (NIfTI by File_Pattern, or DICOM: scan -> select series by Rules_Text -> volume) -> put every modality on
the reference modality's grid -> nnU-Net inference -> write the label map (NIfTI) or a DICOM SEG -> run report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, SegmapError
from .model import MonetModel, load_model
from .tasks import SegmentationTask, load_task
from .validate import check_agreement
from .volume import Volume

log = logging.getLogger("segmap")

NIFTI_OUTPUT = "segmentation.nii.gz"
SEG_OUTPUT = "segmentation.dcm"
REPORT = "run_report.json"


@dataclass
class RunOptions:
    model: Path
    task: Path
    input: Path
    output: Path
    task_name: str | None = None
    #: "dicom", "nifti" or "auto" (dicom unless the input is or holds NIfTI files).
    variant: str = "auto"
    device: str = "auto"
    mirroring: bool = False
    omit_empty_frames: bool = False


@dataclass
class Inputs:
    """What was loaded for one run: the stacked model input and where it came from."""

    #: ``[c, z, y, x]`` in the task's (= model's) modality order, on the reference modality's grid.
    volume: Volume
    #: modality key -> the volume as loaded (before resampling onto the reference grid).
    per_modality: dict[str, Volume]
    variant: str
    #: DICOM only: the reference series' instance headers in the volume's z order (the SEG references them).
    reference_datasets: list | None = None
    #: DICOM only: modality key -> segmap.dicom.selection.SeriesSelection.
    selections: dict[str, Any] = field(default_factory=dict)


def detect_variant(input_path: Path) -> str:
    """``nifti`` when the input is a NIfTI file or a folder holding one at its top level, else ``dicom``."""
    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError(f"input {input_path} does not exist")
    from .nifti_input import NIFTI_SUFFIXES

    if input_path.is_file():
        return "nifti" if input_path.name.endswith(NIFTI_SUFFIXES) else "dicom"
    if any(p.name.endswith(NIFTI_SUFFIXES) for p in input_path.iterdir() if p.is_file()):
        return "nifti"
    return "dicom"


def load_nifti_inputs(input_path: Path, task: SegmentationTask) -> Inputs:
    from .nifti_input import find_modality_files, read_nifti

    files = find_modality_files(input_path, task)
    volumes = {}
    for key, path in files.items():
        volumes[key] = read_nifti(path)
        volumes[key].meta["modality_key"] = key
        log.info("modality '%s': %s, %s voxels (z, y, x) at %s mm", key, path.name, volumes[key].shape_zyx,
                 tuple(round(s, 3) for s in volumes[key].spacing_zyx))
    return Inputs(combine_modalities(volumes, task), volumes, "nifti")


def select_dicom_series(scan, task: SegmentationTask) -> dict:
    """One series per modality of the task, chosen by its Rules_Text (see segmap.dicom.selection)."""
    from .dicom.selection import select_for_task

    missing = [m.key for m in task.modalities if not m.rules]
    if missing:
        raise InputError(f"task '{task.name}' modality(ies) {', '.join(missing)} have no Rules_Text, so the task "
                         f"cannot select DICOM series (use the NIfTI variant)")
    selections = select_for_task(scan, {m.key: m.rules for m in task.modalities})
    for key, sel in selections.items():
        log.info("modality '%s': series %s (%s, '%s', %d instances) selected by '%s'", key,
                 sel.series.series_instance_uid, sel.series.modality, sel.series.description,
                 len(sel.series.instances), sel.selection_name)
    return selections


def dicom_inputs(selections: dict, task: SegmentationTask) -> Inputs:
    """Decode the selected series into volumes and stack them on the reference modality's grid."""
    from .dicom.series_volume import series_to_volume, source_datasets

    volumes = {}
    for key, sel in selections.items():
        volumes[key] = series_to_volume(sel.series)
        volumes[key].meta["modality_key"] = key
        log.info("modality '%s': %s voxels (z, y, x) at %s mm", key, volumes[key].shape_zyx,
                 tuple(round(s, 3) for s in volumes[key].spacing_zyx))
    ref = task.reference_modality
    datasets = source_datasets(selections[ref].series, volumes[ref])
    return Inputs(combine_modalities(volumes, task), volumes, "dicom", datasets, selections)


def load_dicom_inputs(input_path: Path, task: SegmentationTask) -> Inputs:
    from .dicom.loading import scan_dicom_folder

    return dicom_inputs(select_dicom_series(scan_dicom_folder(input_path), task), task)


def combine_modalities(volumes: dict[str, Volume], task: SegmentationTask) -> Volume:
    """Stack modalities in task order, resampling each non-reference one onto the reference grid (linear)."""
    reference = volumes[task.reference_modality]
    if len(volumes) == 1:
        return reference
    from .dicom.resample import resample_to_reference

    channels = []
    for m in task.modalities:
        v = volumes[m.key]
        if v.shape_zyx != reference.shape_zyx or not np.allclose(v.affine, reference.affine, atol=1e-3):
            log.info("resampling modality '%s' onto the grid of '%s'", m.key, task.reference_modality)
            v = resample_to_reference(v, reference, order=1)
        channels.append(v.array[0].astype(np.float32, copy=False))
    return Volume(np.stack(channels), reference.affine.copy(), {**reference.meta, "modalities": task.modality_keys})


def load_inputs(input_path: Path, task: SegmentationTask, variant: str = "auto") -> Inputs:
    variant = detect_variant(input_path) if variant == "auto" else variant
    if variant == "nifti":
        return load_nifti_inputs(input_path, task)
    if variant == "dicom":
        return load_dicom_inputs(input_path, task)
    raise SegmapError(f"unknown variant '{variant}' (use dicom, nifti or auto)")


def write_outputs(staging_dir: Path, labels: np.ndarray, inputs: Inputs, task: SegmentationTask, *,
                  omit_empty_frames: bool = False, algorithm_version: str | None = None) -> list[tuple[Path, str]]:
    """Write the label map as NIfTI (nifti variant) or DICOM SEG (dicom variant) into ``staging_dir``."""
    if inputs.variant == "nifti":
        from .outputs.nifti import write_label_nifti

        path = write_label_nifti(labels, inputs.volume.affine, Path(staging_dir) / NIFTI_OUTPUT,
                                 source_header=inputs.volume.meta.get("nifti_header"))
        return [(path, "nifti")]
    from .outputs.seg import write_seg

    path = write_seg(labels, inputs.reference_datasets, task.segments, Path(staging_dir) / SEG_OUTPUT,
                     omit_empty_frames=omit_empty_frames)
    return [(path, "dicom-seg")]


def record_inputs(report, inputs: Inputs) -> None:
    from .outputs.report import input_notes

    for key, vol in inputs.per_modality.items():
        details = {"shape_zyx": list(vol.shape_zyx), "spacing_zyx": [round(s, 4) for s in vol.spacing_zyx],
                   **input_notes(vol.meta)}
        sel = inputs.selections.get(key)
        if sel is not None:
            report.add_input(key, files=vol.meta.get("source_paths", []), datasets=sel.series.datasets,
                             selected_by=sel.selection_name, passed_over=list(sel.passed_over), **details)
        else:
            report.add_input(key, files=vol.meta.get("source_files", []), **details)


def resolve_model_path(path: Path) -> Path:
    """A model file or fold folder; a folder holding exactly one model folder (a MAP's models/<name>/) is entered."""
    path = Path(path)
    if path.is_dir() and not (path / "model.ts").exists() and not any(path.glob("fold_*/model.ts")):
        subdirs = [d for d in path.iterdir() if d.is_dir() and ((d / "model.ts").exists() or any(d.glob("fold_*/model.ts")))]
        if len(subdirs) == 1:
            return subdirs[0]
    return path


def prepare(model_path: Path, task_path: Path, task_name: str | None) -> tuple[MonetModel, SegmentationTask]:
    """Load and cross-check the model and the task (fails before any input is read)."""
    task = load_task(task_path, task_name)
    model = load_model(resolve_model_path(model_path))
    check_agreement(task, model.spec, task_source=task_path, model_source=model_path)
    return model, task


class Run:
    """One run's state, shared by the steps (and by the application's operators)."""

    def __init__(self, opts: RunOptions) -> None:
        from .outputs.atomic import claim_output_folder
        from .outputs.report import RunReport

        self.t0 = time.perf_counter()
        self.opts = opts
        self.model, self.task = prepare(opts.model, opts.task, opts.task_name)
        self.out_dir = claim_output_folder(opts.output, input_path=opts.input)
        self.report = RunReport(task_name=self.task.name, task_file=opts.task)
        self.report.set_model(self.model.fold_files, path=opts.model, configuration=self.model.spec.configuration,
                              folds=[f.parent.name for f in self.model.fold_files])
        self.segmenter = None
        self.error: SegmapError | None = None
        self.report_path: Path | None = None

    @property
    def variant(self) -> str:
        return detect_variant(self.opts.input) if self.opts.variant == "auto" else self.opts.variant

    def segment(self, inputs: Inputs) -> np.ndarray:
        from .engine import EngineOptions, Segmenter

        record_inputs(self.report, inputs)
        if self.segmenter is None:
            with self.report.stage("load_model"):
                self.segmenter = Segmenter(self.model, EngineOptions(device=self.opts.device,
                                                                     mirroring=self.opts.mirroring))
            self.report.set_device(str(self.segmenter.device))
        with self.report.stage("inference"):
            labels = self.segmenter.predict(inputs.volume.array, inputs.volume.spacing_zyx)
        for k in ("preprocess", "network", "postprocess"):
            self.report.timings_s[f"inference.{k}"] = self.segmenter.timings.get(k, 0.0)
        return labels

    def finish(self, labels: np.ndarray, inputs: Inputs) -> Path:
        """Write the outputs and the report atomically; returns the report's path."""
        from .outputs.atomic import atomic_outputs

        self.report.set_segments(labels, inputs.volume.affine, self.task.segments)
        with atomic_outputs(self.out_dir) as staging:
            with self.report.stage("write"):
                for path, kind in write_outputs(staging.dir, labels, inputs, self.task,
                                                omit_empty_frames=self.opts.omit_empty_frames):
                    self.report.add_output(staging.final_path(path), kind)
            self.report.finish("succeeded")
            self.report.write(staging.dir / REPORT)
        for seg in self.report.segments:
            log.info("segment %s: %s voxels, %.1f mL", seg["name"], seg["voxels"], seg["volume_ml"])
        log.info("done in %.1f s: %s", time.perf_counter() - self.t0,
                 ", ".join(str(p) for p in staging.committed))
        self.report_path = self.out_dir / REPORT
        return self.report_path


def run(opts: RunOptions) -> Path:
    """One complete run; returns the path of the run report. Nothing is written unless the run succeeds."""
    state = Run(opts)
    with state.report.stage("load"):
        inputs = load_inputs(Path(opts.input), state.task, state.variant)
    labels = state.segment(inputs)
    return state.finish(labels, inputs)
