"""Images with explicit geometry.

Axis convention used across segmap: arrays are indexed ``[c, z, y, x]`` (or ``[z, y, x]``), where ``x`` is the
fastest-varying voxel index (``i`` in NIfTI, the DICOM column), ``y`` the next (``j``, the DICOM row) and ``z`` the
slowest (``k``, the slice). This is the order SimpleITK and nnU-Net use. The geometry travels as a NIfTI-style
affine that maps the voxel index ``(x, y, z)`` — note: in that order — to RAS+ millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D image (one or more channels) and the voxel-to-world mapping it lives on."""

    #: ``[c, z, y, x]`` array (channels first). Use :meth:`single` for a one-channel volume.
    array: np.ndarray
    #: 4x4 matrix mapping voxel index ``(x, y, z, 1)`` to RAS+ mm.
    affine: np.ndarray
    #: Free-form provenance: source files, series UIDs, modality keys. Never patient identity.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim == 3:
            self.array = self.array[None]
        if self.array.ndim != 4:
            raise ValueError(f"Volume array must be [c, z, y, x] or [z, y, x], got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {self.affine.shape}")

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """Voxel size in mm along x, y, z (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        x, y, z = self.spacing_xyz
        return (z, y, x)

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """A volume on the same grid with other voxel values (e.g. a label map)."""
        if array.shape[-3:] != self.shape_zyx:
            raise ValueError(f"array shape {array.shape} does not fit grid {self.shape_zyx}")
        return Volume(array, self.affine.copy(), {**self.meta, **meta})


def affine_from_dicom(position_lps: np.ndarray, row_cosine_lps: np.ndarray, col_cosine_lps: np.ndarray,
                      slice_step_lps: np.ndarray, pixel_spacing_rc: tuple[float, float]) -> np.ndarray:
    """NIfTI-style RAS affine for a DICOM slice stack.

    ``position_lps`` is ImagePositionPatient of the first slice (z = 0), ``row_cosine_lps``/``col_cosine_lps`` the
    two ImageOrientationPatient vectors (direction of increasing column index x / row index y), ``slice_step_lps``
    the vector from one slice's position to the next, ``pixel_spacing_rc`` PixelSpacing (row spacing, column
    spacing) in mm.
    """
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_cosine_lps, float) * float(pixel_spacing_rc[1])
    lps[:3, 1] = np.asarray(col_cosine_lps, float) * float(pixel_spacing_rc[0])
    lps[:3, 2] = np.asarray(slice_step_lps, float)
    lps[:3, 3] = np.asarray(position_lps, float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


#: Two grids whose affines differ by less than this (mm, per matrix entry) are the same grid.
GRID_TOLERANCE_MM = 1e-3


def same_grid(a: Volume, b: Volume) -> bool:
    """Whether ``a`` and ``b`` have the same voxel grid (shape and affine within :data:`GRID_TOLERANCE_MM`)."""
    return a.shape_zyx == b.shape_zyx and bool(np.allclose(a.affine, b.affine, rtol=0, atol=GRID_TOLERANCE_MM))
