"""Output operators: DICOM SEG or NIfTI label map, plus the run report, committed atomically."""

from __future__ import annotations

from .base import StepOperator


class _Writer(StepOperator):
    def setup(self, spec) -> None:
        spec.input("in")

    def step(self, value):
        labels, inputs = value
        self.run_state.finish(labels, inputs)
        return None


class DicomSegWriterOperator(_Writer):
    """Writes a DICOM SEG (highdicom, BINARY) that references the selected series."""


class NiftiWriterOperator(_Writer):
    """Writes the label map as NIfTI with exactly the input's affine."""
