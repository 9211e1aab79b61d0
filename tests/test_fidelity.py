"""segmap's engine against nnU-Net itself (nnunetv2's nnUNetPredictor on the CPU), same weights, same input.

Each case builds a small PlainConvUNet, saves it both as a MONet model.ts and as an nnU-Net results folder, and
compares the label maps: the exact path Dice >= 0.999 for every label present, the fast path (bf16, on CPUs that
compute it natively; skipped elsewhere) Dice >= 0.99, both >= 99.5 % voxel agreement. The networks are
trained briefly on phantoms so that several labels cover real structures (asserted, so a trivial all-background
comparison cannot pass).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_CT

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")
pytest.importorskip("dynamic_network_architectures")

from nnunet_reference import dice_per_label, make_model_pair, nnunet_predict  # noqa: E402
from segmap.demo.phantom import make_phantom  # noqa: E402
from segmap_tools.plans import make_dataset_json, make_plans  # noqa: E402
from segmap.engine import EngineOptions, Segmenter  # noqa: E402
from segmap.engine.options import NNUNET_STEP  # noqa: E402
from segmap.engine.precision import cpu_has_fast_bf16  # noqa: E402
from segmap.model import load_model  # noqa: E402

SAMPLE_CT_NIFTI = SAMPLE_CT / "ct.nii.gz"

CT_PROPS = {"mean": 80.0, "std": 250.0, "percentile_00_5": -150.0, "percentile_99_5": 1000.0}
LABELS = {"background": 0, "spleen": 1, "liver": 2, "bone": 3}
FEATURES = (6, 12, 24)
#: segmap's device (nnU-Net's reference always runs on the CPU): bench/gpu_check.sh sets SEGMAP_TEST_DEVICE=cuda.
DEVICE = os.environ.get("SEGMAP_TEST_DEVICE", "cpu")
#: The fast path's arithmetic here, or None where there is none (the fast checks are then skipped; see
#: tests/test_precision.py::test_fast_path_is_available_on_this_cpu for the visible skip).
FAST = "fp16" if DEVICE.startswith("cuda") else ("bf16" if cpu_has_fast_bf16() else None)
#: OpenVINO (opt-in, optional extra) is checked too where it is installed: bf16 beside torch's where the CPU has
#: native bf16, else fp32, the fast path of CPUs without it.
OPENVINO = importlib.util.find_spec("openvino") is not None
if FAST is None and OPENVINO and DEVICE == "cpu":
    FAST = "fp32"
#: ``SEGMAP_FIDELITY_INT8=1`` also holds OpenVINO int8 (NNCF, tools/segmap_tools/quantize.py) to the fast path's
#: bar: a measurement of a candidate the engine does not offer (it missed the bar; docs/performance.md).
INT8 = os.environ.get("SEGMAP_FIDELITY_INT8") == "1"
#: ``SEGMAP_FIDELITY_STEP=0.75`` also holds the exact arithmetic at that tile step to the fast path's bar against
#: nnU-Net at its default 0.5: how the fast path's step was decided (it keeps 0.5; docs/performance.md).
WIDER_STEP = float(os.environ["SEGMAP_FIDELITY_STEP"]) if os.environ.get("SEGMAP_FIDELITY_STEP") else None
#: Per-label Dice bars against nnUNetPredictor: the exact (fp32) path and the fast (bf16/fp16) path.
EXACT_DICE = 0.999
FAST_DICE = 0.99


def _plans(**kw):
    defaults = dict(patch_size=(24, 48, 48), spacing=(3.0, 1.5, 1.5), normalization_schemes=["CTNormalization"],
                    intensity_properties=[CT_PROPS], features=FEATURES)
    defaults.update(kw)
    return make_plans(**defaults)


def _check(reference: np.ndarray, ours: np.ndarray, present, *, min_dice: float, what: str):
    assert ours.shape == reference.shape
    dice = dice_per_label(reference, ours)
    agreement = float((reference == ours).mean())
    assert agreement >= 0.995, (what, agreement, dice)
    for label in present:
        assert dice[label] >= min_dice, (what, label, dice)
    print(f"fidelity {what}: agreement {agreement:.5f}, Dice {{{', '.join(f'{k}: {v:.4f}' for k, v in dice.items())}}}")
    return dice, agreement


def compare(tmp_path: Path, trained, image_czyx: np.ndarray, spacing_zyx, *, plans: dict, dataset_json=None,
            folds: int = 1, mirroring: bool = False, min_labels: int = 2, exact_dice: float = EXACT_DICE,
            fast_dice: float = FAST_DICE):
    """nnU-Net's label map against segmap's exact path and, where the CPU computes bf16 natively, the fast path
    (each reduced-precision candidate pinned, so that each is checked, then as users get it: the fastest per run)."""
    dataset_json = dataset_json or make_dataset_json(LABELS)
    n_out = len(dataset_json.get("regions_class_order") or dataset_json["labels"])
    states = [trained(plans, k, n_out) for k in range(folds)]
    pair = make_model_pair(tmp_path, states, plans=plans, dataset_json=dataset_json)
    reference = nnunet_predict(pair.results, folds, image_czyx, spacing_zyx, mirroring=mirroring)
    assert reference.shape == image_czyx.shape[1:]
    counts = np.bincount(reference.ravel(), minlength=len(dataset_json["labels"]))
    present = [v for v in range(1, len(counts)) if counts[v] >= 0.002 * reference.size]
    assert len(present) >= min_labels, f"the network's output is too trivial to compare: counts {counts}"
    print(f"voxels per label {counts.tolist()}")
    model = load_model(pair.monet)

    exact = Segmenter(model, EngineOptions(device=DEVICE, mirroring=mirroring, precision="exact"))
    result = _check(reference, exact.predict(image_czyx, spacing_zyx), present, min_dice=exact_dice, what="exact")
    assert exact.precision_used == "fp32" and exact.step == NNUNET_STEP
    if FAST:
        fast = Segmenter(model, EngineOptions(device=DEVICE, mirroring=mirroring, precision="fast",
                                              openvino=OPENVINO))
        assert fast.step == NNUNET_STEP
        # Every reduced-precision way the engine may choose, each pinned so that it is what is checked: TorchScript
        # autocast and, where the optional extras are installed, OpenVINO bf16 or fp32 and int8 (opt-in).
        paths = [c.name for c in fast.runner.candidates if c.precision != "fp32" or c.name.startswith("openvino")]
        if FAST != "fp32":
            assert any(p.startswith("torchscript") for p in paths), paths
        assert paths, [c.name for c in fast.runner.candidates]
        for path in paths:
            pinned = Segmenter(model, EngineOptions(device=DEVICE, mirroring=mirroring, precision="fast",
                                                    openvino=OPENVINO))
            chosen = pinned.runner.pin(path)
            _check(reference, pinned.predict(image_czyx, spacing_zyx), present, min_dice=fast_dice,
                   what=f"fast {chosen.precision} ({path}, tile step {pinned.step})")
            assert pinned.precision_used == chosen.precision and pinned.network_path == path
        auto = Segmenter(model, EngineOptions(device=DEVICE, mirroring=mirroring, precision="auto"))
        _check(reference, auto.predict(image_czyx, spacing_zyx), present, min_dice=fast_dice,
               what=f"auto ({auto.network_path}, tile step {auto.step})")
    if WIDER_STEP:
        wide = Segmenter(model, EngineOptions(device=DEVICE, mirroring=mirroring, precision="exact", step=WIDER_STEP))
        _check(reference, wide.predict(image_czyx, spacing_zyx), present, min_dice=fast_dice,
               what=f"exact arithmetic at tile step {WIDER_STEP} against nnU-Net at 0.5 (measured, not a default)")
    if INT8:
        from segmap.engine.precision import FastestCandidate
        from segmap_tools.quantize import int8_candidate

        int8 = Segmenter(model, EngineOptions(device="cpu", mirroring=mirroring, precision="fast"))
        int8.runner = FastestCandidate([int8_candidate(int8.networks, (model.spec.num_channels,
                                                                       *model.spec.patch_size))])
        _check(reference, int8.predict(image_czyx, spacing_zyx), present, min_dice=fast_dice,
               what="int8 (NNCF, OpenVINO; measured, not offered)")
        assert int8.precision_used == "int8"
    return result


def ct_image(shape=(32, 80, 80), spacing=(3.0, 1.5, 1.5), seed=5):
    p = make_phantom(shape, spacing, seed=seed, extra_labels=True)
    return p.hu[None].astype(np.float32), spacing


def test_ct_normalisation(tmp_path, trained):
    image, spacing = ct_image()
    compare(tmp_path, trained, image, spacing, plans=_plans(spacing=(2.5, 1.25, 1.25)))


def test_mirroring_on(tmp_path, trained):
    image, spacing = ct_image(shape=(20, 48, 48), spacing=(3.0, 2.0, 2.0))
    compare(tmp_path, trained, image, spacing, plans=_plans(patch_size=(16, 40, 40), spacing=(3.0, 2.0, 2.0)),
            mirroring=True)


@pytest.mark.parametrize("use_mask", [False, True], ids=["zscore", "zscore-mask"])
def test_zscore(tmp_path, trained, use_mask):
    # An MR-like image: zero outside the body, so cropping to nonzero and the mask both matter.
    image, spacing = ct_image(seed=7)
    image = np.where(image > -500, image + 1024, 0).astype(np.float32)
    image[:, :, :6, :] = 0  # an empty band the crop removes
    compare(tmp_path, trained, image, spacing,
            plans=_plans(normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[use_mask]))


@pytest.mark.parametrize("scheme", ["NoNormalization", "RescaleTo01Normalization"])
def test_other_normalisations(tmp_path, trained, scheme):
    image, spacing = ct_image(shape=(24, 64, 64), seed=9)
    if scheme == "NoNormalization":  # the values the network was trained on, so its output is not out of range
        image = np.clip(image, CT_PROPS["percentile_00_5"], CT_PROPS["percentile_99_5"])
        image = (image - CT_PROPS["mean"]) / CT_PROPS["std"]
    else:
        image = image + 1024
    compare(tmp_path, trained, image.astype(np.float32), spacing,
            plans=_plans(normalization_schemes=[scheme]), min_labels=1)


def test_anisotropic_target_separate_z(tmp_path, trained):
    # Target spacing 6 x 1.2 x 1.2 mm: max/min = 5 > 3, so nnU-Net resamples out-of-plane separately (order 0),
    # both on the way in and when the logits go back.
    image, spacing = ct_image(shape=(36, 72, 72), spacing=(2.0, 1.5, 1.5))
    compare(tmp_path, trained, image, spacing, plans=_plans(spacing=(6.0, 1.2, 1.2), patch_size=(12, 48, 48)))


def test_transpose_forward(tmp_path, trained):
    # Plans store spacing and patch in transposed order: network axes are (x, z, y) of the image.
    image, spacing = ct_image(shape=(30, 64, 56))
    compare(tmp_path, trained, image, spacing,
            plans=_plans(transpose_forward=(2, 0, 1), spacing=(1.5, 3.0, 1.5), patch_size=(48, 24, 48)))


def test_two_fold_ensemble(tmp_path, trained):
    image, spacing = ct_image(seed=11)
    dice, _ = compare(tmp_path, trained, image, spacing, plans=_plans(), folds=2)


def test_input_smaller_than_patch(tmp_path, trained):
    image, spacing = ct_image(shape=(10, 28, 24), spacing=(3.0, 4.0, 4.0), seed=3)
    compare(tmp_path, trained, image, spacing, plans=_plans(spacing=(3.0, 3.0, 3.0)), min_labels=1)


def test_region_based_model(tmp_path, trained):
    labels = {"background": 0, "organs": [1, 2], "liver": [2], "bone": [3]}
    ds = make_dataset_json(labels, regions_class_order=[1, 2, 3])
    image, spacing = ct_image(seed=13)
    # A region is "logit > 0" and this head's logits are differences of two class logits, so many voxels sit
    # close to the threshold: with the head in bf16 too, region 1 reached only Dice 0.989 (see engine.head.Fp32Head).
    compare(tmp_path, trained, image, spacing, plans=_plans(), dataset_json=ds)


@pytest.mark.skipif(not SAMPLE_CT_NIFTI.exists(), reason=f"shared sample CT not found at {SAMPLE_CT_NIFTI}")
def test_sample_ct_nifti(tmp_path, trained):
    import nibabel as nib

    img = nib.load(str(SAMPLE_CT_NIFTI))
    image = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]  # (x, y, z) -> (z, y, x)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3][::-1])
    compare(tmp_path, trained, image, spacing, plans=_plans(spacing=(3.0, 3.0, 3.0), patch_size=(32, 48, 48)),
            min_labels=1)


@pytest.mark.skipif(not SAMPLE_CT_NIFTI.exists(), reason=f"shared sample CT not found at {SAMPLE_CT_NIFTI}")
def test_nibabel_axis_order_matches_simpleitk():
    """segmap reads NIfTI with nibabel; nnU-Net with SimpleITK. Both must give the same (z, y, x) array."""
    sitk = pytest.importorskip("SimpleITK")
    import nibabel as nib

    ref = sitk.ReadImage(str(SAMPLE_CT_NIFTI))
    img = nib.load(str(SAMPLE_CT_NIFTI))
    ours = np.asarray(img.dataobj).transpose(2, 1, 0)
    assert np.array_equal(sitk.GetArrayFromImage(ref), ours)
    assert np.allclose(ref.GetSpacing()[::-1], img.header.get_zooms()[:3][::-1])


@pytest.mark.parametrize("case", ["region-based", "two-fold"])
def test_tile_step_setting_matches_nnunet_at_that_step(tmp_path, trained, case):
    """A tile step set by the user is nnU-Net's ``tile_step_size``: the exact path at 0.75 matches nnUNetPredictor
    run with ``tile_step_size=0.75`` as closely as at its default."""
    image, spacing = ct_image(seed=13 if case == "region-based" else 11)
    ds = make_dataset_json({"background": 0, "organs": [1, 2], "liver": [2], "bone": [3]},
                           regions_class_order=[1, 2, 3]) if case == "region-based" else make_dataset_json(LABELS)
    folds = 2 if case == "two-fold" else 1
    n_out = len(ds.get("regions_class_order") or ds["labels"])
    states = [trained(_plans(), k, n_out) for k in range(folds)]
    pair = make_model_pair(tmp_path, states, plans=_plans(), dataset_json=ds)
    model = load_model(pair.monet)
    for step in (0.6, 0.75, 1.0):
        reference = nnunet_predict(pair.results, folds, image, spacing, mirroring=False, step=step)
        present = [v for v, n in enumerate(np.bincount(reference.ravel())) if v and n >= 0.002 * reference.size]
        ours = Segmenter(model, EngineOptions(device=DEVICE, precision="exact", step=step))
        assert ours.step == step
        _check(reference, ours.predict(image, spacing), present, min_dice=EXACT_DICE, what=f"exact, tile step {step}")
