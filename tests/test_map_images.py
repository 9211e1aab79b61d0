"""The real MAP images: `segmap package` builds both variants of the demo model, and `docker run` on a phantom study
(no network, read-only input, the image's default non-root user) gives what `segmap run` gives for the same input.

Needs a Docker engine (CI starts one with .ci/docker-setup.sh); skipped with the reason outside CI when none can
be started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO_MODEL, ROOT, SPLEEN_TASK

from segmap.demo.phantom import make_phantom, write_dicom_series, write_nifti




@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    p = make_phantom((40, 112, 112), (3.0, 1.6, 1.6), seed=314)
    write_dicom_series(p, root / "dicom" / "series")
    write_nifti(p, root / "nifti" / "image.nii.gz")
    for d in (root / "dicom", root / "nifti"):
        for path in [d, *d.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def docker_run(image: str, inp: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o777)  # the image runs as uid 65532
    cmd = ["docker", "run", "--rm", "--network", "none", "-v", f"{inp}:/var/holoscan/input:ro",
           "-v", f"{out}:/var/holoscan/output", image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def segmap_run(inp: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segmap.cli", "run", "--model", str(DEMO_MODEL), "--task",
                           str(SPLEEN_TASK), "-i", str(inp), "-o", str(out), "--device", "cpu"], capture_output=True, text=True,
                          timeout=900)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("segmap: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_dicom_image_matches_segmap_run(images, study, tmp_path):
    from segmap.dicom.loading import scan_dicom_folder
    from segmap.dicom.series_volume import series_to_volume
    from segmap.outputs.seg import read_seg_labels

    t = time.perf_counter()
    proc = docker_run(images[0], study / "dicom", tmp_path / "map")
    print(f"docker run (DICOM variant) took {time.perf_counter() - t:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert segmap_run(study / "dicom", tmp_path / "cli").returncode == 0
    uids = series_to_volume(scan_dicom_folder(study / "dicom").series[0]).meta["sop_instance_uids"]
    in_image = read_seg_labels(tmp_path / "map" / "segmentation.dcm", uids)
    local = read_seg_labels(tmp_path / "cli" / "segmentation.dcm", uids)
    assert np.array_equal(in_image, local)
    assert (in_image == 1).sum() > 0
    tool = shutil.which("dciodvfy")
    if tool:
        check = subprocess.run([tool, str(tmp_path / "map" / "segmentation.dcm")], capture_output=True, text=True)
        assert not [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
    elif os.environ.get("CI"):
        pytest.fail("dciodvfy must be installed in CI")
    report = json.loads((tmp_path / "map" / "run_report.json").read_text())
    assert report["status"] == "succeeded" and report["device"] == "cpu"


def test_nifti_image_matches_segmap_run(images, study, tmp_path):
    from segmap.outputs.nifti import read_label_nifti

    proc = docker_run(images[1], study / "nifti", tmp_path / "map")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert segmap_run(study / "nifti", tmp_path / "cli").returncode == 0
    a, affine_a = read_label_nifti(tmp_path / "map" / "segmentation.nii.gz")
    b, affine_b = read_label_nifti(tmp_path / "cli" / "segmentation.nii.gz")
    assert np.array_equal(a, b) and np.allclose(affine_a, affine_b)


def test_show_prints_the_manifests(images):
    proc = subprocess.run(["docker", "run", "--rm", images[0], "show"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "/etc/holoscan/app.json" in proc.stdout and "/etc/holoscan/pkg.json" in proc.stdout
    assert '"HOLOSCAN_INPUT_PATH": "/var/holoscan/input"' in proc.stdout


def test_env_prints_the_settings_in_effect(images):
    """`docker run IMAGE env`: every setting of segmap.settings with its value, environment over app.yaml."""
    from segmap.settings import declared

    proc = subprocess.run(["docker", "run", "--rm", "-e", "SEGMAP_MIRRORING=true", images[1], "env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert {d.env for d in declared()} <= {line.split("=", 1)[0] for line in lines}
    for expected in ("SEGMAP_MIRRORING=true", "SEGMAP_INPUT_KIND=nifti", "SEGMAP_OUTPUT_FORMAT=nifti",
                     "SEGMAP_MODEL=spleen", "HOLOSCAN_INPUT_PATH=/var/holoscan/input", "HOLOSCAN_TIMEOUT=0"):
        assert expected in lines, proc.stdout
    bad = subprocess.run(["docker", "run", "--rm", "-e", "SEGMAP_DEVICE=", "-e", "SEGMAP_OUTPUT_FORMAT=png", images[0],
                          "env"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("segmap: error: SEGMAP_OUTPUT_FORMAT: output_format must")


def test_empty_input_fails_like_segmap_run(images, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty").chmod(0o755)
    proc = docker_run(images[0], tmp_path / "empty", tmp_path / "map")
    local = segmap_run(tmp_path / "empty", tmp_path / "cli")
    assert proc.returncode != 0 and local.returncode != 0
    expected = error_line(local.stderr).replace(str(tmp_path / "empty"), "/var/holoscan/input")
    assert error_line(proc.stderr) == expected
    assert not any((tmp_path / "map").iterdir())


def test_no_matching_series_fails_like_segmap_run(images, tmp_path):
    mr = make_phantom((8, 48, 48), (3.0, 3.0, 3.0), seed=5)
    write_dicom_series(mr, tmp_path / "mr", modality="MR", series_description="T1 axial")
    for path in [tmp_path / "mr", *(tmp_path / "mr").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    proc = docker_run(images[0], tmp_path / "mr", tmp_path / "map")
    local = segmap_run(tmp_path / "mr", tmp_path / "cli")
    assert proc.returncode != 0 and local.returncode != 0
    assert error_line(proc.stderr) == error_line(local.stderr).replace(str(tmp_path / "mr"), "/var/holoscan/input")
    assert not any((tmp_path / "map").iterdir())
