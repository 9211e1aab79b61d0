"""Holoscan operators of the segmap application: thin shells over the plain, tested functions in ``segmap``.

Each operator receives, calls one function of :mod:`segmap.pipeline` (or the modules behind it), and emits. A
user-fixable :class:`segmap.errors.SegmapError` is recorded on the shared :class:`segmap.pipeline.Run` and the
operator emits nothing, so the graph stops quietly and the application prints one line and exits non-zero.

Why not the SDK's own DICOM operators: ``DICOMDataLoaderOperator`` stops at the first unreadable file and
groups by blank UIDs; ``DICOMSeriesSelectorOperator`` reads attributes from the first instance only, treats a
numeric 0 as missing and fails with a bare exception when nothing matches; ``DICOMSeriesToVolumeOperator`` takes
spacing from SliceThickness; ``DICOMSegmentationWriterOperator`` drops the task's codes and writes non-atomically.
Ours keep the SDK's port-based shape and the same stages.
"""

from .inference import NnunetInferenceOperator
from .loaders import DicomLoaderOperator, NiftiLoaderOperator, SeriesSelectorOperator, SeriesToVolumeOperator
from .writers import DicomSegWriterOperator, NiftiWriterOperator

__all__ = [
    "DicomLoaderOperator",
    "SeriesSelectorOperator",
    "SeriesToVolumeOperator",
    "NiftiLoaderOperator",
    "NnunetInferenceOperator",
    "DicomSegWriterOperator",
    "NiftiWriterOperator",
]
