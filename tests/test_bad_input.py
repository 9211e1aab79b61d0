"""Hostile-but-realistic DICOM and NIfTI inputs (issue 8) at the level of the loading functions: 4D series, raw data
sets without file meta, absurd headers, gantry tilt within tolerance, lossy compression, non-finite voxels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite

from dicom_factory import default_pixels, make_slice, write_series
from segmap.dicom import scan_dicom_folder, select_for_task, series_to_volume
from segmap.dicom.series_volume import lossy_compression
from segmap.errors import InputError
from segmap.input_checks import replace_nonfinite

CT_ONLY = {"selections": [{"name": "CT", "conditions": {"Modality": "CT"}}]}


def pinned(**conditions) -> dict:
    return {"selections": [{"name": "CT", "conditions": {"Modality": "CT", **conditions}}]}


def write_phases(folder, phases=(1, 2), n=6, keyword="TemporalPositionIdentifier", values=None):
    """One series, ``len(phases)`` stacks at the same positions; Instance Number restarts in each phase; the pixels
    of phase p are ``1000 * p + ...`` so a mixture shows."""
    for i, phase in enumerate(phases):
        extra = {keyword: (values[i] if values else phase)} if keyword else {}
        write_series(folder, n, series_uid="1.2.3.44", names=f"P{phase}_{{:03d}}.dcm",
                     pixels=lambda k, p=phase: default_pixels(k, 6, 7, base=1000 * p), **extra)


# ------------------------------------------------------------------------------------------------ 2 4D series


def test_phases_of_one_series_are_split_and_an_unpinned_task_is_refused_naming_them(tmp_path):
    write_phases(tmp_path)
    scan = scan_dicom_folder(tmp_path)
    assert [(s.series_instance_uid, s.stack.describe(), len(s.instances)) for s in scan.series] == [
        ("1.2.3.44", "TemporalPositionIdentifier 1", 6), ("1.2.3.44", "TemporalPositionIdentifier 2", 6)]
    with pytest.raises(InputError) as e:
        select_for_task(scan, {"image": CT_ONLY})
    assert str(e.value) == (
        "series 1.2.3.44 (CT 'Synthetic') holds 2 stacks at the same positions, told apart by "
        "TemporalPositionIdentifier (1, 2), and the rules of modality 'image' match 2 of them "
        "(TemporalPositionIdentifier 1, TemporalPositionIdentifier 2); add a condition such as "
        "\"TemporalPositionIdentifier\": 1 to its Rules_Text to choose one")


@pytest.mark.parametrize("keyword,values", [("TemporalPositionIdentifier", (1, 2)), ("EchoNumbers", (1, 2)),
                                            ("AcquisitionNumber", (3, 7)), ("TriggerTime", (0.0, 412.5))])
def test_a_pinned_stack_gives_a_volume_of_that_phase_only(tmp_path, keyword, values):
    write_phases(tmp_path, keyword=keyword, values=values)
    selection = select_for_task(scan_dicom_folder(tmp_path), {"image": pinned(**{keyword: values[1]})})["image"]
    volume = series_to_volume(selection.series)
    assert volume.array.shape == (1, 6, 6, 7)
    stored = volume.array[0, :, 0, 0].astype(int) + 1024
    assert stored.tolist() == [2000 + 10 * k for k in range(6)]  # every slice from phase 2, in position order
    assert volume.meta["stack"] == f"{keyword} {values[1]}"


def test_repeated_positions_that_no_attribute_explains_are_refused_not_mixed(tmp_path):
    write_phases(tmp_path, keyword=None)
    series = scan_dicom_folder(tmp_path).series
    assert len(series) == 1 and series[0].stack is None
    with pytest.raises(InputError, match="6 of its 6 slice positions hold more than one slice: it looks like several "
                                         "stacks"):
        series_to_volume(series[0])


# ------------------------------------------------------------------------------------------- 5 absurd headers


def test_declared_image_larger_than_its_pixel_data_is_refused_before_decoding(tmp_path):
    write_series(tmp_path, 3, Rows=60000, Columns=60000)
    with pytest.raises(InputError, match=r"IM0001\.dcm declares 60000 x 60000 pixels of 16 bits \(7200000000 bytes\) "
                                         r"but its pixel data hold 84 bytes; its header is damaged"):
        series_to_volume(scan_dicom_folder(tmp_path).series[0])


# ----------------------------------------------------------------------------- 6 no preamble, no file meta


@pytest.mark.parametrize("form", ["implicit-VR", "explicit-VR", "meta-no-preamble"])
def test_data_sets_without_preamble_or_file_meta_are_decoded(tmp_path, form):
    write_series(tmp_path / "normal", 4, series_uid="1.2.3.66")
    (tmp_path / "raw").mkdir()
    for k in range(4):
        ds = make_slice(pixels=default_pixels(k, 6, 7), position=(-10.0, -20.0, 30.0 + 2.0 * k),
                        instance_number=k + 1, series_uid="1.2.3.66")
        if form == "meta-no-preamble":
            ds.preamble = None
            dcmwrite(tmp_path / "raw" / f"s{k}", ds, enforce_file_format=False)
        else:
            del ds.file_meta
            dcmwrite(tmp_path / "raw" / f"s{k}", ds, implicit_vr=form == "implicit-VR", little_endian=True,
                     enforce_file_format=False)
    head = (tmp_path / "raw" / "s0").read_bytes()[:4]
    assert head == (b"\x02\x00\x02\x00" if form == "meta-no-preamble" else b"\x08\x00\x08\x00")  # no "DICM"
    raw = series_to_volume(scan_dicom_folder(tmp_path / "raw").series[0])
    normal = series_to_volume(scan_dicom_folder(tmp_path / "normal").series[0])
    np.testing.assert_array_equal(raw.array, normal.array)
    np.testing.assert_allclose(raw.affine, normal.affine)


# --------------------------------------------------------------------------------------------- 9 gantry tilt


def tilted(tmp_path, degrees: float, n: int = 48, spacing: float = 3.0):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    positions = [(0.0, 0.0, spacing * k) for k in range(n)]  # the table moves along z, slices tilted about x
    write_series(tmp_path, n, orientation=(1, 0, 0, 0, c, -s), positions=positions, pixel_spacing=(0.7, 0.7))
    return scan_dicom_folder(tmp_path).series[0]


def test_slight_gantry_tilt_within_half_a_pixel_is_accepted(tmp_path):
    volume = series_to_volume(tilted(tmp_path, 0.1))  # 0.25 mm sideways drift over 141 mm
    assert volume.shape_zyx == (48, 6, 7)


def test_gantry_tilt_beyond_half_a_pixel_is_refused_with_the_tolerance(tmp_path):
    with pytest.raises(InputError, match=r"drift 4\.92 mm sideways from the slice normal \(about 2\.00 degrees\), "
                                         r"more than the tolerance of 0\.35 mm \(half the smallest pixel spacing, "
                                         r"0\.7 mm\): a gantry-tilted series"):
        series_to_volume(tilted(tmp_path, 2.0))


# ---------------------------------------------------------------------------------------- 9 lossy compression


def with_syntax(uid: str, flag: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    if flag is not None:
        ds.LossyImageCompression = flag
    return ds


@pytest.mark.parametrize("datasets,expected", [
    ([with_syntax("1.2.840.10008.1.2.1")], None),
    ([with_syntax("1.2.840.10008.1.2.4.90")], None),  # JPEG 2000 lossless only
    ([with_syntax("1.2.840.10008.1.2.4.50")], "transfer syntax JPEG Baseline (Process 1)"),
    ([with_syntax("1.2.840.10008.1.2.4.91")], "transfer syntax JPEG 2000 Image Compression"),
    ([with_syntax("1.2.840.10008.1.2.4.91", "00")], None),  # stored with the lossless mode of a mixed syntax
    ([with_syntax("1.2.840.10008.1.2.1"), with_syntax("1.2.840.10008.1.2.1", "01")], "LossyImageCompression 01"),
])
def test_lossy_compression_is_recognised(datasets, expected):
    assert lossy_compression(datasets) == expected


def test_lossy_series_is_recorded_in_the_volume(tmp_path):
    write_series(tmp_path, 3, LossyImageCompression="01")
    assert series_to_volume(scan_dicom_folder(tmp_path).series[0]).meta["lossy_compression"] == \
        "LossyImageCompression 01"


# --------------------------------------------------------------------------------------- 1 non-finite voxels


def test_nonfinite_voxels_become_the_image_extremes():
    a = np.array([[np.nan, 5.0, -np.inf], [np.inf, -3.0, 7.0]], np.float32)
    out, count = replace_nonfinite(a, "image.nii.gz")
    assert count == 3
    assert out.tolist() == [[-3.0, 5.0, -3.0], [7.0, -3.0, 7.0]]
    ints = np.arange(6, dtype=np.int16)
    assert replace_nonfinite(ints, "x") == (ints, 0)


def test_nonfinite_values_after_a_float_rescale_are_replaced_in_a_dicom_volume(tmp_path):
    paths = write_series(tmp_path, 3, rescale=(0.5, 0.0))
    ds = pydicom.dcmread(paths[1])
    ds.RescaleSlope = "1e+36"  # a damaged header: slice 2's values overflow float32 to +inf
    ds.save_as(paths[1])
    volume = series_to_volume(scan_dicom_folder(tmp_path).series[0])
    assert volume.meta["nonfinite_voxels_replaced"] == 6 * 7
    assert np.isfinite(volume.array).all()
    assert volume.array[0, 1].min() == volume.array.max() == np.float32(0.5 * (1000 + 20 + 6))
