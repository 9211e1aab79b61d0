"""nnU-Net-faithful inference for MONet models, in plain PyTorch."""

from .predictor import EngineOptions, Segmenter, logits_to_labels, resolve_device

__all__ = ["EngineOptions", "Segmenter", "logits_to_labels", "resolve_device"]
