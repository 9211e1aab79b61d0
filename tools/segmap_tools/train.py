"""Train the bundled demo model: a small nnU-Net PlainConvUNet that segments the spleen of synthetic phantoms.

    PYTHONPATH=tools python -m segmap_tools.train --out models/demo-spleen/model.ts [--steps N] [--seed S]

The recipe follows nnU-Net where it matters for inference: the plans carry ``CTNormalization`` with intensity
properties computed from the training cases' foreground voxels as nnU-Net's fingerprint does; phantoms are generated
directly at the plans' spacing, so preprocessing is exactly the normalisation nnU-Net's predictor applies; training
uses random patches (the last of each batch forced to contain foreground), random mirroring on every axis (so
test-time mirroring is valid) and nnU-Net's loss (cross-entropy + soft Dice without background). It departs from
nnU-Net for speed: Adam instead of SGD, a few hundred steps, no spatial or intensity augmentation (the phantoms
vary by seed).

The self-check segments held-out phantoms (seeds below :data:`TRAIN_SEED_BASE`, which training never uses) with the
exported model.ts through segmap's engine, exactly as a deployment would, and reports Dice per case. Demo only,
not for clinical use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from segmap.demo.phantom import LABELS, Phantom, make_phantom
from .plans import build_network, make_dataset_json, make_plans

CONFIGURATION = "3d_fullres"
#: Training phantoms: the demo study's field of view (48 x 128 x 128 voxels of 3 x 1.5 x 1.5 mm) sampled
#: directly at the plans' spacing. The coarser in-plane spacing keeps CPU training and inference short, and
#: makes inference on the demo study exercise nnU-Net's resampling both ways.
SHAPE_ZYX = (48, 64, 64)
SPACING_ZYX = (3.0, 3.0, 3.0)
PATCH_ZYX = (32, 48, 48)
FEATURES = (8, 16, 32, 64)
#: Training phantoms use seeds from here on; lower seeds are held out for validation and for the demo study.
TRAIN_SEED_BASE = 1000
VALIDATION_SEEDS = (0, 1, 2)
DESCRIPTION = ("Demo model: spleen segmentation of synthetic CT phantoms (segmap.demo.phantom), trained in minutes "
               "on CPU. Demo only, NOT for clinical use.")


def foreground_intensity_properties(phantoms: Sequence[Phantom]) -> dict[str, float]:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` entry: statistics of HU inside the labels."""
    fg = np.concatenate([p.hu[p.labels > 0].astype(np.float64) for p in phantoms])
    return {
        "max": float(fg.max()),
        "mean": float(fg.mean()),
        "median": float(np.median(fg)),
        "min": float(fg.min()),
        "percentile_00_5": float(np.percentile(fg, 0.5)),
        "percentile_99_5": float(np.percentile(fg, 99.5)),
        "std": float(fg.std()),
    }


def ct_normalize(hu: np.ndarray, props: Mapping[str, float]) -> np.ndarray:
    """nnU-Net's ``CTNormalization``: clip to the foreground percentiles, subtract the mean, divide by the std."""
    image = np.clip(hu.astype(np.float32), props["percentile_00_5"], props["percentile_99_5"])
    return (image - np.float32(props["mean"])) / np.float32(max(props["std"], 1e-8))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int((pred & truth).sum()) / denom


def _random_patch(rng: np.random.Generator, phantom: Phantom, image: np.ndarray, patch: Sequence[int],
                  force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape
    if force_fg:
        fg = np.argwhere(phantom.labels > 0)
        centre = fg[rng.integers(len(fg))]
        lo = [int(np.clip(c - rng.integers(p // 4, 3 * p // 4 + 1), 0, s - p)) for c, p, s in zip(centre, patch, size)]
    else:
        lo = [int(rng.integers(0, s - p + 1)) for s, p in zip(size, patch)]
    sl = tuple(slice(a, a + p) for a, p in zip(lo, patch))
    img, lab = image[sl], phantom.labels[sl]
    for axis in range(3):  # mirroring augmentation, as nnU-Net's trainer does
        if rng.random() < 0.5:
            img, lab = np.flip(img, axis), np.flip(lab, axis)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def _loss(logits, target, num_classes: int):
    """Cross-entropy + soft Dice over foreground classes, per sample (nnU-Net's default, batch_dice off)."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, 1)[:, 1:]
    onehot = F.one_hot(target, num_classes).permute(0, 4, 1, 2, 3)[:, 1:].float()
    axes = (2, 3, 4)
    intersect = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    soft_dice = (2 * intersect + 1e-5) / (denom + 1e-5).clamp_min(1e-8)
    return ce - soft_dice.mean()


def fit(network, cases: Sequence[Phantom], images: Sequence[np.ndarray], *, patch: Sequence[int], num_classes: int,
        steps: int, rng: np.random.Generator, batch_size: int = 2, lr: float = 3e-3, log=print):
    """Train ``network`` in place on random patches of normalised ``images`` with the ``cases``' labels."""
    import torch

    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - s / steps) ** 0.9)
    t_train = time.perf_counter()
    network.train()
    running = None
    for step in range(steps):
        # As nnU-Net: the batch's last patch holds foreground; here the others do too, one time in three.
        batch = [_random_patch(rng, cases[i], images[i], patch,
                               force_fg=(b == batch_size - 1) or rng.random() < 1 / 3)
                 for b, i in enumerate(rng.integers(0, len(cases), batch_size))]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))[:, None]
        y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(network(x), y, num_classes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {running:.3f}  {time.perf_counter() - t_train:.0f} s")
    network.eval()
    return network


def fit_phantom_network(network, *, steps: int, seed: int = 0, extra_labels: bool = True,
                        patch: Sequence[int] = (24, 48, 48), spacing: Sequence[float] = (3.0, 1.5, 1.5),
                        intensity_properties: Mapping[str, float], num_cases: int = 6, log=None):
    """Briefly train a one-channel network on phantoms (spleen, and with ``extra_labels`` liver and bone) so that
    its output has real structure; used by the fidelity tests. Phantoms are CT-normalised with the given
    properties, at ``spacing``, with the default demo field of view."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    fov_mm = (144.0, 192.0, 192.0)
    shape = tuple(max(p, int(round(f / s))) for p, f, s in zip(patch, fov_mm, spacing))
    cases = [make_phantom(shape, spacing, seed=TRAIN_SEED_BASE + 500 + i, extra_labels=extra_labels)
             for i in range(num_cases)]
    images = [ct_normalize(c.hu, intensity_properties) for c in cases]
    classes = 4 if extra_labels else len(LABELS)
    return fit(network, cases, images, patch=patch, num_classes=classes, steps=steps, rng=rng,
               log=log or (lambda *_: None))


def train(out: str | Path, *, steps: int = 250, seed: int = 0, num_cases: int = 16, batch_size: int = 2,
          lr: float = 3e-3, threads: int = 2, validation_seeds: Sequence[int] = VALIDATION_SEEDS,
          log=print) -> dict:
    """Train, export ``out`` (MONet model.ts) and return a report with timings and held-out Dice."""
    import torch

    from segmap.model import export_monet

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    cases = [make_phantom(SHAPE_ZYX, SPACING_ZYX, seed=TRAIN_SEED_BASE + seed * num_cases + i)
             for i in range(num_cases)]
    props = foreground_intensity_properties(cases)
    images = [ct_normalize(c.hu, props) for c in cases]
    plans = make_plans(patch_size=PATCH_ZYX, spacing=SPACING_ZYX, normalization_schemes=["CTNormalization"],
                       intensity_properties=[props], features=FEATURES, configuration=CONFIGURATION,
                       dataset_name="Dataset990_DemoSpleenPhantom")
    dataset_json = make_dataset_json(LABELS, ["CT"], name="Dataset990_DemoSpleenPhantom")
    dataset_json["numTraining"] = num_cases
    network = build_network(plans, CONFIGURATION, 1, len(LABELS))
    log(f"{num_cases} training phantoms in {time.perf_counter() - t0:.1f} s; intensity properties {props}")
    t_train = time.perf_counter()
    fit(network, cases, images, patch=PATCH_ZYX, num_classes=len(LABELS), steps=steps, rng=rng,
        batch_size=batch_size, lr=lr, log=log)
    train_s = time.perf_counter() - t_train

    metadata = _metadata(dataset_json, steps=steps, seed=seed, num_cases=num_cases)
    path = export_monet(out, network, plans, dataset_json, CONFIGURATION, mirroring_axes=(0, 1, 2),
                        metadata=metadata)
    from segmap.engine import EngineOptions, Segmenter
    from segmap.model import load_model

    segmenter = Segmenter(load_model(path), EngineOptions(device="cpu"))
    dices = {}
    t_val = time.perf_counter()
    for s in validation_seeds:
        case = make_phantom(SHAPE_ZYX, SPACING_ZYX, seed=s)
        dices[s] = dice(segmenter.predict(case.hu[None], SPACING_ZYX) == 1, case.labels == 1)
    report = {
        "model": str(path),
        "size_bytes": path.stat().st_size,
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "seconds_per_validation_case": round((time.perf_counter() - t_val) / max(len(validation_seeds), 1), 2),
        "heldout_dice": {str(k): round(v, 4) for k, v in dices.items()},
        "steps": steps,
        "seed": seed,
    }
    log(json.dumps(report))
    return report


def _metadata(dataset_json: Mapping, *, steps: int, seed: int, num_cases: int) -> dict:
    from segmap.model import default_metadata

    meta = default_metadata(dataset_json, name="Demo spleen segmentation (synthetic phantom)",
                            description=DESCRIPTION, input_names=["image"])
    meta.update({
        "intended_use": "Demonstration and testing of segmap only. Not for clinical use.",
        "authors": "segmap",
        "data_source": "Synthetic phantoms from segmap.demo.phantom; no patient data.",
        "data_type": "nifti or dicom CT, axial",
        "training": (f"python -m segmap_tools.train --steps {steps} --seed {seed}: {num_cases} phantoms "
                     f"{SHAPE_ZYX[0]}x{SHAPE_ZYX[1]}x{SHAPE_ZYX[2]} at {SPACING_ZYX} mm"),
    })
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segmap_tools.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo-spleen/model.ts"), help="model.ts to write")
    parser.add_argument("--steps", type=int, default=250, help="training steps (batches of 2 patches)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training phantoms, patches and weights")
    parser.add_argument("--cases", type=int, default=16, help="number of training phantoms")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--min-dice", type=float, default=0.9, help="fail when a held-out Dice is lower")
    args = parser.parse_args(argv)
    report = train(args.out, steps=args.steps, seed=args.seed, num_cases=args.cases, threads=args.threads)
    worst = min(float(v) for v in report["heldout_dice"].values())
    if worst < args.min_dice:
        print(f"held-out Dice {worst:.3f} is below {args.min_dice}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
