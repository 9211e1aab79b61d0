"""Helpers that run nnU-Net itself (nnunetv2's nnUNetPredictor, CPU) next to segmap on the same weights."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from segmap_tools.plans import build_network, make_dataset_json, make_plans, write_nnunet_results_folder
from segmap.model import export_monet


@dataclass
class ModelPair:
    """The same weights as a MONet model (file or fold folder) and as an nnU-Net results folder."""

    monet: Path
    results: Path
    folds: int


def make_model_pair(root: Path, state_dicts: Sequence[dict], *, plans: dict, dataset_json: dict,
                    mirroring_axes=(0, 1, 2)) -> ModelPair:
    root.mkdir(parents=True, exist_ok=True)
    n_in = len(dataset_json["channel_names"])
    n_out = len(dataset_json["labels"]) if "regions_class_order" not in dataset_json else len(
        dataset_json["regions_class_order"])
    monet_dir = root / "monet"
    for k, state in enumerate(state_dicts):
        net = build_network(plans, "3d_fullres", n_in, n_out)
        net.load_state_dict(state)
        export_monet(monet_dir / f"fold_{k}" / "model.ts", net, plans, dataset_json, "3d_fullres",
                     mirroring_axes=mirroring_axes)
    monet = monet_dir if len(state_dicts) > 1 else monet_dir / "fold_0" / "model.ts"
    results = write_nnunet_results_folder(root / "nnunet", plans, dataset_json, state_dicts,
                                          mirroring_axes=mirroring_axes)
    return ModelPair(monet, results, len(state_dicts))


def nnunet_predict(results: Path, folds: int, image_czyx: np.ndarray, spacing_zyx, *, mirroring: bool,
                   device: str = "cpu", timings: dict | None = None, step: float = 0.5) -> np.ndarray:
    """nnU-Net's own label map for an image already in SimpleITK's (c, z, y, x) order.

    On a GPU nnU-Net keeps everything on the device (its default there); on the CPU there is nothing to move.
    ``timings``, when given, receives ``network``: the seconds spent inside the network's forward calls (module
    hooks; they change nothing in what runs) and ``calls``: how many there were. ``step`` is its
    ``tile_step_size`` (``nnUNetv2_predict -step_size``; 0.5 by default, as there)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    dev = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), use_folds=tuple(range(folds)))
    if timings is not None:
        timings.update(network=0.0, calls=0)
        started: list[float] = []

        def before(module, args):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            started.append(time.perf_counter())

        def after(module, args, output):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            timings["network"] += time.perf_counter() - started.pop()
            timings["calls"] += 1

        predictor.network.register_forward_pre_hook(before)
        predictor.network.register_forward_hook(after)
    return predictor.predict_single_npy_array(np.asarray(image_czyx, dtype=np.float32),
                                              {"spacing": [float(s) for s in spacing_zyx]})


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for v in sorted(set(np.unique(a)) | set(np.unique(b))):
        if v == 0:
            continue
        x, y = a == v, b == v
        out[int(v)] = float(2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return out


__all__ = ["ModelPair", "make_model_pair", "nnunet_predict", "dice_per_label", "make_plans", "make_dataset_json",
           "build_network"]
