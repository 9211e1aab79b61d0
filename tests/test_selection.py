"""Series selection rules (FORMATS.md §4) with the original's defects fixed."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest

from dicom_factory import AXIAL, CORONAL, SAGITTAL, make_slice, write_segmentation_object, write_series
from segmap.dicom import DicomInstance, DicomScan, DicomSeries, scan_dicom_folder, select_for_task, select_series
from segmap.dicom.selection import orientation_of
from segmap.errors import InputError, TaskFileError


def series(uid: str, n: int = 3, *, per_instance: dict[int, dict] | None = None, drop: tuple[str, ...] = (),
           **attrs) -> DicomSeries:
    """An in-memory series of ``n`` tiny slices; ``per_instance[k]`` overrides attributes of instance k."""
    instances = []
    for k in range(n):
        kw = {"series_description": "CT Body 3.0", **attrs, **(per_instance or {}).get(k, {})}
        ds = make_slice(pixels=np.zeros((2, 2), np.uint16), position=(0, 0, 2.0 * k), series_uid=uid,
                        instance_number=k + 1, **kw)
        del ds.PixelData
        for keyword in drop:
            if keyword in ds:
                delattr(ds, keyword)
        instances.append(DicomInstance(Path(f"/in/{uid}/{k}.dcm"), ds))
    return DicomSeries(uid, "1.2.3.4", instances)


def scan_of(*all_series: DicomSeries) -> DicomScan:
    return DicomScan(Path("/in"), list(all_series))


def rules(*conditions: dict, names: tuple[str, ...] = ()) -> dict:
    return {"selections": [{"name": names[i] if i < len(names) else f"sel{i}", "conditions": c}
                           for i, c in enumerate(conditions)]}


def chosen(scan: DicomScan, *conditions: dict) -> str | None:
    try:
        return select_series(scan, rules(*conditions)).series.series_instance_uid
    except InputError:
        return None


# ---- each rule form


def test_text_is_case_insensitive_equality_or_unanchored_regex():
    scan = scan_of(series("1.1", modality="CT", series_description="CT Body 3.0"))
    assert chosen(scan, {"Modality": "ct"}) == "1.1"
    assert chosen(scan, {"Modality": "(?i)CT"}) == "1.1"
    assert chosen(scan, {"SeriesDescription": "body"}) == "1.1"  # re.search, not fullmatch
    assert chosen(scan, {"SeriesDescription": "^ct body \\d"}) == "1.1"
    assert chosen(scan, {"SeriesDescription": "^body"}) is None
    assert chosen(scan, {"Modality": "MR"}) is None
    assert chosen(scan, {"SeriesDescription": "CT Body 3.0"}) == "1.1"  # equality even though '.' is a regex char


def test_missing_text_attribute_is_the_empty_string():
    scan = scan_of(series("1.1", study_description=""))
    assert chosen(scan, {"StudyDescription": "(.*?)"}) == "1.1"
    assert chosen(scan, {"BodyPartExamined": "(.*?)"}) == "1.1"  # absent altogether
    assert chosen(scan, {"BodyPartExamined": "ABDOMEN"}) is None


@pytest.mark.parametrize("rule, expected", [
    ([3, 5], True), ([3.5, 5], False), ([1, 3], True),  # inclusive range
    ([2, ">"], True), ([3, ">"], False), ([3, ">="], True), ([4, "<"], True), ([3, "<"], False),
    ([3, "<="], True), ([3, "!="], False), ([2, "!="], True),
    (3, True), (3.0, True), (4, False), ("3", True), ("3|4", True), ("4", False),
])
def test_numeric_forms(rule, expected):
    scan = scan_of(series("1.1", SliceThickness=3.0))
    assert (chosen(scan, {"SliceThickness": rule}) == "1.1") is expected


def test_numeric_zero_is_a_value_not_missing():
    scan = scan_of(series("1.0", series_number=0), series("1.5", series_number=5))
    assert chosen(scan, {"SeriesNumber": 0}) == "1.0"
    assert chosen(scan, {"SeriesNumber": [0, 0]}) == "1.0"
    assert chosen(scan, {"SeriesNumber": [0, ">"]}) == "1.5"
    assert chosen(scan, {"SeriesNumber": [0, "<="]}) == "1.0"
    assert chosen(scan, {"SliceLocation": [0, ">="]}) is None  # missing numeric attribute matches nothing


def test_multi_valued_every_term_present_and_bang_terms_absent():
    scan = scan_of(series("1.1", image_type=("ORIGINAL", "PRIMARY", "AXIAL")))
    assert chosen(scan, {"ImageType": ["PRIMARY", "ORIGINAL"]}) == "1.1"
    assert chosen(scan, {"ImageType": ["primary", "!SECONDARY"]}) == "1.1"
    assert chosen(scan, {"ImageType": "AXIAL"}) == "1.1"
    assert chosen(scan, {"ImageType": ["PRIMARY", "DERIVED"]}) is None
    assert chosen(scan, {"ImageType": ["!AXIAL"]}) is None
    assert chosen(scan, {"ImageType": ["PRIM"]}) is None  # terms are whole values, not substrings
    no_type = scan_of(series("1.2", image_type=None))
    assert chosen(no_type, {"ImageType": ["!LOCALIZER"]}) == "1.2"
    assert chosen(no_type, {"ImageType": ["PRIMARY"]}) is None


@pytest.mark.parametrize("orientation, name", [(AXIAL, "Axial"), (CORONAL, "Coronal"), (SAGITTAL, "Sagittal")])
def test_orientation_by_dominant_axis_of_the_normal(orientation, name):
    scan = scan_of(series("1.1", orientation=orientation))
    assert "PatientPosition" not in scan.series[0].instances[0].dataset  # missing PatientPosition: no crash
    assert chosen(scan, {"ImageOrientationPatient": name.lower()}) == "1.1"
    others = {"Axial", "Coronal", "Sagittal"} - {name}
    assert all(chosen(scan, {"ImageOrientationPatient": o}) is None for o in others)


def test_oblique_orientation_and_explicit_cosines():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    oblique = (1.0, 0.0, 0.0, 0.0, c, s)  # axial tilted by 20 degrees about x
    assert orientation_of(oblique) == "Axial"
    scan = scan_of(series("1.1", orientation=oblique))
    assert chosen(scan, {"ImageOrientationPatient": "Axial"}) == "1.1"
    assert chosen(scan_of(series("1.2")), {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}) == "1.2"
    assert chosen(scan, {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}) is None
    assert chosen(scan_of(series("1.3", drop=("ImageOrientationPatient",))), {"ImageOrientationPatient": "Axial"}) \
        is None


# ---- every instance counts


def test_condition_must_hold_for_every_instance_not_only_the_first():
    last_is_localizer = series("1.1", per_instance={2: {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}})
    assert chosen(scan_of(last_is_localizer), {"ImageType": ["!LOCALIZER"]}) is None
    first_differs = series("1.2", per_instance={0: {"series_description": "Topogram"}})
    assert chosen(scan_of(first_differs), {"SeriesDescription": "Body"}) is None
    assert chosen(scan_of(first_differs), {"SeriesDescription": "Topogram"}) is None
    assert chosen(scan_of(first_differs), {"SeriesDescription": "Topogram|Body"}) == "1.2"


# ---- choosing among several matches


def test_most_images_then_lowest_series_number_then_uid():
    big = series("1.9", n=5, series_number=7)
    small = series("1.1", n=3, series_number=1)
    assert chosen(scan_of(small, big), {"Modality": "CT"}) == "1.9"
    a, b = series("1.8", series_number=3), series("1.2", series_number=4)
    assert chosen(scan_of(b, a), {"Modality": "CT"}) == "1.8"
    c, d = series("1.7", series_number=None), series("1.3", series_number=None)
    assert chosen(scan_of(c, d, series("1.99", series_number=None)), {"Modality": "CT"}) == "1.3"
    assert chosen(scan_of(c, series("1.98", series_number=9)), {"Modality": "CT"}) == "1.98"  # missing number last


def test_choice_is_independent_of_series_and_file_order():
    group = [series(f"1.{i}", n=4, series_number=10 - i) for i in range(1, 6)]
    picks = set()
    for seed in range(5):
        shuffled = group[:]
        random.Random(seed).shuffle(shuffled)
        picks.add(chosen(scan_of(*shuffled), {"Modality": "CT"}))
    assert picks == {"1.5"}


def test_choice_is_independent_of_folder_names(tmp_path):
    for root, (first, second) in (("one", ("a", "b")), ("two", ("b", "a"))):
        write_series(tmp_path / root / first, 3, series_uid="1.2.3.7", series_number=2)
        write_series(tmp_path / root / second, 3, series_uid="1.2.3.6", series_number=3)
    picks = {select_series(scan_dicom_folder(tmp_path / r), rules({"Modality": "CT"})).series.series_instance_uid
             for r in ("one", "two")}
    assert picks == {"1.2.3.7"}


def test_selections_are_tried_in_order_and_alternatives_are_reported():
    thin = series("1.1", n=6, series_description="thin")
    thick = series("1.2", n=3, series_description="thick")
    other_thick = series("1.3", n=2, series_description="thick 2")
    sel = select_series(scan_of(thin, thick, other_thick),
                        rules({"SeriesDescription": "thick"}, {"Modality": "CT"}, names=("Thick", "Any CT")),
                        modality_key="ct")
    assert sel.series is thick and sel.selection_name == "Thick" and sel.selection_index == 0
    assert sel.alternatives == (other_thick,) and sel.modality_key == "ct"
    assert sel.conditions == {"SeriesDescription": "thick"}


def test_ct_is_chosen_over_localizer_and_segmentation(tmp_path):
    write_series(tmp_path / "ct", 8, series_uid="1.2.3.100", series_number=2, series_description="Abdomen")
    write_series(tmp_path / "topo", 2, series_uid="1.2.3.101", series_number=1, series_description="Topogram",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_segmentation_object(tmp_path)
    scan = scan_dicom_folder(tmp_path)
    assert len(scan.series) == 3
    for conditions in ({"Modality": "(?i)CT"}, {"StudyDescription": "(.*?)"},
                       {"StudyDescription": "(.*?)", "Modality": "(?i)CT", "SeriesDescription": "(.*?)"}):
        assert select_series(scan, rules(conditions)).series.series_instance_uid == "1.2.3.100"
    assert select_series(scan, rules({"ImageType": "LOCALIZER"})).series.series_instance_uid == "1.2.3.101"
    with pytest.raises(InputError, match="SEG 'AI segmentation' \\(1 instance, not an image series\\)"):
        select_series(scan, rules({"Modality": "SEG"}))


# ---- errors


def test_no_match_says_what_was_looked_for_and_what_was_found():
    scan = scan_of(series("1.1", n=4, modality="MR", series_description="T1 axial"),
                   series("1.2", n=1, modality="MR", series_description="Survey"))
    with pytest.raises(InputError) as e:
        select_series(scan, rules({"Modality": "(?i)CT", "SliceThickness": [1, 3]}, {"Modality": "PT"},
                                  names=("CT Series", "PET")), modality_key="image")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("modality 'image'", "/in", "'CT Series'", "Modality='(?i)CT'", "SliceThickness=[1, 3]", "'PET'",
                 "found 2 series", "MR 'T1 axial' (4 instances)", "MR 'Survey' (1 instance)"):
        assert part in msg, part


@pytest.mark.parametrize("conditions, fragment", [
    ({"SliceThickness": [3, "=>"]}, "not a comparison"),
    ({"SeriesDescription": "(unclosed"}, "not a valid regular expression"),
    ({"NoSuchKeyword": "x"}, "not a DICOM attribute keyword"),
    ({"ImageOrientationPatient": "Oblique"}, "not an orientation"),
    ({"ProcedureCodeSequence": "x"}, "VR SQ"),
    ({"SliceThickness": [5, 3]}, "min > max"),
    ({"Modality": True}, "strings or numbers"),
])
def test_rules_that_cannot_be_applied_are_task_file_errors(conditions, fragment):
    with pytest.raises(TaskFileError, match="selection 'sel1', condition") as e:  # checked before sel0 matches
        select_series(scan_of(series("1.1")), rules({"Modality": "CT"}, conditions), modality_key="image")
    assert fragment in str(e.value)


# ---- several modalities


def test_each_modality_gets_its_own_series_backtracking_when_needed():
    a = series("1.1", n=5, modality="MR", series_description="T1 post contrast")
    b = series("1.2", n=4, modality="MR", series_description="T1 native")
    c = series("1.3", n=4, modality="MR", series_description="T2 FLAIR")
    scan = scan_of(a, b, c)
    picked = select_for_task(scan, {
        "T1": rules({"SeriesDescription": "T1"}),          # matches a (preferred: more images) and b
        "T1C": rules({"SeriesDescription": "contrast"}),   # only a
        "T2F": rules({"SeriesDescription": "FLAIR"}),
    })
    assert list(picked) == ["T1", "T1C", "T2F"]
    assert {k: v.series.series_instance_uid for k, v in picked.items()} == {"T1": "1.2", "T1C": "1.1", "T2F": "1.3"}
    assert not any(v.shared for v in picked.values())


def test_one_series_serves_two_modalities_only_when_nothing_else_matches(caplog):
    scan = scan_of(series("1.1", modality="CT"), series("1.2", modality="PT"))
    with caplog.at_level(logging.WARNING, logger="segmap.dicom"):
        picked = select_for_task(scan, {"ct": rules({"Modality": "CT"}), "ct2": rules({"Modality": "CT"}),
                                        "pet": rules({"Modality": "PT"})})
    assert [picked[k].series.series_instance_uid for k in ("ct", "ct2", "pet")] == ["1.1", "1.1", "1.2"]
    assert picked["ct"].shared and picked["ct2"].shared and not picked["pet"].shared
    assert any("same series 1.1" in r.getMessage() for r in caplog.records)


def test_modality_without_a_match_names_its_key():
    with pytest.raises(InputError, match="modality 'T2W'"):
        select_for_task(scan_of(series("1.1", modality="MR")),
                        {"T1": rules({"Modality": "MR"}), "T2W": rules({"SeriesDescription": "T2"})})
