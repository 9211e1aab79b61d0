"""Hostile-but-realistic inputs through whole runs (issue 8): the right mask, or one clear line and exit code 2.

Each test builds its input here with nibabel/pydicom from a small phantom and runs ``segmap.run.run`` or the
``segmap`` command with the bundled demo model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DEMO_MODEL, ROOT, SPLEEN_TASK

from segmap.demo.phantom import make_phantom, write_dicom_series, write_nifti
from segmap.errors import InputError
from segmap.outputs.atomic import STAGING_PREFIX
from segmap.outputs.nifti import read_label_nifti
from segmap.run import run
from segmap.run.studies import study_folder_name
from segmap.settings import Settings

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

pytestmark = pytest.mark.skipif(not DEMO_MODEL.exists(), reason=f"demo model missing at {DEMO_MODEL}")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((24, 80, 80), (3.0, 1.8, 1.8), seed=8)


def options(inp: Path, out: Path) -> Settings:
    return Settings(models=DEMO_MODEL, task_file=SPLEEN_TASK, input=inp, output=out, device="cpu")


def cli(inp: Path, out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "segmap.cli", "run", "--model", str(DEMO_MODEL), "--task",
                             str(SPLEEN_TASK), "-i", str(inp), "-o", str(out), "--device", "cpu"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, **popen)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


# ------------------------------------------------------------------------------------------- 1 non-finite voxels


def test_nan_voxel_gives_the_clean_mask_with_a_warning(phantom, tmp_path, caplog):
    clean = write_nifti(phantom, tmp_path / "clean" / "image.nii.gz")
    img = nib.load(clean)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[40, 40, 12] = np.nan  # inside the body, where nnU-Net's clip bounds would become NaN
    data[0, 0, 0] = np.inf
    dirty = tmp_path / "nan" / "image.nii.gz"
    dirty.parent.mkdir()
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data, img.affine, header), dirty)
    assert np.isnan(nib.load(dirty).get_fdata()).sum() == 1

    run(options(clean.parent, tmp_path / "out_clean"))
    with caplog.at_level("WARNING"):
        report_path = run(options(dirty.parent, tmp_path / "out_nan"))

    expected, _ = read_label_nifti(tmp_path / "out_clean" / "segmentation.nii.gz")
    got, _ = read_label_nifti(tmp_path / "out_nan" / "segmentation.nii.gz")
    assert np.count_nonzero(got == 1) > 1000
    assert dice(got == 1, expected == 1) >= 0.99
    assert any("2 voxel(s) are not finite (1 NaN, 1 +inf, 0 -inf)" in r.getMessage() for r in caplog.records)
    report = json.loads(report_path.read_text())
    assert report["inputs"][0]["nonfinite_voxels_replaced"] == 2
    assert report["segments"][0]["volume_ml"] > 0


def test_image_without_a_finite_voxel_is_refused(tmp_path):
    path = tmp_path / "in" / "image.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match="no voxel has a finite value"):
        run(options(path.parent, tmp_path / "out"))
    assert not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------- 4 NIfTI header fidelity


def test_label_map_overlays_the_image_in_simpleitk_when_qform_and_sform_disagree(phantom, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    image = tmp_path / "in" / "image.nii.gz"
    image.parent.mkdir()
    qform = phantom.affine.copy()
    sform = phantom.affine.copy()
    sform[:3, 3] += [50.0, 0.0, 0.0]  # the two transforms disagree by 50 mm
    img = nib.Nifti1Image(phantom.hu.transpose(2, 1, 0).astype(np.int16), None)
    img.set_qform(qform, code=2)  # aligned: SimpleITK's choice
    img.set_sform(sform, code=1)  # scanner: nibabel's choice
    img.header.set_xyzt_units("mm", "msec")
    nib.save(img, image)

    run(options(image.parent, tmp_path / "out"))
    out = tmp_path / "out" / "segmentation.nii.gz"

    src, dst = nib.load(image).header, nib.load(out).header
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                  "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units"):
        np.testing.assert_array_equal(dst[field], src[field], err_msg=field)
    a, b = sitk.ReadImage(str(image)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    far = tuple(int(n) - 1 for n in a.GetSize())
    np.testing.assert_allclose(b.TransformIndexToPhysicalPoint(far), a.TransformIndexToPhysicalPoint(far), atol=1e-3)
    # and nibabel (which reads the sform) overlays them too
    np.testing.assert_allclose(nib.load(out).affine, nib.load(image).affine, atol=1e-4)


# ------------------------------------------------------------------------------- 5 absurd headers, whole command


def test_absurd_dicom_header_is_one_line_and_exit_2(tmp_path):
    from dicom_factory import write_series

    write_series(tmp_path / "in", 3, Rows=60000, Columns=60000)  # every slice claims 60000 x 60000, holds 6 x 7
    proc = cli(tmp_path / "in", tmp_path / "out")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("segmap: error: ")]
    assert len(errors) == 1, err[-2000:]
    assert "60000 x 60000 pixels" in errors[0] and "its pixel data hold 84 bytes" in errors[0]


def declared_only(shape: tuple, path: Path, data: bytes = b"\0" * 128) -> Path:
    """A NIfTI file whose header declares ``shape`` int16 voxels and that holds only ``data``."""
    import gzip

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr["vox_offset"] = 352
    content = hdr.binaryblock + b"\0" * 4 + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def test_absurd_nifti_header_is_refused_before_allocating(tmp_path):
    gz = declared_only((30000, 30000, 3000), tmp_path / "gz" / "image.nii.gz")  # 5 TB declared
    with pytest.raises(InputError, match=r"declares 30000 x 30000 x 3000 voxels of int16.*memory is available"):
        run(options(gz.parent, tmp_path / "out"))
    raw = declared_only((600, 600, 300), tmp_path / "raw" / "image.nii")  # uncompressed: the size tells at once
    with pytest.raises(InputError, match="the file has 480 bytes; the file is truncated"):
        run(options(raw, tmp_path / "out2"))


# ----------------------------------------------------------------------------------------------------- 7 SIGTERM


def test_sigterm_while_writing_removes_the_staging_folder_and_exits_143(tmp_path):
    out = tmp_path / "out"
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT / 'src')!r})
from segmap import signals
from segmap.outputs.atomic import atomic_outputs, claim_output_folder
signals.install_sigterm_handler()
claim_output_folder({str(out)!r})
with atomic_outputs({str(out)!r}) as staging:
    (staging.dir / "segmentation.nii.gz").write_bytes(b"")  # half written when the signal comes
    print("writing", flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert len(list(out.glob(STAGING_PREFIX + "*"))) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.strip().splitlines() == ["segmap: terminated (SIGTERM)"]
    assert list(out.iterdir()) == []


def test_sigterm_during_a_cli_run_exits_143_without_outputs(phantom, tmp_path):
    write_nifti(phantom, tmp_path / "in" / "image.nii.gz")
    out = tmp_path / "out"
    proc = cli(tmp_path / "in", out)
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline:  # the run has claimed its output folder
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143, err[-2000:]
    assert err.splitlines().count("segmap: terminated (SIGTERM)") == 1
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_staging_left_by_a_killed_run_is_removed_by_the_next_run(phantom, tmp_path):
    write_nifti(phantom, tmp_path / "in" / "image.nii.gz")
    out = tmp_path / "out"
    stale = out / f"{STAGING_PREFIX}killed"
    stale.mkdir(parents=True)
    (stale / "segmentation.nii.gz").write_bytes(b"")
    run(options(tmp_path / "in", out))
    assert sorted(p.name for p in out.iterdir()) == ["overlay.png", "run_report.json", "segmentation.nii.gz"]


# ------------------------------------------------------------------------------------------ 8 concurrent runs


def test_second_run_into_the_same_folder_is_refused_at_once(phantom, tmp_path):
    write_nifti(phantom, tmp_path / "in" / "image.nii.gz")
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT / 'src')!r}); "
                               "from segmap.outputs.atomic import claim_output_folder; "
                               f"claim_output_folder({str(out)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        second = cli(tmp_path / "in", out)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("segmap: error: ")]
        assert errors == [f"segmap: error: {out}: another segmap run is writing into this output folder; wait for it "
                          "to finish or choose another output folder"]
        assert "inference" not in err  # refused before any work
        assert time.monotonic() - t0 < 60
    finally:
        holder.kill()
        holder.wait()
    assert list(out.iterdir()) == []
    run(options(tmp_path / "in", out))  # once the first run is gone, the folder is free again
    assert (out / "segmentation.nii.gz").exists()


# ------------------------------------------------------------------------------------------------- 9 smaller ones


def test_report_records_the_size_of_each_output(phantom, tmp_path):
    write_nifti(phantom, tmp_path / "in" / "image.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.nii.gz").write_bytes(b"an earlier run's file")
    report = json.loads(run(options(tmp_path / "in", out)).read_text())
    assert report["outputs"] == [{"path": name, "kind": kind, "bytes": (out / name).stat().st_size}
                                 for name, kind in (("segmentation.nii.gz", "nifti"), ("overlay.png", "overlay-png"))]
    assert report["outputs"][0]["bytes"] > 1000


def test_missing_input_creates_no_output_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run(options(tmp_path / "no-such-input", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_lossy_input_is_warned_about_and_recorded(phantom, tmp_path, caplog):
    paths = write_dicom_series(phantom, tmp_path / "in")
    import pydicom

    for p in paths:  # stored uncompressed now, but lossy-compressed on the way (e.g. by a teleradiology link)
        ds = pydicom.dcmread(p)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "10"
        ds.save_as(p)
    with caplog.at_level("WARNING"):
        report = json.loads(run(options(tmp_path / "in", tmp_path / "out")).read_text())
    assert report["inputs"][0]["lossy_compression"] == "LossyImageCompression 01, ratio 10"
    assert any("lossy-compressed input" in r.getMessage() for r in caplog.records)
    assert report["status"] == "succeeded"


def test_claiming_a_folder_removes_stale_staging_of_study_subfolders_too(tmp_path):
    from segmap.outputs.atomic import claim_output_folder, release_output_folder

    out = tmp_path / "out"
    for stale in (out / f"{STAGING_PREFIX}a", out / "study-0123456789ab" / f"{STAGING_PREFIX}b"):
        stale.mkdir(parents=True)
        (stale / "segmentation.dcm").write_bytes(b"")
    (out / "study-0123456789ab" / "segmentation.dcm").write_bytes(b"kept")
    claim_output_folder(out)
    try:
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
            "study-0123456789ab", "study-0123456789ab/segmentation.dcm"]
    finally:
        release_output_folder(out)


def test_report_says_which_series_was_chosen_and_which_were_passed_over(phantom, tmp_path):
    import pydicom

    write_dicom_series(phantom, tmp_path / "in" / "ct", series_number=2)
    study_uid = pydicom.dcmread(tmp_path / "in" / "ct" / "slice_0001.dcm").StudyInstanceUID
    write_dicom_series(make_phantom((2, 80, 80), (3.0, 1.8, 1.8), seed=1), tmp_path / "in" / "scout",
                       series_description="Topogram", study_uid=study_uid, series_number=1)
    report = json.loads(run(options(tmp_path / "in", tmp_path / "out")).read_text())
    entry = report["inputs"][0]
    assert entry["SeriesDescription"] == "Phantom CT" and entry["selected_by"] == "CT Series"
    assert [(p["summary"].split(" (")[0], p["reason"]) for p in entry["passed_over"]] == [
        ("CT #1 'Topogram'", "matched 'CT Series' too, but the chosen series has more images (24 > 2)")]
    assert "PHANTOM" not in json.dumps(report)


def two_studies(phantom, folder: Path) -> tuple[str, str]:
    """Today's study (patient A) and a 2020 prior of patient B with more slices (what "most images" would pick)."""
    write_dicom_series(phantom, folder / "today", study_uid="1.2.826.7.1", patient_id="PAT-A")
    write_dicom_series(make_phantom((30, 80, 80), (3.0, 1.8, 1.8), seed=2), folder / "prior",
                       study_uid="1.2.826.7.2", patient_id="PAT-B")
    return study_folder_name("1.2.826.7.1"), study_folder_name("1.2.826.7.2")


def test_two_studies_in_one_folder_are_processed_one_by_one(phantom, tmp_path):
    import pydicom

    today, prior = two_studies(phantom, tmp_path / "in")
    out = tmp_path / "out"
    summary = json.loads(run(options(tmp_path / "in", out)).read_text())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([
        "run_summary.json", today, f"{today}/run_report.json", f"{today}/segmentation.dcm", f"{today}/overlay.png",
        prior, f"{prior}/run_report.json", f"{prior}/segmentation.dcm", f"{prior}/overlay.png"])
    assert summary["status"] == "succeeded" and summary["studies_total"] == 2
    for folder, uid, slices in ((today, "1.2.826.7.1", 24), (prior, "1.2.826.7.2", 30)):
        report = json.loads((out / folder / "run_report.json").read_text())
        assert report["inputs"][0]["StudyInstanceUID"] == uid and report["inputs"][0]["instances"] == slices
        seg = pydicom.dcmread(out / folder / "segmentation.dcm")
        assert seg.StudyInstanceUID == uid  # each SEG belongs to its own study
    assert "PAT-" not in json.dumps(summary)


def test_a_failed_study_is_reported_and_does_not_stop_the_others(phantom, tmp_path):
    today, prior = two_studies(phantom, tmp_path / "in")
    (tmp_path / "in" / "prior" / "slice_0010.dcm").unlink()  # a missing slice: that study cannot be segmented
    out = tmp_path / "out"
    proc = cli(tmp_path / "in", out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("segmap: error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"segmap: error: 1 of 2 studies failed ({prior}; see run_summary.json); first: {prior}: series ")
    assert "not evenly spaced" in errors[0]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([
        "run_summary.json", today, f"{today}/run_report.json", f"{today}/segmentation.dcm", f"{today}/overlay.png"])
    summary = json.loads((out / "run_summary.json").read_text())
    assert [(s["folder"], s["status"]) for s in summary["studies"]] == [(today, "succeeded"), (prior, "failed")]
    assert summary["status"] == "partly failed"


def test_the_application_processes_studies_one_by_one_too(phantom, tmp_path):
    pytest.importorskip("holoscan")
    today, prior = two_studies(phantom, tmp_path / "in")
    (tmp_path / "in" / "prior" / "slice_0010.dcm").unlink()
    out = tmp_path / "out"
    env = {**ENV, "SEGMAP_TASK_FILE": str(SPLEEN_TASK), "SEGMAP_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "app"), "-i", str(tmp_path / "in"), "-o", str(out), "-m",
                           str(DEMO_MODEL)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("segmap: error: ")]
    assert len(errors) == 1 and f"1 of 2 studies failed ({prior}; see run_summary.json)" in errors[0]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([
        "run_summary.json", today, f"{today}/run_report.json", f"{today}/segmentation.dcm", f"{today}/overlay.png"])
