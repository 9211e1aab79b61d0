"""The output operator: ``labels`` + ``image`` -> the output format's files and the run report, all or nothing."""

from __future__ import annotations

from typing import Any

from segmap.run import ResultWriter

from .base import StepOperator


class ResultWriterOperator(StepOperator):
    """Writes the label map with its writer (DICOM SEG, NIfTI, ... see ``segmap.outputs.formats``) and the report."""

    inputs = ("labels", "image")

    def __init__(self, fragment, *args: Any, writer: ResultWriter, **kwargs: Any) -> None:
        self.writer = writer
        super().__init__(fragment, *args, **kwargs)

    def step(self, labels, image):
        self.outcome.succeed(self.writer.write(labels, image))
