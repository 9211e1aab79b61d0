"""Holoscan operators of the segmap application: thin shells over the plain, tested functions in ``segmap``.

Each operator receives on named ports, calls one function of :mod:`segmap.run`, and emits on a named port.
Settings, the task and the model reach an operator through its constructor. A user-fixable
:class:`segmap.errors.SegmapError` goes to the run's :class:`Outcome` and the operator emits nothing, so the graph
stops quietly and the application prints one line and exits non-zero.

Why not the SDK's own DICOM operators: ``DICOMDataLoaderOperator`` stops at the first unreadable file and
groups by blank UIDs; ``DICOMSeriesSelectorOperator`` reads attributes from the first instance only, treats a
numeric 0 as missing and fails with a bare exception when nothing matches; ``DICOMSeriesToVolumeOperator`` takes
spacing from SliceThickness; ``DICOMSegmentationWriterOperator`` drops the task's codes and writes non-atomically.
Ours keep the SDK's port-based shape and the same stages.
"""

from .base import Outcome
from .inference import NnunetInferenceOperator
from .loaders import DicomScanOperator, NiftiLoaderOperator, SeriesSelectorOperator, SeriesToVolumeOperator
from .writers import ResultWriterOperator

__all__ = [
    "Outcome",
    "DicomScanOperator",
    "SeriesSelectorOperator",
    "SeriesToVolumeOperator",
    "NiftiLoaderOperator",
    "NnunetInferenceOperator",
    "ResultWriterOperator",
]
