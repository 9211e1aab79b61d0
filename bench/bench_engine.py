"""segmap's engine against nnU-Net's nnUNetPredictor: same weights, same input, same settings, one process.

For each mirroring setting asked for (default: off and on) it runs nnUNetPredictor once and segmap once per
precision asked for (default: exact, and fast where the CPU has native bf16), and prints a table: wall time, peak
memory (resident set growth during the call), ratios to nnU-Net, segmap's stage times and the share of its time
spent outside the network, the network path that ran, voxel agreement and per-label Dice against nnU-Net.

nnU-Net's own network time is measured too (forward hooks on its network; they change nothing in what runs). Its
share of nnU-Net's wall time is the floor of the exact path's time ratio: the exact path runs the same fp32
convolutions, which take the same time in TorchScript as in nnU-Net's eager PyTorch (``network alone`` in the
table is that ratio, near 1 for exact), so only the time outside the network can be saved.

Scenarios (``--scenario``):

- ``demo-clinical``: the bundled demo model (3 mm) on a 512x512x120 CT-like phantom at 0.78 mm; resampling heavy.
- ``medium-net``: a 5-stage PlainConvUNet (16..256 features, patch 48x112x112) on 256x256x80.
- ``realistic``: nnU-Net's default 3d_fullres CT topology (6 stages, 32..320 features, 31 M parameters, patch
  128^3) on a 512x512x300 series at 0.8x0.8x1.5 mm, target 1.5 mm (64 tiles; minutes per tile-set on a CPU).
  ``--tiles N`` shrinks the field of view to N tiles per axis (``--tiles 1``: one tile, a quick check).
- ``many-class``: 105 labels (like TotalSegmentator) on the same 512x512x300 input with a small network: the
  memory scenario. nnU-Net's own peak is estimated first; when it cannot fit in the memory available it is not
  run and the estimate is printed instead (``--shape`` runs a smaller input side by side).

Synthetic networks have random weights whose output biases are calibrated on a phantom patch so that every class
wins somewhere (otherwise a random network paints one class everywhere and Dice means nothing).

The nnU-Net side gets a results folder written from the MONet model itself: a traced network keeps its parameter
names, so its state dict loads into the PlainConvUNet the embedded plans describe. Run with ``make bench`` or
``.venv/bin/python bench/bench_engine.py --help``. Peak memory is measured in one process, nnU-Net first; freed
memory the allocator keeps can make the second side's growth look smaller, so read memory ratios near 1 as equal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from nnunet_reference import dice_per_label, nnunet_predict  # noqa: E402
from segmap.demo.phantom import make_phantom  # noqa: E402
from segmap_tools.quantize import int8_available  # noqa: E402
from segmap_tools.plans import build_network, make_dataset_json, make_plans, write_nnunet_results_folder  # noqa: E402
from segmap.engine import EngineOptions, Segmenter  # noqa: E402
from segmap.engine.openvino_runtime import available as openvino_available  # noqa: E402
from segmap.engine.precision import FastestCandidate, cpu_flags, cpu_has_fast_bf16  # noqa: E402
from segmap.engine import preprocess  # noqa: E402
from segmap.model import export_monet, load_model  # noqa: E402

#: The CPU flags that decide the arithmetic paths, printed with every run (the figures are per CPU).
CPU_FLAGS_SHOWN = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni"}
CT_PROPS = {"mean": 80.0, "std": 250.0, "percentile_00_5": -150.0, "percentile_99_5": 1000.0}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak growth of the resident set while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.base


def calibrate_output_biases(net, plans: dict, share: float) -> None:
    """Shift the last layer's biases so that each foreground class beats background on about ``share`` of a
    phantom patch (one forward pass: a bias adds a constant to its class's logits)."""
    from segmap_tools.train import ct_normalize

    cfg = plans["configurations"]["3d_fullres"]
    patch, spacing = tuple(cfg["patch_size"]), tuple(cfg["spacing"])
    case = make_phantom(patch, spacing, seed=4242, extra_labels=True)
    x = torch.from_numpy(ct_normalize(case.hu, CT_PROPS))[None, None]
    net.eval()
    with torch.inference_mode():
        logits = net(x)[0].reshape(net_outputs(net), -1)[:, ::7].float().numpy()
    seg = [m for name, m in net.named_modules()
           if name.startswith("decoder.seg_layers.") and isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        for k in range(1, logits.shape[0]):
            delta = -float(np.quantile(logits[k] - logits[0], 1 - share))
            for layer in seg:
                layer.bias[k] += delta


def net_outputs(net) -> int:
    return [m for name, m in net.named_modules() if name.startswith("decoder.seg_layers.")][-1].out_channels


def synthetic_model(folder: Path, *, features, patch, spacing, n_labels: int = 4, n_conv_per_stage=2) -> Path:
    torch.manual_seed(0)
    labels = {"background": 0, **{f"class_{k}": k for k in range(1, n_labels)}}
    ds = make_dataset_json(labels)
    plans = make_plans(patch_size=patch, spacing=spacing, normalization_schemes=["CTNormalization"],
                       intensity_properties=[CT_PROPS], features=features)
    net = build_network(plans, "3d_fullres", 1, n_labels)
    calibrate_output_biases(net, plans, share=min(0.15, 0.6 / (n_labels - 1)))
    return export_monet(folder / "model.ts", net, plans, ds, "3d_fullres")


def results_folder_from_monet(model_path: Path, folder: Path) -> tuple[Path, int]:
    model = load_model(model_path)
    states = [torch.jit.load(str(f), map_location="cpu").state_dict() for f in model.fold_files]
    inf = model.inference
    plans = inf["plans"] if isinstance(inf["plans"], dict) else json.loads(inf["plans"])
    ds = inf["dataset_json"] if isinstance(inf["dataset_json"], dict) else json.loads(inf["dataset_json"])
    n_out = model.spec.num_outputs
    build_network(plans, model.spec.configuration, model.spec.num_channels, n_out).load_state_dict(states[0])
    write_nnunet_results_folder(folder, plans, ds, states, configuration=model.spec.configuration,
                                mirroring_axes=model.spec.mirroring_axes or None)
    return folder, len(states)


REALISTIC_FEATURES = (32, 64, 128, 256, 320, 320)
SCENARIOS = {
    "demo-clinical": dict(model=ROOT / "models" / "demo-spleen" / "model.ts", shape=(120, 512, 512),
                          spacing=(2.5, 0.78, 0.78)),
    "medium-net": dict(features=(16, 32, 64, 128, 256), patch=(48, 112, 112), target=(3.0, 1.5, 1.5),
                       shape=(80, 256, 256), spacing=(2.5, 0.78, 0.78)),
    "realistic": dict(features=REALISTIC_FEATURES, patch=(128, 128, 128), target=(1.5, 1.5, 1.5),
                      shape=(300, 512, 512), spacing=(1.5, 0.8, 0.8)),
    "many-class": dict(features=(8, 16, 32, 64, 128, 128), patch=(128, 128, 128), target=(1.5, 1.5, 1.5),
                       shape=(300, 512, 512), spacing=(1.5, 0.8, 0.8), labels=105),
}


def shape_for_tiles(tiles: int, patch, target, spacing) -> tuple[int, ...]:
    """An input shape whose resampled size gives ``tiles`` tiles per axis (step 0.5)."""
    return tuple(int(np.floor((p + (tiles - 1) * p // 2) * t / s)) for p, t, s in zip(patch, target, spacing))


def nnunet_peak_estimate(n_classes: int, net_shape, shape) -> int:
    """nnUNetPredictor's logits memory: float16 sums and weights at the network's resolution, their float32 copy
    for export, float32 probabilities of every class at the input's resolution, and one float64 class while
    resampling (skimage). Image, network and label map come on top."""
    n_net, n_in = int(np.prod(net_shape)), int(np.prod(shape))
    return n_classes * n_net * (2 + 4) + n_net * 2 + n_classes * n_in * 4 + n_in * 8


def parse_candidate(text: str) -> dict:
    """``PRECISION[+openvino][+int8][@STEP]``: a precision setting, OpenVINO allowed to compete (optional extra),
    int8 networks pinned (NNCF, tools/segmap_tools/quantize.py; measured, never offered by the engine), and a tile
    step (nnU-Net's ``tile_step_size``; 0.5 when not given)."""
    base, _, step = text.partition("@")
    parts = base.split("+")
    unknown = set(parts[1:]) - {"openvino", "int8"}
    if unknown or parts[0] not in ("exact", "fast", "auto"):
        raise SystemExit(f"bench_engine: unknown candidate {text!r} (PRECISION[+openvino][+int8][@STEP])")
    return dict(precision=parts[0], openvino="openvino" in parts or "int8" in parts, int8="int8" in parts,
                step=float(step) if step else 0.5)


def run_segmap(model_path, image, spacing, mirroring, candidate: str, device):
    """One segmap run of ``candidate`` (:func:`parse_candidate`)."""
    c = parse_candidate(candidate)
    with PeakRSS() as mem:
        t = time.perf_counter()
        seg = Segmenter(load_model(model_path),
                        EngineOptions(device=device, mirroring=mirroring, precision=c["precision"],
                                      openvino=c["openvino"], step=c["step"]))
        if c["int8"]:
            from segmap_tools.quantize import int8_candidate

            seg.runner = FastestCandidate([int8_candidate(seg.networks, (seg.spec.num_channels,
                                                                         *seg.spec.patch_size))])
        labels = seg.predict(image, spacing)
        elapsed = time.perf_counter() - t
    return labels, elapsed, mem.growth, seg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="demo-clinical")
    ap.add_argument("--model", type=Path, default=None, help="MONet model.ts (overrides the scenario's)")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="phantom size z y x (overrides the scenario's)")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, help="phantom spacing z y x, mm")
    ap.add_argument("--tiles", type=int, default=None,
                    help="shrink the field of view to this many tiles per axis (synthetic scenarios; quick checks)")
    ap.add_argument("--mirroring", choices=["off", "on", "both"], default="both")
    ap.add_argument("--precision", default="exact,fast",
                    help="comma-separated segmap candidates to run, each PRECISION[+openvino][+int8][@STEP]: exact, "
                         "fast, auto; +openvino lets OpenVINO compete (optional extra; OpenVINO fp32 is the fast path "
                         "where the CPU has no native bf16; plain fast is skipped with a note there); +int8 pins "
                         "NNCF-quantized int8 networks (openvino and nncf installed; measured, never offered by the "
                         "engine); @STEP sets the tile step (nnU-Net's tile_step_size, default 0.5), e.g. "
                         "fast+openvino@0.75")
    ap.add_argument("--no-nnunet", action="store_true", help="segmap only (no reference, no Dice)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides; peak memory is host memory)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sc = SCENARIOS[args.scenario]
    spacing = tuple(args.spacing or sc["spacing"])
    shape = tuple(args.shape or sc["shape"])
    if args.tiles:
        if "patch" not in sc:
            ap.error("--tiles needs a synthetic scenario (medium-net, realistic, many-class)")
        shape = shape_for_tiles(args.tiles, sc["patch"], sc["target"], spacing)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in list(precisions):
        c = parse_candidate(p)
        if (c["int8"] and not int8_available()) or (c["openvino"] and not openvino_available()):
            print(f"note: openvino (and nncf for int8) not installed (pip install segmap[bench]): {p} skipped")
            precisions.remove(p)
    if "fast" in precisions and args.device == "cpu" and not cpu_has_fast_bf16():
        hint = " (fast+openvino runs OpenVINO fp32 here)" if openvino_available() else ""
        print(f"note: this CPU has no native bf16 (amx_bf16/avx512_bf16): fast would run exact; skipped{hint}")
        precisions.remove("fast")
    mirrorings = {"off": [False], "on": [True], "both": [False, True]}[args.mirroring]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = args.model or sc.get("model") or synthetic_model(
            tmp, features=sc["features"], patch=sc["patch"], spacing=sc["target"], n_labels=sc.get("labels", 4))
        spec = load_model(model_path).spec
        results, folds = results_folder_from_monet(model_path, tmp / "nnunet")
        phantom = make_phantom(shape, spacing, seed=1234, extra_labels=True)
        image = phantom.hu[None].astype(np.float32)
        del phantom
        net_shape = tuple(int(round(s * sp / t)) for s, sp, t in
                          zip(shape, spacing, [spec.target_spacing[a] for a in np.argsort(spec.transpose_forward)]))
        estimate = nnunet_peak_estimate(spec.num_outputs, net_shape, shape)
        run_ref = not args.no_nnunet
        print(f"scenario {args.scenario}: model {Path(model_path).name} ({folds} fold(s), {spec.num_outputs} outputs, "
              f"patch {spec.patch_size}); input {shape} at {spacing} mm -> about {net_shape} at the network's "
              f"spacing; {args.threads} torch threads")
        shown = " ".join(sorted(cpu_flags() & CPU_FLAGS_SHOWN)) or "none of " + "/".join(sorted(CPU_FLAGS_SHOWN))
        box = preprocess.bbox_of(preprocess.nonzero_mask(image, fill_holes=False))
        kept = float(np.prod([hi - lo for lo, hi in box]) / np.prod(image.shape[1:]))
        print(f"CPU: {os.cpu_count()} cores, flags {shown}; crop to nonzero keeps {100 * kept:.1f} % of the voxels "
              f"(nnU-Net's rule, both sides)")
        if run_ref and estimate > 0.8 * available_bytes():
            print(f"nnUNetPredictor not run: its class arrays alone need about {estimate / 2**30:.1f} GiB, "
                  f"{available_bytes() / 2**30:.1f} GiB available")
            run_ref = False
        for mirroring in mirrorings:
            ref = exact_labels = None
            if run_ref:
                ref_timings: dict = {}
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    ref = nnunet_predict(results, folds, image, spacing, mirroring=mirroring, device=args.device,
                                         timings=ref_timings)
                    t_ref = time.perf_counter() - t
                ref_growth = mem.growth
                floor = ref_timings["network"] / t_ref
                rows.append(dict(side="nnUNetPredictor", mirroring=mirroring, seconds=t_ref,
                                 peak_mib=mem.growth / 2**20, network_seconds=ref_timings["network"],
                                 network_calls=ref_timings["calls"], exact_floor=floor))
                print(f"  mirroring {'on ' if mirroring else 'off'} nnUNetPredictor                 {t_ref:8.2f} s  "
                      f"peak +{mem.growth / 2**20:7.0f} MiB  [network {ref_timings['network']:.2f} s in "
                      f"{ref_timings['calls']} calls: {100 * floor:.1f} % of its time, the floor of an exact "
                      f"path's time ratio]")
            for precision in precisions:
                labels, elapsed, growth, seg = run_segmap(model_path, image, spacing, mirroring, precision, args.device)
                row = dict(side=f"segmap {precision}", mirroring=mirroring, seconds=elapsed,
                           peak_mib=growth / 2**20, path=seg.network_path, precision_used=seg.precision_used,
                           tile_step=seg.step, network_calls=seg.network_calls,
                           stages={k: round(v, 3) for k, v in seg.timings.items()})
                outside = elapsed - seg.timings.get("network", 0.0)
                row["outside_network_share"] = outside / elapsed
                line = (f"  mirroring {'on ' if mirroring else 'off'} segmap {precision:<24} {elapsed:8.2f} s  "
                        f"peak +{growth / 2**20:7.0f} MiB  [{seg.network_path}, step {seg.step:g}; "
                        f"network {seg.timings['network']:.2f} s in {seg.network_calls} calls, "
                        f"outside it {100 * row['outside_network_share']:.1f} %]")
                if precision == "exact":
                    exact_labels = labels
                elif exact_labels is not None:
                    row["agreement_vs_exact"] = float((exact_labels == labels).mean())
                    row["dice_vs_exact"] = dice_per_label(exact_labels, labels)
                    line += (f"\n      against segmap exact: agreement {row['agreement_vs_exact']:.5f}; Dice "
                             + ", ".join(f"{k}: {v:.4f}" for k, v in row["dice_vs_exact"].items()))
                if ref is not None:
                    row["time_ratio"] = elapsed / t_ref
                    row["network_ratio"] = seg.timings["network"] / ref_timings["network"]
                    row["memory_ratio"] = growth / max(ref_growth, 1)
                    row["agreement"] = float((ref == labels).mean())
                    row["dice"] = dice_per_label(ref, labels)
                    dice = ", ".join(f"{k}: {v:.4f}" for k, v in row["dice"].items())
                    line += (f"\n      ratio time {row['time_ratio']:.3f} (network alone {row['network_ratio']:.3f}), "
                             f"memory {row['memory_ratio']:.3f}; "
                             f"agreement {row['agreement']:.5f}; Dice {dice}")
                elif estimate:
                    row["memory_ratio_vs_estimate"] = growth / estimate
                    line += f"\n      memory vs nnU-Net's estimated class arrays: {growth / estimate:.3f}"
                print(line, flush=True)
                rows.append(row)
                del labels
                gc.collect()
            del exact_labels
    if args.json:
        args.json.write_text(json.dumps(dict(scenario=args.scenario, shape=shape, spacing=spacing, rows=rows,
                                             nnunet_estimate_gib=estimate / 2**30), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
