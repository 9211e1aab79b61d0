"""MAIA's own command on the demo MAP image: `docker run --shm-size 2g --rm -v IN:/var/holoscan/input -v
OUT:/var/holoscan/output IMAGE`, no `--user` (MONet-Bundle's MONet_inference_dicom runs exactly this), with OUT made by
`mkdir` on the host. The entry point starts as root only to read OUT's owner and runs the application as that owner
(never as root); a root-owned OUT that the image's non-root default user cannot write gets the outputs from a root
supervisor after the run, owned by root (the entry point's root step, templates/run_as.py). Hardened runs (`--user`,
`--read-only`, `--cap-drop ALL`, no-new-privileges) keep working.

The root step itself is also run here on the host, with a stand-in for the entry point script, for what a real
application never does (links, special files, a failure, a signal). The image tests use the demo model's image built
once per session (tests/conftest.py `images`) and a Docker engine; all need root (to make folders owned by other uids
and to switch users).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, record_figure

from segmap.demo.phantom import make_phantom, write_dicom_series

MAIA = ["--shm-size", "2g", "--rm"]
RUN_AS_PY = ROOT / "src" / "segmap" / "packager" / "templates" / "run_as.py"
DEFAULT = (65532, 65532)


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


def test_a_folder_made_by_root_gets_a_seg_owned_by_root(images, study, tmp_path):
    out = made_by(tmp_path / "out", 0, 0)
    done = maia_run(images[0], study, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "segmentation.dcm").is_file() and (out / "run_report.json").is_file()
    assert owners(out) == {(0, 0)}  # the application ran as 65532 in a private folder; root moved the outputs
    assert not [p for p in out.iterdir() if p.name.startswith(".segmap-")]  # no handoff or staging folder left
    assert not any(p.stat().st_mode & 0o7000 for p in out.rglob("*"))
    # Writable for everybody (mode 1777, as /tmp): the default user writes there itself, not root.
    out = made_by(tmp_path / "sticky", 0, 0)
    out.chmod(0o1777)
    done = maia_run(images[0], study, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert owners(out) == {DEFAULT}


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


def test_docker_stop_ends_a_run_into_a_root_folder_at_once_and_leaves_nothing(images, study, tmp_path):
    out = made_by(tmp_path / "out", 0, 0)
    cmd = ["docker", "run", "-d", "--shm-size", "2g", "-v", f"{study}:/var/holoscan/input", "-v",
           f"{out}:/var/holoscan/output", images[0]]
    cid = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".segmap-handoff-*")):
            assert time.monotonic() < deadline, "the run never made its handoff folder"
            time.sleep(0.01)
        time.sleep(0.5)  # the application has started (its signal handling is the first thing it sets up)
        t = time.monotonic()
        subprocess.run(["docker", "stop", "-t", "10", cid], capture_output=True, check=True)
        took = time.monotonic() - t
        code = int(subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", cid], capture_output=True,
                                  text=True, check=True).stdout)
        logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True).stderr
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    record_figure(f"\ndocker stop of MAIA's run into a root-owned folder: exit {code} after {took:.2f} s")
    assert code == 143, logs[-3000:]
    assert took < 2.0
    assert logs.splitlines().count("segmap: terminated (SIGTERM)") == 1 and "Traceback" not in logs
    assert list(out.iterdir()) == []  # no handoff or staging folder, no partial output


def test_without_the_capability_to_switch_the_run_is_refused_not_run_as_root(images, study, tmp_path):
    for uid in (1000, 0):
        out = made_by(tmp_path / f"out{uid}", uid, uid)
        done = maia_run(images[0], study, out, "--cap-drop", "ALL")
        assert done.returncode == 2
        assert error_lines(done.stderr) == [
            f"segmap: error: the container starts as root but cannot switch to uid {uid or 65532} (no CAP_SETUID or "
            "CAP_SETGID, e.g. --cap-drop ALL): pass --user UID:GID with a uid that may write the output folder"]
        assert not any(out.iterdir())
    # Allowed to switch but not to give a folder away: refused as well, and nothing is left in the root-owned folder.
    done = maia_run(images[0], study, out, "--cap-drop", "ALL", "--cap-add", "SETUID", "--cap-add", "SETGID")
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "segmap: error: /var/holoscan/output: cannot give uid 65532 a folder to write in (Operation not permitted; "
        "CAP_CHOWN is needed, e.g. not --cap-drop ALL): pass --user UID:GID with a uid that may write the output "
        "folder"]
    assert not any(out.iterdir())


# ------------------------------------------------------------------------------ the root step on the host


@pytest.fixture
def shared(tmp_path_factory) -> Path:
    """A folder every uid may enter (pytest's own are root's only, mode 700), as a volume's mount point is."""
    path = Path(tempfile.mkdtemp(prefix="segmap-run-as-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def entry_point(folder: Path, body: str) -> Path:
    """A stand-in for /var/holoscan/tools as the application part runs it: ``body`` in bash, $OUT its output."""
    script = folder / "tools"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      'out="${HOLOSCAN_OUTPUT_PATH}"\n'
                      'for a in "$@"; do case "$a" in --output=*) out="${a#*=}";; esac; done\n'
                      'id -u > "${out}/uid"\n' + body + "\n")
    script.chmod(0o755)
    return script


def root_step(shared: Path, out: Path, body: str, *args: str, wait: bool = True):
    run_as = shared / "run-as"
    run_as.write_text("%d:%d\n" % DEFAULT)
    cmd = [sys.executable, "-I", "-S", str(RUN_AS_PY), str(run_as), str(out), str(entry_point(shared, body)), *args]
    env = dict(os.environ, HOLOSCAN_OUTPUT_PATH=str(out))
    if not wait:
        return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below ``folder`` -> (uid, gid, mode), links not followed."""
    return {str(p.relative_to(folder)): (p.lstat().st_uid, p.lstat().st_gid, stat.S_IMODE(p.lstat().st_mode))
            for p in folder.rglob("*")}


def test_root_step_hands_the_outputs_over_after_the_run(shared):
    out = made_by(shared / "out", 0, 0)
    (out / "old.txt").write_text("an earlier run's file stays")
    done = root_step(shared, out, 'mkdir "$out/study"; echo seg > "$out/study/seg.dcm"; echo "{}" > '
                                  '"$out/run_report.json"; chmod 4755 "$out/study/seg.dcm"; touch "$out/.segmap-lock"')
    assert done.returncode == 0, done.stderr
    assert (out / "uid").read_text().strip() == "65532"  # the application part ran as the default user
    assert tree(out) == {"old.txt": (0, 0, 0o644), "uid": (0, 0, 0o644), "study": (0, 0, 0o755),
                         "study/seg.dcm": (0, 0, 0o755), "run_report.json": (0, 0, 0o644)}  # no setuid bit, no lock


def test_root_step_takes_a_writable_folder_as_it_is(shared):
    owned = made_by(shared / "owned", 1000, 1000)
    done = root_step(shared, owned, 'echo seg > "$out/seg.dcm"')
    assert done.returncode == 0, done.stderr
    assert (owned / "uid").read_text().strip() == "1000" and set(tree(owned).values()) == {(1000, 1000, 0o644)}
    everybody = made_by(shared / "everybody", 0, 0)
    everybody.chmod(0o1777)
    done = root_step(shared, everybody, 'echo seg > "$out/seg.dcm"')
    assert done.returncode == 0, done.stderr
    assert {v[:2] for v in tree(everybody).values()} == {DEFAULT}


@pytest.mark.parametrize("made, what", [
    ('ln -s /etc/shadow "$out/seg.dcm"', "seg.dcm: not a regular file or folder"),
    ('echo seg > "$out/seg.dcm"; ln "$out/seg.dcm" "$out/again.dcm"', "again.dcm: not a regular file or folder"),
    ('mkfifo "$out/seg.dcm"', "seg.dcm: not a regular file or folder"),
    ('mkdir "$out/study"; ln -s / "$out/study/up"', "study/up: not a regular file or folder"),
])
def test_root_step_refuses_links_and_special_files_and_moves_nothing(shared, made, what):
    out = made_by(shared / "out", 0, 0)
    done = root_step(shared, out, made + '; echo "{}" > "$out/run_report.json"')
    assert done.returncode == 2
    assert error_lines(done.stderr) == [f"segmap: error: {what} (a link or a special file); nothing was moved"]
    assert list(out.iterdir()) == []  # the handoff folder is gone too


def test_root_step_moves_nothing_when_the_run_fails_and_refuses_what_is_in_the_way(shared):
    out = made_by(shared / "out", 0, 0)
    done = root_step(shared, out, 'echo seg > "$out/seg.dcm"; echo "segmap: error: bad input" >&2; exit 2')
    assert (done.returncode, error_lines(done.stderr)) == (2, ["segmap: error: bad input"])
    assert list(out.iterdir()) == []
    (out / "seg.dcm").mkdir()
    done = root_step(shared, out, 'echo seg > "$out/seg.dcm"')
    assert done.returncode == 2
    assert error_lines(done.stderr) == [f"segmap: error: {out}/seg.dcm: in the way of an output of the same name (a "
                                        "folder); nothing was moved"]
    assert sorted(p.name for p in out.iterdir()) == ["seg.dcm"]


def test_root_step_forwards_sigterm_and_cleans_up(shared):
    out = made_by(shared / "out", 0, 0)
    (out / ".segmap-handoff-stale").mkdir()  # left by a container killed outright
    proc = root_step(shared, out, 'echo seg > "$out/seg.dcm"; trap "echo segmap: terminated \\(SIGTERM\\) >&2; '
                                  'exit 143" TERM; touch "$out/started"; while :; do sleep 0.05 & wait $!; done',
                     wait=False)
    deadline = time.monotonic() + 30
    while not list(out.glob(".segmap-handoff-*/started")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr and proc.stderr.read()
        time.sleep(0.02)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    assert time.monotonic() - t < 1.0
    assert proc.stderr.read().splitlines() == ["segmap: terminated (SIGTERM)"]  # the child's line, once
    assert list(out.iterdir()) == []


def test_root_step_points_an_output_argument_at_the_handoff(shared):
    spec = importlib.util.spec_from_file_location("run_as", RUN_AS_PY)
    run_as = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_as)
    assert run_as.with_output(["-i", "/in", "-o", "/out"], "/h") == (["-i", "/in", "-o", "/h"], True)
    assert run_as.with_output(["--output=/out", "-v"], "/h") == (["--output=/h", "-v"], True)
    assert run_as.with_output(["-o/out"], "/h") == (["-o/h"], True)
    assert run_as.with_output(["-i", "/in"], "/h") == (["-i", "/in"], False)
    out = made_by(shared / "out", 0, 0)
    done = root_step(shared, out, 'echo seg > "$out/seg.dcm"', f"--output={out}")
    assert done.returncode == 0, done.stderr
    assert sorted(tree(out)) == ["seg.dcm", "uid"]
