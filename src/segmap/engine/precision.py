"""How the network runs: exact (fp32) or fast (bf16 on CPUs that compute it natively, fp16 on CUDA).

``precision`` is ``"exact"``, ``"fast"`` or ``"auto"`` (fast where the hardware has it, else exact). The fast path
uses autocast, so normalisation layers, softmax-free logits accumulation and everything outside the network stay
in fp32; only convolutions and matrix products run in the low precision, except the segmentation head (the last
convolution, which makes the logits), which runs in fp32: see :mod:`segmap.engine.head`. On CPUs without native bf16 the
fast path is OpenVINO's fp32 where OpenVINO is allowed and installed (:mod:`segmap.engine.openvino_runtime`).

On the CPU, which variant of a network is fastest depends on its size, not on a rule we could write down: torch's
frozen, oneDNN-fused TorchScript is 3-6x faster than the plain graph on small networks (32x48x48 patches, <= 256
features) but about 25 % slower on nnU-Net's default CT network (6 stages, 32..320 features, patch 128^3), where
bf16 autocast on the plain graph is 2x faster than either fp32 variant (with AMX, bf16 also beat the fused graph
on the small networks measured). So the engine times the allowed candidates on the first network calls of a run and keeps the fastest
for the rest. A call is one network on one tile (one mirrored copy of it, with mirroring), so with mirroring the
choice is made inside the first tile. Each candidate's first call on each fold's network is a warm-up (TorchScript
profiles its graph on it) and is not compared; the next call is timed. A candidate whose warm-up call already took
twice the best timed call gets no second call, and once the best timed call takes a second or more the choice is
made without trying the rest: that is convolution arithmetic, where fusing saves a per-operation overhead that is
by then a small share (the fused graph is slower there), and each trial call of a slower path costs seconds. The
candidates are listed best-on-large-networks first, so such a run never leaves the first one. On the fast path
the fused fp32 graph is tried only while a call takes under 0.1 s: it lost to bf16 on every network measured, and
may win only on tiny ones.

Trial calls of different candidates may make up one tile's mirrored copies, so the result is the same as if one
candidate had run every call, within the tolerance of the candidates allowed: exact allows only fp32 variants
(logits within ~1e-5 of each other), fast also bf16 (or fp16 on CUDA) ones.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .head import fp32_head
from .openvino_runtime import openvino_networks
from .options import check_precision

log = logging.getLogger("segmap.engine")

#: CPU flags that mean native bf16 arithmetic (oneDNN uses AMX tiles or AVX512-BF16 dot products). Without them
#: torch still accepts bf16 but emulates it, which is slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags the CPU reports (empty when it cannot be inspected: not Linux, or /proc hidden)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    return frozenset(w for line in text.splitlines() if line.startswith("flags") and ":" in line
                     for w in line.split(":", 1)[1].split())


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native-bf16 flags this CPU reports (empty when none, or when the CPU cannot be inspected)."""
    flags = cpu_flags(cpuinfo)
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def cpu_has_fast_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bf16 natively and torch's oneDNN can use it; never assumed."""
    if not cpu_bf16_flags(cpuinfo):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the fast path on ``device``, or None where there is no fast path."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def resolve_precision(precision: str, device: torch.device,
                      use_openvino: bool = False) -> torch.dtype | None:
    """The autocast dtype to use (None: fp32) for a requested ``precision`` on ``device``.

    ``fast`` where the hardware has no fast path runs exact with a warning (a deployed image may land on an older
    host, and emulated bf16 would be slower than fp32, never faster), unless ``use_openvino`` (allowed, installed):
    its fp32 is then the fast path (:func:`candidates_for`).
    """
    check_precision(precision)
    if precision == "exact":
        return None
    dtype = fast_dtype(device)
    if dtype is None and use_openvino:
        log.info("this CPU has no native bf16 (flags %s): the fast path is OpenVINO fp32", "/".join(BF16_CPU_FLAGS))
    elif dtype is None and precision == "fast":
        log.warning("precision 'fast' requested but this CPU has no native bf16 (flags %s); running exact fp32",
                    "/".join(BF16_CPU_FLAGS))
    return dtype


_DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def frozen(network):
    """A frozen, oneDNN-fused copy of a TorchScript network, or None where torch cannot do it."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # torch points to torch.compile; TorchScript is our input
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.optimize_for_inference(torch.jit.freeze(network.eval()))
    except Exception as e:  # an unusual graph: run it as it is
        log.debug("network not frozen for CPU inference: %s", e)
        return None


def _fast_networks(networks: Sequence) -> tuple[list, str]:
    """The networks for an autocast candidate (heads in fp32 where they can be split off) and a name suffix."""
    heads = [fp32_head(n) for n in networks]
    if all(h is not None for h in heads):
        return heads, ", fp32 head"
    log.info("segmentation head could not be split off: the fast path runs the whole network in reduced precision")
    return list(networks), ""


@dataclass
class Candidate:
    """One way to run the fold networks: which graphs, and autocast to which dtype (None: fp32)."""

    name: str
    networks: Sequence[Callable]
    dtype: torch.dtype | None = None
    #: Tried only while the best timed call so far is shorter than this (seconds; None: always tried). For paths
    #: that win only on small networks, where a trial call is cheap; elsewhere a trial costs seconds.
    try_below: float | None = None
    #: The arithmetic's name where autocast's dtype does not tell it (e.g. int8 networks measured by bench/).
    arithmetic: str = ""

    @property
    def precision(self) -> str:
        return self.arithmetic or _DTYPE_NAMES[self.dtype]

    @property
    def needs_calibration(self) -> bool:
        """Whether the networks must see a tile of the input before their first call (quantized networks, which
        have a ``calibrate(tile)`` method and no compiled graph until then)."""
        return getattr(self.networks, "compiled", True) is None

    def calibrate(self, sample: torch.Tensor) -> None:
        """Calibrate on ``sample`` (a ``[1, c, *patch]`` tile of the input) where this path needs it."""
        self.networks.calibrate(sample)

    def __call__(self, fold: int, x: torch.Tensor) -> torch.Tensor:
        """Fold ``fold``'s network on ``x`` in this candidate's arithmetic."""
        net = self.networks[fold]
        if x.device.type == "cuda" and self.dtype is None:
            # Exact on a GPU means fp32 convolutions: cuDNN would otherwise use TF32 (10-bit mantissa).
            with torch.backends.cudnn.flags(enabled=True, benchmark=torch.backends.cudnn.benchmark,
                                            deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
                return net(x)
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return net(x)


def candidates_for(networks: Sequence, device: torch.device, dtype: torch.dtype | None,
                   optimize: bool | None = None, tile_shape: Sequence[int] | None = None,
                   openvino_fp32: bool = False) -> list[Candidate]:
    """The ways to run ``networks`` on ``device`` that the chosen precision allows.

    ``optimize`` picks the CPU's fp32 graph: None both the plain and the frozen/fused one (the faster is kept),
    True only the frozen/fused one (the plain one where torch cannot freeze it), False only the plain one.
    ``tile_shape`` (``[channels, *patch]``), given where OpenVINO is allowed (``EngineOptions.openvino``) and the
    optional ``openvino`` package is installed, adds OpenVINO (:mod:`segmap.engine.openvino_runtime`) as a
    candidate of the fast path: bf16 on the CPU's bf16 fast path, and fp32 where ``openvino_fp32`` says the fast
    path was asked for on a CPU without native bf16 (``dtype`` None). The exact path never runs OpenVINO.
    """
    if device.type != "cpu":
        if dtype is None:
            return [Candidate("torchscript fp32", networks)]
        fast, suffix = _fast_networks(networks)
        return [Candidate(f"torchscript {_DTYPE_NAMES[dtype]} autocast{suffix}", fast, dtype)]
    # First the path that is best on large networks: a run too short to time every candidate (a few calls)
    # then loses least in absolute terms (a small network's tiles are cheap whichever path runs them).
    out = []
    openvino_fp32 = openvino_fp32 and dtype is None and tile_shape is not None
    if tile_shape is not None and (dtype == torch.bfloat16 or openvino_fp32):
        # First when asked for: per tile it beat every TorchScript path of its arithmetic on the medium and
        # realistic-size networks (bench/bench_runtimes.py), and a one-tile run never gets to time the others.
        compiled = openvino_networks(networks, tile_shape, dtype)
        if compiled is not None:
            out.append(Candidate("openvino bf16, fp32 head", compiled, dtype) if dtype is not None
                       else Candidate("openvino fp32", compiled))
    # Next to OpenVINO's fp32, torch's fp32 lost on every network measured (about 2x slower per call, AVX2):
    # tried only while calls are cheap, as the fused graph is next to bf16 below.
    torch_fp32_below = 0.1 if out and openvino_fp32 else None
    if dtype is not None:
        # Plain fp32 never beats bf16 autocast on a CPU with native bf16; the frozen fp32 graph can (small nets).
        fast, suffix = _fast_networks(networks)
        out.append(Candidate(f"torchscript {_DTYPE_NAMES[dtype]} autocast{suffix}", fast, dtype))
    elif not optimize:
        out.append(Candidate("torchscript fp32", networks, try_below=torch_fp32_below))
    fused = [frozen(n) for n in networks] if optimize is not False else [None]
    if all(f is not None for f in fused):
        # Next to bf16 the fused fp32 graph lost on every network measured (demo model 21 against 9 ms a call,
        # medium 590 against 200 ms, 2 threads, AMX); it may still win on a tiny network on a CPU with slower bf16,
        # where trying it costs milliseconds. On larger networks its one warm-up call cost 25 % of a medium run.
        out.append(Candidate("torchscript frozen fp32", fused,
                             try_below=0.1 if dtype is not None else torch_fp32_below))
    elif not any(c.name.startswith("torchscript") for c in out):  # the graph that cannot be frozen runs as it is
        out.append(Candidate("torchscript fp32", networks, try_below=torch_fp32_below))
    return out


@dataclass
class FastestCandidate:
    """Runs network calls with each candidate in turn until each has a timed call, then only with the fastest."""

    candidates: list[Candidate]
    #: A candidate whose warm-up call took this many times the best timed call gets no timed call: on
    #: nnU-Net-sized networks a call of the wrong path costs seconds.
    give_up: float = 2.0
    #: Once the best timed call takes this long, it is chosen without trying the remaining candidates.
    settle: float = 1.0
    #: Seconds of each candidate's last trial call (its warm-up call until it has a timed one).
    seconds: dict[str, float] = field(default_factory=dict)
    #: Calls each candidate ran.
    calls: dict[str, int] = field(default_factory=dict)
    chosen: Candidate | None = None
    #: A representative tile of the current input (``() -> [1, c, *patch]``) for candidates that calibrate on it
    #: (:attr:`Candidate.needs_calibration`); set by the sliding window. Without it such a candidate calibrates on
    #: the tile of its first call.
    calibration_sample: Callable[[], torch.Tensor] | None = None
    _timed: set = field(default_factory=set, init=False, repr=False)  # candidates with a timed call
    _warm: set = field(default_factory=set, init=False, repr=False)  # (candidate, fold) pairs called at least once

    def __post_init__(self) -> None:
        if len(self.candidates) == 1:
            self.chosen = self.candidates[0]

    @property
    def folds(self) -> int:
        return len(self.candidates[0].networks)

    def networks(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """One callable per fold: each call runs on the candidate this runner picks for it."""
        return [lambda x, k=k: self.call(k, x) for k in range(self.folds)]

    def next(self) -> Candidate:
        """The candidate for the next call."""
        if self.chosen is not None:
            return self.chosen
        best = self._best_timed()
        settled = bool(self._timed) and best >= self.settle
        for c in self.candidates:
            if c.name in self._timed or settled or (c.try_below is not None and best >= c.try_below):
                continue
            if c.name in self.seconds and self.seconds[c.name] > self.give_up * best:
                continue  # even its warm-up call ruled it out: a timed one would be wasted time
            return c
        self.chosen = min((c for c in self.candidates if c.name in self._timed), key=lambda c: self.seconds[c.name])
        log.info("network path: %s (call times %s)", self.chosen.name,
                 ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.seconds.items()))
        return self.chosen

    def _best_timed(self) -> float:
        return min((self.seconds[name] for name in self._timed), default=float("inf"))

    def call(self, fold: int, x: torch.Tensor) -> torch.Tensor:
        candidate = self.next()
        if candidate.needs_calibration:
            if not self._calibrate(candidate, x):
                return self.call(fold, x)
        self.calls[candidate.name] = self.calls.get(candidate.name, 0) + 1
        if self.chosen is not None:
            return candidate(fold, x)
        t = time.perf_counter()
        out = candidate(fold, x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)  # so that the call's time is the call's
        self.seconds[candidate.name] = time.perf_counter() - t
        if (candidate.name, fold) in self._warm:
            self._timed.add(candidate.name)
        self._warm.add((candidate.name, fold))
        return out

    def _calibrate(self, candidate: Candidate, x: torch.Tensor) -> bool:
        """Calibrate ``candidate`` (not timed as a call); on failure drop it with a warning. True when it can run."""
        try:
            candidate.calibrate(self.calibration_sample() if self.calibration_sample is not None else x)
            return True
        except Exception as e:  # a network that cannot be quantized: the other paths run, where there are any
            others = [c for c in self.candidates if c is not candidate]
            if not others:
                raise
            log.warning("%s dropped: its calibration failed (%s: %s)", candidate.name, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            self.candidates = others
            self.chosen = others[0] if len(others) == 1 else None
            return False

    def pin(self, precision: str) -> Candidate:
        """Run every call with the candidate named ``precision``, else the first of that arithmetic (fp32, bf16,
        fp16): for measurements and tests that must know what ran. Raises ``ValueError`` when none matches."""
        for c in sorted(self.candidates, key=lambda c: c.name != precision):
            if c.precision == precision or c.name == precision:
                self.chosen = c
                return c
        raise ValueError(f"no {precision} path among {[c.name for c in self.candidates]}")

    def current(self) -> Candidate:
        """The chosen candidate, or the one that ran the most calls when the run was too short to choose."""
        if self.chosen is not None:
            return self.chosen
        return max(self.candidates, key=lambda c: self.calls.get(c.name, 0))
