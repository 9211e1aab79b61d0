"""OpenVINO as one more fast-path candidate on the CPU: opt-in (the ``openvino`` setting,
``EngineOptions.openvino``), where the optional ``openvino`` package is installed.

Two arithmetics, by what the CPU has:

- **bf16** on CPUs with native bf16 (AMX-BF16 / AVX512-BF16), beside torch's bf16 autocast. Measured per 128^3
  tile on nnU-Net's default CT network (6 stages, 32..320 features; 2 threads, AMX, bench/bench_runtimes.py):
  torch bf16 autocast (fp32 head) 2.7 s, this candidate 1.9 s, OpenVINO bf16 with the head in bf16 too 1.1 s
  (cutting the head off costs OpenVINO fusion and a 32-channel fp32 output); on the 5-stage medium network 204,
  140 and 90 ms. The head stays in fp32 all the same: in bf16 it failed the region-based fidelity case (Dice
  0.989), as torch's did. OpenVINO's bf16 is further from fp32 than torch's autocast (on the realistic-size
  benchmark, voxel agreement with nnU-Net 0.993 where torch bf16 has 0.996, below the fast path's 99.5 % bar).
- **fp32** on CPUs without native bf16, where it is the only fast path. Per tile on a 2-core AVX2 CPU (AMD
  EPYC, no AVX-512), against torch's plain and frozen fp32 graphs: the bundled demo network 16 ms against 137
  and 30 ms, the medium network 420 ms against 930 and 1045 ms.
  It is fp32 arithmetic but not torch's: its instance normalisation sums in a different order, 2-4e-4 apart on
  one convolution block at 48x112x112, up to 8e-3 on the medium network's logits (tile argmax agreement 0.9989).
  Centring before the normalisation or summing in three levels did not bring it nearer. So it is held to the fast
  path's bar (Dice >= 0.99, agreement >= 99.5 %) and never runs on the exact path.

Converting and compiling the networks costs seconds when the model loads (1.5-3.6 s on the benchmark's
networks), which a short run does not win back, so it is not on by default. Like every candidate it is timed
against the TorchScript paths on the first network calls; the fastest is kept.

OpenVINO's Python package sends anonymous usage events to Google Analytics by default, on ``import openvino``
and on each model conversion, and keeps a client ID under ``~/intel`` (its ``openvino_telemetry`` package; the
documented way out is ``opt_in_out --opt_out``, a file in the user's home). An inference server in a hospital
must not phone out, so segmap imports OpenVINO only through :func:`openvino_module`, which declines that
telemetry for the process first: nothing is sent and nothing is written. Where that cannot be done (a changed
telemetry package), OpenVINO is not used.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from typing import Sequence

import numpy as np
import torch

from .head import fp32_head

log = logging.getLogger("segmap.engine")


def available() -> bool:
    """Whether the optional ``openvino`` package is installed (without importing it: see the module's note)."""
    return importlib.util.find_spec("openvino") is not None


class TelemetryError(RuntimeError):
    """OpenVINO's telemetry could not be declined: OpenVINO is then not used."""


def _decline_telemetry() -> None:
    """Make ``openvino_telemetry`` find the user's consent declined in this process, before OpenVINO asks it."""
    if importlib.util.find_spec("openvino_telemetry") is None:
        return  # OpenVINO then uses its own stub, which sends nothing
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError as e:
        raise TelemetryError(f"openvino_telemetry changed ({e})") from e
    if not callable(getattr(OptInChecker, "check", None)) or not hasattr(ConsentCheckResult, "DECLINED"):
        raise TelemetryError("openvino_telemetry changed (no OptInChecker.check)")
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED


def openvino_module():
    """``import openvino``, with its telemetry declined (raises :class:`TelemetryError` where it cannot be)."""
    _decline_telemetry()
    import openvino

    if "openvino_telemetry" in sys.modules:
        import openvino_telemetry

        try:
            consent = openvino_telemetry.Telemetry().consent
        except RuntimeError:  # never configured: nothing was sent
            consent = False
        if consent:
            raise TelemetryError("its telemetry was switched on by an earlier import in this process")
    return openvino


class CompiledNetwork:
    """An OpenVINO model compiled for the CPU and one input shape; called like the network."""

    def __init__(self, core, model, shape: Sequence[int], hint: str, threads: int):
        self.shape = tuple(shape)
        # One request at a time on all of torch's threads: LATENCY (THROUGHPUT splits the threads into streams
        # and took twice as long per tile on 2 cores).
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "INFERENCE_NUM_THREADS": int(threads),
                                                          "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            raise ValueError(f"OpenVINO network compiled for {self.shape}, called with {tuple(x.shape)}")
        out = self.request.infer([np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)])
        return torch.from_numpy(np.array(out[self.compiled.output(0)], dtype=np.float32, copy=True))


def bf16_capable() -> bool:
    ov = openvino_module()

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def convert(network, example: torch.Tensor):
    """A TorchScript network as an OpenVINO model for inputs shaped like ``example``."""
    ov = openvino_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation warnings from the conversion
        return ov.convert_model(network, example_input=example)


class OpenVinoNetwork(CompiledNetwork):
    """A TorchScript network converted and compiled by OpenVINO for one input shape; called like the network."""

    def __init__(self, network, example: torch.Tensor, hint: str, threads: int):
        super().__init__(openvino_module().Core(), convert(network, example), example.shape, hint, threads)


def _compiled(networks: Sequence, tile_shape: Sequence[int], hint: str) -> list:
    example = torch.zeros((1, *tile_shape), dtype=torch.float32)
    if hint == "f32":  # fp32 all through: the head needs no splitting off
        return [OpenVinoNetwork(n, example, hint, torch.get_num_threads()) for n in networks]
    out = []
    for n in networks:
        # The segmentation head stays in fp32 here too (see head.Fp32Head): with it in bf16 OpenVINO
        # gave Dice 0.989 on the region-based fidelity case, the same miss as torch's whole-network bf16.
        split = fp32_head(n)
        if split is None:
            raise ValueError("the segmentation head could not be split off")
        split.body = OpenVinoNetwork(split.body, example, hint, torch.get_num_threads())
        out.append(split)
    return out


def openvino_networks(networks: Sequence, tile_shape: Sequence[int], dtype: torch.dtype | None) -> list | None:
    """The networks compiled by OpenVINO for ``[1, *tile_shape]`` inputs, in bf16 (``dtype`` bf16: all but the
    segmentation head, which runs in fp32 in torch) or fp32 (``dtype`` None: whole), or None (not installed, no
    bf16 on this CPU, or a network it cannot convert: logged, and the TorchScript paths run)."""
    if not available():
        return None
    hint = "bf16" if dtype == torch.bfloat16 else "f32"
    try:
        if hint == "bf16" and not bf16_capable():
            log.info("OpenVINO reports no bf16 on this CPU: not a fast-path candidate")
            return None
        return _compiled(networks, tile_shape, hint)
    except TelemetryError as e:
        log.warning("OpenVINO not used: its telemetry (usage data sent to Google Analytics) could not be declined: "
                    "%s; running TorchScript only", e)
        return None
    except Exception as e:
        log.warning("OpenVINO could not compile the network (%s: %s); running TorchScript only", type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
        return None
