"""What an installation holds: the wheel carries the demo (so `segmap demo` works without a checkout), and the
segmap a MAP image installs holds only what runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT



@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("segmap-*.whl"))


def test_wheel_ships_the_demo_and_not_the_tooling(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "segmap/demo/model/model.ts" in names and "segmap/demo/model/spleen.yaml" in names
    assert not [n for n in names if n.startswith("segmap_tools/") or "/train.py" in n or "/plans.py" in n]
    with zipfile.ZipFile(wheel) as zf:  # the task file travels as a file, not as a link into the checkout
        assert zf.read("segmap/demo/model/spleen.yaml") == (ROOT / "tasks" / "spleen.yaml").read_bytes()


def test_demo_runs_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    demo = subprocess.run([sys.executable, "-m", "segmap.cli", "demo", "--out", str(tmp_path / "demo"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=900, env=env,
                          cwd=tmp_path)  # far from the checkout
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "DICOM SEG and NIfTI label map identical: yes" in demo.stdout
    assert str(target) in subprocess.run([sys.executable, "-c", "import segmap; print(segmap.__file__)"],
                                         capture_output=True, text=True, env=env, cwd=tmp_path).stdout


def test_image_wheel_holds_only_what_runs(tmp_path):
    from segmap.packager.wheelhouse import NOT_IN_IMAGE, build_segmap_wheel

    names = zipfile.ZipFile(build_segmap_wheel(ROOT, tmp_path)).namelist()
    for sub in NOT_IN_IMAGE:
        assert not [n for n in names if n.startswith(sub + "/")], sub
    for runtime in ("segmap/run/orchestration.py", "segmap/settings.py", "segmap/engine/predictor.py",
                    "segmap/outputs/seg.py", "segmap/dicom/loading.py", "segmap/cli.py"):
        assert runtime in names


def test_image_installation_refuses_the_tools_it_lacks(tmp_path):
    from segmap.packager.wheelhouse import build_segmap_wheel

    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                           str(target), str(build_segmap_wheel(ROOT, tmp_path / "w"))], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    for argv in (["package", "-m", "m.ts"], ["demo"]):
        done = subprocess.run([sys.executable, "-m", "segmap.cli", *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().startswith("segmap: error: segmap ") and "Traceback" not in done.stderr
