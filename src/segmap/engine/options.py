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

#: nnU-Net's ``tile_step_size`` (its predictor's default and ``nnUNetv2_predict -step_size``): the exact path's step.
NNUNET_STEP = 0.5


@dataclass
class EngineOptions:
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    #: Test-time mirroring over the model's allowed axes (nnU-Net's default is on; 8x the network time in 3D).
    mirroring: bool = False
    #: Tile step as a fraction of the patch size, nnU-Net's ``tile_step_size`` (``nnUNetv2_predict -step_size``),
    #: on both paths. Larger steps mean fewer, less overlapping tiles: faster (0.75 cuts a 512x512x300 CT's tiles at
    #: 1.5 mm from 64 to 27), and further from the model's output at nnU-Net's default. The fast path does not pick
    #: a larger one: on the trained fidelity networks 0.75 moved nnU-Net's own output by up to half a label (Dice
    #: 0.50-0.99 against 0.5; docs/performance.md), so fewer tiles are the user's choice, never a default.
    step: float = NNUNET_STEP
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
        self.step = check_step(self.step)


def check_step(step) -> float:
    """A tile step as a number in (0, 1], or a one-line error."""
    try:
        value = float(step)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value <= 1:
        raise SegmapError(f"tile step {step!r} must be a number in (0, 1] (a fraction of the patch size; "
                          f"nnU-Net's default is {NNUNET_STEP})")
    return value


def check_precision(precision: str) -> None:
    """Refuse a precision that is not one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise SegmapError(f"unknown precision '{precision}' (use exact, fast or auto)")
