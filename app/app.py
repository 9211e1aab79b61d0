"""segmap's MONAI Deploy application: DICOM study -> DICOM SEG, or NIfTI -> NIfTI label map.

Run as ``python -m app`` from the repository, or as ``python3 /opt/holoscan/app`` inside a MAP. Paths come from
``-i/-o/-m`` or the ``HOLOSCAN_*`` environment (flags win); the variant, the task file and the task name come from
the app configuration (``app.yaml`` or ``HOLOSCAN_CONFIG_PATH``); runtime settings can be overridden with
``SEGMAP_*`` environment variables (see ``app/config.py``).
"""

from __future__ import annotations

import logging
import sys

from monai.deploy.core import Application
from holoscan.conditions import CountCondition

from operators import (
    DicomLoaderOperator,
    DicomSegWriterOperator,
    NiftiLoaderOperator,
    NiftiWriterOperator,
    NnunetInferenceOperator,
    SeriesSelectorOperator,
    SeriesToVolumeOperator,
)
from segmap.errors import SegmapError
from segmap.pipeline import Run

from .config import AppSettings, load_settings

log = logging.getLogger("segmap.app")


class SegmapApp(Application):
    """load -> select series -> volume -> nnU-Net inference -> DICOM SEG (or NIfTI -> inference -> NIfTI)."""

    def __init__(self, settings: AppSettings, run: Run, *args, **kwargs):
        self.settings = settings
        self.run_state = run
        super().__init__(*args, **kwargs)

    def compose(self):
        run = self.run_state
        infer = NnunetInferenceOperator(self, run=run, name="nnunet_inference")
        if self.settings.variant == "dicom":
            scan = DicomLoaderOperator(self, CountCondition(self, 1), run=run, name="dicom_loader")
            select = SeriesSelectorOperator(self, run=run, name="series_selector")
            volume = SeriesToVolumeOperator(self, run=run, name="series_to_volume")
            write = DicomSegWriterOperator(self, run=run, name="dicom_seg_writer")
            self.add_flow(scan, select, {("out", "in")})
            self.add_flow(select, volume, {("out", "in")})
            self.add_flow(volume, infer, {("out", "in")})
        else:
            load = NiftiLoaderOperator(self, CountCondition(self, 1), run=run, name="nifti_loader")
            write = NiftiWriterOperator(self, run=run, name="nifti_writer")
            self.add_flow(load, infer, {("out", "in")})
        self.add_flow(infer, write, {("out", "in")})


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        settings.configure_logging()
        log.info("segmap %s variant: input %s, output %s, model %s, task %s%s", settings.variant,
                 settings.options.input, settings.options.output, settings.options.model, settings.options.task,
                 f" ({settings.options.task_name})" if settings.options.task_name else "")
        run = Run(settings.options)
        if run.variant != settings.variant and settings.options.variant != "auto":
            log.warning("input looks like %s but the application is the %s variant", run.variant, settings.variant)
        SegmapApp(settings, run).run()
        if run.error is not None:
            raise run.error
        if run.report_path is None:
            raise SegmapError("the graph finished without writing outputs (see the log above)")
        return 0
    except SegmapError as e:
        print(f"segmap: error: {e}", file=sys.stderr)
        return e.exit_code
