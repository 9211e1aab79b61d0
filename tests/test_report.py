"""Run report (statistics, timings, no PHI) and all-or-nothing output staging."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import segmap
from segmap.errors import OutputError
from segmap.outputs.atomic import atomic_outputs, ensure_writable
from segmap.outputs.report import RunReport, segment_statistics
from segmap.tasks import Code, Segment

ANISOTROPIC = np.diag([0.5, 0.8, 2.5, 1.0])  # x, y, z spacing in mm: 1 mm^3 voxels


def ct_headers(n: int = 4) -> list[pydicom.Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "ID-98765", "19700101"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.FrameOfReferenceUID = generate_uid()
        ds.SeriesDescription, ds.Modality, ds.SeriesNumber = "Abdomen 1.0", "CT", 3
        out.append(ds)
    return out


# ------------------------------------------------------------------------------------------ segment statistics


def test_box_volume_on_anisotropic_spacing():
    labels = np.zeros((10, 40, 30), np.uint8)  # z, y, x
    labels[2:6, 5:25, 10:20] = 1  # 4 x 20 x 10 voxels of 0.5 x 0.8 x 2.5 mm = 800 mm^3
    stats = segment_statistics(labels, ANISOTROPIC, ["box", "nothing"])
    assert stats[0] == {"label_value": 1, "name": "box", "voxels": 800, "volume_ml": pytest.approx(0.8)}
    assert stats[1] == {"label_value": 2, "name": "nothing", "voxels": 0, "volume_ml": 0.0}


def test_sphere_volume_matches_geometry():
    spacing_xyz = np.array([0.6, 0.9, 1.5])
    shape_zyx = (60, 80, 110)
    z, y, x = np.indices(shape_zyx)
    centre = np.array([30.0, 40.0, 55.0]) * spacing_xyz[::-1]
    r2 = sum(((v * s) - c) ** 2 for v, s, c in zip((z, y, x), spacing_xyz[::-1], centre))
    labels = (r2 <= 25.0 ** 2).astype(np.uint8)  # radius 25 mm
    affine = np.diag([*spacing_xyz, 1.0])
    (stats,) = segment_statistics(labels, affine, ["sphere"])
    assert stats["volume_ml"] == pytest.approx(4 / 3 * np.pi * 25.0 ** 3 / 1000, rel=0.01)
    assert stats["voxels"] == int(labels.sum())


def test_voxel_volume_uses_the_determinant_for_oblique_grids():
    rotation = np.array([[0.0, -1.0, 0.0], [np.sqrt(0.5), 0.0, np.sqrt(0.5)], [-np.sqrt(0.5), 0.0, np.sqrt(0.5)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.5, 0.8, 2.5])
    labels = np.ones((2, 3, 5), np.int16)
    (stats,) = segment_statistics(labels, affine, ["all"])
    assert stats["volume_ml"] == pytest.approx(30 * 1.0 / 1000)


def test_counts_are_exact_across_chunks():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=(70, 256, 256), dtype=np.uint8)  # more than one 4 Mi-voxel chunk
    stats = segment_statistics(labels, np.eye(4), ["a", "b"])
    assert [s["voxels"] for s in stats] == [int((labels == 1).sum()), int((labels == 2).sum())]


def test_labels_beyond_the_segments_are_refused():
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, 0] = 4
    with pytest.raises(ValueError, match="value 4 .* 2 segment"):
        segment_statistics(labels, np.eye(4), ["a", "b"])
    with pytest.raises(ValueError, match="negative value -1"):
        segment_statistics(np.full((2, 2, 2), -1, np.int8), np.eye(4), ["a"])


# --------------------------------------------------------------------------------------------------- run report


def test_report_contents_and_no_phi(tmp_path):
    model = tmp_path / "fold_0" / "model.ts"
    model.parent.mkdir()
    model.write_bytes(b"not really torchscript")
    series = ct_headers()
    seg_file = tmp_path / "out" / "seg.dcm"
    seg_file.parent.mkdir()
    seg_file.write_bytes(b"x" * 123)

    report = RunReport(task_name="Spleen", task_file=tmp_path / "task.yaml", device="cpu")
    with report.stage("load"):
        time.sleep(0.01)
    with report.stage("load"):
        pass
    report.add_input("image", files=[tmp_path / f"{k}.dcm" for k in range(4)], datasets=series,
                     shape_zyx=(4, 16, 16), PatientID="leaked?")
    report.set_model([model], path=model.parent.parent, configuration="3d_fullres", folds=[0])
    labels = np.zeros((4, 10, 10), np.uint8)
    labels[:2, :5, :4] = 1
    segments = [Segment("Spleen", Code("91772007", "SCT", "Organ"), Code("78961009", "SCT", "Spleen"), "alg")]
    report.set_segments(labels, ANISOTROPIC, segments)
    report.add_output(seg_file, kind="dicom-seg")
    report.finish("succeeded")
    path = report.write(tmp_path / "out" / "run_report.json")

    text = path.read_text()
    doc = json.loads(text)
    for secret in ("Doe", "Jane", "98765", "19700101", "leaked?", "PatientName", "PatientID", "PatientBirthDate"):
        assert secret not in text
    assert doc["segmap_version"] == segmap.__version__
    assert doc["status"] == "succeeded" and doc["error"] is None
    assert doc["started_at"] <= doc["finished_at"]
    assert doc["task"] == {"name": "Spleen", "file": str(tmp_path / "task.yaml")}
    assert doc["device"] == "cpu"
    (entry,) = doc["inputs"]
    assert entry["key"] == "image" and entry["files"] == 4 and entry["instances"] == 4
    assert entry["SeriesInstanceUID"] == series[0].SeriesInstanceUID
    assert entry["StudyInstanceUID"] == series[0].StudyInstanceUID
    assert (entry["Modality"], entry["SeriesDescription"], entry["SeriesNumber"]) == ("CT", "Abdomen 1.0", 3)
    assert entry["shape_zyx"] == [4, 16, 16]
    assert entry["folder"] == str(tmp_path) and len(entry["paths"]) == 4
    assert doc["model"]["configuration"] == "3d_fullres" and doc["model"]["folds"] == [0]
    assert doc["model"]["files"] == [{"path": str(model), "bytes": model.stat().st_size,
                                      "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}]
    assert doc["timings_s"]["load"] >= 0.01
    (stats,) = doc["segments"]
    assert (stats["name"], stats["voxels"]) == ("Spleen", 40)
    assert stats["volume_ml"] == pytest.approx(0.04)
    assert stats["property_type"]["meaning"] == "Spleen"
    assert doc["outputs"] == [{"path": "seg.dcm", "kind": "dicom-seg", "bytes": 123}]
    assert [p.name for p in path.parent.iterdir()] and not list(path.parent.glob(".*tmp"))


def test_failed_stage_is_timed_and_error_is_one_line(tmp_path):
    report = RunReport()
    with pytest.raises(RuntimeError):
        with report.stage("inference"):
            raise RuntimeError("out of memory\nsecond line")
    report.finish("failed", RuntimeError("out of memory\nsecond line"))
    doc = json.loads(report.write(tmp_path / "run_report.json").read_text())
    assert "inference" in doc["timings_s"]
    assert doc["status"] == "failed" and doc["error"] == "out of memory"


def test_report_unwritable_is_an_output_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="a_file"):
        RunReport().write(tmp_path / "a_file" / "run_report.json")


# ---------------------------------------------------------------------------------------------- atomic outputs


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_outputs_appear_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_outputs(out, commit_last=("run_report.json",)) as staging:
        (staging.dir / "run_report.json").write_text("{}")
        (staging.dir / "seg.dcm").write_bytes(b"seg")
        (staging.dir / "nifti").mkdir()
        (staging.dir / "nifti" / "labels.nii.gz").write_bytes(b"nii")
        assert listing(out) == {staging.dir.name} | {f"{staging.dir.name}/{p}" for p in listing(staging.dir)}
        assert staging.final_path(staging.dir / "seg.dcm") == out.absolute() / "seg.dcm"
    assert listing(out) == {"run_report.json", "seg.dcm", "nifti", "nifti/labels.nii.gz"}
    assert (out / "nifti" / "labels.nii.gz").read_bytes() == b"nii"
    assert staging.committed[-1].name == "run_report.json"  # the report lands last
    assert set(staging.committed) == {out.absolute() / p for p in ("run_report.json", "seg.dcm",
                                                                   "nifti/labels.nii.gz")}


def test_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me")
    with pytest.raises(ZeroDivisionError):
        with atomic_outputs(out) as staging:
            (staging.dir / "seg.dcm").write_bytes(b"half")
            1 / 0
    assert listing(out) == {"earlier.txt"}
    assert (out / "earlier.txt").read_text() == "keep me"


def test_same_named_outputs_are_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.dcm").write_bytes(b"old")
    with atomic_outputs(out) as staging:
        (staging.dir / "seg.dcm").write_bytes(b"new")
    assert (out / "seg.dcm").read_bytes() == b"new"
    assert listing(out) == {"seg.dcm"}


def test_ensure_writable_creates_the_folder(tmp_path):
    folder = ensure_writable(tmp_path / "a" / "b")
    assert folder.is_dir() and listing(folder) == set()


@pytest.mark.parametrize("make_target", [
    lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "out",  # parent is a file (fails for root too)
    lambda tmp: (tmp / "file").write_text("x") and tmp / "file",          # the folder itself is a file
], ids=["parent-is-file", "target-is-file"])
def test_unwritable_output_folder_is_an_output_error(tmp_path, make_target):
    target = make_target(tmp_path)
    with pytest.raises(OutputError, match=str(target)):
        ensure_writable(target)
    with pytest.raises(OutputError, match=str(target)):
        with atomic_outputs(target):
            pytest.fail("the block must not run")


def test_read_only_folder_is_an_output_error(tmp_path):
    """/proc/1 refuses new files even for root: a real write-permission failure, not a path shape problem."""
    target = Path("/proc/1")
    if not target.is_dir():
        pytest.skip("no /proc on this system")
    with pytest.raises(OutputError, match="/proc/1: output folder is not writable"):
        ensure_writable(target)
