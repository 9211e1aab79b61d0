"""Choosing how the network runs: precision settings, bf16 detection, the fastest-candidate choice."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import DEMO_MODEL

from segmap.engine import EngineOptions
from segmap.engine.openvino_runtime import available as openvino_available
from segmap.engine.precision import (Candidate, FastestCandidate, candidates_for, cpu_bf16_flags, cpu_has_fast_bf16,
                                     fp32_head, resolve_precision)
from segmap.engine.sliding_window import sliding_window_logits
from segmap.errors import SegmapError

CPU = torch.device("cpu")
#: The optional openvino extra (pytest.importorskip would import it, and its telemetry with it).
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="the optional openvino extra is not installed")


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: fpu sse2 avx2 {flags}\n")
    return path


def test_bf16_flags_are_read_from_cpuinfo(tmp_path):
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx512f avx512_bf16")) == ("avx512_bf16",)
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "amx_tile amx_bf16 avx512_bf16")) == ("amx_bf16", "avx512_bf16")
    # avx512f alone emulates bf16 (slower than fp32): not a fast path.
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx512f avx512bw")) == ()
    assert not cpu_has_fast_bf16(_cpuinfo(tmp_path, "avx512f avx512bw"))
    assert cpu_bf16_flags(tmp_path / "missing") == ()  # not Linux, or /proc hidden: never assume


@pytest.mark.parametrize("bad", ["fp16", "", "Exact"])
def test_unknown_precision_is_a_user_error(bad):
    with pytest.raises(SegmapError, match="unknown precision"):
        EngineOptions(precision=bad)


@pytest.mark.parametrize("step", [0, 1.5, -0.5, "often", None])
def test_tile_step_out_of_range_is_a_user_error(step):
    with pytest.raises(SegmapError, match="tile step .* must be a number in \\(0, 1\\]"):
        EngineOptions(step=step)


def test_tile_step_is_nnunets_on_both_paths_unless_set():
    """The fast path does not widen the step by itself: a larger one failed the fidelity bar on the trained
    networks (docs/performance.md); the user sets it."""
    from segmap.engine import Segmenter
    from segmap.model import load_model

    model = load_model(DEMO_MODEL)
    for precision in ("exact", "fast", "auto"):
        assert Segmenter(model, EngineOptions(precision=precision)).step == 0.5
    assert Segmenter(model, EngineOptions(precision="fast", step="0.75")).step == 0.75


def test_network_calls_follow_the_tile_step():
    """The report's network calls: tiles x mirrored copies x folds, fewer with a larger step."""
    import numpy as np

    from segmap.engine import Segmenter
    from segmap.engine.sliding_window import tile_starts
    from segmap.model import load_model

    model = load_model(DEMO_MODEL)
    image = np.full((1, 80, 240, 240), -1000, np.float32)
    image[:, 8:72, 30:210, 30:210] = 40
    counts = {}
    for step in (0.5, 1.0):
        seg = Segmenter(model, EngineOptions(device="cpu", step=step))
        seg.predict(image, (3.0, 1.5, 1.5))
        counts[step] = seg.network_calls
        spatial = [int(round(s * sp / t)) for s, sp, t in zip(image.shape[1:], (3.0, 1.5, 1.5),
                                                               model.spec.target_spacing)]
        padded = [max(s, p) for s, p in zip(spatial, model.spec.patch_size)]
        tiles = np.prod([len(t) for t in tile_starts(padded, model.spec.patch_size, step)])
        assert seg.network_calls == tiles * len(seg.networks), (step, spatial)
    assert counts[1.0] < counts[0.5]


def test_exact_never_runs_reduced_precision():
    assert resolve_precision("exact", CPU) is None
    net = torch.jit.trace(torch.nn.Conv3d(1, 2, 3, padding=1).eval(), torch.zeros(1, 1, 4, 4, 4))
    assert [c.name for c in candidates_for([net], CPU, None)] == ["torchscript fp32", "torchscript frozen fp32"]
    assert [c.name for c in candidates_for([net], CPU, None, optimize=True)] == ["torchscript frozen fp32"]
    assert [c.name for c in candidates_for([net], CPU, None, optimize=False)] == ["torchscript fp32"]


def test_auto_follows_the_cpu():
    expected = torch.bfloat16 if cpu_has_fast_bf16() else None
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fast", CPU) == expected


def test_fast_path_is_available_on_this_cpu():
    """Makes a missing bf16 path visible: without it the fast-path fidelity checks in test_fidelity do not run."""
    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no native bf16 (amx_bf16 / avx512_bf16 flags): torch's bf16 fast-path fidelity "
                    "not checked (OpenVINO fp32's is, where the openvino extra is installed)")
    net = torch.jit.trace(_HeadNet().eval(), torch.zeros(1, 1, 4, 4, 4))
    runner = FastestCandidate(candidates_for([net], CPU, resolve_precision("fast", CPU)))
    assert runner.pin("torchscript bf16 autocast, fp32 head").dtype == torch.bfloat16
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        # all but the segmentation head (see test_segmentation_head_runs_in_fp32_under_autocast) runs in bf16
        assert runner.chosen.networks[0].body(x).dtype == torch.bfloat16


class Sleepy(torch.nn.Module):
    """A 'network' that costs a known time: the choice must follow measured time, not the list order."""

    def __init__(self, seconds: float, value: float):
        super().__init__()
        self.seconds, self.value = seconds, value

    def forward(self, x):
        time.sleep(self.seconds)
        return torch.full((x.shape[0], 2, *x.shape[2:]), self.value)


def test_fastest_candidate_is_kept_after_a_warm_up_and_a_timed_call_each():
    slow, quick = Candidate("slow", [Sleepy(0.03, 1.0)]), Candidate("quick", [Sleepy(0.0, 1.0)])
    runner = FastestCandidate([slow, quick])
    data = torch.zeros(1, 40, 10, 10).numpy()
    logits = sliding_window_logits(data, runner, (10, 10, 10), 2, device=CPU)
    assert runner.chosen is quick
    assert runner.calls == {"slow": 2, "quick": 5}  # 7 tiles: 2 + 2 trials, then the rest on the faster
    assert torch.allclose(logits.float(), torch.ones_like(logits.float()))


def test_with_mirroring_the_choice_is_made_inside_the_first_tile():
    """Each mirrored copy is a network call: the trials cost calls, not whole tiles of eight calls."""
    slow, quick = Candidate("slow", [Sleepy(0.02, 1.0)]), Candidate("quick", [Sleepy(0.0, 1.0)])
    runner = FastestCandidate([slow, quick])
    logits = sliding_window_logits(torch.zeros(1, 20, 10, 10).numpy(), runner, (10, 10, 10), 2, device=CPU,
                                   mirror_axes=(0, 1, 2))
    assert runner.chosen is quick
    assert runner.calls == {"slow": 2, "quick": 22}  # 3 tiles x 8 copies; 2 + 2 of the first tile's were trials
    assert torch.allclose(logits.float(), torch.ones_like(logits.float()))


def test_each_folds_first_call_is_a_warm_up_not_a_timing():
    """A fold's first call pays TorchScript's profiling run: it must not count as that candidate's timed call."""

    class FirstCallSlow(Sleepy):
        def forward(self, x):
            out = super().forward(x)
            self.seconds = 0.0
            return out

    slow = Candidate("slow", [FirstCallSlow(0.05, 1.0), FirstCallSlow(0.05, 1.0)])
    other = Candidate("other", [Sleepy(0.01, 1.0), Sleepy(0.01, 1.0)])
    runner = FastestCandidate([slow, other], give_up=100)
    sliding_window_logits(torch.zeros(1, 40, 10, 10).numpy(), runner, (10, 10, 10), 2, device=CPU)
    # fold 0 and fold 1 each warm up once; the third call (fold 0 again) is the timed one, and it is fast
    assert runner.chosen is slow
    assert runner.seconds["slow"] < 0.01


def test_a_candidate_slow_even_to_warm_up_gets_no_second_trial():
    quick, slow = Candidate("quick", [Sleepy(0.0, 1.0)]), Candidate("slow", [Sleepy(0.03, 1.0)])
    runner = FastestCandidate([quick, slow])
    sliding_window_logits(torch.zeros(1, 40, 10, 10).numpy(), runner, (10, 10, 10), 2, device=CPU)
    assert runner.chosen is quick
    assert runner.calls == {"quick": 6, "slow": 1}


def test_a_long_timed_call_settles_the_choice_without_trying_the_rest():
    """On nnU-Net-sized networks the first path's calls take seconds; a trial of another costs seconds more."""
    first, other = Candidate("first", [Sleepy(0.03, 1.0)]), Candidate("other", [Sleepy(0.0, 1.0)])
    runner = FastestCandidate([first, other], settle=0.02)
    sliding_window_logits(torch.zeros(1, 40, 10, 10).numpy(), runner, (10, 10, 10), 2, device=CPU)
    assert runner.chosen is first
    assert runner.calls == {"first": 7}


def test_a_small_network_path_is_tried_only_while_calls_are_cheap():
    """The fused fp32 graph on the fast path wins, if ever, on tiny networks; elsewhere its trial costs seconds."""
    first = Candidate("bf16", [Sleepy(0.02, 1.0)])
    runner = FastestCandidate([first, Candidate("fused", [Sleepy(0.0, 1.0)], try_below=0.01)])
    sliding_window_logits(torch.zeros(1, 40, 10, 10).numpy(), runner, (10, 10, 10), 2, device=CPU)
    assert runner.chosen is first and runner.calls == {"bf16": 7}
    runner = FastestCandidate([Candidate("bf16", [Sleepy(0.02, 1.0)]),
                               Candidate("fused", [Sleepy(0.0, 1.0)], try_below=1.0)])
    sliding_window_logits(torch.zeros(1, 40, 10, 10).numpy(), runner, (10, 10, 10), 2, device=CPU)
    assert runner.chosen.name == "fused"


def test_fast_path_tries_the_fused_fp32_graph_only_for_cheap_calls():
    net = torch.jit.trace(_HeadNet().eval(), torch.zeros(1, 1, 4, 4, 4))
    fused = [c for c in candidates_for([net], CPU, torch.bfloat16) if c.precision == "fp32"]
    assert fused and all(c.try_below is not None for c in fused)
    assert all(c.try_below is None for c in candidates_for([net], CPU, None))


class Calibrating:
    """Networks that must see a tile of the input before their first call (as quantized networks do)."""

    def __init__(self, fail: bool = False):
        self.compiled, self.samples, self.fail = None, [], fail

    def calibrate(self, sample):
        self.samples.append(sample.clone())
        if self.fail:
            raise RuntimeError("cannot quantize this graph\nsecond line")
        self.compiled = [Sleepy(0.0, 1.0)]

    def __len__(self):
        return 1

    def __getitem__(self, fold):
        return self.compiled[fold]


def test_a_calibrating_path_is_calibrated_once_on_the_middle_tile_before_its_first_call():
    data = torch.arange(40, dtype=torch.float32).reshape(1, 40, 1, 1).expand(1, 40, 10, 10).contiguous().numpy()
    nets = Calibrating()
    runner = FastestCandidate([Candidate("int8", nets, arithmetic="int8")])
    sliding_window_logits(data, runner, (10, 10, 10), 2, device=CPU)
    assert len(nets.samples) == 1 and runner.calls == {"int8": 7}
    # 7 tiles along z start at 0, 5, ..., 30: the middle one starts at 15
    assert nets.samples[0].shape == (1, 1, 10, 10, 10) and float(nets.samples[0][0, 0, 0, 0, 0]) == 15.0
    assert runner.current().precision == "int8"
    assert runner.calibration_sample is None  # a warm model keeps no reference to the last input


def test_a_path_whose_calibration_fails_is_dropped_with_a_warning(caplog):
    runner = FastestCandidate([Candidate("int8", Calibrating(fail=True)), Candidate("fp32", [Sleepy(0.0, 1.0)])])
    with caplog.at_level("WARNING", logger="segmap.engine"):
        logits = sliding_window_logits(torch.zeros(1, 40, 10, 10).numpy(), runner, (10, 10, 10), 2, device=CPU)
    assert runner.chosen.name == "fp32" and runner.calls == {"fp32": 7}
    assert "int8 dropped: its calibration failed (RuntimeError: cannot quantize this graph)" in caplog.text
    assert torch.allclose(logits.float(), torch.ones_like(logits.float()))
    alone = FastestCandidate([Candidate("int8", Calibrating(fail=True))])
    with pytest.raises(RuntimeError, match="cannot quantize"):  # nothing else to run: the error is the run's
        sliding_window_logits(torch.zeros(1, 10, 10, 10).numpy(), alone, (10, 10, 10), 2, device=CPU)


def test_pin_refuses_a_precision_it_does_not_have():
    runner = FastestCandidate([Candidate("torchscript fp32", [Sleepy(0, 0)])])
    with pytest.raises(ValueError, match="no bf16 path"):
        runner.pin("bf16")


def test_float16_overflow_reruns_in_float32(caplog):
    """Sums accumulate in float16 like nnU-Net's; logits too large for it must not come back as inf."""
    data = torch.zeros(1, 20, 20, 20).numpy()
    with caplog.at_level("WARNING", logger="segmap.engine"):
        logits = sliding_window_logits(data, [Sleepy(0.0, 1e5)], (10, 10, 10), 2, device=CPU)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.allclose(logits, torch.full_like(logits, 1e5))
    assert "overflow float16" in caplog.text
    assert sliding_window_logits(data, [Sleepy(0.0, 3.0)], (10, 10, 10), 2, device=CPU).dtype == torch.float16


class _HeadNet(torch.nn.Module):
    def __init__(self, relu_last: bool = False):
        super().__init__()
        self.body = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.head = torch.nn.Conv3d(8, 3, 1)
        self.relu_last = relu_last

    def forward(self, x):
        y = self.head(torch.nn.functional.leaky_relu(self.body(x)))
        return torch.relu(y) if self.relu_last else y


def test_segmentation_head_runs_in_fp32_under_autocast():
    """The fast path keeps the last convolution (the logits) in fp32: bf16 there moved region voxels across 0."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 8, 8)
    net = torch.jit.trace(_HeadNet().eval(), x)
    split = fp32_head(net)
    assert split is not None
    with torch.inference_mode():
        assert torch.allclose(split(x), net(x), atol=1e-5)  # the same network, cut and rejoined
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, whole = split(x), net(x)
    assert out.dtype == torch.float32 and whole.dtype == torch.bfloat16
    # The head's inputs are the bf16 body's, so the output is close to but not the fp32 one; never the bf16 one.
    assert not torch.equal(out, whole.float())
    names = [c.name for c in candidates_for([net], CPU, torch.bfloat16, optimize=False)]
    assert names == ["torchscript bf16 autocast, fp32 head"]


def test_a_network_not_ending_in_a_convolution_runs_whole():
    x = torch.randn(1, 1, 6, 8, 8)
    net = torch.jit.trace(_HeadNet(relu_last=True).eval(), x)
    assert fp32_head(net) is None
    assert [c.name for c in candidates_for([net], CPU, torch.bfloat16, optimize=False)] == [
        "torchscript bf16 autocast"]
    assert fp32_head(Sleepy(0, 1.0)) is None  # not TorchScript at all


@needs_openvino
def test_openvino_is_a_fast_candidate_where_installed():
    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no native bf16: OpenVINO bf16 cannot run here (its fp32 is checked instead)")
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 8, 8)
    net = torch.jit.trace(_HeadNet().eval(), x)
    names = [c.name for c in candidates_for([net], CPU, torch.bfloat16, optimize=False, tile_shape=(1, 6, 8, 8))]
    assert names == ["openvino bf16, fp32 head", "torchscript bf16 autocast, fp32 head"]
    assert [c.name for c in candidates_for([net], CPU, None, tile_shape=(1, 6, 8, 8))] == [
        "torchscript fp32", "torchscript frozen fp32"]  # the exact path never runs it
    ov = FastestCandidate(candidates_for([net], CPU, torch.bfloat16, optimize=False, tile_shape=(1, 6, 8, 8)))
    ov_net = ov.pin("openvino bf16, fp32 head").networks[0]
    with torch.inference_mode():
        out, ref = ov_net(x), net(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert torch.allclose(out, ref, atol=0.05, rtol=0.02)  # bf16 body
        with pytest.raises(ValueError, match="compiled for"):
            ov_net(torch.randn(1, 1, 6, 8, 10))


@needs_openvino
def test_openvino_fp32_is_the_fast_path_where_the_cpu_has_no_native_bf16():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 8, 8)
    net = torch.jit.trace(_HeadNet().eval(), x)
    candidates = candidates_for([net], CPU, None, tile_shape=(1, 6, 8, 8), openvino_fp32=True)
    assert [c.name for c in candidates] == ["openvino fp32", "torchscript fp32", "torchscript frozen fp32"]
    # torch's fp32 lost to it on every network measured: tried only while calls are cheap
    assert [c.try_below for c in candidates] == [None, 0.1, 0.1]
    assert [c.name for c in candidates_for([net], CPU, None, tile_shape=(1, 6, 8, 8))] == [
        "torchscript fp32", "torchscript frozen fp32"]  # not asked for: the exact path
    runner = FastestCandidate(candidates)
    assert runner.pin("openvino fp32").precision == "fp32"
    with torch.inference_mode():
        out, ref = runner.networks()[0](x), net(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-3)  # fp32, summed in another order


@needs_openvino
def test_openvino_fp32_only_on_the_fast_path_of_a_cpu_without_native_bf16(monkeypatch, caplog):
    from pathlib import Path

    from segmap.engine import Segmenter, precision
    from segmap.model import load_model

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda *a: False)  # whatever this CPU has
    model = load_model(DEMO_MODEL)
    for asked in ("fast", "auto"):
        with caplog.at_level("INFO", logger="segmap.engine"):
            seg = Segmenter(model, EngineOptions(precision=asked, openvino=True))
        assert seg.runner.candidates[0].name == "openvino fp32", asked
        assert "the fast path is OpenVINO fp32" in caplog.text
    exact = Segmenter(model, EngineOptions(precision="exact", openvino=True))
    assert not any("openvino" in c.name for c in exact.runner.candidates)
    plain = Segmenter(model, EngineOptions(precision="fast"))  # not asked for: exact, with a warning
    assert not any("openvino" in c.name for c in plain.runner.candidates)


@needs_openvino
def test_openvino_sends_no_telemetry_and_writes_nothing_home(tmp_path):
    """``import openvino`` alone sends a usage event to Google Analytics and writes a client ID to ~/intel unless
    the user opted out (openvino 2026.4, checked by hand): segmap's use of it must do neither."""
    import os
    import subprocess
    import sys

    code = """
import torch
from segmap.engine.openvino_runtime import openvino_networks
net = torch.jit.trace(torch.nn.Conv3d(1, 2, 3, padding=1).eval(), torch.zeros(1, 1, 4, 8, 8))
nets = openvino_networks([net], (1, 4, 8, 8), None)
assert nets is not None, "OpenVINO not used"
nets[0](torch.zeros(1, 1, 4, 8, 8))
import openvino_telemetry
print("consent", openvino_telemetry.Telemetry().consent)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}  # its own opt-outs
    env["HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "consent False" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no ~/intel/openvino_ga_cid, no stats


def test_openvino_only_when_asked_for_and_installed(monkeypatch, caplog):
    from pathlib import Path

    from segmap.engine import Segmenter, openvino_runtime
    from segmap.model import load_model

    model = load_model(DEMO_MODEL)
    default = Segmenter(model, EngineOptions(precision="fast"))
    assert not any("openvino" in c.name for c in default.runner.candidates)  # opt-in, installed or not
    monkeypatch.setattr(openvino_runtime, "available", lambda: False)
    with caplog.at_level("WARNING", logger="segmap.engine"):
        asked = Segmenter(model, EngineOptions(precision="fast", openvino=True))
    assert not any("openvino" in c.name for c in asked.runner.candidates)
    assert "openvino package is not installed" in caplog.text
