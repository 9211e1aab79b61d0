"""NIfTI label-map output, written with nibabel.

The label map arrives as ``[z, y, x]`` (segmap's convention) and is stored as NIfTI expects, voxel ``(i, j, k) =
(x, y, z)``, by a transpose that costs nothing: the transposed array is Fortran-ordered, which is the order nibabel
writes.

Geometry. With the input image's header (``source_header``, what :func:`segmap.nifti_input.read_nifti` keeps in
``meta["nifti_header"]``), its spatial fields are copied exactly: qform (quaternion, offsets, qfac), sform (the three
rows), both codes, pixdim and xyzt_units. Readers disagree on which transform wins when both are set (nibabel and
3D Slicer prefer the sform, ITK/SimpleITK prefer the qform when its code is set); copying both keeps the label map
on the image in every reader, even when the input's qform and sform disagree. Without a source header the affine is
stored in both the sform and the qform (codes 1/1 unless the caller passes others). NIfTI-1 keeps the sform in
float32, so the affine read back equals the given one to float32 precision; the qform cannot hold a sheared affine
and is then an approximation that readers ignore while the sform code is set.

Values are stored as they are: uint8 (uint16 when a label exceeds 255), no scaling (``scl_slope`` NaN), intent
"label", ``cal_min``/``cal_max`` 0 and the largest label so viewers pick a sensible colour range.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import OutputError
from .formats import Provenance, SourceImage

_SUFFIXES = (".nii", ".nii.gz")


def write_label_nifti(labels_zyx: np.ndarray, affine: np.ndarray, path: str | Path, *,
                      sform_code: int = 1, qform_code: int = 1, source_header=None) -> Path:
    """Write a ``[z, y, x]`` label map on the grid ``affine`` (voxel ``(x, y, z)`` -> RAS+ mm) to ``path``.

    ``path`` must end in ``.nii`` or ``.nii.gz``. ``sform_code``/``qform_code``: the NIfTI codes to record (pass
    the source image's to preserve them; 1 = scanner anatomical). ``source_header``: the input image's NIfTI
    header (nibabel); its spatial fields are copied exactly and the codes arguments are ignored. It must describe
    the grid ``affine`` (same best affine and the same voxel counts), else ``ValueError``. Returns ``path``.
    """
    path = Path(path)
    if not path.name.endswith(_SUFFIXES):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    labels = np.asarray(labels_zyx)
    if labels.ndim != 3:
        raise ValueError(f"labels_zyx must be a [z, y, x] array, got shape {labels.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) == 0:
        raise ValueError("affine is singular: its 3x3 part has determinant 0")

    dtype = _label_dtype(labels)
    data_xyz = (labels if labels.dtype == dtype else labels.astype(dtype)).transpose(2, 1, 0)

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(data_xyz, affine=None, header=header)
    if source_header is None:
        img.set_sform(affine, code=int(sform_code))
        img.set_qform(affine, code=int(qform_code))
        img.header.set_xyzt_units("mm", "sec")
    else:
        _copy_spatial_fields(source_header, img.header, affine, data_xyz.shape)
    hdr = img.header
    hdr.set_intent("label")
    hdr.set_slope_inter(np.nan, np.nan)
    hdr["cal_min"] = 0
    hdr["cal_max"] = int(labels.max()) if labels.size else 0
    try:
        nib.save(img, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the NIfTI label map ({e.strerror or e})") from e
    return path


#: Header fields that place the voxels in space; copied from the input image's header unchanged.
SPATIAL_FIELDS = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                  "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units")


def _copy_spatial_fields(source, target: nib.Nifti1Header, affine: np.ndarray, shape_xyz: tuple) -> None:
    src_shape = tuple(int(n) for n in source.get_data_shape()[:3])
    if src_shape != tuple(shape_xyz):
        raise ValueError(f"source header is for {src_shape} voxels (x, y, z), the label map has {tuple(shape_xyz)}")
    if not np.allclose(source.get_best_affine(), affine, atol=1e-4):
        raise ValueError("source header does not describe the label map's grid (its best affine differs)")
    for name in SPATIAL_FIELDS:
        target[name] = source[name]


def read_label_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map back as ``(labels_zyx, affine)``; the affine is nibabel's best one (sform when set)."""
    img = nib.load(Path(path))
    data_xyz = np.asanyarray(img.dataobj)
    if data_xyz.ndim == 4 and data_xyz.shape[3] == 1:
        data_xyz = data_xyz[..., 0]
    if data_xyz.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {data_xyz.shape}")
    return data_xyz.transpose(2, 1, 0), np.asarray(img.affine, dtype=np.float64)


def _label_dtype(labels: np.ndarray) -> type:
    if labels.dtype == np.bool_:
        return np.uint8
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels_zyx must hold integer label values, got dtype {labels.dtype}")
    if labels.size == 0:
        return np.uint8
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError(f"label map holds negative value {int(labels.min())}")
    top = int(labels.max())
    if top > 0xFFFF:
        raise ValueError(f"label map holds value {top}; labels are stored as uint16 (at most 65535)")
    return np.uint8 if top <= 0xFF else np.uint16


class NiftiWriter:
    """The ``nifti`` output format: the label map on exactly the input's grid (from NIfTI or DICOM input)."""

    filename = "segmentation.nii.gz"

    def __init__(self, task, settings) -> None:
        pass

    def write(self, labels, image: SourceImage, folder: Path, provenance: Provenance) -> Path:
        # A NIfTI input's header travels in the volume's meta: its spatial fields are copied exactly (see above).
        header = labels.meta.get("nifti_header") or image.volume.meta.get("nifti_header")
        return write_label_nifti(labels.array[0], labels.affine, Path(folder) / self.filename, source_header=header)
