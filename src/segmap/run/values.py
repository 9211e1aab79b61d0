"""The values that flow between the steps of a run (and along the application's ports).

Every value carries the seconds its steps took (``timings_s``), so the run report is assembled from what reaches
the writer rather than from state shared between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from ..dicom.loading import DicomScan
from ..dicom.selection import SeriesSelection
from ..volume import Volume

T = TypeVar("T")


def timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    """``fn()``, its seconds added to ``timings[name]`` (also when it raises)."""
    t = time.perf_counter()
    try:
        return fn()
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


@dataclass
class Study:
    """A scanned DICOM input folder (headers only), or one study of it."""

    scan: DicomScan
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class SeriesChoice:
    """The series chosen for each modality of the task, in task order."""

    selections: dict[str, SeriesSelection]  # modality key -> selection
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class InputImage:
    """The model input of one run and where it came from."""

    #: ``[c, z, y, x]`` in the task's (= model's) modality order, on the reference modality's grid.
    volume: Volume
    #: modality key -> the volume as loaded (before resampling onto the reference grid).
    per_modality: dict[str, Volume]
    #: ``"dicom"`` or ``"nifti"``.
    kind: str
    #: DICOM only: the reference series' instance headers in the volume's z order (a DICOM SEG references them).
    reference_datasets: list | None = None
    #: DICOM only: modality key -> the selection of its series.
    selections: dict[str, SeriesSelection] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def other_input_datasets(self) -> list[list] | None:
        """DICOM only: the headers of each chosen series besides the reference one (a SEG references them all)."""
        if self.reference_datasets is None:
            return None
        reference = str(self.reference_datasets[0].SeriesInstanceUID) if self.reference_datasets else None
        others, seen = [], {reference}
        for selection in self.selections.values():
            uid = selection.series.series_instance_uid
            if uid not in seen:
                seen.add(uid)
                others.append(selection.series.datasets)
        return others
