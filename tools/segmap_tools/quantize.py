"""Int8 networks for measurement: post-training quantization of a MONet model's networks with NNCF, run by OpenVINO.

Measured as a fast-path candidate (issue 25) and **not** adopted: on the trained fidelity networks int8 missed the
fast path's bar (voxel agreement 0.985-0.997 and per-label Dice down to 0.89 against nnU-Net, where OpenVINO fp32
kept 0.9999), with the first and last convolutions kept in fp32 or not. So the engine never offers it; the
benchmark (``bench/bench_engine.py --precision fast+int8``) and the fidelity tests (``SEGMAP_FIDELITY_INT8=1``)
use this module to measure it again, on another CPU or another NNCF.

Why NNCF and not torch's own quantization: a MONet bundle holds only TorchScript, which torch's quantization flows
(eager, FX, PT2E) cannot take, while NNCF quantizes the OpenVINO model that segmap already converts from it, and
OpenVINO has int8 kernels for 3D convolutions on every x86 CPU (VNNI or AMX where the CPU has them, AVX2
multiply-adds elsewhere). NNCF's telemetry goes through the same package as OpenVINO's and is declined the same way
(:func:`segmap.engine.openvino_runtime.openvino_module` first).

Activations are calibrated on one tile of the input (the sliding window hands the middle tile, the likeliest to hold
the body, to :meth:`Int8Networks.calibrate` before the first call): NNCF's statistics and fast bias correction cost
about four fp32 calls.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import time
import warnings
from typing import Sequence

import numpy as np
import torch

from segmap.engine.openvino_runtime import CompiledNetwork, available, convert, openvino_module
from segmap.engine.precision import Candidate

log = logging.getLogger("segmap.engine")

def int8_available() -> bool:
    """Whether NNCF is installed beside OpenVINO (without importing either)."""
    return available() and importlib.util.find_spec("nncf") is not None


def _nncf():
    openvino_module()  # declines the telemetry NNCF would send through the same package
    import nncf

    nncf.set_log_level(logging.WARNING)
    return nncf


class Int8Networks:
    """A model's fold networks, quantized to int8 by NNCF on a calibration tile and compiled by OpenVINO for
    ``[1, *tile_shape]`` inputs, the first and the last convolution (the segmentation head) left in fp32 (without
    that, agreement with nnU-Net was lower still). Until :meth:`calibrate` runs, ``compiled`` is None and the engine
    calibrates first."""

    def __init__(self, networks: Sequence, tile_shape: Sequence[int]):
        self._sources = list(networks)
        self.shape = (1, *tile_shape)
        self.compiled: list | None = None
        #: Seconds the quantization took (conversion, statistics, bias correction, compiling).
        self.seconds = 0.0

    def calibrate(self, sample: torch.Tensor) -> None:
        nncf = _nncf()
        t = time.perf_counter()
        example = torch.zeros(self.shape, dtype=torch.float32)
        data = np.ascontiguousarray(sample.detach().cpu().numpy(), dtype=np.float32)
        core = openvino_module().Core()
        out = []
        for network in self._sources:
            model = convert(network, example)
            convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
            ignored = nncf.IgnoredScope(names=[convs[0], convs[-1]]) if convs else None
            # NNCF draws progress bars on standard output: a run's output is its log, not a terminal.
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantized = nncf.quantize(model, nncf.Dataset([data]), subset_size=1,
                                          preset=nncf.QuantizationPreset.MIXED, target_device=nncf.TargetDevice.CPU,
                                          ignored_scope=ignored)
            out.append(CompiledNetwork(core, quantized, self.shape, "f32", torch.get_num_threads()))
        self.compiled = out
        self.seconds = time.perf_counter() - t
        log.info("int8: %d network(s) quantized on one tile in %.1f s", len(out), self.seconds)

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, fold: int):
        if self.compiled is None:
            raise RuntimeError("int8 networks called before calibration")
        return self.compiled[fold]


def int8_candidate(networks: Sequence, tile_shape: Sequence[int]) -> Candidate:
    """The engine's candidate for int8 networks (pin it with ``FastestCandidate([candidate])``)."""
    return Candidate("openvino int8", Int8Networks(networks, tile_shape), None, arithmetic="int8")
