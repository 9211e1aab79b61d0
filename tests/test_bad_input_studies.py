"""Issue 8 item 3: one patient, one study, one frame of reference per result; several studies are processed one by
one into their own output folders (plain logic of segmap.dicom.studies and segmap.run.studies, with real DICOM files)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dicom_factory import write_series
from segmap.dicom import scan_dicom_folder, select_for_task, series_to_volume
from segmap.dicom.selection import passed_over
from segmap.dicom.studies import check_one_study, split_by_study
from segmap.errors import InputError, StudiesFailed
from segmap.run.studies import process_studies, raise_if_any_failed, study_folder_name, write_summary

CT = {"selections": [{"name": "CT", "conditions": {"Modality": "CT", "ImageType": ["!LOCALIZER"]}}]}
T1 = {"selections": [{"name": "T1", "conditions": {"SeriesDescription": "^T1$"}}]}
T2 = {"selections": [{"name": "T2", "conditions": {"SeriesDescription": "^T2$"}}]}


def two_studies(folder):
    """Today's study (3 slices) and a 2020 prior of another patient (5 slices, so 'most images' would pick it)."""
    write_series(folder / "today", 3, study_uid="1.2.826.1.1", series_uid="1.2.826.1.1.1", PatientID="PAT-A",
                 StudyDate="20261130")
    write_series(folder / "prior", 5, study_uid="1.2.826.1.2", series_uid="1.2.826.1.2.1", PatientID="PAT-B",
                 StudyDate="20200101", frame_of_reference_uid="1.2.826.1.2.9")


def test_a_scan_is_split_into_one_scan_per_study(tmp_path):
    two_studies(tmp_path)
    studies = split_by_study(scan_dicom_folder(tmp_path))
    assert [[s.series_instance_uid for s in study.series] for study in studies] == [["1.2.826.1.1.1"],
                                                                                    ["1.2.826.1.2.1"]]
    # selection inside each study cannot reach into the other one
    chosen = [select_for_task(study, {"image": CT})["image"].series.study_instance_uid for study in studies]
    assert chosen == ["1.2.826.1.1", "1.2.826.1.2"]


def test_study_folder_names_are_stable_hashes_without_patient_data():
    name = study_folder_name("1.2.826.1.1")
    assert re.fullmatch(r"study-[0-9a-f]{12}", name)
    assert name == study_folder_name("1.2.826.1.1") != study_folder_name("1.2.826.1.2")


def test_channels_from_two_studies_are_refused_naming_them(tmp_path):
    write_series(tmp_path / "a", 3, study_uid="1.2.826.1.1", series_uid="1.2.826.1.1.1", series_description="T1")
    write_series(tmp_path / "b", 3, study_uid="1.2.826.1.2", series_uid="1.2.826.1.2.1", series_description="T2")
    scan = scan_dicom_folder(tmp_path)
    with pytest.raises(InputError) as e:  # selecting across the studies is refused ...
        select_for_task(scan, {"t1": T1, "t2": T2})
    assert str(e.value) == (f"{tmp_path} holds 2 studies with series that match the task's rules (1.2.826.1.1, "
                            "1.2.826.1.2); one result must come from one study: process each study on its own")
    a, b = split_by_study(scan)  # ... and series chosen in two studies cannot make one input
    selections = {"t1": select_for_task(a, {"t1": T1})["t1"], "t2": select_for_task(b, {"t2": T2})["t2"]}
    with pytest.raises(InputError) as e:
        check_one_study(selections)
    assert str(e.value) == ("the series chosen for one model input come from different studies (t1: study "
                            "1.2.826.1.1; t2: study 1.2.826.1.2); channels of one input must come from one study")


def test_channels_in_two_frames_of_reference_are_refused(tmp_path):
    write_series(tmp_path / "a", 3, series_uid="1.2.3.1", series_description="T1", frame_of_reference_uid="1.2.3.91")
    write_series(tmp_path / "b", 3, series_uid="1.2.3.2", series_description="T2", frame_of_reference_uid="1.2.3.92")
    with pytest.raises(InputError, match=r"different frames of reference \(t1: 1\.2\.3\.91; t2: 1\.2\.3\.92\)"):
        select_for_task(scan_dicom_folder(tmp_path), {"t1": T1, "t2": T2})


def test_one_study_two_patients_is_refused_without_naming_them(tmp_path):
    write_series(tmp_path / "a", 3, series_uid="1.2.3.1", series_description="T1", PatientID="PAT-A")
    write_series(tmp_path / "b", 3, series_uid="1.2.3.2", series_description="T2", PatientID="PAT-B")
    with pytest.raises(InputError) as e:
        select_for_task(scan_dicom_folder(tmp_path), {"t1": T1, "t2": T2})
    assert "2 different patients" in str(e.value) and "PAT-" not in str(e.value)


def test_one_study_one_frame_of_reference_passes(tmp_path):
    write_series(tmp_path / "a", 3, series_uid="1.2.3.1", series_description="T1")
    write_series(tmp_path / "b", 3, series_uid="1.2.3.2", series_description="T2")
    selections = select_for_task(scan_dicom_folder(tmp_path), {"t1": T1, "t2": T2})
    check_one_study(selections)
    assert {k: s.series.series_instance_uid for k, s in selections.items()} == {"t1": "1.2.3.1", "t2": "1.2.3.2"}


def test_candidates_passed_over_are_listed_with_the_reason(tmp_path):
    write_series(tmp_path / "ct", 5, series_uid="1.2.3.1", series_description="Abdomen", series_number=2)
    write_series(tmp_path / "thin", 3, series_uid="1.2.3.2", series_description="Abdomen thin", series_number=3)
    write_series(tmp_path / "scout", 1, series_uid="1.2.3.3", series_description="Topogram", series_number=1,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    scan = scan_dicom_folder(tmp_path)
    selections = select_for_task(scan, {"image": CT})
    assert selections["image"].series.series_instance_uid == "1.2.3.1"
    reasons = {e["series_instance_uid"]: e["reason"] for e in selections["image"].passed_over}
    assert reasons == {
        "1.2.3.2": "matched 'CT' too, but the chosen series has more images (5 > 3)",
        "1.2.3.3": "does not match ImageType=['!LOCALIZER']",
    }
    assert passed_over(scan, selections) == {"image": list(selections["image"].passed_over)}
    two = select_for_task(scan, {"a": CT, "b": CT})  # the second modality gets the second-best series
    assert {e["series_instance_uid"]: e["reason"] for e in two["b"].passed_over}["1.2.3.1"] == \
        "chosen for modality 'a'"


def test_studies_are_processed_one_by_one_and_a_failure_does_not_stop_the_others(tmp_path):
    two_studies(tmp_path / "in")
    # the prior's slices are unevenly spaced: that study fails, today's still gets its output
    bad = sorted((tmp_path / "in" / "prior").iterdir())[2]
    bad.unlink()
    out = tmp_path / "out"

    def process_one(study, target):
        volume = series_to_volume(select_for_task(study, {"image": CT})["image"].series)
        target.mkdir(parents=True, exist_ok=True)
        np.save(target / "volume.npy", volume.array)
        (target / "run_report.json").write_text("{}")
        return target / "run_report.json"

    results = process_studies(scan_dicom_folder(tmp_path / "in"), out, process_one)
    today, prior = study_folder_name("1.2.826.1.1"), study_folder_name("1.2.826.1.2")
    assert [(r.folder, r.status) for r in results] == [(today, "succeeded"), (prior, "failed")]
    assert "not evenly spaced" in results[1].error
    assert np.load(out / today / "volume.npy").shape == (1, 3, 6, 7)
    assert not (out / prior).exists()

    doc = json.loads(write_summary(results, out).read_text())
    assert doc["status"] == "partly failed" and doc["studies_failed"] == 1 and doc["studies_total"] == 2
    assert doc["studies"][0] == {"study_instance_uid": "1.2.826.1.1", "folder": today, "status": "succeeded",
                                 "error": None, "report": f"{today}/run_report.json", "series": 1}
    assert "PAT-" not in json.dumps(doc)
    with pytest.raises(StudiesFailed, match=rf"1 of 2 studies failed \({prior}; see run_summary.json\); first: "
                                            rf"{prior}: series 1\.2\.826\.1\.2\.1 .*not evenly spaced"):
        raise_if_any_failed(results)


def test_a_single_study_keeps_outputs_at_the_top_and_its_error_as_is(tmp_path):
    write_series(tmp_path / "in", 3)
    seen = []
    results = process_studies(scan_dicom_folder(tmp_path / "in"), tmp_path / "out",
                              lambda study, target: seen.append(target))
    assert seen == [tmp_path / "out"] and results[0].folder == "."
    raise_if_any_failed(results)

    def fail(study, target):
        raise InputError("nothing matches")

    with pytest.raises(InputError, match="nothing matches"):
        process_studies(scan_dicom_folder(tmp_path / "in"), tmp_path / "out", fail)
