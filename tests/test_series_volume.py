"""Series -> volume: slice order, geometry (oblique, tilt, gaps), rescale, duplicates; and resampling onto a reference
grid through world coordinates."""

from __future__ import annotations

import logging
import random

import numpy as np
import pydicom
import pytest

from dicom_factory import default_pixels, make_slice, write_series
from segmap.dicom import resample_to_reference, scan_dicom_folder, series_to_volume, source_datasets
from segmap.errors import InputError
from segmap.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(degrees_x: float, degrees_y: float, degrees_z: float) -> np.ndarray:
    ax, ay, az = np.radians([degrees_x, degrees_y, degrees_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def only_series(folder):
    scan = scan_dicom_folder(folder)
    assert len(scan.series) == 1
    return scan.series[0]


def test_oblique_series_affine_maps_each_voxel_to_its_patient_position(tmp_path):
    r = rotation(25, -15, 40)
    orientation = tuple(r[:, 0]) + tuple(r[:, 1])
    write_series(tmp_path, 5, rows=6, cols=7, orientation=orientation, slice_spacing=2.5, pixel_spacing=(0.8, 0.6),
                 origin=(12.0, -30.0, 55.0))
    series = only_series(tmp_path)
    volume = series_to_volume(series)

    assert volume.array.shape == (1, 5, 6, 7)
    np.testing.assert_allclose(volume.spacing_zyx, (2.5, 0.8, 0.6), atol=1e-6)
    for k, ds in enumerate(source_datasets(series, volume)):
        ipp = np.array(ds.ImagePositionPatient, float)
        row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        for x, y in ((0, 0), (6, 0), (0, 5), (3, 4)):
            lps = ipp + x * 0.6 * row + y * 0.8 * col  # x runs along the row cosine, spaced by column spacing
            np.testing.assert_allclose(volume.affine @ [x, y, k, 1], [*(LPS_TO_RAS @ lps), 1], atol=1e-4)


def test_slices_are_ordered_along_the_normal_not_by_instance_number(tmp_path):
    # positions descend along the normal while instance numbers ascend
    write_series(tmp_path, 4, slice_spacing=-3.0, origin=(0, 0, 100))
    volume = series_to_volume(only_series(tmp_path))
    assert [int(volume.array[0, z, 0, 0]) for z in range(4)] == [1000 + 10 * k - 1024 for k in (3, 2, 1, 0)]
    np.testing.assert_allclose(volume.affine[:3, 3], LPS_TO_RAS @ [0, 0, 91.0])
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 3.0])
    assert [p.rsplit("/", 1)[1] for p in volume.meta["source_paths"]] == [f"IM{i:04d}.dcm" for i in (4, 3, 2, 1)]


def test_shuffled_file_names_give_the_identical_volume(tmp_path):
    write_series(tmp_path / "ordered", 6, series_uid="1.2.3.50")
    reference = series_to_volume(only_series(tmp_path / "ordered"))
    for seed in (1, 2):
        names = [f"x{n:02d}.dcm" for n in random.Random(seed).sample(range(99), 6)]
        folder = tmp_path / f"shuffled{seed}"
        for k, path in enumerate(sorted((tmp_path / "ordered").iterdir())):
            (folder / names[k]).parent.mkdir(exist_ok=True)
            (folder / names[k]).write_bytes(path.read_bytes())
        volume = series_to_volume(only_series(folder))
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_array_equal(volume.affine, reference.affine)
        assert volume.meta["sop_instance_uids"] == reference.meta["sop_instance_uids"]


def test_rescale_is_applied_per_slice(tmp_path):
    paths = write_series(tmp_path, 3, rescale=(2.0, -100.0))
    ds = pydicom.dcmread(paths[1])
    ds.RescaleIntercept = -50  # one slice with its own intercept
    ds.save_as(paths[1])
    volume = series_to_volume(only_series(tmp_path))
    assert volume.array.dtype == np.int16
    raw = [default_pixels(k, 6, 7).astype(int) for k in range(3)]
    np.testing.assert_array_equal(volume.array[0, 0], 2 * raw[0] - 100)
    np.testing.assert_array_equal(volume.array[0, 1], 2 * raw[1] - 50)


def test_fractional_rescale_gives_float32(tmp_path):
    write_series(tmp_path, 2, rescale=(0.25, 0.5))
    volume = series_to_volume(only_series(tmp_path))
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array[0, 1], 0.25 * default_pixels(1, 6, 7) + 0.5)


def test_values_beyond_int16_switch_to_float32(tmp_path):
    write_series(tmp_path, 3, rescale=None, pixels=lambda k: np.full((4, 4), 100 + 20000 * k, np.uint16))
    volume = series_to_volume(only_series(tmp_path))
    assert volume.array.dtype == np.float32
    assert volume.array[0, :, 0, 0].tolist() == [100.0, 20100.0, 40100.0]


def test_duplicate_positions_keep_the_highest_instance_number(tmp_path, caplog):
    write_series(tmp_path, 4)
    extra = make_slice(pixels=np.full((6, 7), 7, np.uint16), position=(-10.0, -20.0, 32.0), instance_number=40)
    extra.save_as(tmp_path / "resent.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="segmap.dicom"):
        volume = series_to_volume(only_series(tmp_path))
    assert volume.array.shape == (1, 4, 6, 7)
    assert int(volume.array[0, 1, 0, 0]) == 7 - 1024
    assert extra.SOPInstanceUID in volume.meta["sop_instance_uids"]
    assert any("share a position" in r.getMessage() for r in caplog.records)


def test_missing_slice_is_refused_naming_the_series_and_the_gap(tmp_path):
    paths = write_series(tmp_path, 6, series_uid="1.2.3.60", series_description="Thorax")
    paths[2].unlink()
    with pytest.raises(InputError) as e:
        series_to_volume(only_series(tmp_path))
    msg = str(e.value)
    for part in ("1.2.3.60", "'Thorax'", "not evenly spaced", "4.000 mm", "instance 2", "instance 4", "2.000 mm",
                 "missing"):
        assert part in msg, part


def test_gantry_tilted_series_is_refused(tmp_path):
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    positions = [(0.0, 0.0, 3.0 * k) for k in range(5)]  # table moves along z, the slices are tilted about x
    write_series(tmp_path, 5, orientation=(1, 0, 0, 0, c, -s), positions=positions)
    with pytest.raises(InputError, match="gantry-tilted"):
        series_to_volume(only_series(tmp_path))


def test_mixed_orientations_and_multiframe_are_refused(tmp_path):
    write_series(tmp_path / "loc", 1)
    write_series(tmp_path / "loc", 1, names="B{:04d}.dcm", orientation=(1, 0, 0, 0, 0, -1))
    with pytest.raises(InputError, match="different orientations"):
        series_to_volume(only_series(tmp_path / "loc"))

    paths = write_series(tmp_path / "mf", 1)
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(paths[0])
    with pytest.raises(InputError, match="multi-frame"):
        series_to_volume(only_series(tmp_path / "mf"))


def test_meta_and_source_datasets_for_the_seg_writer(tmp_path):
    write_series(tmp_path, 3, series_uid="1.2.3.70", study_uid="1.2.3.7", frame_of_reference_uid="1.2.3.79",
                 series_description="Abdomen")
    series = only_series(tmp_path)
    volume = series_to_volume(series)
    assert {k: volume.meta[k] for k in ("series_instance_uid", "study_instance_uid", "frame_of_reference_uid",
                                        "modality", "series_description")} == {
        "series_instance_uid": "1.2.3.70", "study_instance_uid": "1.2.3.7", "frame_of_reference_uid": "1.2.3.79",
        "modality": "CT", "series_description": "Abdomen"}
    assert "Test^Synthetic" not in repr(volume.meta)  # no patient identity in the volume's provenance
    datasets = source_datasets(series, volume)
    assert [ds.SOPInstanceUID for ds in datasets] == volume.meta["sop_instance_uids"]
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [30.0, 32.0, 34.0]
    assert all("PixelData" not in ds for ds in datasets)
    with pytest.raises(ValueError):
        source_datasets(series, volume.with_array(volume.array, sop_instance_uids=["9.9"]))


def test_single_slice_uses_its_thickness(tmp_path):
    write_series(tmp_path, 1)
    volume = series_to_volume(only_series(tmp_path))
    assert volume.spacing_zyx[0] == pytest.approx(99.0)


# ---- resampling


def linear_field(affine: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """f(world) = 2 R + 3 A - S + 5 sampled at the voxel centres of a grid ([z, y, x])."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij")
    world = np.einsum("ij,j...->i...", affine[:3, :3], np.stack([x, y, z]).astype(float)) + \
        affine[:3, 3, None, None, None]
    return (2 * world[0] + 3 * world[1] - world[2] + 5).astype(np.float32)


def test_resampling_follows_world_coordinates():
    moving_affine = np.eye(4)
    moving_affine[:3, :3] = rotation(10, 0, 30) @ np.diag([1.5, 1.2, 2.0])
    moving_affine[:3, 3] = (-20, -15, -10)
    moving = Volume(linear_field(moving_affine, (20, 30, 30)), moving_affine, {"series_instance_uid": "m"})
    reference_affine = np.diag([0.9, 1.1, 1.7, 1.0])
    reference_affine[:3, 3] = (-5, 0, 2)
    reference = Volume(np.zeros((1, 8, 10, 12), np.int16), reference_affine, {"series_instance_uid": "r"})

    out = resample_to_reference(moving, reference, order=1)

    assert out.array.shape == (1, 8, 10, 12) and out.array.dtype == np.float32
    np.testing.assert_array_equal(out.affine, reference.affine)
    assert out.meta["resampled_to"] == "r" and out.meta["series_instance_uid"] == "m"
    np.testing.assert_allclose(out.array[0], linear_field(reference_affine, (8, 10, 12)), atol=1e-3)


def test_resampling_fills_outside_with_the_minimum_and_keeps_dtype_for_nearest():
    moving = Volume(np.arange(4 * 4 * 4, dtype=np.int16).reshape(4, 4, 4) + 10, np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = (2, 0, 0)
    reference = Volume(np.zeros((4, 4, 4), np.int16), shifted)
    out = resample_to_reference(moving, reference, order=0)
    assert out.array.dtype == np.int16
    np.testing.assert_array_equal(out.array[0, :, :, :2], moving.array[0, :, :, 2:])
    assert np.all(out.array[0, :, :, 2:] == 10)  # the moving volume's minimum
    np.testing.assert_array_equal(resample_to_reference(moving, moving).array, moving.array)


def test_resampling_volumes_that_do_not_overlap_is_refused():
    far = np.eye(4)
    far[:3, 3] = (500, 0, 0)
    with pytest.raises(InputError, match="does not overlap"):
        resample_to_reference(Volume(np.ones((3, 3, 3), np.float32), np.eye(4), {"series_instance_uid": "m"}),
                              Volume(np.ones((3, 3, 3), np.float32), far))


def test_phantom_round_trip_through_dicom(tmp_path):
    phantom_mod = pytest.importorskip("segmap.demo.phantom")
    from pydicom.uid import RLELossless

    phantom = phantom_mod.make_phantom(shape_zyx=(6, 32, 40), spacing_zyx=(3.0, 1.5, 1.5), seed=3)
    phantom_mod.write_dicom_series(phantom, tmp_path, transfer_syntax=RLELossless)
    volume = series_to_volume(only_series(tmp_path))
    np.testing.assert_array_equal(volume.array[0], phantom.hu)
    np.testing.assert_allclose(volume.affine, phantom.affine, atol=1e-4)
