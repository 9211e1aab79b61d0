"""segmap's engine against nnU-Net's nnUNetPredictor: same weights, same input, same settings, one process.

Prints wall time and peak memory (resident set growth during the call) of each, their ratios, and the agreement of
the two label maps. Run with ``make bench`` or ``.venv/bin/python bench/bench_engine.py --help``.

The nnU-Net side gets a results folder written from the MONet model itself: a traced network keeps its parameter
names, so its state dict loads into the PlainConvUNet the embedded plans describe.
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
from segmap_tools.plans import build_network, make_dataset_json, make_plans, write_nnunet_results_folder  # noqa: E402
from segmap.engine import EngineOptions, Segmenter  # noqa: E402
from segmap.model import export_monet, load_model  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def synthetic_model(folder: Path, features, patch, spacing) -> Path:
    torch.manual_seed(0)
    ds = make_dataset_json({"background": 0, "spleen": 1, "liver": 2, "bone": 3})
    plans = make_plans(patch_size=patch, spacing=spacing, normalization_schemes=["CTNormalization"],
                       intensity_properties=[{"mean": 80.0, "std": 250.0, "percentile_00_5": -150.0,
                                              "percentile_99_5": 1000.0}], features=features)
    net = build_network(plans, "3d_fullres", 1, 4)
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


SCENARIOS = {
    "demo-clinical": {"model": ROOT / "models" / "demo-spleen" / "model.ts", "shape": (120, 512, 512),
                      "spacing": (2.5, 0.78, 0.78),
                      "help": "the bundled demo model (3 mm) on a 512x512x120 CT-like phantom at 0.78 mm"},
    "medium-net": {"model": None, "shape": (80, 256, 256), "spacing": (2.5, 0.78, 0.78),
                   "help": "a synthetic 5-stage PlainConvUNet (16..256 features, patch 48x112x112) on 256x256x80"},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="demo-clinical",
                    help="; ".join(f"{k}: {v['help']}" for k, v in sorted(SCENARIOS.items())))
    ap.add_argument("--model", type=Path, default=None, help="MONet model.ts (overrides the scenario's)")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="phantom size z y x (overrides the scenario's)")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, help="phantom spacing z y x, mm")
    ap.add_argument("--mirroring", action="store_true", help="test-time mirroring on both sides")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scenario = SCENARIOS[args.scenario]
    args.shape = args.shape or scenario["shape"]
    args.spacing = args.spacing or scenario["spacing"]
    if args.model is None and scenario["model"] is not None:
        args.model = scenario["model"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = args.model or synthetic_model(tmp, (16, 32, 64, 128, 256), (48, 112, 112), (3.0, 1.5, 1.5))
        results, folds = results_folder_from_monet(model_path, tmp / "nnunet")
        phantom = make_phantom(tuple(args.shape), tuple(args.spacing), seed=1234, extra_labels=True)
        image = phantom.hu[None].astype(np.float32)
        spacing = tuple(args.spacing)
        print(f"scenario {args.scenario}: model {model_path} ({folds} fold(s)); input {image.shape[1:]} at {spacing} mm; "
              f"mirroring {'on' if args.mirroring else 'off'}; {args.threads} torch threads")

        with PeakRSS() as mem_ref:
            t = time.perf_counter()
            ref = nnunet_predict(results, folds, image, spacing, mirroring=args.mirroring)
            t_ref = time.perf_counter() - t
        with PeakRSS() as mem_ours:
            t = time.perf_counter()
            segmenter = Segmenter(load_model(model_path), EngineOptions(device="cpu", mirroring=args.mirroring))
            ours = segmenter.predict(image, spacing)
            t_ours = time.perf_counter() - t

    dice = dice_per_label(ref, ours)
    agreement = float((ref == ours).mean())
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in segmenter.timings.items())
    print(f"nnUNetPredictor : {t_ref:8.2f} s   peak +{mem_ref.growth / 2**20:8.0f} MiB")
    print(f"segmap engine   : {t_ours:8.2f} s   peak +{mem_ours.growth / 2**20:8.0f} MiB   ({stages})")
    print(f"ratio segmap/nnU-Net: time {t_ours / t_ref:.3f}, peak memory {mem_ours.growth / max(mem_ref.growth, 1):.3f}")
    print(f"agreement {agreement:.5f}; Dice per label " + ", ".join(f"{k}: {v:.4f}" for k, v in dice.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
