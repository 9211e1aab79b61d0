"""What a hospital's IT checks before running MAP images unattended, on the real CPU image of the demo model:
docker stop at any moment, fair CPU use under --cpus, refusal below the memory estimate, a full output disk,
provenance in the report, the SEG and the labels, and a slim image. Needs a Docker engine (the `engine` fixture);
the image size and layer sizes are printed into the test log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import DEMO_MODEL, ROOT, SAMPLE_CT, SPLEEN_TASK, record_figure

from segmap.demo.phantom import make_phantom, write_dicom_series, write_nifti

HARDENED = ["--user", "4242:4242", "--read-only", "--network", "none", "--cap-drop", "ALL", "--security-opt",
            "no-new-privileges", "--pids-limit", "256"]
STOP_LINE = "segmap: terminated (SIGTERM)"
SAMPLE_DICOM = SAMPLE_CT / "ct_dicom"



def _readable(root: Path) -> Path:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops-study")
    p = make_phantom((40, 112, 112), (3.0, 1.6, 1.6), seed=314)
    write_dicom_series(p, root / "dicom" / "series")
    write_nifti(p, root / "nifti" / "image.nii.gz")
    # Larger, so that inference lasts long enough to be interrupted in the middle of it.
    big = make_phantom((96, 192, 192), (1.5, 1.0, 1.0), seed=5)
    write_nifti(big, root / "long" / "image.nii.gz")
    return _readable(root)


def out_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)  # writable by whichever uid the container runs as
    return path


def run_args(image: str, inp: Path, out: Path | None, *extra: str, hardened: bool = True) -> list[str]:
    cmd = ["docker", "run", "--rm", *(HARDENED if hardened else ["--network", "none"]), *extra,
           "-v", f"{inp}:/var/holoscan/input:ro"]
    if out is not None:
        cmd += ["-v", f"{out}:/var/holoscan/output"]
    return cmd + [image]


def only_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("segmap: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ image contents


def test_image_is_slim_and_labelled(images):
    info = json.loads(subprocess.run(["docker", "image", "inspect", images[0]], capture_output=True, text=True,
                                     check=True).stdout)[0]
    size = int(info["Size"])
    history = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", images[0]],
                             capture_output=True, text=True, check=True).stdout
    record_figure(f"\nimage {images[0]}: {size / 1e9:.3f} GB ({size / 2**20:.0f} MiB)")
    for line in history.splitlines():
        if not line.startswith("0B"):
            record_figure(f"  layer {line[:110]}")
    assert size < 1.0e9, f"{size / 1e9:.2f} GB"

    labels = info["Config"]["Labels"]
    assert labels["io.segmap.model.sha256"] == hashlib.sha256(DEMO_MODEL.read_bytes()).hexdigest()
    assert labels["io.segmap.task"] == "Spleen" and labels["io.segmap.variant"] == "dicom"
    assert labels["org.opencontainers.image.version"] == images[0].rsplit(":", 1)[1]
    for key in ("created", "revision", "source"):
        assert labels[f"org.opencontainers.image.{key}"], key
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert info["Config"]["StopSignal"] == "SIGTERM"
    assert info["Config"]["Entrypoint"][0] == "/usr/bin/tini"
    # Root only until the entry point takes the output folder's owner (tests/test_plain_run.py); the default user
    # for a root-owned folder is recorded in the image.
    assert info["Config"]["User"] == "0:0"
    run_as = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "/usr/bin/cat", images[0],
                             "/etc/holoscan/run-as"], capture_output=True, text=True, timeout=120)
    assert run_as.stdout.strip() == "65532:65532", run_as.stderr
    assert "Healthcheck" not in info["Config"] or not info["Config"]["Healthcheck"]

    # Nothing in the file system that a batch container does not run: package managers, pip, compilers' headers,
    # test suites, setuid programs, wheels.
    probe = r"""
import os, shutil, sys
found = []
for root, dirs, files in os.walk('/'):
    if root in ('/proc', '/sys', '/dev'):
        dirs[:] = []
        continue
    for d in dirs:
        if d in ('tests', 'include') or (d == 'test' and 'torch' in root):
            found.append(os.path.join(root, d))
    for f in files:
        p = os.path.join(root, f)
        if f.endswith('.whl') or (not os.path.islink(p) and os.lstat(p).st_mode & 0o6000):
            found.append(p)
tools = ('pip', 'pip3', 'apt', 'apt-get', 'dpkg', 'perl', 'su', 'mount', 'strip', 'gcc')
found += [t for t in tools if shutil.which(t)]
print('\n'.join(found))
"""
    proc = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint",
                           "/opt/holoscan/venv/bin/python", images[0], "-c", probe],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


# ------------------------------------------------------------------------------------------------ provenance


def test_report_and_seg_carry_provenance(images, study, tmp_path):
    import pydicom

    out = out_dir(tmp_path / "out")
    proc = subprocess.run(run_args(images[0], study / "dicom", out, "--memory", "4g"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda" not in proc.stderr.lower()  # no CUDA warnings on a CPU-only run
    report = json.loads((out / "run_report.json").read_text())
    labels = json.loads(subprocess.run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", images[0]],
                                       capture_output=True, text=True, check=True).stdout)
    digest = hashlib.sha256(DEMO_MODEL.read_bytes()).hexdigest()
    assert report["model"]["sha256"] == digest == labels["io.segmap.model.sha256"]
    assert report["image"]["ref"] == images[0]
    assert report["image"]["revision"] == labels["org.opencontainers.image.revision"]
    assert report["image"]["created"] == labels["org.opencontainers.image.created"]
    assert report["segmap_version"] == labels["io.segmap.version"]
    seg_path = out / "segmentation.dcm"
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    entry, overlay = report["outputs"]
    assert overlay["kind"] == "overlay-png" and overlay["bytes"] == (out / "overlay.png").stat().st_size
    assert entry["bytes"] == seg_path.stat().st_size
    assert entry["series_instance_uid"] == seg.SeriesInstanceUID and entry["sop_instance_uid"] == seg.SOPInstanceUID
    assert list(seg.SoftwareVersions) == [report["segmap_version"], f"model sha256:{digest[:16]}"]
    for f in (seg_path, out / "run_report.json", out / "overlay.png"):
        assert f.stat().st_mode & 0o777 == 0o640 and f.stat().st_uid == 4242
    tool = shutil.which("dciodvfy")
    if tool:
        check = subprocess.run([tool, str(seg_path)], capture_output=True, text=True)
        assert not [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]


# ------------------------------------------------------------------------------------------------ docker stop


def _stop_when(image: str, inp: Path, out: Path, ready) -> tuple[int, str, float]:
    """Start a detached run, wait until ``ready(log_text, out)`` holds, ``docker stop`` it; (exit code, log, seconds
    docker stop took)."""
    cmd = run_args(image, inp, out)
    cmd.remove("--rm")
    cid = subprocess.run(cmd[:2] + ["-d"] + cmd[2:], capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True).stderr
            if ready(logs, out):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the run never reached the point to stop it at")
        t = time.monotonic()
        subprocess.run(["docker", "stop", "-t", "10", cid], capture_output=True, check=True)
        took = time.monotonic() - t
        code = int(subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", cid], capture_output=True,
                                  text=True, check=True).stdout)
        logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True).stderr
        return code, logs, took
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def _started(delay: float):
    """``delay`` seconds after the container started (the first check comes right after ``docker run -d``
    returns, which can itself take longer than ``delay`` on a busy machine)."""
    t0: list[float] = []

    def ready(logs, out) -> bool:
        if not t0:
            t0.append(time.monotonic())
        return time.monotonic() - t0[0] >= delay
    return ready


@pytest.mark.parametrize("moment", ["at 0.5 s", "mid-inference", "mid-write"])
def test_docker_stop_at_any_moment_exits_143_at_once(images, study, tmp_path, moment):
    out = out_dir(tmp_path / "out")
    if moment == "at 0.5 s":
        image, inp, ready = images[0], study / "dicom", _started(0.5)
    elif moment == "mid-inference":
        image, inp = images[1], study / "long"
        ready = lambda logs, out: "sliding window: 1/" in logs  # noqa: E731
    else:
        image, inp = images[0], study / "dicom"
        ready = lambda logs, out: any(out.glob(".segmap-staging-*"))  # noqa: E731
    code, logs, took = _stop_when(image, inp, out, ready)
    record_figure(f"\ndocker stop {moment}: exit {code} after {took:.2f} s")
    assert code == 143, logs[-3000:]
    assert took < 2.0
    assert logs.splitlines().count(STOP_LINE) == 1 and "Traceback" not in logs
    assert list(out.iterdir()) == []  # no staging folder, no partial output


# ------------------------------------------------------------------------------------------------ CPU and memory


def test_four_containers_with_one_cpu_each_are_no_slower_than_serial(images, study, tmp_path):
    runs = [run_args(images[0], study / "dicom", out_dir(tmp_path / f"out{i}"), "--cpus", "1") for i in range(4)]

    def one(cmd) -> float:
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "using 1 CPU thread(s)" in proc.stderr
        return time.perf_counter() - t

    def clear():
        for i in range(4):
            for f in (tmp_path / f"out{i}").iterdir():
                f.unlink()

    # The machine may be shared (CI runners, other jobs): a burst of outside load during one of the two
    # measurements decides nothing, so the pair is measured up to three times and the best pair counts.
    pairs = []
    for _ in range(3):
        t = time.perf_counter()
        each = [one(cmd) for cmd in runs]
        serial = time.perf_counter() - t
        clear()
        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, runs))
        parallel = time.perf_counter() - t
        clear()
        pairs.append((parallel / serial, serial, parallel))
        record_figure(f"\nfour runs with --cpus 1: one after another {serial:.1f} s ({', '.join(f'{s:.1f}' for s in each)}), "
              f"at once {parallel:.1f} s on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f})")
        if parallel <= serial:
            break
    ratio, serial, parallel = min(pairs)
    assert parallel <= serial * 1.05, pairs


def test_memory_below_the_estimate_is_refused_before_inference(images, study, tmp_path):
    big = tmp_path / "big"
    write_nifti(make_phantom((300, 512, 512), (1.0, 0.8, 0.8), seed=3), big / "image.nii.gz")
    _readable(big)
    out = out_dir(tmp_path / "out")
    proc = subprocess.run(run_args(images[1], big, out, "--memory", "1536m"), capture_output=True, text=True,
                          timeout=600)
    line = only_error_line(proc.stderr)
    assert proc.returncode == 2
    assert line.startswith("segmap: error: segmenting a 300 x 512 x 512 volume needs an estimated ")
    assert "GiB of memory but the container's memory limit is 1.50 GiB" in line
    assert "sliding window" not in proc.stderr and "preprocessed" not in proc.stderr  # before inference
    assert list(out.iterdir()) == []


def test_full_output_disk_is_one_line_and_leaves_nothing(images, study):
    # A 64 KiB tmpfs owned by the container user: the SEG of the phantom (about 90 kB) does not fit. (tmpfs-mode
    # is not applied over a folder the image has, at least by Docker 20.10: uid/gid make it the user's.)
    cmd = run_args(images[0], study / "dicom", None, "--tmpfs", "/var/holoscan/output:size=64k,uid=4242,gid=4242",
                   "--entrypoint", "/bin/bash")
    proc = subprocess.run(cmd + ["-c", "/var/holoscan/tools; rc=$?; ls -A /var/holoscan/output; exit $rc"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = only_error_line(proc.stderr)
    assert line == "segmap: error: /var/holoscan/output: cannot write the outputs (No space left on device)"
    assert proc.stdout.strip() == ""  # nothing left in the output folder


# ------------------------------------------------------------------------------------------------ small points


def test_extract_refuses_an_unmounted_target_and_env_validates(images, tmp_path):
    proc = subprocess.run(["docker", "run", "--rm", "--network", "none", images[0], "extract"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("segmap: error: /var/holoscan/output is not on a mounted volume, so nothing would "
                                   "reach the host: run with -v HOST_DIR:/var/holoscan/output")
    out = out_dir(tmp_path / "x")
    for _ in range(2):
        done = subprocess.run(["docker", "run", "--rm", "--network", "none", "-v", f"{out}:/var/holoscan/output",
                               images[0], "extract"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert (out / "app" / "__main__.py").is_file() and not (out / "app" / "app").exists()
    bad = subprocess.run(["docker", "run", "--rm", "--network", "none", "-e", "SEGMAP_THREADS=lots", images[0], "env"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("segmap: error: SEGMAP_THREADS: threads must be auto, 0 or a positive whole number, "
                                  "got 'lots'")
    ok = subprocess.run(["docker", "run", "--rm", "--network", "none", images[0], "env"], capture_output=True,
                        text=True, timeout=120)
    assert "SEGMAP_THREADS=auto" in ok.stdout.splitlines() and "SEGMAP_UMASK=027" in ok.stdout.splitlines()


def test_hardened_runs_cold_and_warm(images, study, tmp_path):
    """The hospital's hardened settings on the phantom and, where present, the sample CT; timings in the log."""
    inputs = [("phantom", study / "dicom")] + ([("sample CT", SAMPLE_DICOM)] if SAMPLE_DICOM.is_dir() else [])
    for name, inp in inputs:
        times = []
        for attempt in ("cold", "warm"):
            out = out_dir(tmp_path / f"{name}-{attempt}".replace(" ", "-"))
            t = time.perf_counter()
            proc = subprocess.run(run_args(images[0], inp, out, "--memory", "4g"), capture_output=True, text=True,
                                  timeout=900)
            times.append(time.perf_counter() - t)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert (out / "segmentation.dcm").is_file()
        record_figure(f"\nhardened run on the {name}: first {times[0]:.1f} s, again {times[1]:.1f} s")
