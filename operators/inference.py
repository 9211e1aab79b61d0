"""nnU-Net inference: ``image`` -> ``labels`` (GPU when present, CPU otherwise)."""

from __future__ import annotations

from typing import Any

from segmap.model import MonetModel
from segmap.pipeline import Inference
from segmap.settings import Settings

from .base import StepOperator


class NnunetInferenceOperator(StepOperator):
    """Emits ``labels``: the label map on the image's grid; device and mirroring come from the settings."""

    inputs = ("image",)
    output = "labels"

    def __init__(self, fragment, *args: Any, model: MonetModel, settings: Settings, **kwargs: Any) -> None:
        self.inference = Inference(model, settings)
        super().__init__(fragment, *args, **kwargs)

    def step(self, image):
        return self.inference.segment(image)
