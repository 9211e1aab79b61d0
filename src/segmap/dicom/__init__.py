"""The DICOM input side: find the instances in a folder, pick the series a task needs, turn them into volumes.

Plain functions with no Holoscan import, so the application's operators and the tests call the same code:

- :func:`scan_dicom_folder` reads the headers of every file under a folder and groups them into series;
- :func:`select_series` / :func:`select_for_task` apply a task's series-selection rules;
- :func:`series_to_volume` decodes one series into a :class:`segmap.volume.Volume` (``[1, z, y, x]``, RAS affine)
  and :func:`source_datasets` gives the matching source headers in slice order (for the DICOM SEG writer);
- :func:`resample_to_reference` puts another modality onto the reference modality's grid.
"""

from .loading import DicomInstance, DicomScan, DicomSeries, scan_dicom_folder
from .resample import resample_to_reference
from .selection import SeriesSelection, select_for_task, select_series
from .series_volume import series_to_volume, source_datasets

__all__ = [
    "DicomInstance",
    "DicomScan",
    "DicomSeries",
    "SeriesSelection",
    "resample_to_reference",
    "scan_dicom_folder",
    "select_for_task",
    "select_series",
    "series_to_volume",
    "source_datasets",
]
