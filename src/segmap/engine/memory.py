"""What a run of the engine will need of memory, predicted before it starts.

The estimate follows the engine's own arrays (:mod:`.predictor`: transposed and cropped input, normalised copy,
nnU-Net's resampling to the network spacing, the sliding window's logits and weights, one channel resampled back at
a time), so it lives with the engine; the host's side (the cgroup limit and the refusal) is
:mod:`segmap.resources`.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..model import ModelSpec

#: Resident memory of the application (torch, numpy, scipy, pydicom, Holoscan imported, network loaded) before
#: the data, with margin. Calibration (peak RSS measured in the CPU image / this estimate): phantom 40x112x112
#: 506 MiB / 0.59 GiB, sample CT 20x512x512 585 MiB / 0.71 GiB, 300x512x512 1896 MiB / 2.37 GiB.
BASE_BYTES = 560 * 2**20
#: Working memory per voxel of the sliding window's tile, per output channel, beyond the logits: the network's
#: activations for one tile (a 3D U-Net keeps about 30 float32 feature maps of the tile's size alive at its
#: widest stage).
TILE_FACTOR = 48


def estimate_peak_memory(*, input_shape_czyx: Sequence[int], input_spacing_zyx: Sequence[float],
                         target_spacing_zyx: Sequence[float], patch_size: Sequence[int], num_outputs: int,
                         model_bytes: int = 0, source_bytes: int = 0) -> int:
    """Upper bound of a run's resident memory in bytes.

    Counted: the process base (:data:`BASE_BYTES`), the model's weights (twice: the file read and the loaded
    module), the input as decoded (``source_bytes``, e.g. the DICOM pixel data) and as float32, its float32
    copies through cropping, normalisation and resampling to the network spacing, the logits and weights the
    sliding window accumulates in network space, one logit channel resampled back at a time plus the argmax and
    the label map, and the network's working memory for one tile. Each term is a real array of the engine
    (segmap.engine.predictor); the constants are calibrated on measured runs (:data:`BASE_BYTES`).
    """
    c = int(input_shape_czyx[0])
    n_in = math.prod(int(v) for v in input_shape_czyx[1:])
    factors = [s / t for s, t in zip(input_spacing_zyx, target_spacing_zyx)]
    net_shape = [max(int(round(n * f)), int(p)) for n, f, p in zip(input_shape_czyx[1:], factors, patch_size)]
    n_net = math.prod(net_shape)
    k = max(int(num_outputs), 1)
    tile = math.prod(int(v) for v in patch_size)
    f32 = 4
    input_side = source_bytes + 3 * c * n_in * f32            # the volume, its transposed and normalised copies
    network_side = 2 * c * n_net * f32 + (k + 1) * n_net * f32  # resampled input + copy; logits + weights
    back = 2 * n_in * f32 + 2 * n_in * 2                       # one channel back + running max; labels and full map
    tiles = TILE_FACTOR * k * tile * f32 + 4 * c * tile * f32
    return int(BASE_BYTES + 2 * model_bytes + input_side + network_side + back + tiles)


def peak_memory_for(spec: ModelSpec, shape_czyx: Sequence[int], spacing_zyx: Sequence[float], *,
                    model_bytes: int = 0, source_bytes: int = 0) -> int:
    """:func:`estimate_peak_memory` of segmenting an image ``[c, z, y, x]`` with spacing ``spacing_zyx`` with a
    model of plans ``spec``: the image is transposed into the network's axis order first, as the engine does."""
    order = spec.transpose_forward
    return estimate_peak_memory(
        input_shape_czyx=[shape_czyx[0], *(shape_czyx[1 + i] for i in order)],
        input_spacing_zyx=[spacing_zyx[i] for i in order], target_spacing_zyx=spec.target_spacing,
        patch_size=spec.patch_size, num_outputs=spec.num_outputs, model_bytes=model_bytes, source_bytes=source_bytes)
