"""Input operators: DICOM scan -> series selection -> image, and NIfTI loading by File_Pattern."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segmap.pipeline import Study, choose_series, load_nifti, load_series, scan_study
from segmap.tasks import SegmentationTask

from .base import StepOperator


class DicomScanOperator(StepOperator):
    """Source: scans the input folder recursively (unreadable and non-DICOM files skipped with a warning).

    Emits ``study`` (the headers of every DICOM file, grouped by series).
    """

    output = "study"

    def __init__(self, fragment, *args: Any, input_path: Path, study: Study | None = None, **kwargs: Any) -> None:
        self.input_path = Path(input_path)
        self.study = study  # one study of an input already scanned and split by study (app._run_studies)
        super().__init__(fragment, *args, **kwargs)

    def step(self):
        return self.study if self.study is not None else scan_study(self.input_path)


class SeriesSelectorOperator(StepOperator):
    """``study`` -> ``series``: one series per modality of the task, chosen by its Rules_Text."""

    inputs = ("study",)
    output = "series"

    def __init__(self, fragment, *args: Any, task: SegmentationTask, **kwargs: Any) -> None:
        self.task = task
        super().__init__(fragment, *args, **kwargs)

    def step(self, study):
        return choose_series(study, self.task)


class SeriesToVolumeOperator(StepOperator):
    """``series`` -> ``image``: decodes the chosen series and stacks the modalities on the reference grid."""

    inputs = ("series",)
    output = "image"

    def __init__(self, fragment, *args: Any, task: SegmentationTask, **kwargs: Any) -> None:
        self.task = task
        super().__init__(fragment, *args, **kwargs)

    def step(self, series):
        return load_series(series, self.task)


class NiftiLoaderOperator(StepOperator):
    """Source: finds each modality's NIfTI file by File_Pattern and emits ``image`` (with the files' affine)."""

    output = "image"

    def __init__(self, fragment, *args: Any, input_path: Path, task: SegmentationTask, **kwargs: Any) -> None:
        self.input_path = Path(input_path)
        self.task = task
        super().__init__(fragment, *args, **kwargs)

    def step(self):
        return load_nifti(self.input_path, self.task)
