"""segmap's MONAI Deploy application: a DICOM study or NIfTI image in, a label map in the chosen format out.

Run as ``python -m app`` from the repository, or as ``python3 /opt/holoscan/app`` inside a MAP. Paths come from
``-i/-o/-m`` or the ``HOLOSCAN_*`` environment (flags win); every other setting from ``SEGMAP_*`` variables, the
``segmap:`` section of the app configuration (``app.yaml`` or ``HOLOSCAN_CONFIG_PATH``), or its default
(``segmap.settings`` declares them all).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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
from segmap.run import ResultWriter, RunContext, Study, input_kind, run_input, start

from .config import load_settings

log = logging.getLogger("segmap.app")


class SegmapApp(Application):
    """DICOM: study -> select series -> image; NIfTI: load -> image. Then image -> inference -> labels, and
    labels + image -> writer (the output format and the run report).

    One graph takes one image (one study of a DICOM input) through; the run's :class:`~segmap.run.RunContext` (the
    task, the networks loaded once) is shared by the graphs of all the studies of an input (:func:`run_graph`).
    """

    def __init__(self, *args, context: RunContext, writer: ResultWriter, outcome: Outcome,
                 study: Study | None = None, **kwargs):
        self.context, self.writer, self.outcome, self.study = context, writer, outcome, study
        super().__init__(*args, **kwargs)

    def compose(self):
        once, outcome, task = CountCondition(self, 1), self.outcome, self.context.task
        if self.context.kind == "dicom":
            scan = DicomScanOperator(self, once, study=self.study, outcome=outcome, name="dicom_scan")
            select = SeriesSelectorOperator(self, task=task, outcome=outcome, name="series_selector")
            load = SeriesToVolumeOperator(self, task=task, outcome=outcome, name="series_to_volume")
            self.add_flow(scan, select, {("study", "study")})
            self.add_flow(select, load, {("series", "series")})
        else:
            load = NiftiLoaderOperator(self, once, input_path=self.context.settings.input, task=task,
                                       outcome=outcome, name="nifti_loader")
        infer = NnunetInferenceOperator(self, inference=self.context.inference, outcome=outcome,
                                        name="nnunet_inference")
        write = ResultWriterOperator(self, writer=self.writer, outcome=outcome, name="result_writer")
        self.add_flow(load, infer, {("image", "image")})
        self.add_flow(infer, write, {("labels", "labels")})
        self.add_flow(load, write, {("image", "image")})


def run_graph(context: RunContext, study: Study | None, writer: ResultWriter) -> Path:
    """One image through the graph (the :data:`segmap.run.orchestration.ImageRunner` of the application)."""
    outcome = Outcome()
    SegmapApp(context=context, writer=writer, outcome=outcome, study=study).run()
    if outcome.error is not None:
        raise outcome.error
    if outcome.report is None:
        raise SegmapError("the graph finished without writing outputs (see the log above)")
    return outcome.report


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        configure_logging(settings.log_level)
        log.info("segmap: %s input %s -> %s output %s; model %s, task %s%s", input_kind(settings), settings.input,
                 settings.output_format, settings.output, settings.model_path, settings.task_file,
                 f" ({settings.task_name})" if settings.task_name else "")
        run_input(start(settings), run_graph)
        return 0
    except SegmapError as e:
        print(f"segmap: error: {e}", file=sys.stderr)
        return e.exit_code
