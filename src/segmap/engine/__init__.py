"""nnU-Net-faithful inference for MONet models, in plain PyTorch.

``EngineOptions`` and the precision names live in the torch-free :mod:`.options`, which the application's settings
read; the names below that need torch (``Segmenter`` and its helpers) are imported on first use, so that importing
``segmap.engine.options`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import EngineOptions

__all__ = ["EngineOptions", "Segmenter", "logits_to_labels", "resolve_device"]


def __getattr__(name: str) -> Any:
    if name in ("Segmenter", "logits_to_labels", "resolve_device"):
        return getattr(importlib.import_module(".predictor", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
