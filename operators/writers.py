"""The output operator: ``labels`` + ``image`` -> the output format's files and the run report, all or nothing."""

from __future__ import annotations

from segmap.run import ResultWriter

from .base import StepOperator


class ResultWriterOperator(StepOperator):
    """Writes the label map with its ``writer`` (a :class:`segmap.run.ResultWriter`: DICOM SEG, NIfTI, ... see
    ``segmap.outputs.formats``) and the report."""

    inputs = ("labels", "image")
    bound = ("writer",)
    writer: ResultWriter

    def step(self, labels, image):
        self.outcome.succeed(self.writer.write(labels, image))
