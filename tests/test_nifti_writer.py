"""NIfTI label writer: exact grid, (x, y, z) storage order, integer storage without scaling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from segmap.errors import OutputError
from segmap.outputs.nifti import read_label_nifti, write_label_nifti

AXIAL = np.array([[-0.75, 0.0, 0.0, 180.5],
                  [0.0, -0.8, 0.0, 200.25],
                  [0.0, 0.0, 2.5, -300.0],
                  [0.0, 0.0, 0.0, 1.0]])


def oblique_affine() -> np.ndarray:
    """Rotated 20 degrees about x and 10 about z, anisotropic spacing, plus a small shear."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.7, 0.9, 3.0])
    affine[0, 2] += 0.05
    affine[:3, 3] = [-12.3, 45.6, 78.9]
    return affine


def labels_zyx(shape=(5, 7, 9)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4, size=shape).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("affine", [AXIAL, oblique_affine()], ids=["axial", "oblique"])
def test_round_trip_is_exact(tmp_path, suffix, affine):
    labels = labels_zyx()
    path = write_label_nifti(labels, affine, tmp_path / f"labels{suffix}")

    back, back_affine = read_label_nifti(path)
    np.testing.assert_array_equal(back, labels)
    # NIfTI-1 stores the sform as float32: exact to that precision, nothing more lost
    np.testing.assert_array_equal(back_affine, affine.astype(np.float32).astype(np.float64))


def test_storage_is_xyz_uint8_unscaled_with_label_intent(tmp_path):
    labels = labels_zyx()
    img = nib.load(write_label_nifti(labels, AXIAL, tmp_path / "l.nii.gz"))
    assert img.shape == (9, 7, 5)  # (x, y, z)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.uint8
    assert data[8, 1, 3] == labels[3, 1, 8]
    hdr = img.header
    assert hdr.get_data_dtype() == np.uint8
    slope, inter = hdr.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert int(hdr["intent_code"]) == 1002  # NIFTI_INTENT_LABEL
    assert hdr.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(hdr.get_zooms(), (0.75, 0.8, 2.5), rtol=1e-6)


def test_codes_of_the_source_are_kept(tmp_path):
    img = nib.load(write_label_nifti(labels_zyx(), AXIAL, tmp_path / "l.nii", sform_code=2, qform_code=0))
    assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 0


def test_more_than_255_labels_use_uint16(tmp_path):
    labels = labels_zyx().astype(np.int32)
    labels[0, 0, 0] = 300
    back, _ = read_label_nifti(write_label_nifti(labels, AXIAL, tmp_path / "l.nii.gz"))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)


def test_bool_and_int64_inputs(tmp_path):
    labels = labels_zyx()
    back, _ = read_label_nifti(write_label_nifti(labels.astype(np.int64), AXIAL, tmp_path / "a.nii.gz"))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    back, _ = read_label_nifti(write_label_nifti(labels == 2, AXIAL, tmp_path / "b.nii.gz"))
    np.testing.assert_array_equal(back, (labels == 2).astype(np.uint8))


@pytest.mark.parametrize("labels, affine, message", [
    (np.zeros((2, 3), np.uint8), AXIAL, "shape"),
    (np.zeros((2, 3, 4), np.float32), AXIAL, "integer"),
    (np.full((2, 3, 4), -2, np.int16), AXIAL, "negative value -2"),
    (np.zeros((2, 3, 4), np.uint8), np.eye(3), "4x4"),
    (np.zeros((2, 3, 4), np.uint8), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
])
def test_bad_inputs_are_refused(tmp_path, labels, affine, message):
    with pytest.raises(ValueError, match=message):
        write_label_nifti(labels, affine, tmp_path / "l.nii.gz")


def test_name_must_be_nifti(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii"):
        write_label_nifti(labels_zyx(), AXIAL, tmp_path / "l.nrrd")


def test_unwritable_path_is_an_output_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="a_file"):
        write_label_nifti(labels_zyx(), AXIAL, tmp_path / "a_file" / "l.nii.gz")
