"""The networks of a run, loaded once and shared by every image (every study) of its input."""

from __future__ import annotations

import logging

from ..model import MonetModel
from ..settings import Settings
from ..volume import Volume
from .host import check_memory_for, use_threads
from .values import InputImage, timed

log = logging.getLogger("segmap")


class Inference:
    """The model, loaded onto its device at the first image, turning an :class:`InputImage` into a label map on its
    grid. One instance serves every study of a run (``segmap run`` and the application alike)."""

    def __init__(self, model: MonetModel, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self._segmenter = None
        use_threads(settings.threads)

    def segment(self, image: InputImage) -> Volume:
        """The label map ``[1, z, y, x]`` on the image's grid; ``meta`` holds device and timings."""
        # Here, not at the top: the engine imports torch (seconds), which `segmap validate` and `package` never need.
        from ..engine import EngineOptions, Segmenter

        timings: dict[str, float] = {}
        check_memory_for(image, self.model)
        if self._segmenter is None:
            self._segmenter = timed(timings, "load_model", lambda: Segmenter(self.model, EngineOptions(
                device=self.settings.device, mirroring=self.settings.mirroring, precision=self.settings.precision,
                step=self.settings.tile_step_size, openvino=self.settings.openvino)))
        labels = timed(timings, "inference", lambda: self._segmenter.segment(image.volume))
        for k in ("preprocess", "network", "postprocess"):
            timings[f"inference.{k}"] = self._segmenter.timings.get(k, 0.0)
        return Volume(labels.array, labels.affine, {
            "device": str(self._segmenter.device), "timings_s": timings,
            "engine": {"precision": self.settings.precision, "arithmetic": self._segmenter.precision_used,
                       "network_path": self._segmenter.network_path, "tile_step": self._segmenter.step,
                       "network_calls": self._segmenter.network_calls}})
