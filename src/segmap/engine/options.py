"""How the engine runs a model: the options and their names, without torch.

Torch-free on purpose: the application's settings (``segmap.settings``) take their engine defaults and the
precision names from here, and listing settings (``--help``, ``app.yaml``, the README table) must not import torch.
The engine never reads the application's settings; the run layer turns settings into :class:`EngineOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SegmapError

#: The network's arithmetic: exact (fp32), fast (bf16/fp16 where the hardware has it) or auto (fast where it has).
PRECISIONS = ("exact", "fast", "auto")


@dataclass
class EngineOptions:
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    #: Test-time mirroring over the model's allowed axes (nnU-Net's default is on; 8x the network time in 3D).
    mirroring: bool = False
    #: Tile step as a fraction of the patch size, nnU-Net's ``tile_step_size`` (0.5; its predictor's default).
    #: Larger steps mean fewer, less overlapping tiles: faster, and further from the model's reference output.
    step: float = 0.5
    #: "exact" (fp32, matches nnU-Net to Dice >= 0.999), "fast" (bf16 on CPUs with native bf16, fp16 on CUDA;
    #: Dice >= 0.99) or "auto" (fast where the hardware has it, else exact). See :mod:`segmap.engine.precision`.
    precision: str = "exact"
    #: The CPU's fp32 graph: None (default) times the plain TorchScript graph and torch's frozen, oneDNN-fused
    #: copy on the first network calls and keeps the faster (fused: 3-6x faster on small networks, ~25 % slower on
    #: nnU-Net-sized ones; logits within ~1e-6); True only the fused graph, False only the plain one.
    optimize: bool | None = None
    #: Let OpenVINO (the optional ``openvino`` extra) compete on the CPU's fast path: bf16 where the CPU has native
    #: bf16 (about 1.4x torch bf16 per tile on nnU-Net-sized networks, but further from fp32: voxel agreement
    #: 0.993 against nnU-Net on the realistic-size benchmark where torch bf16 has 0.996), fp32 where it has not
    #: (the only fast path there). Off by default: compiling costs seconds when the model loads. Never on the
    #: exact path. See :mod:`segmap.engine.openvino_runtime`.
    openvino: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not 0 < float(self.step) <= 1:
            raise SegmapError(f"tile step {self.step} must be in (0, 1] (a fraction of the patch size)")


def check_precision(precision: str) -> None:
    """Refuse a precision that is not one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise SegmapError(f"unknown precision '{precision}' (use exact, fast or auto)")
