"""The portal's one door into a segmap run: the same steps as ``segmap run``, with the model kept loaded.

Every import of the run's steps (``prepare``, ``scan_study``, ``choose_series``, ``load_series``, ``load_nifti``,
``Inference``, ``ResultWriter``) is in this module, so that moving those steps means changing these imports only.
Nothing here copies a rule of the run: a DICOM folder goes through the task's series selection, the label map comes
from the same engine, and the NIfTI label map and the DICOM SEG from the same writers, so the portal's result equals
``segmap run``'s for the same input, voxel for voxel.

A :class:`WarmModel` loads one configured model once (:func:`prepare` plus an :class:`Inference` whose networks stay
on the device) and answers requests with it; it is used from one thread at a time (the portal's device slot).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, SegmapError
from ..outputs.atomic import release_output_folder
from ..outputs.report import REPORT_NAME
from ..run import Inference, InputImage, ResultWriter, choose_series, load_nifti, load_series, prepare, scan_study
from ..settings import Settings, resolve
from ..text import first_line
from ..volume import Volume
from .config import ModelConfig

log = logging.getLogger("segmap.portal")

#: The file formats of a result, by the portal's name for them.
NIFTI, DICOM_SEG = "nifti", "dicom-seg"


@dataclass
class Result:
    """What one inference produced: output files by format, the label map's segments and the stage timings."""

    files: dict[str, Path]
    segments: list[dict[str, Any]]
    timings_s: dict[str, float] = field(default_factory=dict)
    #: DICOM input: the series the task's rules chose (SeriesInstanceUID), per modality key.
    series: dict[str, str] = field(default_factory=dict)


def model_settings(cfg: ModelConfig) -> Settings:
    """The ``segmap run`` settings of one configured model (the configuration file only; not the environment)."""
    return resolve({"models": cfg.model, "task_file": cfg.task, "task_name": cfg.task_name, **cfg.settings}, env={})


class WarmModel:
    """One configured model, loaded and checked against its task once, networks kept on the device."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.settings = model_settings(cfg)
        self.model, self.task = prepare(self.settings)
        self.inference = Inference(self.model, self.settings)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def device(self) -> str:
        return self.settings.device

    # ------------------------------------------------------------------------------------------- description

    def info(self) -> dict[str, Any]:
        """The model in the shape MONAI Label's ``/info/`` gives each model, plus MONet's bundle metadata."""
        spec, task = self.model.spec, self.task
        labels = {seg.label: value for seg, (value, _) in zip(task.segments, spec.foreground_labels)}
        colours = {seg.label: list(seg.color_rgb) for seg in task.segments if seg.color_rgb is not None}
        metadata = dict(spec.metadata)
        network_format = metadata.get("network_data_format") or {}
        metadata.setdefault("inputs", network_format.get("inputs", {}))
        metadata.setdefault("outputs", network_format.get("outputs", {}))
        return {
            "type": "segmentation",
            "labels": labels,
            "label_colors": colours,
            "dimension": 3,
            "description": self.cfg.description or str(metadata.get("description") or task.name),
            "config": {"task": task.name, "modalities": list(task.modality_keys), "device": self.device},
            "metadata": metadata,
        }

    # ------------------------------------------------------------------------------------------- requests

    def warm_up(self) -> float:
        """Run the network once on an empty patch so that the first request finds everything loaded; seconds."""
        t = time.perf_counter()
        spec = self.model.spec
        zyx = [spec.patch_size[spec.transpose_backward[i]] for i in range(3)]
        spacing_zyx = [spec.target_spacing[spec.transpose_backward[i]] for i in range(3)]
        affine = np.diag([*spacing_zyx[::-1], 1.0])
        channels = np.zeros((len(self.task.modalities), *zyx), np.float32)
        volume = Volume(channels, affine, {"modalities": list(self.task.modality_keys)})
        self.inference.segment(InputImage(volume, {m.key: volume for m in self.task.modalities}, "warm-up"))
        return time.perf_counter() - t

    def segment_nifti(self, path: Path, work_dir: Path) -> Result:
        """A NIfTI image (one modality task: the file; several: a folder matched by File_Pattern) -> label map."""
        t = time.perf_counter()
        try:
            image = load_nifti(path, self.task)
        except SegmapError:
            raise
        except Exception as e:  # nibabel's many ways of saying "not a NIfTI file"
            raise InputError(f"the uploaded image is not a readable NIfTI file ({first_line(e)})") from None
        load_s = time.perf_counter() - t
        return self._segment(image, path, work_dir, [NIFTI], {"load": load_s})

    def segment_dicom(self, folder: Path, work_dir: Path, formats: list[str]) -> Result:
        """A folder of DICOM files (one study) -> the task's series chosen by its rules -> SEG and/or label map."""
        t = time.perf_counter()
        image = load_series(choose_series(scan_study(folder), self.task), self.task)
        load_s = time.perf_counter() - t
        result = self._segment(image, folder, work_dir, formats, {"load": load_s})
        result.series = {key: sel.series.series_instance_uid for key, sel in image.selections.items()}
        return result

    def _segment(self, image: InputImage, source: Path, work_dir: Path, formats: list[str],
                 timings: dict[str, float]) -> Result:
        t = time.perf_counter()
        labels = self.inference.segment(image)
        timings["inference"] = time.perf_counter() - t
        t = time.perf_counter()
        files: dict[str, Path] = {}
        segments: list[dict[str, Any]] = []
        for fmt in formats:
            out = work_dir / fmt
            # The model's own settings otherwise (overlay.png too, when the configuration leaves it on).
            settings = self.settings.with_values(input=source, output=out, output_format=fmt)
            writer = ResultWriter(settings, self.model, self.task, image.kind)
            try:
                writer.write(labels, image)
            finally:
                release_output_folder(writer.out_dir)
            files[fmt] = _output_file(writer.out_dir, fmt)
            segments = writer.report.segments
        timings["write"] = time.perf_counter() - t
        return Result(files, segments, timings)


def _output_file(out_dir: Path, fmt: str) -> Path:
    """The one output file of a format in a committed output folder (read from its run report)."""
    import json

    report = json.loads((out_dir / REPORT_NAME).read_text())
    for output in report.get("outputs", []):
        if output.get("kind") == fmt:
            path = Path(output["path"])
            return path if path.is_absolute() else out_dir / path
    raise SegmapError(f"{out_dir}: the run report lists no {fmt} output")
