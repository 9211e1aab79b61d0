"""nnU-Net's preprocessing steps before the network: transpose, crop to nonzero, normalise, target shape.

Each step is a small function over ``[c, z, y, x]`` float32 arrays (after ``transpose_forward`` the axes are in the
network's order, which the plans' spacing and patch size already use).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import binary_fill_holes

from ..model import ChannelNormalization

Bbox = tuple[tuple[int, int], ...]


def transpose_image(image: np.ndarray, spacing: Sequence[float], order: Sequence[int]) -> tuple[np.ndarray, tuple]:
    """Apply nnU-Net's ``transpose_forward`` to a ``[c, *spatial]`` array and its spacing."""
    image = image.transpose([0, *[a + 1 for a in order]])
    return image, tuple(float(spacing[a]) for a in order)


def nonzero_mask(image: np.ndarray, fill_holes: bool = True) -> np.ndarray:
    """Voxels where any channel is nonzero; with holes filled, as nnU-Net's ``create_nonzero_mask``."""
    mask = image[0] != 0
    for c in range(1, image.shape[0]):
        mask |= image[c] != 0
    return binary_fill_holes(mask) if fill_holes else mask


def bbox_of(mask: np.ndarray) -> Bbox:
    """Half-open bounding box ``((lo, hi), ...)`` of a mask's True voxels; the whole array when it has none.

    Filling holes never moves a bounding box, so callers may pass the unfilled mask.
    """
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, mask.shape[axis]))
    return tuple(box)


def crop(image: np.ndarray, bbox: Bbox) -> np.ndarray:
    return image[(slice(None), *(slice(lo, hi) for lo, hi in bbox))]


def normalize(image: np.ndarray, schemes: Sequence[ChannelNormalization], mask: np.ndarray | None) -> np.ndarray:
    """Normalise each channel in place (float32), as nnU-Net's normalisation classes do.

    ``mask`` is the (cropped, hole-filled) nonzero mask; only Z-score with ``use_mask_for_norm`` reads it. Voxels
    outside the mask are then left untouched, exactly like nnU-Net.
    """
    image = image.astype(np.float32, copy=False)
    for c, norm in enumerate(schemes):
        ch = image[c]
        eps = 1e-8
        if norm.scheme == "CTNormalization":
            p = norm.intensity_properties
            np.clip(ch, p["percentile_00_5"], p["percentile_99_5"], out=ch)
            ch -= p["mean"]
            ch /= max(p["std"], eps)
        elif norm.scheme == "ZScoreNormalization":
            if norm.use_mask_for_norm:
                if mask is None:
                    raise ValueError("Z-score normalisation with use_mask_for_norm needs the nonzero mask")
                values = ch[mask]
                mean, std = values.mean(), values.std()
                ch[mask] = (values - mean) / max(std, eps)
            else:
                mean, std = ch.mean(), ch.std()
                ch -= mean
                ch /= max(std, eps)
        elif norm.scheme == "RescaleTo01Normalization":
            ch -= ch.min()
            ch /= np.clip(ch.max(), a_min=eps, a_max=None)
        elif norm.scheme == "RGBTo01Normalization":
            ch /= 255.0
        elif norm.scheme != "NoNormalization":
            raise ValueError(f"unsupported normalization scheme {norm.scheme!r}")
    return image


def target_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: round(old_spacing / new_spacing * old_shape), Python rounding."""
    return tuple(int(round(s / t * n)) for n, s, t in zip(shape, spacing, target_spacing))
