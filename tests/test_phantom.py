"""The synthetic phantom: anatomy where it should be, and NIfTI/DICOM files that read back exactly."""

from __future__ import annotations


import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from conftest import DEMO_MODEL

from segmap.demo.phantom import EXTRA_LABELS, HU, LABELS, make_phantom, write_dicom_series, write_nifti, \
    write_phantom_study

SHAPE = (16, 64, 64)
SPACING = (3.0, 1.5, 1.5)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=0)


@pytest.fixture(scope="module")
def small():
    # A small FOV (96 mm) through the middle of the abdomen: anatomy is scaled in-plane to fit.
    return make_phantom(SHAPE, SPACING, seed=5)


def read_series(files):
    """HU array [z, y, x] in order along the slice normal, and the datasets in that order."""
    datasets = [pydicom.dcmread(f) for f in files]
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    hu = np.stack([d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in datasets])
    return hu, datasets


def test_shape_types_and_geometry(phantom):
    assert phantom.hu.shape == phantom.labels.shape == (48, 128, 128)
    assert phantom.hu.dtype == np.int16 and phantom.labels.dtype == np.uint8
    assert phantom.spacing_zyx == pytest.approx((3.0, 1.5, 1.5))
    # Axial LPS grid: x to the patient's left (RAS -x), y posterior (RAS -y), z superior.
    np.testing.assert_allclose(phantom.affine[:3, :3], np.diag([-1.5, -1.5, 3.0]))


def test_realistic_hounsfield_units(phantom):
    hu = phantom.hu
    # Air border all around the body.
    assert np.abs(hu[:, :, :3].mean() - HU["air"]) < 5 and np.abs(hu[:, :3, :].mean() - HU["air"]) < 5
    assert hu.min() >= -1024 and hu.max() > 1000  # cortical bone
    spleen = hu[phantom.labels == LABELS["spleen"]].astype(float)
    assert abs(np.median(spleen) - HU["spleen"]) < 5
    assert 5 < spleen.std() < 25  # noise, some partial volume at the edge
    counts, edges = np.histogram(hu, bins=[-1100, -500, -50, 0, 80, 300, 3000])
    assert all(counts[i] > 1000 for i in (0, 1, 3, 5)), counts  # air, fat, soft tissue/organs, bone


def test_spleen_lies_on_patients_left_and_posterior(phantom):
    zyx = np.argwhere(phantom.labels == LABELS["spleen"])
    assert len(zyx) * 3.0 * 1.5 * 1.5 > 30_000  # > 30 mL
    centre_xyz1 = np.array([*zyx.mean(0)[::-1], 1.0])
    body_centre_xyz1 = np.array([63.5, 63.5, 23.5, 1.0])
    ras = phantom.affine @ centre_xyz1 - phantom.affine @ body_centre_xyz1
    assert ras[0] < -20  # RAS x: negative = patient's left
    assert ras[1] < 0  # RAS y: negative = posterior


def test_extra_labels(phantom):
    multi = make_phantom(seed=0, extra_labels=True)
    assert set(np.unique(multi.labels)) == set(EXTRA_LABELS.values())
    np.testing.assert_array_equal(multi.hu, phantom.hu)
    np.testing.assert_array_equal(multi.labels == 1, phantom.labels == 1)
    liver_x = np.argwhere(multi.labels == EXTRA_LABELS["liver"])[:, 2].mean()
    spleen_x = np.argwhere(multi.labels == EXTRA_LABELS["spleen"])[:, 2].mean()
    assert liver_x < spleen_x  # liver on the patient's right (low x index in LPS)
    assert np.median(multi.hu[multi.labels == EXTRA_LABELS["bone"]]) > 600


def test_determinism_and_seed_variation():
    a, b = make_phantom(SHAPE, SPACING, seed=3), make_phantom(SHAPE, SPACING, seed=3)
    c = make_phantom(SHAPE, SPACING, seed=4)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_small_field_of_view_keeps_air_border(small):
    assert small.hu.shape == SHAPE
    assert (small.hu[:, :, 0] < -900).all() and (small.hu[:, 0, :] < -900).all()
    assert (small.labels == 1).sum() > 100


def test_invalid_arguments():
    with pytest.raises(ValueError, match="shape_zyx"):
        make_phantom((16, 64))
    with pytest.raises(ValueError, match="spacing_zyx"):
        make_phantom(SHAPE, (3.0, 0.0, 1.5))


def test_nifti_round_trip(small, tmp_path):
    path = write_nifti(small, tmp_path / "image.nii.gz")
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, small.affine)
    np.testing.assert_allclose(img.get_sform(), small.affine)
    np.testing.assert_allclose(img.get_qform(), small.affine, atol=1e-5)
    assert img.header.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), small.hu)
    labels = nib.load(write_nifti(small, tmp_path / "labels.nii.gz", labels=True))
    np.testing.assert_array_equal(np.asarray(labels.dataobj).transpose(2, 1, 0), small.labels)


@pytest.mark.parametrize("transfer_syntax", [pydicom.uid.ExplicitVRLittleEndian, RLELossless])
def test_dicom_round_trip(small, tmp_path, transfer_syntax):
    files = write_dicom_series(small, tmp_path, transfer_syntax=transfer_syntax, series_number=7)
    assert len(files) == SHAPE[0]
    hu, datasets = read_series(files[::-1])  # file order must not matter
    np.testing.assert_array_equal(hu, small.hu)
    lps_affine = RAS_TO_LPS @ small.affine
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert ds.InstanceNumber == k + 1 and ds.SeriesNumber == 7
        assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.pixel_array.min() >= 0
        np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), (lps_affine @ [0, 0, k, 1])[:3],
                                   atol=1e-4)
    ds = datasets[0]
    np.testing.assert_allclose(np.array(ds.ImageOrientationPatient, float), [1, 0, 0, 0, 1, 0])
    assert float(ds.SliceThickness) == 3.0
    assert (ds.Rows, ds.Columns) == SHAPE[1:]
    assert len({d.StudyInstanceUID for d in datasets}) == len({d.FrameOfReferenceUID for d in datasets}) == 1
    assert len({d.SOPInstanceUID for d in datasets}) == SHAPE[0]


def test_dicom_pixel_spacing_order(tmp_path):
    ph = make_phantom((4, 40, 60), (2.5, 1.25, 0.8), seed=1)
    files = write_dicom_series(ph, tmp_path)
    hu, datasets = read_series(files)
    np.testing.assert_array_equal(hu, ph.hu)
    ds = datasets[0]
    assert (ds.Rows, ds.Columns) == (40, 60)
    assert [float(v) for v in ds.PixelSpacing] == [1.25, 0.8]  # [between rows (y), between columns (x)]
    step = np.subtract(datasets[1].ImagePositionPatient, datasets[0].ImagePositionPatient)
    np.testing.assert_allclose(step, [0, 0, 2.5], atol=1e-5)


def test_dicom_rejects_lossy_transfer_syntax(small, tmp_path):
    with pytest.raises(ValueError, match="lossless"):
        write_dicom_series(small, tmp_path, transfer_syntax=pydicom.uid.JPEGBaseline8Bit)


def test_phantom_study(tmp_path):
    study = write_phantom_study(tmp_path, seed=2, shape_zyx=SHAPE, patient_id="P-2",
                                series_description="Abdomen 3mm")
    assert study["nifti"] == tmp_path / "image.nii.gz"
    hu, datasets = read_series(sorted(study["dicom_dir"].glob("*.dcm")))
    np.testing.assert_array_equal(hu, study["phantom"].hu)
    np.testing.assert_array_equal(np.asarray(nib.load(study["nifti"]).dataobj).transpose(2, 1, 0), hu)
    ds = datasets[0]
    assert ds.StudyInstanceUID == study["study_uid"] and ds.SeriesInstanceUID == study["series_uid"]
    assert ds.FrameOfReferenceUID == study["frame_of_reference_uid"]
    assert ds.PatientID == "P-2" and ds.SeriesDescription == "Abdomen 3mm"
    np.testing.assert_array_equal(study["phantom"].hu, make_phantom(SHAPE, seed=2).hu)


# The bundled demo model and the script that makes it.



@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="models/demo-spleen/model.ts not present")
def test_bundled_demo_model_segments_a_held_out_phantom():
    import torch

    from segmap_tools.train import PATCH_ZYX, SHAPE_ZYX, SPACING_ZYX, dice
    from segmap.engine import EngineOptions, Segmenter
    from segmap.model import load_model

    model = load_model(DEMO_MODEL)
    assert DEMO_MODEL.stat().st_size < 10 * 2**20
    assert "not for clinical use" in model.spec.metadata["description"].lower()
    assert list(model.spec.metadata["network_data_format"]["inputs"]) == ["image"]
    assert dict(model.spec.labels) == LABELS
    assert model.spec.patch_size == PATCH_ZYX and model.spec.target_spacing == SPACING_ZYX
    assert model.spec.normalization[0].scheme == "CTNormalization"
    torch.set_num_threads(2)
    case = make_phantom(SHAPE_ZYX, SPACING_ZYX, seed=1)  # training uses seeds >= 1000
    labels = Segmenter(model, EngineOptions(device="cpu")).predict(case.hu[None], SPACING_ZYX)
    assert dice(labels == 1, case.labels == 1) >= 0.9


def test_training_script_exports_a_monet_model(tmp_path):
    from segmap_tools.train import train
    from segmap.model import load_model

    lines = []
    report = train(tmp_path / "model.ts", steps=2, num_cases=2, validation_seeds=(0,), log=lines.append)
    model = load_model(tmp_path / "model.ts")
    props = model.spec.normalization[0].intensity_properties
    assert props["percentile_00_5"] < HU["spleen"] < props["percentile_99_5"]
    assert abs(props["mean"] - HU["spleen"]) < 10
    assert set(report["heldout_dice"]) == {"0"} and report["size_bytes"] < 10 * 2**20
    assert model.spec.mirroring_axes == (0, 1, 2)
