"""Put one modality's volume on the reference modality's grid.

Multi-modality models take their channels stacked on one grid, that of the task's reference modality (the grid the
DICOM SEG refers to). The other modalities are resampled through world coordinates: each reference voxel centre is
mapped by the reference affine to RAS mm and by the inverse of the moving volume's affine back into the moving
array, where it is interpolated. Nothing is registered; the series are assumed to share a frame of reference (a
warning says when their Frame of Reference UIDs differ).

:func:`scipy.ndimage.affine_transform` does the interpolation: it is :func:`scipy.ndimage.map_coordinates` for a
coordinate grid that is an affine function of the output index, without materialising that grid (3 x N floats).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..volume import Volume, same_grid

log = logging.getLogger(__name__)

_XYZ_TO_ZYX = np.eye(3)[::-1]  # swaps the x and z axes (its own inverse)


def resample_to_reference(moving: Volume, reference: Volume, order: int = 1, *, fill: float | None = None) -> Volume:
    """``moving`` interpolated at the voxel centres of ``reference``'s grid, channel by channel.

    ``order`` is the spline order (0 nearest, 1 linear, 3 cubic). Points outside the moving volume get ``fill``, by
    default each channel's minimum (air for CT, background for MR). The result has ``reference``'s shape and
    affine, ``moving``'s channels and meta (plus ``resampled_to``: the reference series UID), and is float32 unless
    ``order`` is 0, which keeps the dtype. Raises :class:`~segmap.errors.InputError` when the two volumes do not
    overlap in space.
    """
    meta = {**moving.meta, "resampled_to": reference.meta.get("series_instance_uid")}
    if same_grid(moving, reference):
        return Volume(moving.array.copy(), reference.affine.copy(), meta)

    _check_frames_of_reference(moving, reference)
    _check_overlap(moving, reference)

    index_map = np.linalg.inv(moving.affine) @ reference.affine  # reference voxel (x, y, z) -> moving voxel
    matrix = _XYZ_TO_ZYX @ index_map[:3, :3] @ _XYZ_TO_ZYX
    offset = _XYZ_TO_ZYX @ index_map[:3, 3]
    dtype = moving.array.dtype if order == 0 else np.float32
    out = np.empty((moving.array.shape[0], *reference.shape_zyx), dtype=dtype)
    for c, channel in enumerate(moving.array):
        cval = float(channel.min()) if fill is None else float(fill)
        ndimage.affine_transform(channel, matrix, offset, output_shape=reference.shape_zyx, output=out[c],
                                 order=order, mode="constant", cval=cval)
    return Volume(out, reference.affine.copy(), meta)


def _corners_world(volume: Volume) -> np.ndarray:
    z, y, x = volume.shape_zyx
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, x - 0.5) for j in (-0.5, y - 0.5) for k in (-0.5, z - 0.5)])
    return (volume.affine @ corners.T).T[:, :3]


def _check_overlap(moving: Volume, reference: Volume) -> None:
    # Bounding boxes in the moving volume's voxel space: exact for the moving volume, generous for the reference.
    inv = np.linalg.inv(moving.affine)
    ref_in_moving = (inv[:3, :3] @ _corners_world(reference).T).T + inv[:3, 3]
    lo, hi = ref_in_moving.min(axis=0), ref_in_moving.max(axis=0)
    extent = np.array(moving.shape_zyx[::-1], dtype=float) - 0.5
    if np.any(hi < -0.5) or np.any(lo > extent):
        raise InputError(f"series {moving.meta.get('series_instance_uid', '?')} "
                         f"({moving.meta.get('series_description', '')!r}) does not overlap the reference series "
                         f"{reference.meta.get('series_instance_uid', '?')} in space; they cannot be combined")


def _check_frames_of_reference(moving: Volume, reference: Volume) -> None:
    a, b = moving.meta.get("frame_of_reference_uid"), reference.meta.get("frame_of_reference_uid")
    if a and b and a != b:
        log.warning("series %s and reference series %s have different Frames of Reference; resampling assumes their "
                    "coordinates agree (no registration is done)", moving.meta.get("series_instance_uid", "?"),
                    reference.meta.get("series_instance_uid", "?"))
