"""Scanning a folder: grouping into series, tolerance of junk and truncated files, blank-UID repair, decoding of
compressed transfer syntaxes, and the real-world sample CT."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicom_factory import default_pixels, write_report, write_segmentation_object, write_series
from conftest import SAMPLE_CT
from segmap.dicom import scan_dicom_folder, series_to_volume
from segmap.errors import InputError

SAMPLE = SAMPLE_CT / "ct_dicom"

needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"sample CT not present at {SAMPLE}")


def test_groups_instances_into_series_across_subfolders(tmp_path):
    write_series(tmp_path / "a" / "ct", 4, series_uid="1.2.3.10", series_number=2, series_description="CT")
    write_series(tmp_path / "b", 3, series_uid="1.2.3.11", series_number=1, series_description="other")
    write_segmentation_object(tmp_path)

    scan = scan_dicom_folder(tmp_path)

    assert [(s.series_instance_uid, len(s.instances)) for s in scan.series][:2] == [("1.2.3.11", 3), ("1.2.3.10", 4)]
    assert len(scan.series) == 3 and scan.skipped == [] and scan.files_seen == 8
    ct = scan.get("1.2.3.10")
    assert ct.is_image and ct.modality == "CT" and ct.description == "CT"
    assert [i.instance_number for i in ct.instances] == [1, 2, 3, 4]
    assert all("PixelData" not in i.dataset for i in ct.instances)  # headers only
    seg = next(s for s in scan.series if s.modality == "SEG")
    assert not seg.is_image


def test_same_series_uid_in_two_studies_are_two_series(tmp_path):
    write_series(tmp_path / "x", 2, study_uid="1.9.1", series_uid="1.9.5")
    write_series(tmp_path / "y", 2, study_uid="1.9.2", series_uid="1.9.5")
    scan = scan_dicom_folder(tmp_path)
    assert sorted(s.study_instance_uid for s in scan.series) == ["1.9.1", "1.9.2"]
    assert scan.study_uids == ["1.9.1", "1.9.2"]


def test_text_file_and_truncated_slice_are_skipped_with_a_warning(tmp_path, caplog):
    paths = write_series(tmp_path, 4, series_uid="1.2.3.20")
    (tmp_path / "notes.txt").write_text("not an image\n")
    data = paths[0].read_bytes()
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(data[: len(data) - 20])  # a half-copied slice: the pixel data is cut short
    header_only = tmp_path / "cut_in_header.dcm"
    header_only.write_bytes(data[:400])
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="segmap.dicom"):
        scan = scan_dicom_folder(tmp_path)

    assert [len(s.instances) for s in scan.series] == [4]
    reasons = {p.name: r for p, r in scan.skipped}
    assert set(reasons) == {"notes.txt", "broken.dcm", "cut_in_header.dcm", "empty.dcm"}
    assert "not a DICOM" in reasons["notes.txt"]
    assert "truncated" in reasons["broken.dcm"]
    assert "truncated" in reasons["cut_in_header.dcm"] or "no data elements" in reasons["cut_in_header.dcm"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in reasons:
        assert name in warned


def test_duplicate_file_of_the_same_instance_is_skipped(tmp_path):
    paths = write_series(tmp_path / "s", 3, series_uid="1.2.3.30")
    shutil.copy(paths[1], tmp_path / "zz_copy.dcm")
    scan = scan_dicom_folder(tmp_path)
    assert len(scan.series) == 1 and len(scan.series[0].instances) == 3
    assert [p.name for p, _ in scan.skipped] == ["zz_copy.dcm"]
    assert "same SOPInstanceUID" in scan.skipped[0][1]


@pytest.mark.parametrize("make", ["empty", "only_text", "missing"])
def test_no_dicom_is_an_input_error(tmp_path, make):
    folder = tmp_path / "in"
    if make != "missing":
        folder.mkdir()
    if make == "only_text":
        (folder / "readme.txt").write_text("hello")
        (folder / "x.bin").write_bytes(b"\x00" * 300)
    with pytest.raises(InputError) as e:
        scan_dicom_folder(folder)
    msg = str(e.value)
    assert str(folder) in msg and "\n" not in msg
    if make == "missing":
        assert "does not exist" in msg
    elif make == "empty":
        assert "no DICOM files found" in msg and "0 files looked at" in msg
    else:
        assert "2 files looked at, 2 skipped" in msg and "readme.txt: not a DICOM file" in msg


def test_report_and_segmentation_objects_are_kept_as_non_image_series(tmp_path):
    write_series(tmp_path, 2)
    write_report(tmp_path)
    write_segmentation_object(tmp_path)
    scan = scan_dicom_folder(tmp_path)
    assert sorted((s.modality, s.is_image) for s in scan.series) == [("CT", True), ("SEG", False), ("SR", False)]


def _blank_uids(paths):
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.SOPClassUID = ""
        ds.save_as(p)  # file meta keeps the Media Storage SOP Class/Instance UIDs


def test_blank_uids_are_repaired_or_generated_deterministically(tmp_path, caplog):
    a = write_series(tmp_path / "one", 3, series_description="first")
    b = write_series(tmp_path / "two", 2, series_description="second")
    _blank_uids(a + b)
    meta_sops = {pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID for p in a}

    with caplog.at_level(logging.WARNING, logger="segmap.dicom"):
        scan1 = scan_dicom_folder(tmp_path)
    scan2 = scan_dicom_folder(tmp_path)

    assert len(scan1.series) == 2
    first = next(s for s in scan1.series if s.description == "first")
    assert {i.sop_instance_uid for i in first.instances} == meta_sops
    assert all(str(i.dataset.SOPClassUID) == pydicom.uid.CTImageStorage for i in first.instances)
    assert first.generated_uids == ("StudyInstanceUID", "SeriesInstanceUID")
    assert len({s.study_instance_uid for s in scan1.series}) == 1  # same study attributes -> one study
    assert [(s.study_instance_uid, s.series_instance_uid) for s in scan1.series] == \
        [(s.study_instance_uid, s.series_instance_uid) for s in scan2.series]
    assert all(pydicom.uid.UID(s.series_instance_uid).is_valid for s in scan1.series)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "no SeriesInstanceUID" in warned and first.series_instance_uid in warned
    assert "taken from the file meta" in warned


def test_generated_uids_do_not_depend_on_where_the_folder_is(tmp_path):
    write_series(tmp_path / "x" / "ct", 3)
    _blank_uids(sorted((tmp_path / "x").rglob("*.dcm")))
    shutil.copytree(tmp_path / "x", tmp_path / "elsewhere" / "y")
    uid1 = scan_dicom_folder(tmp_path / "x").series[0].series_instance_uid
    uid2 = scan_dicom_folder(tmp_path / "elsewhere" / "y").series[0].series_instance_uid
    assert uid1 == uid2


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_values(tmp_path, syntax):
    size = dict(rows=40, cols=48)  # OpenJPEG refuses tiny tiles
    plain = write_series(tmp_path / "plain", 3, series_uid="1.2.3.40", **size)
    write_series(tmp_path / "packed", 3, series_uid="1.2.3.41", transfer_syntax=syntax, **size)
    assert pydicom.dcmread(sorted((tmp_path / "packed").iterdir())[0]).file_meta.TransferSyntaxUID == syntax
    scan = scan_dicom_folder(tmp_path)
    v_plain = series_to_volume(scan.get("1.2.3.40"))
    v_packed = series_to_volume(scan.get("1.2.3.41"))
    np.testing.assert_array_equal(v_packed.array, v_plain.array)
    assert int(v_plain.array[0, 2, 0, 3]) == int(default_pixels(2, 40, 48)[0, 3]) - 1024 == -1
    assert len(plain) == 3


@needs_sample
def test_sample_ct_loads_with_repaired_uids():
    scan1 = scan_dicom_folder(SAMPLE)
    scan2 = scan_dicom_folder(SAMPLE)
    assert len(scan1.series) == 1 and scan1.skipped == []
    series = scan1.series[0]
    assert len(series.instances) == 20 and series.modality == "CT"
    assert series.generated_uids == ("StudyInstanceUID", "SeriesInstanceUID")
    assert all(i.sop_instance_uid and i.sop_instance_uid == i.dataset.file_meta.MediaStorageSOPInstanceUID
               for i in series.instances)
    assert all(str(i.dataset.SOPClassUID) == pydicom.uid.CTImageStorage for i in series.instances)
    assert (series.study_instance_uid, series.series_instance_uid) == \
        (scan2.series[0].study_instance_uid, scan2.series[0].series_instance_uid)

    volume = series_to_volume(series)  # JPEG 2000 lossless
    assert volume.array.shape == (1, 20, 512, 512)
    np.testing.assert_allclose(volume.spacing_zyx, (2.0, 0.977, 0.977), atol=1e-3)
    assert -1100 <= volume.array.min() <= -900 and 1000 <= volume.array.max() <= 3100
    body = volume.array[0, :, 256, 200:312]  # a line through the abdomen: soft tissue, not air
    assert -200 < float(np.median(body)) < 200
    assert volume.meta["series_instance_uid"] == series.series_instance_uid
    assert len(set(volume.meta["sop_instance_uids"])) == 20


@needs_sample
def test_sample_ct_grid_matches_totalsegmentator_labels_in_world_space():
    nib = pytest.importorskip("nibabel")
    labels = nib.load(SAMPLE.parent / "ct_dicom_totalseg_labels.nii.gz")
    volume = series_to_volume(scan_dicom_folder(SAMPLE).series[0])
    shape_xyz = volume.shape_zyx[::-1]
    assert labels.shape == shape_xyz

    def centre_corners(affine):
        idx = np.array([[i, j, k, 1] for i in (0, shape_xyz[0] - 1) for j in (0, shape_xyz[1] - 1)
                        for k in (0, shape_xyz[2] - 1)], float)
        return sorted(map(tuple, np.round((affine @ idx.T).T[:, :3], 3)))

    assert centre_corners(volume.affine) == centre_corners(labels.affine)
    # the spleen label (1) must sit on soft tissue, not air or bone, once both are on the same world grid
    lab_zyx = np.asarray(labels.dataobj).transpose(2, 1, 0)
    if not np.allclose(labels.affine, volume.affine, atol=1e-3):  # dcm2niix flips the row axis
        flip = np.sign(np.diag(labels.affine)[:3]) != np.sign(np.diag(volume.affine)[:3])
        lab_zyx = np.flip(lab_zyx, axis=tuple(2 - a for a in np.flatnonzero(flip)))
    organ = volume.array[0][lab_zyx == 5]  # liver
    assert organ.size > 1000 and 0 < float(np.median(organ)) < 150
