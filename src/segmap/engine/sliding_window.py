"""nnU-Net's sliding-window inference: tile placement, Gaussian importance weighting, mirroring, fold ensemble.

Written here rather than taken from MONAI's ``sliding_window_inference`` because that places tiles and builds its
Gaussian differently from nnU-Net (FORMATS.md §3), which moves the result away from the model's reference.

Folds are averaged per tile rather than per volume (nnU-Net runs the whole window once per fold): the weighted sum
is linear, so the result is the same while only one logits volume is ever held.
"""

from __future__ import annotations

import itertools
import logging
import math
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .precision import Candidate, FastestCandidate

log = logging.getLogger("segmap.engine")


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
def gaussian_importance(tile_size: tuple[int, ...], sigma_scale: float = 1.0 / 8, peak: float = 10.0,
                        dtype: type = np.float32) -> np.ndarray:
    """nnU-Net's tile weighting: a Gaussian (sigma = tile/8) centred at ``size // 2``, peak ``peak``, no zeros.

    nnU-Net's predictor uses it in float16 (values rounded to half precision, zeros replaced after rounding).
    """
    delta = np.zeros(tile_size)
    delta[tuple(s // 2 for s in tile_size)] = 1
    g = gaussian_filter(delta, [s * sigma_scale for s in tile_size], 0, mode="constant", cval=0)
    g = g / g.max() * peak
    g = g.astype(dtype)
    g[g == 0] = g[g > 0].min()
    g.flags.writeable = False  # cached and shared
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


def predict_tile(networks: Sequence[Callable], x: torch.Tensor, mirror_axes: Sequence[int],
                 batch_mirrors: bool = False) -> torch.Tensor:
    """Mean over folds of each fold's (optionally mirror-averaged) logits for a ``[1, c, *tile]`` tile.

    ``batch_mirrors`` sends the tile and its mirrored copies through the network as one batch (faster on a GPU;
    on the CPU, measured on toy and nnU-Net-sized networks, one call per copy is faster).
    """
    combos = mirror_combinations(mirror_axes)
    flips = [[a + 2 for a in axes] for axes in combos]
    total = None
    for net in networks:
        if batch_mirrors and combos:
            batch = torch.cat([x] + [torch.flip(x, dims) for dims in flips])
            out = net(batch)
            pred = out[:1].float()
            for k, dims in enumerate(flips, start=1):
                pred += torch.flip(out[k:k + 1], dims)
        else:
            # fp32 accumulation whatever the network's output dtype (bf16/fp16 under autocast)
            pred = net(x).float()
            for dims in flips:
                pred += torch.flip(net(torch.flip(x, dims)), dims)
        if combos:
            pred /= len(combos) + 1
        total = pred if total is None else total.add_(pred)
    if len(networks) > 1:
        total /= len(networks)
    return total


def _zeros(shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def sliding_window_logits(data: np.ndarray, runner: FastestCandidate | Sequence[Callable], tile_size: Sequence[int],
                          num_outputs: int, *, device: torch.device, mirror_axes: Sequence[int] = (),
                          step: float = 0.5, accumulate: torch.dtype = torch.float16,
                          progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Logits ``[num_outputs, *spatial]`` (dtype ``accumulate``, on the CPU) for a preprocessed ``[c, *spatial]``
    array.

    ``runner`` chooses how each network call runs (:class:`~segmap.engine.precision.FastestCandidate`); a plain
    list of networks runs them as they are. Weighted sums accumulate in float16 as nnU-Net's predictor does (its
    Gaussian is float16 too): that is both its result near ties between classes and half the memory of float32
    (what makes many-class models fit). Should a sum overflow float16, the window is run again in float32 with a
    warning.
    A CUDA out-of-memory error propagates: the caller falls back to the CPU.
    """
    if not isinstance(runner, FastestCandidate):
        runner = FastestCandidate([Candidate("fp32", list(runner))])
    padded, unpad = pad_to_tile(data, tile_size)
    spatial = padded.shape[1:]
    starts = tile_starts(spatial, tile_size, step)
    tiles = [tuple(slice(s, s + t) for s, t in zip(corner, tile_size)) for corner in itertools.product(*starts)]
    on_gpu = device.type == "cuda"

    # Accumulate on the device when it is a GPU with room; otherwise on the CPU.
    acc_device = device
    try:
        logits = _zeros((num_outputs, *spatial), acc_device, accumulate)
        weights = _zeros(spatial, acc_device, accumulate)
    except torch.OutOfMemoryError:
        acc_device = torch.device("cpu")
        if on_gpu:
            torch.cuda.empty_cache()
        logits = _zeros((num_outputs, *spatial), acc_device, accumulate)
        weights = _zeros(spatial, acc_device, accumulate)
    g_dtype = np.float16 if accumulate == torch.float16 else np.float32
    g = torch.from_numpy(gaussian_importance(tuple(tile_size), dtype=g_dtype).copy()).to(acc_device)
    source = torch.from_numpy(padded)
    # A path calibrated on the input (quantized networks) takes the middle tile: the likeliest to hold the body.
    runner.calibration_sample = lambda: source[(slice(None), *tiles[len(tiles) // 2])][None].contiguous()
    networks = runner.networks()
    if progress is not None:
        progress(0, len(tiles))
    try:
        with torch.inference_mode():
            for done, sl in enumerate(tiles, start=1):
                x = source[(slice(None), *sl)][None]
                if on_gpu:  # page-locked memory lets the copy overlap with the previous tile's work
                    x = x.pin_memory().to(device, non_blocking=True)
                else:
                    x = x.contiguous()
                pred = predict_tile(networks, x, mirror_axes, batch_mirrors=on_gpu)[0].to(acc_device)
                pred *= g  # float32 times the (float16) weights, as nnU-Net
                weights[sl] += g
                logits[(slice(None), *sl)] += pred
                if progress is not None:
                    progress(done, len(tiles))
    finally:
        runner.calibration_sample = None  # it holds this input: a warm model must not keep it
    with torch.inference_mode():
        torch.div(logits, weights, out=logits)
        # Class by class: a boolean copy of all logits would be a quarter of their size again (many-class models).
        if accumulate == torch.float16 and any(bool(torch.isinf(ch).any()) for ch in logits):
            log.warning("logits overflow float16 in the sliding window: running it again in float32")
            del logits, weights
            return sliding_window_logits(data, runner, tile_size, num_outputs, device=device,
                                         mirror_axes=mirror_axes, step=step,
                                         accumulate=torch.float32, progress=progress)
    return logits[(slice(None), *unpad)].cpu()
