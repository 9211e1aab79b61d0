"""The nnU-Net-faithful inference pipeline, in plain PyTorch (nnunetv2 is never imported at run time).

transpose -> crop to nonzero -> normalise -> resample to the target spacing -> sliding window (Gaussian, optional
mirroring, fold ensemble) -> resample logits back (one class at a time) -> argmax or regions -> uncrop ->
transpose back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError, SegmapError
from ..model import ModelSpec, MonetModel
from ..settings import Settings
from ..volume import Volume
from . import preprocess
from .resample import iter_resampled, resample
from .sliding_window import sliding_window_logits

log = logging.getLogger("segmap.engine")


@dataclass
class EngineOptions:
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" (default: segmap.settings).
    device: str = Settings.device
    #: Test-time mirroring over the model's allowed axes (nnU-Net's default is on; 8x the network time in 3D).
    mirroring: bool = Settings.mirroring
    #: Tile step as a fraction of the patch size (nnU-Net: 0.5).
    step: float = 0.5
    #: Tiles per network call.
    batch_size: int = 1
    #: On the CPU, freeze the TorchScript network and let torch fuse it for oneDNN (several times faster; logits
    #: differ from the unfused network by about 1e-6).
    optimize: bool = True


def resolve_device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SegmapError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegmapError(f"device '{name}' requested but CUDA is not available on this machine (use --device cpu)")
    return device


def logits_to_labels(logits: torch.Tensor, shape: Sequence[int], spec: ModelSpec,
                     current_spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray:
    """Resample logits ``[k, *net_shape]`` to ``shape`` class by class and turn them into a label map.

    Softmax does not change which class is largest, so the argmax runs on logits; for region-based models
    ``sigmoid(x) > 0.5`` is ``x > 0``. Only the running maximum and the labels are held at full size.
    """
    dtype = np.uint8 if len(spec.foreground_labels) < 255 else np.uint16
    labels = np.zeros(tuple(shape), dtype=dtype)
    channels = iter_resampled(lambda c: logits[c].numpy(), logits.shape[0], shape, spec.probabilities_resampling,
                              current_spacing, new_spacing)
    if spec.has_regions:
        for value, ch in zip(spec.regions_class_order, channels):
            labels[ch > 0] = value
        return labels
    best = None
    for c, ch in enumerate(channels):
        if best is None:
            best = np.array(ch, dtype=np.float32, copy=True)
            continue
        better = ch > best
        labels[better] = c
        np.maximum(best, ch, out=best)
    return labels


def _optimized(network):
    """A frozen, oneDNN-fused copy of a TorchScript network, or the network itself where torch cannot do it."""
    import warnings

    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch points to torch.compile; TorchScript is our input
            return torch.jit.optimize_for_inference(torch.jit.freeze(network.eval()))
    except Exception as e:  # an unusual graph: run it as it is
        log.debug("network not optimised for CPU inference: %s", e)
        return network


@dataclass
class Segmenter:
    """A loaded model ready to segment volumes; networks stay on the device between calls."""

    model: MonetModel
    options: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        self.spec = self.model.spec
        self.device = resolve_device(self.options.device)
        t0 = time.perf_counter()
        self.networks = self.model.load_networks(str(self.device))
        if self.device.type == "cpu" and self.options.optimize:
            self.networks = [_optimized(n) for n in self.networks]
        self.mirror_axes: tuple[int, ...] = ()
        if self.options.mirroring:
            if self.spec.mirroring_axes:
                self.mirror_axes = self.spec.mirroring_axes
            else:
                log.warning("mirroring requested but the model allows no mirroring axes; running without it")
        self.timings: dict[str, float] = {"load_model": time.perf_counter() - t0}
        log.info("model loaded: %d fold(s) on %s in %.2f s", len(self.networks), self.device,
                 self.timings["load_model"])

    def predict(self, image: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
        """Label map ``[z, y, x]`` for an image ``[c, z, y, x]`` (channels in the model's order) and its spacing."""
        spec = self.spec
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[0] != spec.num_channels:
            raise InputError(f"the model expects {spec.num_channels} channel(s) {list(spec.input_names)}, "
                             f"got an array of shape {tuple(image.shape)}")
        timings: dict[str, float] = {}
        t = time.perf_counter()
        data, spacing = preprocess.transpose_image(np.asarray(image, dtype=np.float32), spacing_zyx,
                                                   spec.transpose_forward)
        shape_before = data.shape[1:]
        needs_mask = any(n.use_mask_for_norm for n in spec.normalization)
        raw_mask = preprocess.nonzero_mask(data, fill_holes=False)
        bbox = preprocess.bbox_of(raw_mask)
        data = preprocess.crop(data, bbox)
        mask = None
        if needs_mask:
            from scipy.ndimage import binary_fill_holes

            mask = binary_fill_holes(raw_mask)[tuple(slice(lo, hi) for lo, hi in bbox)]
        del raw_mask
        shape_after = data.shape[1:]
        new_shape = preprocess.target_shape(shape_after, spacing, spec.target_spacing)
        data = preprocess.normalize(np.array(data, dtype=np.float32, copy=True), spec.normalization, mask)
        data = resample(data, new_shape, spec.data_resampling, spacing, spec.target_spacing)
        data = np.ascontiguousarray(data, dtype=np.float32)
        timings["preprocess"] = time.perf_counter() - t
        log.info("preprocessed %s -> %s at spacing %s (crop %s) in %.2f s", tuple(shape_before), tuple(new_shape),
                 spec.target_spacing, bbox, timings["preprocess"])

        t = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] > 5:
                last[0] = now
                log.info("sliding window: %d/%d tiles", done, total)

        logits = sliding_window_logits(
            data, self.networks, spec.patch_size, spec.num_outputs, device=self.device,
            mirror_axes=self.mirror_axes, step=self.options.step, batch_size=self.options.batch_size,
            autocast=self.device.type == "cuda", progress=progress)
        del data
        timings["network"] = time.perf_counter() - t

        t = time.perf_counter()
        labels = logits_to_labels(logits, shape_after, spec, spec.target_spacing, spacing)
        del logits
        full = np.zeros(shape_before, dtype=labels.dtype)
        full[tuple(slice(lo, hi) for lo, hi in bbox)] = labels
        labels = np.ascontiguousarray(full.transpose(spec.transpose_backward))
        timings["postprocess"] = time.perf_counter() - t
        log.info("network %.2f s, resampling back and argmax %.2f s", timings["network"], timings["postprocess"])
        self.timings.update(timings)
        return labels

    def segment(self, volume: Volume) -> Volume:
        """The label map of a volume, on the volume's grid (same affine)."""
        labels = self.predict(volume.array, volume.spacing_zyx)
        return volume.with_array(labels)
