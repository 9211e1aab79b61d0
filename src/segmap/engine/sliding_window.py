"""nnU-Net's sliding-window inference: tile placement, Gaussian importance weighting, mirroring, fold ensemble.

Written here rather than taken from MONAI's ``sliding_window_inference`` because that places tiles and builds its
Gaussian differently from nnU-Net (FORMATS.md §3), which moves the result away from the model's reference.

Folds are averaged per tile rather than per volume (nnU-Net runs the whole window once per fold): the weighted sum
is linear, so the result is the same while only one logits volume is ever held.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


def tile_starts(image_size: Sequence[int], tile_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Tile start offsets per axis, evenly spread, ``ceil((size - tile) / (tile * step)) + 1`` per axis."""
    starts = []
    for size, tile in zip(image_size, tile_size):
        if size < tile:
            raise ValueError(f"image size {size} is smaller than the tile {tile}; pad first")
        n = int(math.ceil((size - tile) / (tile * step))) + 1
        span = size - tile
        actual = span / (n - 1) if n > 1 else 0
        starts.append([int(round(actual * i)) for i in range(n)])
    return starts


@lru_cache(maxsize=4)
def gaussian_importance(tile_size: tuple[int, ...], sigma_scale: float = 1.0 / 8, peak: float = 10.0) -> np.ndarray:
    """nnU-Net's tile weighting: a Gaussian (sigma = tile/8) centred at ``size // 2``, peak ``peak``, no zeros."""
    delta = np.zeros(tile_size)
    delta[tuple(s // 2 for s in tile_size)] = 1
    g = gaussian_filter(delta, [s * sigma_scale for s in tile_size], 0, mode="constant", cval=0)
    g = g / g.max() * peak
    g = g.astype(np.float32)
    g[g == 0] = g[g > 0].min()
    return g


def pad_to_tile(data: np.ndarray, tile_size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad ``[c, *spatial]`` to at least the tile size, split as nnU-Net does (extra voxel at the end)."""
    spatial = data.shape[1:]
    diff = [max(t - s, 0) for s, t in zip(spatial, tile_size)]
    if not any(diff):
        return data, tuple(slice(0, s) for s in spatial)
    pad = [(0, 0)] + [(d // 2, d // 2 + d % 2) for d in diff]
    padded = np.pad(data, pad, mode="constant", constant_values=0)
    return padded, tuple(slice(lo, lo + s) for (lo, _), s in zip(pad[1:], spatial))


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty combination of spatial axes (0-based), in nnU-Net's order."""
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def predict_tile(networks: Sequence[Callable], x: torch.Tensor, mirror_axes: Sequence[int]) -> torch.Tensor:
    """Mean over folds of each fold's (optionally mirror-averaged) logits for a ``[b, c, *tile]`` batch."""
    combos = mirror_combinations(mirror_axes)
    total = None
    for net in networks:
        pred = net(x)
        for axes in combos:
            dims = [a + 2 for a in axes]
            pred += torch.flip(net(torch.flip(x, dims)), dims)
        if combos:
            pred /= len(combos) + 1
        total = pred if total is None else total.add_(pred)
    if len(networks) > 1:
        total /= len(networks)
    return total


def sliding_window_logits(data: np.ndarray, networks: Sequence[Callable], tile_size: Sequence[int],
                          num_outputs: int, *, device: torch.device, mirror_axes: Sequence[int] = (),
                          step: float = 0.5, use_gaussian: bool = True, batch_size: int = 1,
                          autocast: bool = False, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Logits ``[num_outputs, *spatial]`` (float32, on the CPU) for a preprocessed ``[c, *spatial]`` array."""
    padded, unpad = pad_to_tile(data, tile_size)
    spatial = padded.shape[1:]
    starts = tile_starts(spatial, tile_size, step)
    tiles = [tuple(slice(s, s + t) for s, t in zip(corner, tile_size)) for corner in itertools.product(*starts)]

    # Accumulate on the device when it is a GPU with room; otherwise on the CPU.
    acc_device = device
    try:
        logits = torch.zeros((num_outputs, *spatial), dtype=torch.float32, device=acc_device)
        weights = torch.zeros(spatial, dtype=torch.float32, device=acc_device)
    except torch.OutOfMemoryError:
        acc_device = torch.device("cpu")
        logits = torch.zeros((num_outputs, *spatial), dtype=torch.float32)
        weights = torch.zeros(spatial, dtype=torch.float32)
    g = torch.from_numpy(gaussian_importance(tuple(tile_size))).to(acc_device) if use_gaussian else None
    source = torch.from_numpy(padded)
    with torch.inference_mode():
        for first in range(0, len(tiles), batch_size):
            batch = tiles[first:first + batch_size]
            x = torch.stack([source[(slice(None), *sl)] for sl in batch]).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
                pred = predict_tile(networks, x, mirror_axes)
            pred = pred.float().to(acc_device)
            for sl, p in zip(batch, pred):
                if g is not None:
                    p *= g
                    weights[sl] += g
                else:
                    weights[sl] += 1
                logits[(slice(None), *sl)] += p
            if progress is not None:
                progress(min(first + batch_size, len(tiles)), len(tiles))
        logits /= weights
    return logits[(slice(None), *unpad)].cpu()
