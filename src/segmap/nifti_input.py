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
from .input_checks import check_allocation, replace_nonfinite
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
    """A one-channel :class:`Volume` in ``[1, z, y, x]`` order with the file's affine (no reorientation).

    Before the voxels are read, the declared size is checked against the bytes an uncompressed file holds and
    against the available memory (a damaged header is one line, not a MemoryError). Non-finite voxels are
    replaced as :func:`segmap.input_checks.replace_nonfinite` documents, and counted in
    ``meta["nonfinite_voxels_replaced"]``. ``meta["nifti_header"]`` is a copy of the file's header, so the label map
    can be written with exactly the same spatial fields (qform, sform, their codes, pixdim, units).
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: not a readable NIfTI file ({e})") from e
    _check_declared_size(img, path)
    try:
        data = np.asarray(img.dataobj)
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read {img.header.get_data_shape()} voxels") from None
    except Exception as e:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: not a readable NIfTI file ({e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D image, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{path}: voxel type {data.dtype} is not numeric")
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)
    array, replaced = replace_nonfinite(array, str(path))
    meta = {"source_files": [str(path)], "kind": "nifti", "nifti_header": img.header.copy()}
    if replaced:
        meta["nonfinite_voxels_replaced"] = replaced
    return Volume(array[None], img.affine, meta)


def _check_declared_size(img, path: Path) -> None:
    header = img.header
    shape = tuple(int(n) for n in header.get_data_shape())
    try:
        dtype = np.dtype(header.get_data_dtype())
    except TypeError:
        raise InputError(f"{path}: unsupported voxel type in the NIfTI header") from None
    slope, inter = header.get_slope_inter()
    # scaled values come out as float64 from nibabel; the model input is float32 in any case
    itemsize = max(8 if slope not in (None, 1.0) or inter not in (None, 0.0) else 4, dtype.itemsize)
    voxels = int(np.prod(shape, dtype=object)) if shape else 0
    declared = f"{' x '.join(str(n) for n in shape)} voxels of {dtype}"
    if not str(path).endswith(".gz"):
        offset = int(header["vox_offset"])
        needed = offset + voxels * dtype.itemsize
        size = path.stat().st_size
        if needed > size:
            raise InputError(f"{path}: its header declares {declared} ({needed} bytes with the header), the file "
                             f"has {size} bytes; the file is truncated or its header is damaged")
    check_allocation(voxels * itemsize, str(path), declared)
