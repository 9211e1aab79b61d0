"""The end of a run: the label map in its output format, the overlay and the run report, all or nothing."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .. import __version__
from ..errors import OutputError
from ..model import MonetModel, model_digest
from ..outputs.atomic import atomic_outputs, claim_output_folder
from ..outputs.formats import Provenance, output_format
from ..outputs.overlay import OVERLAY_NAME, write_overlay
from ..outputs.report import REPORT_NAME, RunReport, image_provenance, input_notes, output_identity
from ..settings import Settings
from ..tasks import SegmentationTask
from ..volume import Volume
from .host import patient_data_umask
from .values import InputImage

log = logging.getLogger("segmap")


class ResultWriter:
    """Writes a run's label map in its output format and the run report, all or nothing, into the output folder.

    Owns the run report: it is started when the writer is made (the start of the run) and filled from what
    arrives (the image's provenance and timings, the label map's device and timings). Making the writer claims
    the output folder (:func:`segmap.outputs.atomic.claim_output_folder`).
    """

    def __init__(self, settings: Settings, model: MonetModel, task: SegmentationTask, kind: str) -> None:
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
        files = self.report.model["files"]
        self.report.model["sha256"] = digest = model_digest([f["path"] for f in files], [f["sha256"] for f in files])
        self.report.extra["image"] = image_provenance()
        self.provenance = Provenance(__version__, digest)

    def write(self, labels: Volume, image: InputImage) -> Path:
        """Commit the outputs and the report; returns the report's path."""
        report = self.report
        record_inputs(report, image)
        report.timings_s.update(image.timings_s)
        report.timings_s.update(labels.meta.get("timings_s", {}))
        report.set_device(labels.meta.get("device"))
        report.extra["engine"] = labels.meta.get("engine")
        report.set_segments(labels.array[0], labels.affine, self.task.segments)
        try:
            with patient_data_umask(self.umask), \
                    atomic_outputs(self.out_dir, commit_last=(REPORT_NAME,)) as staging:
                with report.stage("write"):
                    path = self.writer.write(labels, image, staging.dir, self.provenance)
                    report.add_output(staging.final_path(path), self.format.name, **output_identity(path))
                    if self.overlay:
                        png = write_overlay(image.volume, labels, self.task.segments, staging.dir / OVERLAY_NAME,
                                            volumes_ml=[s["volume_ml"] for s in report.segments])
                        report.add_output(staging.final_path(png), "overlay-png")
                report.finish("succeeded")
                report.write(staging.dir / REPORT_NAME)
        except (OSError, OutputError) as e:  # disk full, quota, I/O error; atomic_outputs has removed the staging
            reason = os_error_reason(e)
            if reason is None:
                raise
            raise OutputError(f"{self.out_dir}: cannot write the outputs ({reason})") from e
        for seg in report.segments:
            log.info("segment %s: %s voxels, %.1f mL", seg["name"], seg["voxels"], seg["volume_ml"])
        log.info("done in %.1f s: %s", time.perf_counter() - self.t0, ", ".join(str(p) for p in staging.committed))
        return self.out_dir / REPORT_NAME


def os_error_reason(error: BaseException) -> str | None:
    """The system's words for the first errno along an exception's chain ("No space left on device"), or None.
    Writers wrap OSErrors (pydicom as "With tag ... got exception: [Errno 28] ..."); the user needs the reason."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.strerror or os.strerror(e.errno)
        e = e.__cause__ or e.__context__
    return None


def record_inputs(report: RunReport, image: InputImage) -> None:
    """Each modality's input in the report: files, grid, noted volume facts and, for DICOM, how it was chosen."""
    for key, vol in image.per_modality.items():
        details = {"shape_zyx": list(vol.shape_zyx), "spacing_zyx": [round(s, 4) for s in vol.spacing_zyx],
                   **input_notes(vol.meta)}
        sel = image.selections.get(key)
        if sel is not None:
            report.add_input(key, files=vol.meta.get("source_paths", []), datasets=sel.series.datasets,
                             selected_by=sel.selection_name, passed_over=list(sel.passed_over), **details)
        else:
            report.add_input(key, files=vol.meta.get("source_files", []), **details)
