"""nnU-Net inference on the stacked input volume (GPU when present, CPU otherwise)."""

from __future__ import annotations

from .base import StepOperator


class NnunetInferenceOperator(StepOperator):
    """Emits ``(labels_zyx, inputs)``; device, mirroring and folds come from the run's options and model."""

    def step(self, inputs):
        return self.run_state.segment(inputs), inputs
