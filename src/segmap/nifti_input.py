"""NIfTI inputs: find each modality's file by its ``File_Pattern`` and read it with its geometry.

Matching rule (documented in the README): a pattern with glob characters (``*?[``) is matched with ``fnmatch``
against the file name; otherwise the file name must end with the pattern (``.nii.gz``, ``_0000.nii.gz``,
``t1c.nii.gz``). Files are looked for directly in the input folder (not recursively). More than one match is an
error that lists them, never a silent pick.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np

from .errors import InputError
from .tasks import SegmentationTask
from .volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name.endswith(pattern)


def find_modality_files(input_path: Path, task: SegmentationTask) -> dict[str, Path]:
    """The file for each modality key of the task, in the task's modality order."""
    input_path = Path(input_path)
    if input_path.is_file():
        if len(task.modalities) != 1:
            raise InputError(f"{input_path}: task '{task.name}' needs {len(task.modalities)} modalities "
                             f"({', '.join(task.modality_keys)}); give a folder holding one file per modality")
        return {task.modalities[0].key: input_path}
    if not input_path.is_dir():
        raise InputError(f"input {input_path} does not exist")
    files = sorted(p for p in input_path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"input folder {input_path} is empty")
    found: dict[str, Path] = {}
    for modality in task.modalities:
        pattern = modality.file_pattern
        if not pattern:
            raise InputError(f"task '{task.name}' modality '{modality.key}' has no File_Pattern, so it cannot run on "
                             f"NIfTI input (use the DICOM variant)")
        hits = [p for p in files if _matches(p.name, pattern)]
        if not hits:
            raise InputError(f"no file in {input_path} matches File_Pattern '{pattern}' of modality "
                             f"'{modality.key}' (files: {', '.join(p.name for p in files[:10])}"
                             f"{', ...' if len(files) > 10 else ''})")
        if len(hits) > 1:
            raise InputError(f"{len(hits)} files in {input_path} match File_Pattern '{pattern}' of modality "
                             f"'{modality.key}': {', '.join(p.name for p in hits)}; keep one or make the pattern "
                             f"more specific")
        found[modality.key] = hits[0]
    return found


def read_nifti(path: Path) -> Volume:
    """A one-channel :class:`Volume` in ``[1, z, y, x]`` order with the file's affine (no reorientation)."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: not a readable NIfTI file ({e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D image, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{path}: voxel type {data.dtype} is not numeric")
    array = data.transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
    return Volume(np.ascontiguousarray(array)[None], img.affine,
                  {"source_files": [str(path)], "kind": "nifti"})
