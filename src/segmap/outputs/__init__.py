"""What a run leaves behind: DICOM SEG and NIfTI label maps, written atomically, and the JSON run report.

Plain functions with no Holoscan dependency; the application's output operators are thin shells over them.
"""

from .atomic import atomic_outputs, ensure_writable
from .nifti import read_label_nifti, write_label_nifti
from .report import RunReport, segment_statistics
from .seg import read_seg_labels, write_seg

__all__ = [
    "RunReport",
    "atomic_outputs",
    "ensure_writable",
    "read_label_nifti",
    "read_seg_labels",
    "segment_statistics",
    "write_label_nifti",
    "write_seg",
]
