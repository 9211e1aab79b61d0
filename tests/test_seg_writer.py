"""DICOM SEG writer: round trips through highdicom, references to the source series, codes, validity."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from segmap.errors import InputError, OutputError
from segmap.outputs.seg import read_seg_labels, write_seg
from segmap.tasks import Code, Segment

NZ, NY, NX = 6, 16, 12
ORGAN = Code("91772007", "SCT", "Organ")


def make_series(nz: int = NZ, ny: int = NY, nx: int = NX, *, descending: bool = False,
                patient_name: str | None = "Doe^Jane", patient_id: str | None = "ID-123") -> list[Dataset]:
    """Single-frame CT slices with real geometry (0.8 x 0.7 mm pixels, 2.5 mm slices) and pixel data."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        if patient_name is not None:
            ds.PatientName = patient_name
        if patient_id is not None:
            ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101" if patient_name else ""
        ds.PatientSex = "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.SeriesDescription = "Abdomen"
        z = 50.0 + 2.5 * (nz - 1 - k if descending else k)
        ds.ImagePositionPatient = [-100.0, -120.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.7]
        ds.SliceThickness = 2.5
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.full((ny, nx), k, np.int16).tobytes()
        slices.append(ds)
    return slices


def make_segments(n: int = 3) -> list[Segment]:
    spleen = Segment("Spleen", ORGAN, Code("78961009", "SCT", "Spleen"), "MAIA_Segmentation-Spleen",
                     algorithm_version="2.1", type_modifier=Code("7771000", "SCT", "Left"),
                     anatomic_region=Code("818981001", "SCT", "Abdomen"), color_rgb=(200, 40, 30))
    liver = Segment("Liver", ORGAN, Code("10200004", "SCT", "Liver"), "MAIA_Segmentation-Spleen")
    kidney = Segment("Kidney", ORGAN, Code("64033007", "SCT", "Kidney"), "MAIA_Segmentation-Spleen")
    return [spleen, liver, kidney][:n]


def make_labels(nz: int = NZ, ny: int = NY, nx: int = NX) -> np.ndarray:
    """Label 1 on slices 1-3, label 2 on slices 3-4 (asymmetric in y and x), label 3 nowhere."""
    labels = np.zeros((nz, ny, nx), np.uint8)
    labels[1:4, 2:7, 3:5] = 1
    labels[3:5, 9:15, 1:10] = 2
    labels[2, 0, 0] = 2
    return labels


def uids(series: list[Dataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in series]


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (apt-get install -y dicom3tools)")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("omit_empty_frames", [False, True])
def test_round_trip_voxel_for_voxel(tmp_path, omit_empty_frames):
    series, labels, segments = make_series(), make_labels(), make_segments(3)
    out = write_seg(labels, series, segments, tmp_path / "seg.dcm", omit_empty_frames=omit_empty_frames)

    assert out == tmp_path / "seg.dcm"
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels)
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "BINARY"
    # one frame per slice and segment, or only the slices where each segment is present
    expected_frames = NZ * 3 if omit_empty_frames is False else 3 + 3
    assert seg.NumberOfFrames == expected_frames


def test_round_trip_follows_references_not_frame_order(tmp_path):
    """Slices listed top to bottom: frames must still land on the slice they reference."""
    series, labels = make_series(descending=True), make_labels()
    out = write_seg(labels, series, make_segments(2), tmp_path / "seg.dcm", omit_empty_frames=True)
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels)
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)[::-1]), labels[::-1])


def test_empty_segment_is_still_listed(tmp_path):
    series, labels, segments = make_series(), make_labels(), make_segments(3)
    assert not (labels == 3).any()
    for omit in (False, True):
        seg = pydicom.dcmread(write_seg(labels, series, segments, tmp_path / f"seg{omit}.dcm",
                                        omit_empty_frames=omit))
        assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2, 3]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen", "Liver", "Kidney"]


def test_all_empty_label_map_keeps_frames_without_warning(tmp_path, caplog):
    series = make_series()
    labels = np.zeros((NZ, NY, NX), np.uint8)
    with caplog.at_level(logging.WARNING):
        out = write_seg(labels, series, make_segments(2), tmp_path / "seg.dcm", omit_empty_frames=True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    seg = pydicom.dcmread(out)
    assert seg.NumberOfFrames == NZ * 2
    assert len(seg.SegmentSequence) == 2
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels)


def test_codes_algorithm_and_series_attributes_come_from_segments(tmp_path):
    series, segments = make_series(), make_segments(2)
    seg = pydicom.dcmread(write_seg(make_labels(), series, segments, tmp_path / "seg.dcm"))

    first, second = seg.SegmentSequence
    assert first.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91772007"
    type_item = first.SegmentedPropertyTypeCodeSequence[0]
    assert (type_item.CodeValue, type_item.CodingSchemeDesignator, type_item.CodeMeaning) == \
        ("78961009", "SCT", "Spleen")
    assert type_item.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert first.AnatomicRegionSequence[0].CodeValue == "818981001"
    assert len(first.RecommendedDisplayCIELabValue) == 3
    assert first.SegmentAlgorithmType == "AUTOMATIC"
    assert first.SegmentAlgorithmName == "MAIA_Segmentation-Spleen"
    algorithm = first.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("MAIA_Segmentation-Spleen", "2.1")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert second.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in second.SegmentedPropertyTypeCodeSequence[0]
    assert "RecommendedDisplayCIELabValue" not in second

    assert seg.SeriesDescription == "segmap: MAIA_Segmentation-Spleen"
    assert seg.SeriesNumber == 900
    assert seg.Manufacturer == "segmap"
    assert seg.Modality == "SEG"


def test_references_and_frame_of_reference_match_source(tmp_path):
    series = make_series()
    seg = pydicom.dcmread(write_seg(make_labels(), series, make_segments(2), tmp_path / "seg.dcm"))

    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == series[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != series[0].SeriesInstanceUID
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == set(uids(series))
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [float(v) for v in by_uid[source].ImagePositionPatient]


def test_headers_without_pixel_data_are_enough(tmp_path):
    series = make_series()
    for k, ds in enumerate(series):
        ds.save_as(tmp_path / f"ct{k}.dcm", enforce_file_format=True)
    headers = [pydicom.dcmread(tmp_path / f"ct{k}.dcm", stop_before_pixels=True) for k in range(NZ)]
    assert "PixelData" not in headers[0]
    labels = make_labels()
    out = write_seg(labels, headers, make_segments(2), tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_seg_labels(out, uids(headers)), labels)


def test_repaired_uids_and_blank_patient_give_a_valid_seg(tmp_path):
    """Sample data with blanked UIDs (regenerated by the loader) and no patient identity at all."""
    series = make_series(patient_name=None, patient_id=None)
    study, series_uid, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for ds in series:
        del ds.PatientBirthDate, ds.StudyID, ds.AccessionNumber
        ds.PatientSex = "U"  # not a DICOM value; highdicom would refuse it
        ds.file_meta.MediaStorageSOPInstanceUID = ""  # what the file said; the dataset carries the repaired UID
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame_of_reference
    before = [set(ds.keys()) for ds in series]

    labels = make_labels()
    out = write_seg(labels, series, make_segments(2), tmp_path / "seg.dcm")

    assert [set(ds.keys()) for ds in series] == before  # the caller's datasets are untouched
    assert series[0].PatientSex == "U"
    seg = pydicom.dcmread(out)
    assert seg.StudyInstanceUID == study
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.FrameOfReferenceUID == frame_of_reference
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        assert keyword in seg and not seg[keyword].value
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels)
    assert dciodvfy_errors(out) == []


@pytest.mark.parametrize("omit_empty_frames", [False, True])
def test_dciodvfy_reports_no_errors(tmp_path, omit_empty_frames):
    out = write_seg(make_labels(), make_series(), make_segments(3), tmp_path / "seg.dcm",
                    omit_empty_frames=omit_empty_frames)
    assert dciodvfy_errors(out) == []


def test_labelmap_option_round_trips(tmp_path):
    series, labels = make_series(), make_labels()
    out = write_seg(labels, series, make_segments(3), tmp_path / "seg.dcm", segmentation_type="LABELMAP")
    seg = pydicom.dcmread(out)
    assert seg.SegmentationType == "LABELMAP"
    assert seg.NumberOfFrames == NZ
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels)


@pytest.mark.parametrize("omit_empty_frames", [False, True])
def test_labelmap_passes_dciodvfy(tmp_path, omit_empty_frames):
    out = write_seg(make_labels(), make_series(), make_segments(3), tmp_path / "seg.dcm",
                    segmentation_type="labelmap", omit_empty_frames=omit_empty_frames)
    assert pydicom.dcmread(out).SegmentationType == "LABELMAP"
    errors = dciodvfy_errors(out)
    if "Error - Information Object Not found" in errors:
        pytest.skip("this dciodvfy predates the Label Map Segmentation IOD (DICOM 2024): it cannot check LABELMAP")
    assert errors == []


def test_labelmap_holds_many_segments_in_one_frame_per_slice(tmp_path):
    """100 segments: BINARY needs a frame per segment per slice, LABELMAP one per slice; both read back equal."""
    n = 100
    series = make_series()
    labels = (np.arange(NZ * NY * NX).reshape(NZ, NY, NX) % (n + 1)).astype(np.uint8)
    segments = [Segment(f"Structure {k}", ORGAN, Code("91772007", "SCT", "Organ"), "algo") for k in range(1, n + 1)]
    binary = write_seg(labels, series, segments, tmp_path / "binary.dcm")
    labelmap = write_seg(labels, series, segments, tmp_path / "labelmap.dcm", segmentation_type="LABELMAP")
    assert int(pydicom.dcmread(binary, stop_before_pixels=True).NumberOfFrames) == NZ * n
    seg = pydicom.dcmread(labelmap, stop_before_pixels=True)
    assert int(seg.NumberOfFrames) == NZ
    # highdicom describes the background as segment 0 in a LABELMAP; 1..n are the task's segments.
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence if int(item.SegmentNumber)] == list(range(1, n + 1))
    for out in (binary, labelmap):
        np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels)


def test_int64_and_bool_label_maps_are_accepted(tmp_path):
    series, labels = make_series(), make_labels()
    out = write_seg(labels.astype(np.int64), series, make_segments(2), tmp_path / "a.dcm")
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels)
    out = write_seg(labels == 1, series, make_segments(1), tmp_path / "b.dcm")
    np.testing.assert_array_equal(read_seg_labels(out, uids(series)), labels == 1)


def test_label_value_without_segment_is_refused(tmp_path):
    labels = make_labels()
    labels[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"value 5 .* 3 segments"):
        write_seg(labels, make_series(), make_segments(3), tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


@pytest.mark.parametrize("labels, message", [
    (np.zeros((NZ, NY, NX + 1), np.uint8), "shape"),
    (np.zeros((NZ - 1, NY, NX), np.uint8), "shape"),
    (np.zeros((NZ, NY, NX), np.float32), "integer"),
    (np.full((NZ, NY, NX), -1, np.int16), "negative value -1"),
])
def test_label_map_must_fit_the_source(tmp_path, labels, message):
    with pytest.raises(ValueError, match=message):
        write_seg(labels, make_series(), make_segments(2), tmp_path / "seg.dcm")


def test_source_without_frame_of_reference_is_an_input_error(tmp_path):
    series = make_series()
    for ds in series:
        del ds.FrameOfReferenceUID
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        write_seg(make_labels(), series, make_segments(2), tmp_path / "seg.dcm")


def test_mixed_series_is_an_input_error(tmp_path):
    series = make_series()
    series[2].SeriesInstanceUID = generate_uid()
    with pytest.raises(InputError, match="slice 2 has SeriesInstanceUID"):
        write_seg(make_labels(), series, make_segments(2), tmp_path / "seg.dcm")


def test_unwritable_path_is_an_output_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="a_file"):
        write_seg(make_labels(), make_series(), make_segments(2), tmp_path / "a_file" / "seg.dcm")


def test_read_refuses_uids_the_seg_does_not_reference(tmp_path):
    series = make_series()
    out = write_seg(make_labels(), series, make_segments(2), tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match="does not reference"):
        read_seg_labels(out, uids(series)[:-1] + [generate_uid()])


def test_phantom_series_round_trip(tmp_path):
    phantom_mod = pytest.importorskip("segmap.demo.phantom")
    phantom = phantom_mod.make_phantom(shape_zyx=(8, 32, 32), spacing_zyx=(3.0, 1.5, 1.5), extra_labels=True)
    files = phantom_mod.write_dicom_series(phantom, tmp_path / "ct")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert phantom.labels.max() <= 3
    out = write_seg(phantom.labels, headers, make_segments(3), tmp_path / "s.dcm")
    np.testing.assert_array_equal(read_seg_labels(out, uids(headers)), phantom.labels)
    assert dciodvfy_errors(out) == []
