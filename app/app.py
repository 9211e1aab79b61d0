"""segmap's MONAI Deploy application: a DICOM study or NIfTI image in, a label map in the chosen format out.

Run as ``python -m app`` from the repository, or as ``python3 /opt/holoscan/app`` inside a MAP. Paths come from
``-i/-o/-m`` or the ``HOLOSCAN_*`` environment (flags win); every other setting from ``SEGMAP_*`` variables, the
``segmap:`` section of the app configuration (``app.yaml`` or ``HOLOSCAN_CONFIG_PATH``), or its default
(``segmap.settings`` declares them all).
"""

from __future__ import annotations

import logging
import sys

from holoscan.conditions import CountCondition
from monai.deploy.core import Application

from operators import (
    DicomScanOperator,
    NiftiLoaderOperator,
    NnunetInferenceOperator,
    Outcome,
    ResultWriterOperator,
    SeriesSelectorOperator,
    SeriesToVolumeOperator,
)
from segmap.errors import SegmapError
from segmap.logs import configure_logging
from segmap.model import MonetModel
from segmap.pipeline import ResultWriter, Study, input_kind, prepare, scan_study, study_settings
from segmap.settings import Settings
from segmap.tasks import SegmentationTask

from .config import load_settings

log = logging.getLogger("segmap.app")


class SegmapApp(Application):
    """DICOM: scan -> select series -> image; NIfTI: load -> image. Then image -> inference -> labels, and
    labels + image -> writer (the output format and the run report)."""

    def __init__(self, *args, settings: Settings, kind: str, model: MonetModel, task: SegmentationTask,
                 writer: ResultWriter, outcome: Outcome, study: Study | None = None, **kwargs):
        self.settings, self.kind, self.model, self.task = settings, kind, model, task
        self.writer, self.outcome, self.study = writer, outcome, study
        super().__init__(*args, **kwargs)

    def compose(self):
        once, outcome = CountCondition(self, 1), self.outcome
        if self.kind == "dicom":
            scan = DicomScanOperator(self, once, input_path=self.settings.input, study=self.study, outcome=outcome,
                                     name="dicom_scan")
            select = SeriesSelectorOperator(self, task=self.task, outcome=outcome, name="series_selector")
            load = SeriesToVolumeOperator(self, task=self.task, outcome=outcome, name="series_to_volume")
            self.add_flow(scan, select, {("study", "study")})
            self.add_flow(select, load, {("series", "series")})
        else:
            load = NiftiLoaderOperator(self, once, input_path=self.settings.input, task=self.task, outcome=outcome,
                                       name="nifti_loader")
        infer = NnunetInferenceOperator(self, model=self.model, settings=self.settings, outcome=outcome,
                                        name="nnunet_inference")
        write = ResultWriterOperator(self, writer=self.writer, outcome=outcome, name="result_writer")
        self.add_flow(load, infer, {("image", "image")})
        self.add_flow(infer, write, {("labels", "labels")})
        self.add_flow(load, write, {("image", "image")})


def _run_graph(settings: Settings, kind: str, model: MonetModel, task: SegmentationTask, writer: ResultWriter,
               study: Study | None = None):
    outcome = Outcome()
    SegmapApp(settings=settings, kind=kind, model=model, task=task, writer=writer, outcome=outcome,
              study=study).run()
    if outcome.error is not None:
        raise outcome.error
    if outcome.report is None:
        raise SegmapError("the graph finished without writing outputs (see the log above)")
    return outcome.report


def _run_studies(settings: Settings, model: MonetModel, task: SegmentationTask, writer: ResultWriter) -> None:
    """A DICOM input study by study (segmap.dicom.studies): the graph runs once per study, into the output folder
    itself for a single study and into its ``study-<hash>/`` folder otherwise (then ``run_summary.json``)."""
    from segmap.dicom.studies import process_studies, raise_if_any_failed, write_summary

    study = scan_study(settings.input)

    def one(scan, folder):
        study_writer = writer if folder == writer.out_dir else \
            ResultWriter(study_settings(settings, folder), model, task, "dicom")
        return _run_graph(settings, "dicom", model, task, study_writer, Study(scan, dict(study.timings_s)))

    results = process_studies(study.scan, writer.out_dir, one)
    if len(results) > 1:
        write_summary(results, writer.out_dir)
        raise_if_any_failed(results)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        configure_logging(settings.log_level)
        kind = input_kind(settings)
        log.info("segmap: %s input %s -> %s output %s; model %s, task %s%s", kind, settings.input,
                 settings.output_format, settings.output, settings.model_path, settings.task_file,
                 f" ({settings.task_name})" if settings.task_name else "")
        model, task = prepare(settings)
        writer = ResultWriter(settings, model, task, kind)
        if kind == "dicom":
            _run_studies(settings, model, task, writer)
        else:
            _run_graph(settings, kind, model, task, writer)
        return 0
    except SegmapError as e:
        print(f"segmap: error: {e}", file=sys.stderr)
        return e.exit_code
