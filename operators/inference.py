"""nnU-Net inference: ``image`` -> ``labels`` (GPU when present, CPU otherwise)."""

from __future__ import annotations

from segmap.run import Inference

from .base import StepOperator


class NnunetInferenceOperator(StepOperator):
    """Emits ``labels``: the label map on the image's grid. Its ``inference`` is the run's own, shared by the
    graphs of every study of the input, so the networks are loaded once."""

    inputs = ("image",)
    output = "labels"
    bound = ("inference",)
    inference: Inference

    def step(self, image):
        return self.inference.segment(image)
