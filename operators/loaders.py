"""Input operators: DICOM study -> series selection -> image, and NIfTI loading by File_Pattern."""

from __future__ import annotations

from pathlib import Path

from segmap.run import Study, choose_series, load_nifti, load_series
from segmap.tasks import SegmentationTask

from .base import StepOperator


class DicomScanOperator(StepOperator):
    """Source: emits ``study``, the headers of every DICOM file of one study, grouped by series.

    The input folder is scanned, and split by study, before the graph runs (:func:`segmap.run.run_input`): the
    graph takes one study of the input through, and the next study gets a graph of its own.
    """

    output = "study"
    bound = ("study",)
    study: Study

    def step(self):
        return self.study


class SeriesSelectorOperator(StepOperator):
    """``study`` -> ``series``: one series per modality of the task, chosen by its Rules_Text."""

    inputs = ("study",)
    output = "series"
    bound = ("task",)
    task: SegmentationTask

    def step(self, study):
        return choose_series(study, self.task)


class SeriesToVolumeOperator(StepOperator):
    """``series`` -> ``image``: decodes the chosen series and stacks the modalities on the reference grid."""

    inputs = ("series",)
    output = "image"
    bound = ("task",)
    task: SegmentationTask

    def step(self, series):
        return load_series(series, self.task)


class NiftiLoaderOperator(StepOperator):
    """Source: finds each modality's NIfTI file by File_Pattern and emits ``image`` (with the files' affine)."""

    output = "image"
    bound = ("input_path", "task")
    input_path: Path
    task: SegmentationTask

    def step(self):
        return load_nifti(self.input_path, self.task)
