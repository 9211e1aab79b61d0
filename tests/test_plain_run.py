"""MAIA's own command on the demo MAP image: `docker run --shm-size 2g --rm -v IN:/var/holoscan/input -v
OUT:/var/holoscan/output IMAGE`, no `--user` (MONet-Bundle's MONet_inference_dicom runs exactly this), with OUT made by
`mkdir` on the host. The entry point starts as root only to read OUT's owner and runs the application as that owner
(never as root); a root-owned OUT gets the image's non-root default and the one-line error when it cannot write there.
Hardened runs (`--user`, `--read-only`, `--cap-drop ALL`, no-new-privileges) keep working.

Uses the demo model's image built once per session (tests/conftest.py `images`); needs a Docker engine and root (to
make folders owned by other uids).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from segmap.demo.phantom import make_phantom, write_dicom_series

MAIA = ["--shm-size", "2g", "--rm"]


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("needs root to make output folders owned by root and by uid 1000")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain") / "in"
    write_dicom_series(make_phantom((24, 96, 96), (3.0, 1.6, 1.6), seed=271), root / "series")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def maia_run(image: str, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["docker", "run", *MAIA, *extra, "-v", f"{inp}:/var/holoscan/input", "-v", f"{out}:/var/holoscan/output",
           image]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def made_by(path: Path, uid: int, gid: int) -> Path:
    """``mkdir OUT`` as the person with ``uid``: mode 755, theirs."""
    path.mkdir()
    path.chmod(0o755)
    os.chown(path, uid, gid)
    return path


def owners(folder: Path) -> set[tuple[int, int]]:
    return {(p.stat().st_uid, p.stat().st_gid) for p in folder.rglob("*")}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_a_folder_made_by_a_person_gets_their_seg(images, study, tmp_path):
    out = made_by(tmp_path / "out", 1000, 1000)
    done = maia_run(images[0], study, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "segmentation.dcm").is_file() and (out / "run_report.json").is_file()
    assert owners(out) == {(1000, 1000)}  # every output, and the application wrote them as uid 1000


def test_a_root_folder_gets_the_non_root_default_and_the_clear_error(images, study, tmp_path):
    out = made_by(tmp_path / "out", 0, 0)
    done = maia_run(images[0], study, out)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "segmap: error: output folder /var/holoscan/output is not writable by uid 65532: make the host folder "
        "writable for that uid (chown/chmod, or an ACL), or pass --user with a uid that may write there"]
    assert not any(out.iterdir())
    # Writable for everybody (mode 1777, as /tmp): the default user writes there, not root.
    out.chmod(0o1777)
    done = maia_run(images[0], study, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert owners(out) == {(65532, 65532)}


def test_hardened_runs_keep_working(images, study, tmp_path):
    out = made_by(tmp_path / "hardened", 4242, 4242)
    done = maia_run(images[0], study, out, "--user", "4242:4242", "--read-only", "--network", "none", "--cap-drop",
                    "ALL", "--security-opt", "no-new-privileges")
    assert done.returncode == 0, done.stderr[-3000:]
    assert owners(out) == {(4242, 4242)}
    # no-new-privileges alone does not stop the switch to the folder's owner (it only lowers privileges).
    out = made_by(tmp_path / "nnp", 1000, 1000)
    done = maia_run(images[0], study, out, "--read-only", "--security-opt", "no-new-privileges")
    assert done.returncode == 0, done.stderr[-3000:]
    assert owners(out) == {(1000, 1000)}


def test_without_the_capability_to_switch_the_run_is_refused_not_run_as_root(images, study, tmp_path):
    out = made_by(tmp_path / "out", 1000, 1000)
    done = maia_run(images[0], study, out, "--cap-drop", "ALL")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "segmap: error: the container starts as root but cannot switch to uid 1000 (no CAP_SETUID or CAP_SETGID, "
        "e.g. --cap-drop ALL): pass --user UID:GID with a uid that may write the output folder"]
    assert not any(out.iterdir())
