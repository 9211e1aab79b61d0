"""Input operators: DICOM scan -> series selection -> volume, and NIfTI loading by File_Pattern."""

from __future__ import annotations

from pathlib import Path

from segmap.dicom.loading import scan_dicom_folder
from segmap.pipeline import dicom_inputs, load_nifti_inputs, select_dicom_series

from .base import StepOperator


class DicomLoaderOperator(StepOperator):
    """Scans the input folder recursively; unreadable and non-DICOM files are skipped with a warning."""

    source = True
    stage = "load.scan"

    def step(self, _):
        return scan_dicom_folder(Path(self.run_state.opts.input))


class SeriesSelectorOperator(StepOperator):
    """Picks one series per modality with the task's Rules_Text."""

    stage = "load.select"

    def step(self, scan):
        return select_dicom_series(scan, self.run_state.task)


class SeriesToVolumeOperator(StepOperator):
    """Decodes the selected series and stacks the modalities on the reference grid."""

    stage = "load.volume"

    def step(self, selections):
        return dicom_inputs(selections, self.run_state.task)


class NiftiLoaderOperator(StepOperator):
    """Finds each modality's file by File_Pattern and reads it with its affine."""

    source = True
    stage = "load"

    def step(self, _):
        return load_nifti_inputs(Path(self.run_state.opts.input), self.run_state.task)
