"""Tiny synthetic DICOM series for the DICOM input tests (small images, written with pydicom).

Slice ``k`` of a series made by :func:`write_series` stores the value ``base + 10 * k + column`` at every pixel of
that column, so tests can tell slices apart after reordering and check the rescale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, UID,
                         ComprehensiveSRStorage, generate_uid)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def make_slice(*, pixels: np.ndarray, position: Sequence[float], orientation: Sequence[float] = AXIAL,
               pixel_spacing: Sequence[float] = (1.0, 1.0), instance_number: int | None = 1,
               series_uid: str = "1.2.3.4.1", study_uid: str = "1.2.3.4", sop_uid: str | None = None,
               modality: str = "CT", series_description: str = "Synthetic", study_description: str = "Study",
               series_number: int | None = 1, image_type: Sequence[str] | None = ("ORIGINAL", "PRIMARY", "AXIAL"),
               rescale: tuple[float, float] | None = (1.0, -1024.0), frame_of_reference_uid: str = "1.2.3.4.9",
               **extra) -> Dataset:
    """One single-frame CT-like image slice with the given geometry (``pixels`` is ``[rows, columns]`` uint16)."""
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.StudyDescription = study_description
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYNTH-1"
    if series_number is not None:
        ds.SeriesNumber = series_number
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if image_type is not None:
        ds.ImageType = list(image_type)
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 99.0  # deliberately not the slice spacing
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def default_pixels(k: int, rows: int, cols: int, base: int = 1000) -> np.ndarray:
    return np.broadcast_to(base + 10 * k + np.arange(cols, dtype=np.uint16), (rows, cols)).copy()


def write_series(folder: Path, n: int = 5, *, rows: int = 6, cols: int = 7, slice_spacing: float = 2.0,
                 origin: Sequence[float] = (-10.0, -20.0, 30.0), orientation: Sequence[float] = AXIAL,
                 positions: Sequence[Sequence[float]] | None = None, pixels: Callable[[int], np.ndarray] | None = None,
                 names: str = "IM{:04d}.dcm", transfer_syntax: str | None = None,
                 instance_numbers: Sequence[int | None] | None = None, **slice_kwargs) -> list[Path]:
    """Write ``n`` slices stacked along the slice normal into ``folder``; returns the paths in slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    paths = []
    for k in range(n):
        position = positions[k] if positions is not None else np.asarray(origin, float) + k * slice_spacing * normal
        data = pixels(k) if pixels is not None else default_pixels(k, rows, cols)
        ds = make_slice(pixels=data, position=position, orientation=orientation,
                        instance_number=instance_numbers[k] if instance_numbers is not None else k + 1,
                        **slice_kwargs)
        if transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(UID(transfer_syntax))
        path = folder / names.format(k + 1)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_segmentation_object(folder: Path, *, study_uid: str = "1.2.3.4", name: str = "SEG.dcm") -> Path:
    """A minimal SEG-like object (modality SEG, two frames of pixels): never an image to segment."""
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(SegmentationStorage, sop, ExplicitVRLittleEndian)
    ds.SOPClassUID, ds.SOPInstanceUID = SegmentationStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesDescription, ds.StudyDescription = "SEG", "AI segmentation", "Study"
    ds.SeriesNumber = 900
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.Rows = ds.Columns = 4
    ds.NumberOfFrames = 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation = 0, 0
    ds.PixelData = b"\x00" * 4
    path = Path(folder) / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_report(folder: Path, *, study_uid: str = "1.2.3.4", name: str = "SR.dcm") -> Path:
    """A minimal structured report (no pixel data)."""
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(ComprehensiveSRStorage, sop, ExplicitVRLittleEndian)
    ds.SOPClassUID, ds.SOPInstanceUID = ComprehensiveSRStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesDescription = "SR", "Report"
    path = Path(folder) / name
    ds.save_as(path, enforce_file_format=True)
    return path
