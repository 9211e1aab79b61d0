"""nnU-Net inference: ``image`` -> ``labels`` (GPU when present, CPU otherwise)."""

from __future__ import annotations

from typing import Any

from segmap.run import Inference

from .base import StepOperator


class NnunetInferenceOperator(StepOperator):
    """Emits ``labels``: the label map on the image's grid. The :class:`~segmap.run.Inference` is the run's own,
    shared by the graphs of every study of the input, so the networks are loaded once."""

    inputs = ("image",)
    output = "labels"

    def __init__(self, fragment, *args: Any, inference: Inference, **kwargs: Any) -> None:
        self.inference = inference
        super().__init__(fragment, *args, **kwargs)

    def step(self, image):
        return self.inference.segment(image)
