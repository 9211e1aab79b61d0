"""Resampling exactly as nnU-Net's ``resample_data_or_seg_to_shape``, computed separably in float32.

nnU-Net resizes with ``skimage.transform.resize(order, mode='edge', anti_aliasing=False)`` in float64, i.e.
``scipy.ndimage.zoom(grid_mode=True, mode='nearest')`` on an edge-padded, spline-prefiltered copy, then clips to the
input's range. A tensor-product B-spline is separable, so the same values come from one 1D pass per axis: prefilter
along the axis (scipy's own ``spline_filter1d``), then gather the ``order + 1`` neighbouring coefficients with their
B-spline weights. That costs ``order + 1`` multiply-adds per voxel and axis instead of ``(order + 1) ** 3``, runs on
torch's threads, and keeps memory in float32. Axes whose length does not change are left alone: interpolating a
spline at its own knots returns the input.

For strongly anisotropic spacing nnU-Net resizes in-plane first (per slice, clipped per slice) and then along the
out-of-plane axis with ``order_z`` (nearest by default); :func:`resample` reproduces that too.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy.ndimage import spline_filter1d

from ..model import ResamplingSpec

#: scipy pads by this many edge values before prefiltering in mode 'nearest'.
_SPLINE_PAD = 12


def separate_z_axis(spec: ResamplingSpec, current_spacing: Sequence[float],
                    new_spacing: Sequence[float]) -> int | None:
    """The out-of-plane axis nnU-Net resamples separately, or None (``determine_do_sep_z_and_axis``)."""

    def lowres_axes(spacing: Sequence[float]) -> list[int]:
        s = np.asarray(spacing, float)
        return list(np.where(s.max() / s == 1)[0])

    def anisotropic(spacing: Sequence[float]) -> bool:
        return float(np.max(spacing) / np.min(spacing)) > spec.separate_z_anisotropy_threshold

    if spec.force_separate_z is not None:
        axes = lowres_axes(current_spacing) if spec.force_separate_z else []
    elif anisotropic(current_spacing):
        axes = lowres_axes(current_spacing)
    elif anisotropic(new_spacing):
        axes = lowres_axes(new_spacing)
    else:
        axes = []
    return int(axes[0]) if len(axes) == 1 else None


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinate of each output voxel centre (``grid_mode=True``)."""
    scale = n_in / n_out
    return (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5


def _bspline_taps(coords: np.ndarray, order: int, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``[order+1, n_out]`` (clamped to ``[0, n)``) and B-spline weights for 1D interpolation."""
    x = coords + offset
    if order == 0:
        idx = np.floor(x + 0.5).astype(np.int64)[None]
        return np.clip(idx, 0, n - 1), np.ones_like(idx, dtype=np.float64)
    if order == 1:
        base = np.floor(x)
        t = x - base
        idx = np.stack([base, base + 1]).astype(np.int64)
        w = np.stack([1 - t, t])
        return np.clip(idx, 0, n - 1), w
    if order == 3:
        base = np.floor(x)
        t = x - base
        idx = np.stack([base - 1, base, base + 1, base + 2]).astype(np.int64)
        t2, t3 = t * t, t * t * t
        w = np.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3]) / 6.0
        return np.clip(idx, 0, n - 1), w
    raise ValueError(f"interpolation order {order} is not supported (0, 1 or 3)")


def _resample_axis(t: torch.Tensor, axis: int, n_out: int, order: int, offset: int = 0,
                   n_in: int | None = None) -> torch.Tensor:
    """Interpolate tensor ``t`` along ``axis`` to ``n_out`` samples.

    For order 3 ``t`` must hold spline coefficients, padded by ``offset`` voxels on both sides of ``axis``;
    ``n_in`` is then the unpadded length that defines the coordinate mapping.
    """
    n_in = t.shape[axis] - 2 * offset if n_in is None else n_in
    idx, w = _bspline_taps(_source_coordinates(n_in, n_out), order, t.shape[axis], offset)
    shape = [1] * t.ndim
    shape[axis] = n_out
    out = None
    for k in range(idx.shape[0]):
        taken = t.index_select(axis, torch.from_numpy(idx[k]).to(t.device))
        weight = torch.from_numpy(w[k]).to(device=t.device, dtype=t.dtype).reshape(shape)
        if out is None:
            out = taken.mul_(weight) if order else taken
        else:
            out.addcmul_(taken, weight)
    return out


def _spline_resize(arr: np.ndarray, new_shape: Sequence[int], order: int, axes: Sequence[int],
                   device: torch.device | None = None) -> np.ndarray:
    """skimage ``resize(arr, new_shape, order, mode='edge', anti_aliasing=False)`` along ``axes`` only.

    Clipping to the input range is the caller's job (it differs between the 3D and per-slice paths). With a CUDA
    ``device`` the interpolation (not scipy's prefilter) runs there; the gathers and multiply-adds are the same
    float32 operations, so results agree with the CPU to float32 rounding.
    """
    axes = [a for a in axes if arr.shape[a] != new_shape[a]]
    if not axes:
        return arr
    if order == 3:
        pad = [(0, 0)] * arr.ndim
        for a in axes:
            pad[a] = (_SPLINE_PAD, _SPLINE_PAD)
        coef = np.pad(arr, pad, mode="edge").astype(np.float32, copy=False)
        for a in axes:
            coef = spline_filter1d(coef, 3, axis=a, mode="nearest", output=np.float32)
        t = _to(torch.from_numpy(coef), device)
        for a in axes:
            t = _resample_axis(t, a, new_shape[a], 3, offset=_SPLINE_PAD, n_in=arr.shape[a])
        return t.cpu().numpy()
    if order == 1 and arr.ndim == 3:
        return _linear_resize(arr, new_shape, axes, device)
    t = _to(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), device)
    for a in axes:
        t = _resample_axis(t, a, new_shape[a], order)
    return t.cpu().numpy()


def _linear_resize(arr: np.ndarray, new_shape: Sequence[int], axes: Sequence[int],
                   device: torch.device | None = None) -> np.ndarray:
    """Order 1 (how logits go back to the input grid) in one pass: torch's linear interpolation with
    ``align_corners=False`` samples at ``(i + 0.5) * n_in / n_out - 0.5`` and clamps to the edge, which is what
    ``grid_mode=True, mode='nearest'`` does for a linear spline.

    It runs in float64 because torch computes the sample positions in the tensor's dtype: in float32 they are off
    by up to ~3e-5 for ratios such as 100/173, in float64 the result equals skimage's to ~1e-15. Still 2.4x (three
    axes) to 3.2x (in-plane only) faster than three separable passes in float32 on 300x273x273 -> 300x512x512.
    """
    t = _to(torch.from_numpy(np.ascontiguousarray(arr)), device).to(torch.float64)
    size = [int(new_shape[a]) if a in axes else arr.shape[a] for a in range(3)]
    if 0 not in axes:  # in-plane only: the slices are channels of one 2D interpolation
        out = torch.nn.functional.interpolate(t[None], size=size[1:], mode="bilinear", align_corners=False)[0]
    else:
        out = torch.nn.functional.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    return out.to(torch.float32).cpu().numpy()


def _to(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t if device is None or device.type == "cpu" else t.to(device)


def resample_channel(arr: np.ndarray, new_shape: Sequence[int], order: int, order_z: int,
                     z_axis: int | None, device: torch.device | None = None) -> np.ndarray:
    """Resample one ``[z, y, x]`` channel the way nnU-Net does (float32 result; interpolation on ``device``)."""
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(arr.shape) == new_shape:
        return arr
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if z_axis is None:
        out = _spline_resize(arr, new_shape, order, range(3), device)
        if order > 1:
            np.clip(out, arr.min(), arr.max(), out=out)
        return out
    in_plane = [a for a in range(3) if a != z_axis]
    shape_2d = tuple(arr.shape[a] if a == z_axis else new_shape[a] for a in range(3))
    out = _spline_resize(arr, shape_2d, order, in_plane, device)
    if order > 1 and out is not arr:
        # skimage clips every 2D slice to that slice's own range.
        lo = arr.min(axis=tuple(in_plane), keepdims=True)
        hi = arr.max(axis=tuple(in_plane), keepdims=True)
        np.clip(out, lo, hi, out=out)
    if arr.shape[z_axis] != new_shape[z_axis]:
        if order_z not in (0, 1):
            raise ValueError(f"order_z {order_z} is not supported (0 or 1)")
        out = _resample_axis(_to(torch.from_numpy(np.ascontiguousarray(out)), device), z_axis, new_shape[z_axis],
                             order_z).cpu().numpy()
    return out


def resample(data: np.ndarray, new_shape: Sequence[int], spec: ResamplingSpec, current_spacing: Sequence[float],
             new_spacing: Sequence[float], device: torch.device | None = None) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for image data ``[c, z, y, x]`` (float32 result)."""
    z_axis = separate_z_axis(spec, current_spacing, new_spacing)
    if tuple(data.shape[1:]) == tuple(new_shape):
        return data
    return np.stack([resample_channel(data[c], new_shape, spec.order, spec.order_z, z_axis, device)
                     for c in range(data.shape[0])])


def iter_resampled(channels: Callable[[int], np.ndarray], n: int, new_shape: Sequence[int], spec: ResamplingSpec,
                   current_spacing: Sequence[float], new_spacing: Sequence[float],
                   device: torch.device | None = None) -> Iterator[np.ndarray]:
    """Resample channels one at a time (so many-class logits never exist at full size all at once)."""
    z_axis = separate_z_axis(spec, current_spacing, new_spacing)
    for c in range(n):
        yield resample_channel(channels(c), new_shape, spec.order, spec.order_z, z_axis, device)
