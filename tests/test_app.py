"""The MONAI Deploy application end to end (real Holoscan graph, real highdicom SEG, dciodvfy), and the bad inputs a
hospital will send it: each gives one clear line, a non-zero exit code and no output files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO_MODEL, ROOT, SAMPLE_CT, SPLEEN_TASK

from segmap.demo.phantom import make_phantom, write_dicom_series, write_nifti

SAMPLE_DICOM = SAMPLE_CT / "ct_dicom"


pytestmark = pytest.mark.skipif(not DEMO_MODEL.exists(), reason=f"demo model missing at {DEMO_MODEL}")


def run_app(inp: Path, out: Path, *, model: Path = DEMO_MODEL, task: Path = SPLEEN_TASK, variant: str = "auto",
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGMAP_TASK_FILE": str(task), "SEGMAP_INPUT_KIND": variant, "SEGMAP_DEVICE": "cpu",
           **(extra_env or {})}
    return subprocess.run([sys.executable, str(ROOT / "app"), "-i", str(inp), "-o", str(out), "-m", str(model)],
                          capture_output=True, text=True, env=env, timeout=600)


def run_cli(inp: Path, out: Path, *, model: Path = DEMO_MODEL, task: Path = SPLEEN_TASK) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segmap.cli", "run", "--model", str(model), "--task", str(task),
                           "-i", str(inp), "-o", str(out), "--device", "cpu"], capture_output=True, text=True,
                          timeout=600)


def assert_failed_cleanly(proc: subprocess.CompletedProcess, out: Path, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("segmap: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return errors[0]


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    p = make_phantom((40, 112, 112), (3.0, 1.6, 1.6), seed=77)
    write_dicom_series(p, root / "dicom" / "ct")
    write_nifti(p, root / "nifti" / "image.nii.gz")
    return root, p


def engine_labels(volume) -> np.ndarray:
    from segmap.engine import EngineOptions, Segmenter
    from segmap.model import load_model

    return Segmenter(load_model(DEMO_MODEL), EngineOptions(device="cpu")).segment(volume).array[0]


def dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (dicom3tools) must be installed in CI")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def check_seg_against_engine(seg_path: Path, series_folder: Path) -> np.ndarray:
    from segmap.dicom.loading import scan_dicom_folder
    from segmap.dicom.series_volume import series_to_volume
    from segmap.outputs.seg import read_seg_labels

    assert dciodvfy_errors(seg_path) == []
    scan = scan_dicom_folder(series_folder)
    series = max(scan.series, key=lambda s: len(s.instances))
    volume = series_to_volume(series)
    expected = engine_labels(volume)
    got = read_seg_labels(seg_path, volume.meta["sop_instance_uids"])
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)
    return expected


def test_dicom_phantom_end_to_end(phantom_study, tmp_path):
    root, phantom = phantom_study
    proc = run_app(root / "dicom", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["overlay.png", "run_report.json",
                                                                      "segmentation.dcm"]
    labels = check_seg_against_engine(tmp_path / "out" / "segmentation.dcm", root / "dicom")
    spleen = phantom.labels == 1
    dice = 2 * (spleen & (labels == 1)).sum() / (spleen.sum() + (labels == 1).sum())
    assert dice > 0.8, dice  # the demo model finds the phantom's spleen

    import json

    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["status"] == "succeeded"
    assert report["segments"][0]["voxels"] == int((labels == 1).sum())
    assert "PHANTOM" not in json.dumps(report)  # no patient name or ID in the report
    assert "PHANTOM" not in proc.stderr  # nor in the log


@pytest.mark.skipif(not SAMPLE_DICOM.exists(), reason=f"shared sample CT not found at {SAMPLE_DICOM}")
def test_sample_ct_jpeg2000_with_blank_uids(tmp_path):
    proc = run_app(SAMPLE_DICOM, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_seg_against_engine(tmp_path / "out" / "segmentation.dcm", SAMPLE_DICOM)


def test_dicom_and_nifti_variants_agree(phantom_study, tmp_path):
    from segmap.outputs.nifti import read_label_nifti

    root, _ = phantom_study
    assert run_cli(root / "dicom", tmp_path / "d").returncode == 0
    proc = run_app(root / "nifti", tmp_path / "n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    nifti_labels, affine = read_label_nifti(tmp_path / "n" / "segmentation.nii.gz")
    import nibabel as nib

    assert np.allclose(affine, nib.load(str(root / "nifti" / "image.nii.gz")).affine, atol=1e-4)
    from segmap.dicom.loading import scan_dicom_folder
    from segmap.outputs.seg import read_seg_labels

    uids = [ds.SOPInstanceUID for ds in sorted(scan_dicom_folder(root / "dicom").series[0].datasets,
                                               key=lambda d: float(d.ImagePositionPatient[2]))]
    dicom_labels = read_seg_labels(tmp_path / "d" / "segmentation.dcm", uids)
    assert np.array_equal(dicom_labels, nifti_labels)


def test_study_with_localizer_and_seg_selects_the_ct(phantom_study, tmp_path):
    root, phantom = phantom_study
    study = tmp_path / "study"
    shutil.copytree(root / "dicom" / "ct", study / "ct")
    ct_uid = __import__("pydicom").dcmread(next((study / "ct").iterdir())).StudyInstanceUID
    scout = make_phantom((2, 112, 112), (3.0, 1.6, 1.6), seed=1)
    write_dicom_series(scout, study / "scout", series_description="Topogram", study_uid=ct_uid, series_number=2)
    first = run_app(study, tmp_path / "first")  # its SEG becomes part of the study
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copy(tmp_path / "first" / "segmentation.dcm", study / "seg.dcm")
    proc = run_app(study, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'Phantom CT'" in proc.stderr
    check_seg_against_engine(tmp_path / "out" / "segmentation.dcm", study / "ct")


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("runner", [run_app, run_cli], ids=["app", "cli"])
def test_empty_input_folder(tmp_path, runner):
    (tmp_path / "in").mkdir()
    proc = runner(tmp_path / "in", tmp_path / "out")
    assert_failed_cleanly(proc, tmp_path / "out", str(tmp_path / "in"))


@pytest.mark.parametrize("runner", [run_app, run_cli], ids=["app", "cli"])
def test_only_non_dicom_files(tmp_path, runner):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "scan.bin").write_bytes(os.urandom(4096))
    proc = runner(tmp_path / "in", tmp_path / "out")
    assert_failed_cleanly(proc, tmp_path / "out", "no DICOM")


def test_corrupt_file_among_good_slices(phantom_study, tmp_path):
    root, _ = phantom_study
    shutil.copytree(root / "dicom", tmp_path / "in")
    victim = sorted((tmp_path / "in" / "ct").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:1500])  # truncated mid-header / pixel data
    (tmp_path / "in" / "readme.txt").write_text("hello")
    proc = run_app(tmp_path / "in", tmp_path / "out")
    # The truncated slice is skipped with a warning naming it; the gap it leaves in the series is refused with one
    # line (a volume with a missing slice would put every later slice at the wrong place), and nothing is written.
    assert victim.name in proc.stderr, proc.stderr[-3000:]
    assert_failed_cleanly(proc, tmp_path / "out", "gap")


def test_corrupt_extra_file_run_succeeds(phantom_study, tmp_path):
    root, _ = phantom_study
    shutil.copytree(root / "dicom", tmp_path / "in")
    good = sorted((tmp_path / "in" / "ct").iterdir())[0]
    broken = tmp_path / "in" / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:1000])
    proc = run_app(tmp_path / "in", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.dcm" in proc.stderr
    assert (tmp_path / "out" / "segmentation.dcm").exists()


@pytest.mark.parametrize("runner", [run_app, run_cli], ids=["app", "cli"])
def test_no_series_matches(phantom_study, tmp_path, runner):
    root, _ = phantom_study
    mr = make_phantom((8, 64, 64), (3.0, 3.0, 3.0), seed=2)
    write_dicom_series(mr, tmp_path / "in", modality="MR", series_description="T2 axial")
    proc = runner(tmp_path / "in", tmp_path / "out")
    line = assert_failed_cleanly(proc, tmp_path / "out", "CT")
    assert "T2 axial" in line and "MR" in line  # what was found


@pytest.mark.parametrize("runner", [run_app, run_cli], ids=["app", "cli"])
def test_two_nifti_files_match(phantom_study, tmp_path, runner):
    root, _ = phantom_study
    (tmp_path / "in").mkdir()
    shutil.copy(root / "nifti" / "image.nii.gz", tmp_path / "in" / "a.nii.gz")
    shutil.copy(root / "nifti" / "image.nii.gz", tmp_path / "in" / "b.nii.gz")
    proc = runner(tmp_path / "in", tmp_path / "out")
    assert_failed_cleanly(proc, tmp_path / "out", "a.nii.gz", "b.nii.gz")


@pytest.mark.parametrize("runner", [run_app, run_cli], ids=["app", "cli"])
def test_task_model_mismatch(phantom_study, tmp_path, runner):
    root, _ = phantom_study
    import yaml

    doc = yaml.safe_load(SPLEEN_TASK.read_text())
    (name, task_doc), = doc["tasks"].items()
    second = dict(task_doc["Segments"][0], segment_label="Liver")
    second["segmented_property_type"] = {"code": "10200004", "scheme": "SCT", "meaning": "Liver"}
    task_doc["Segments"].append(second)
    task = tmp_path / "two.yaml"
    task.write_text(yaml.safe_dump(doc))
    proc = runner(root / "dicom", tmp_path / "out", task=task)
    assert_failed_cleanly(proc, tmp_path / "out", "segment")


@pytest.mark.parametrize("runner", [run_app, run_cli], ids=["app", "cli"])
def test_unwritable_output_folder(phantom_study, tmp_path, runner):
    root, _ = phantom_study
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    proc = runner(root / "nifti", blocker / "out")
    assert_failed_cleanly(proc, blocker / "out", str(blocker))


def test_two_studies_through_the_application_load_the_networks_once(tmp_path, monkeypatch):
    """The application and ``segmap run`` share one orchestration (segmap.run): one Inference serves every study
    of an input, so the networks are loaded once, not once per study (issue 19)."""
    pytest.importorskip("holoscan")
    import json

    from segmap.model import MonetModel

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("HOLOSCAN_LOG_LEVEL", "ERROR")
    from app.app import main

    loads = []
    load_networks = MonetModel.load_networks

    def counted(self, device):
        loads.append(device)
        return load_networks(self, device)

    monkeypatch.setattr(MonetModel, "load_networks", counted)
    write_dicom_series(make_phantom((24, 80, 80), (3.0, 1.8, 1.8), seed=8), tmp_path / "in" / "today",
                       study_uid="1.2.826.7.1", patient_id="PAT-A")
    write_dicom_series(make_phantom((30, 80, 80), (3.0, 1.8, 1.8), seed=2), tmp_path / "in" / "prior",
                       study_uid="1.2.826.7.2", patient_id="PAT-B")
    monkeypatch.setenv("SEGMAP_TASK_FILE", str(SPLEEN_TASK))
    monkeypatch.setenv("SEGMAP_DEVICE", "cpu")
    out = tmp_path / "out"
    assert main(["-i", str(tmp_path / "in"), "-o", str(out), "-m", str(DEMO_MODEL)]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["status"], summary["studies_total"]) == ("succeeded", 2)
    assert all((out / s["folder"] / "segmentation.dcm").is_file() for s in summary["studies"])
    assert loads == ["cpu"]  # once for the input, not once per study
