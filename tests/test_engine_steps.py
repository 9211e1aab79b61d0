"""Each step of the engine against the nnunetv2 function it reproduces (nnunetv2 is a test dependency only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

from segmap.engine import preprocess  # noqa: E402
from segmap.engine.predictor import logits_to_labels  # noqa: E402
from segmap.engine.resample import resample, separate_z_axis  # noqa: E402
from segmap.engine.sliding_window import gaussian_importance, pad_to_tile, tile_starts  # noqa: E402
from segmap.model import ChannelNormalization, ResamplingSpec  # noqa: E402

RESAMPLE_CASES = [
    # shape, new shape, current spacing, new spacing, order
    ((1, 20, 40, 36), (31, 57, 29), (2.0, 1.0, 1.0), (1.3, 0.7, 1.24), 3),   # isotropic path, up and down
    ((1, 12, 50, 44), (30, 61, 80), (5.0, 1.0, 1.0), (2.0, 0.8, 0.55), 3),   # anisotropic input: separate z
    ((1, 12, 50, 44), (24, 25, 22), (1.0, 1.0, 1.0), (0.5, 2.0, 2.0), 3),    # anisotropic target: separate z
    ((2, 30, 40, 44), (12, 61, 80), (1.0, 1.0, 1.0), (2.5, 0.7, 0.55), 1),   # logits-style, two channels
    ((1, 30, 40, 44), (15, 41, 44), (1.0, 4.0, 1.0), (2.0, 4.0, 1.0), 3),    # low-res axis is y
    ((1, 16, 40, 44), (8, 40, 44), (4.0, 1.0, 1.0), (8.0, 1.0, 1.0), 3),     # z halves: nearest-neighbour ties
]


@pytest.mark.parametrize("shape,new_shape,cur,new,order", RESAMPLE_CASES)
def test_resampling_equals_nnunet(shape, new_shape, cur, new, order):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    x[:, 3:8] += 5  # an edge, so cubic overshoot and its clipping matter
    ref = resample_data_or_seg_to_shape(x, new_shape, cur, new, is_seg=False, order=order, order_z=0,
                                        force_separate_z=None)
    ours = resample(x, new_shape, ResamplingSpec(order, 0, None), cur, new)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cur,new,force", [((3.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),
                                           ((1.0, 1.0, 1.0), (5.0, 1.0, 1.0), None),
                                           ((1.0, 1.0, 1.0), (1.5, 1.0, 1.0), None),
                                           ((4.0, 4.0, 1.0), (1.0, 1.0, 1.0), None),
                                           ((1.0, 2.0, 1.0), (1.0, 1.0, 1.0), True),
                                           ((5.0, 1.0, 1.0), (1.0, 1.0, 1.0), False)])
def test_separate_z_decision_equals_nnunet(cur, new, force):
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    do_sep, axis = determine_do_sep_z_and_axis(force, cur, new)
    assert separate_z_axis(ResamplingSpec(3, 0, force), cur, new) == (axis if do_sep else None)


@pytest.mark.parametrize("step", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("size,tile", [((64, 130, 131), (32, 48, 48)), ((32, 48, 48), (32, 48, 48)),
                                       ((33, 200, 49), (32, 64, 48)), ((300, 273, 273), (128, 128, 128))])
def test_tile_starts_equal_nnunet(size, tile, step):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    assert tile_starts(size, tile, step) == [list(s) for s in compute_steps_for_sliding_window(size, tile, step)]


def test_larger_tile_step_means_fewer_tiles_on_a_large_ct():
    """A 512x512x300 CT at 0.8x0.8x1.5 mm resampled to 1.5 mm (300x273x273), nnU-Net's default CT patch: 64 tiles
    at nnU-Net's step 0.5, 27 at 0.75 (the figure the tile_step_size setting's help gives)."""
    count = lambda step: int(np.prod([len(s) for s in tile_starts((300, 273, 273), (128, 128, 128), step)]))
    assert (count(0.5), count(0.75), count(1.0)) == (64, 27, 27)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_crop_on_a_phantom_equals_nnunet(modality):
    """nnU-Net crops to the nonzero region before tiling. On CT air is -1024, not 0, so nothing is cropped and
    every tile is needed; on MR-like images (zero outside the body) the crop removes the empty border, on both
    sides alike, so no tile lies wholly outside it."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    from segmap.demo.phantom import make_phantom

    image = make_phantom((40, 96, 96), (3.0, 1.5, 1.5), seed=2).hu[None].astype(np.float32)
    if modality == "MR":
        image = np.where(image > -500, image + 1024, 0).astype(np.float32)
    _, _, bbox = crop_to_nonzero(image.copy())
    ours = preprocess.bbox_of(preprocess.nonzero_mask(image, fill_holes=False))
    assert [list(b) for b in ours] == [list(b) for b in bbox]
    kept = np.prod([hi - lo for lo, hi in ours]) / np.prod(image.shape[1:])
    if modality == "CT":
        assert kept == 1.0
    else:
        assert kept < 0.8


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gaussian_equals_nnunet(dtype):
    """float16 is what nnUNetPredictor uses (its default), float32 what segmap's float32 accumulation uses."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    ref = compute_gaussian((20, 32, 28), sigma_scale=1.0 / 8, value_scaling_factor=10,
                           dtype=torch.from_numpy(np.zeros(1, dtype)).dtype, device=torch.device("cpu")).numpy()
    ours = gaussian_importance((20, 32, 28), dtype=dtype)
    assert ours.dtype == ref.dtype
    np.testing.assert_allclose(ours, ref, rtol=1e-5 if dtype == np.float32 else 0)


def test_padding_equals_nnunet():
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    x = np.random.default_rng(1).normal(size=(2, 10, 33, 50)).astype(np.float32)
    ref, ref_slicer = pad_nd_image(torch.from_numpy(x), (16, 32, 48), "constant", {"value": 0}, True, None)
    ours, unpad = pad_to_tile(x, (16, 32, 48))
    np.testing.assert_array_equal(ours, ref.numpy())
    assert tuple(ref_slicer[1:]) == unpad


def test_crop_to_nonzero_equals_nnunet():
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    x = np.zeros((2, 30, 40, 50), np.float32)
    x[0, 5:20, 8:30, 10:45] = 1
    x[1, 3:6, 30:35, 2:4] = 2
    x[0, 10, 15, 20] = 0  # a hole: filled in the mask, no effect on the box
    ref, seg, bbox = crop_to_nonzero(x.copy())
    ours_box = preprocess.bbox_of(preprocess.nonzero_mask(x, fill_holes=False))
    assert [list(b) for b in ours_box] == [list(b) for b in bbox]
    np.testing.assert_array_equal(preprocess.crop(x, ours_box), ref)
    mask = preprocess.nonzero_mask(x)[tuple(slice(lo, hi) for lo, hi in ours_box)]
    np.testing.assert_array_equal(mask, seg[0] >= 0)


@pytest.mark.parametrize("scheme,use_mask", [("CTNormalization", False), ("ZScoreNormalization", False),
                                             ("ZScoreNormalization", True), ("NoNormalization", False),
                                             ("RescaleTo01Normalization", False), ("RGBTo01Normalization", False)])
def test_normalisation_equals_nnunet(scheme, use_mask):
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, size=(1, 12, 20, 22)).astype(np.float32)
    x[0, :, :3] = 0
    mask = x[0] != 0
    props = {"mean": 100.0, "std": 40.0, "percentile_00_5": 20.0, "percentile_99_5": 230.0}
    seg = np.where(mask, 0, -1)
    ref = getattr(schemes, scheme)(use_mask_for_norm=use_mask, intensityproperties=props).run(x[0].copy(), seg)
    ours = preprocess.normalize(x.copy(), [ChannelNormalization(scheme, use_mask, props)], mask)
    np.testing.assert_allclose(ours[0], ref, rtol=1e-6, atol=1e-6)


def test_streamed_argmax_equals_full_resampling_then_argmax():
    """Class-by-class resampling into a running argmax gives nnU-Net's export result."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from segmap_tools.plans import make_dataset_json, make_plans
    from segmap.model import parse_spec

    labels = {f"c{i}": i for i in range(1, 12)}
    ds = make_dataset_json({"background": 0, **labels})
    plans = make_plans(patch_size=(16, 16, 16), spacing=(3.0, 1.0, 1.0), normalization_schemes=["ZScoreNormalization"])
    spec = parse_spec({"plans": plans, "dataset_json": ds, "nnunet_configuration": "3d_fullres"}, {}, "test")
    logits = torch.from_numpy(np.random.default_rng(3).normal(size=(12, 10, 24, 20)).astype(np.float32))
    shape = (15, 30, 41)
    pm = PlansManager(plans)
    props = {"spacing": [2.0, 0.8, 0.49], "shape_after_cropping_and_before_resampling": shape,
             "shape_before_cropping": shape, "bbox_used_for_cropping": [[0, s] for s in shape]}
    ref = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.clone(), pm, pm.get_configuration("3d_fullres"), pm.get_label_manager(ds), props)
    ours = logits_to_labels(logits, shape, spec, spec.target_spacing, props["spacing"])
    assert (ours == ref).mean() > 0.9999


def test_label_maps_of_more_than_255_classes_are_uint16_and_exact():
    """Labels are written with unsigned wrap-around arithmetic; past 255 classes that must still be exact."""
    from segmap_tools.plans import make_dataset_json, make_plans
    from segmap.model import parse_spec

    ds = make_dataset_json({"background": 0, **{f"c{i}": i for i in range(1, 300)}})
    plans = make_plans(patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0), normalization_schemes=["ZScoreNormalization"])
    spec = parse_spec({"plans": plans, "dataset_json": ds, "nnunet_configuration": "3d_fullres"}, {}, "test")
    logits = torch.from_numpy(np.random.default_rng(4).normal(size=(300, 6, 7, 8)).astype(np.float32))
    labels = logits_to_labels(logits, (6, 7, 8), spec, spec.target_spacing, spec.target_spacing)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, logits.numpy().argmax(0))
