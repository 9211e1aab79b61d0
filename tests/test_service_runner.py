"""The job service's Docker runner on the real engine, and the seeded SEG UIDs a job's MAP run writes.

Two images run: the demo model's MAP (the session fixture ``images``: a real segmentation whose SEG must carry the
UIDs derived from the job key) and a small probe image built here from segmap's CPU base, which sleeps, exits with a
chosen code, allocates memory, and writes down what it saw from inside (its uid, its network interfaces, whether it
could write into its input) so the isolation is checked from the container's side, not only from its configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pydicom
import pytest

from conftest import record_figure
from segmap.errors import RunnerError
from segmap.service.keys import job_key, seg_uids
from segmap.service.runners.base import RunSpec

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-spleen" / "model.ts"
TASK = ROOT / "tasks" / "spleen.yaml"
PROBE_TAG = "segmap-test/runner-probe:ci"

#: What the probe does: record what it sees, optionally allocate memory, sleep, exit with the chosen code.
PROBE_SCRIPT = (
    "out=/var/holoscan/output; id -u > $out/uid; ls /sys/class/net > $out/net; "
    "ls /var/holoscan/input | wc -l > $out/inputs; cat /var/holoscan/input/* > /dev/null 2>&1 && echo yes > $out/readable; "
    "if touch /var/holoscan/input/x 2>$out/input-write; then echo writable >> $out/input-write; fi; "
    "if [ -n \"$ALLOC_MB\" ]; then python3 -c \"b = bytearray($ALLOC_MB * 2**20); import time; time.sleep(5)\"; fi; "
    "touch /probe-root 2>$out/root-write; echo x > /tmp/probe && echo ok > $out/tmp-write; "
    "if [ -n \"$WRITE_MB\" ]; then head -c $(($WRITE_MB * 1048576)) /dev/zero > $out/big; fi; "
    "echo probe says hello; sleep ${SLEEP_S:-0}; exit ${EXIT_CODE:-0}")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def probe(engine):
    """The probe image, built from the CPU base image (no network needed)."""
    import io
    import json
    import tarfile

    from segmap.packager.baseimage import CPU_BASE_IMAGE
    from segmap.packager.docker_engine import follow

    dockerfile = (f"FROM {CPU_BASE_IMAGE}\nUSER 65532:65532\n"
                  f"ENTRYPOINT {json.dumps(['/usr/bin/tini', '--', '/bin/sh', '-c', PROBE_SCRIPT])}\n").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    buf.seek(0)
    follow(engine.build(fileobj=buf, custom_context=True, tag=PROBE_TAG, rm=True, decode=True), "probe image build")
    return PROBE_TAG


@pytest.fixture(scope="module")
def map_image(images, engine):
    """The DICOM MAP by image id: other test sessions may re-tag ``segmap-test/spleen:ci`` meanwhile."""
    return engine.inspect_image(images[0])["Id"]


@pytest.fixture
def runner(engine):
    from segmap.service.runners.docker import DockerRunner

    made = []
    r = DockerRunner()
    r.made = made
    yield r
    for name in made:  # leave no container behind, whatever the test did
        r.cancel(name)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from segmap.demo.phantom import write_phantom_study

    root = tmp_path_factory.mktemp("phantom")
    return write_phantom_study(root, shape_zyx=(24, 96, 96), seed=11, patient_name="DOE^JANE")


def job_folder(tmp_path: Path, files=()) -> tuple[Path, Path]:
    """``jobs/<run>/input`` as the service makes it: root-owned, private (0700 / 0600) hard links of the files."""
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    for f in files:
        os.link(f, inp / Path(f).name)
        (inp / Path(f).name).chmod(0o600)
    inp.chmod(0o700)
    return inp, out


def spec_for(runner, image: str, inp: Path, out: Path, **kw) -> RunSpec:
    name = kw.pop("name", None) or f"segmap-test-{uuid.uuid4().hex[:12]}"
    runner.made.append(name)
    return RunSpec(name=name, image=image, input_dir=inp, output_dir=out, **{"cpus": 1, "memory": "1g", **kw})


def wait_finished(runner, name: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        status = runner.status(name)
        if status.finished:
            return status
        assert time.monotonic() < deadline, f"run {name} still {status.state} after {timeout} s"
        time.sleep(0.2)


def containers_named(name: str) -> list:
    import docker

    return docker.from_env().containers.list(all=True, filters={"name": f"^/{name}$"})


# ------------------------------------------------------------------------------------------------ real MAP runs


def test_map_run_writes_the_seg_with_the_job_key_uids(runner, map_image, phantom, tmp_path):
    files = phantom["dicom_files"]
    inp, out = job_folder(tmp_path, files)
    key = job_key(phantom["series_uid"], [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files],
                  runner.image_digest(map_image), map_name="spleen", destinations=())
    spec = spec_for(runner, map_image, inp, out, env={"SEGMAP_UID_SEED": key}, cpus=2, memory="2g")
    t = time.perf_counter()
    first = runner.start(spec)
    assert first.state in ("running", "succeeded")
    status = wait_finished(runner, spec.name)
    record_figure(f"Docker runner: demo MAP on a 24x96x96 phantom, start to exit {time.perf_counter() - t:.1f} s")
    assert status.state == "succeeded" and status.exit_code == 0, runner.logs(spec.name)
    assert status.started_at and status.finished_at and status.finished_at >= status.started_at and status.node
    seg = pydicom.dcmread(out / "segmentation.dcm")
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == seg_uids(key)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom["series_uid"]
    assert "done in" in runner.logs(spec.name)
    assert "DOE" not in runner.logs(spec.name, tail=10000)  # the MAP's log holds no patient name
    runner.remove(spec.name)
    assert runner.status(spec.name).state == "missing" and runner.logs(spec.name) == ""


def test_failing_map_run_reports_exit_code_and_its_error_line(runner, map_image, tmp_path):
    inp, out = job_folder(tmp_path)  # an empty series folder
    spec = spec_for(runner, map_image, inp, out)
    runner.start(spec)
    status = wait_finished(runner, spec.name)
    assert status.state == "failed" and status.exit_code == 2
    assert status.error.startswith("exited with code 2: segmap: error: ") and "\n" not in status.error
    assert not (out / "segmentation.dcm").exists()


# ------------------------------------------------------------------------------------------------ restarts


def test_restarted_service_adopts_the_running_container(runner, probe, tmp_path):
    from segmap.service.runners.docker import DockerRunner

    inp, out = job_folder(tmp_path)
    spec = spec_for(runner, probe, inp, out, env={"SLEEP_S": "120"})
    assert runner.start(spec).state == "running"
    original = containers_named(spec.name)[0].id
    restarted = DockerRunner()  # the service after a restart: a new process knows nothing but the name
    assert restarted.start(spec).state == "running"
    assert [c.id for c in containers_named(spec.name)] == [original]
    assert spec.name in restarted.runs()
    restarted.cancel(spec.name)
    assert runner.status(spec.name).state == "missing" and containers_named(spec.name) == []
    restarted.cancel(spec.name)  # cancelling what is gone is no error


def test_a_finished_run_is_collected_not_run_again(runner, probe, tmp_path):
    from segmap.service.runners.docker import DockerRunner

    inp, out = job_folder(tmp_path)
    spec = spec_for(runner, probe, inp, out, env={"EXIT_CODE": "0"})
    runner.start(spec)
    first = wait_finished(runner, spec.name)
    again = DockerRunner().start(spec)  # the service restarted after the container exited, before it collected
    assert again.state == "succeeded" and again.started_at == first.started_at
    assert again.finished_at == first.finished_at


def test_a_container_created_but_never_started_is_started_on_adoption(runner, probe, tmp_path):
    """The service died between the engine's create and start: the next start must not leave it pending forever."""
    import docker

    inp, out = job_folder(tmp_path)
    spec = spec_for(runner, probe, inp, out, env={"SLEEP_S": "60"})
    docker.from_env().containers.create(probe, name=spec.name, labels={"segmap.run": spec.name})
    assert runner.status(spec.name).state == "pending"
    assert runner.start(spec).state in ("running", "succeeded")
    assert len(containers_named(spec.name)) == 1


def test_two_starters_racing_make_one_container(runner, probe, tmp_path):
    """Two service processes that both believe they hold the job: the engine's 409 makes the loser adopt."""
    from segmap.service.runners.docker import DockerRunner

    inp, out = job_folder(tmp_path)
    spec = spec_for(runner, probe, inp, out, env={"SLEEP_S": "60"})
    runners = [DockerRunner() for _ in range(4)]
    results, errors = [], []
    barrier = threading.Barrier(len(runners))

    def go(r):
        barrier.wait()
        try:
            results.append(r.start(spec).state)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == ["running"] * len(runners)
    assert len(containers_named(spec.name)) == 1


def test_timeout_is_enforced_after_a_restart(runner, probe, tmp_path):
    from segmap.service.runners.docker import DockerRunner

    inp, out = job_folder(tmp_path)
    spec = spec_for(runner, probe, inp, out, env={"SLEEP_S": "300"}, timeout_s=3)
    runner.start(spec)
    restarted = DockerRunner()  # the deadline travels on the container's label, not in the first runner's memory
    assert restarted.status(spec.name).state == "running"
    t = time.monotonic()
    status = wait_finished(restarted, spec.name, timeout=60)
    assert time.monotonic() - t < 30
    assert status.state == "failed" and status.error == "timed out after 3 s" and status.exit_code == 137
    assert runner.status(spec.name).error == "timed out after 3 s"  # and it stays reported so


def test_cancel_kills_and_removes(runner, probe, tmp_path):
    inp, out = job_folder(tmp_path)
    spec = spec_for(runner, probe, inp, out, env={"SLEEP_S": "300"})
    runner.start(spec)
    t = time.monotonic()
    runner.cancel(spec.name)
    assert time.monotonic() - t < 20
    assert runner.status(spec.name).state == "missing" and containers_named(spec.name) == []


# ------------------------------------------------------------------------------------------------ isolation


def test_container_is_isolated_and_not_root(runner, probe, phantom, tmp_path):
    inp, out = job_folder(tmp_path, phantom["dicom_files"][:3])
    spec = spec_for(runner, probe, inp, out, cpus=0.5, memory="256m", labels={"segmap.job": "42"})
    runner.start(spec)
    attrs = containers_named(spec.name)[0].attrs
    assert wait_finished(runner, spec.name).state == "succeeded", runner.logs(spec.name)
    # from inside: a non-root uid, only the loopback interface, the input readable but not writable
    assert (out / "uid").read_text().strip() == "65532"
    assert (out / "net").read_text().split() == ["lo"]
    assert (out / "inputs").read_text().strip() == "3" and (out / "readable").read_text().strip() == "yes"
    assert "Read-only file system" in (out / "input-write").read_text()
    # and how the engine was asked
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and attrs["Config"]["User"] == "65532:65532"
    assert host["NanoCpus"] == 500_000_000 and host["Memory"] == host["MemorySwap"] == 256 * 2**20
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert mounts["/var/holoscan/input"]["RW"] is False and mounts["/var/holoscan/output"]["RW"] is True
    labels = attrs["Config"]["Labels"]
    assert labels["segmap.job"] == "42" and labels["segmap.run"] == spec.name
    assert float(labels["segmap.deadline"]) > time.time() + 1700
    assert "probe says hello" in runner.logs(spec.name)
    # the private input files were not opened to everyone, only to the container's group
    assert all(p.stat().st_mode & 0o007 == 0 for p in inp.iterdir())


def test_a_map_container_is_bounded_pids_read_only_root_small_tmpfs_and_an_output_cap(probe, tmp_path):
    from segmap.service.runners.docker import DockerOptions, DockerRunner

    r = DockerRunner(options=DockerOptions(pids_limit=64, tmpfs_size="16m", max_output_bytes=8 << 20))
    r.made = []
    inp, out = job_folder(tmp_path)
    spec = spec_for(r, probe, inp, out, env={"WRITE_MB": "32", "SLEEP_S": "120"})
    try:
        r.start(spec)
        host = containers_named(spec.name)[0].attrs["HostConfig"]
        assert host["PidsLimit"] == 64 and host["ReadonlyRoot" + "fs"] is True
        assert "size=16m" in host["Tmpfs"]["/tmp"]
        start = time.monotonic()
        status = wait_finished(r, spec.name, timeout=60)
        assert time.monotonic() - start < 30, "a run over its output cap was left running"
        assert status.state == "failed" and "max_output_bytes (8m)" in status.error, status
        assert "Read-only file system" in (out / "root-write").read_text()
        assert (out / "tmp-write").read_text().strip() == "ok"
    finally:
        r.cancel(spec.name)


@pytest.mark.unit
def test_docker_bounds_are_settings_with_defaults(tmp_path):
    from segmap.service.runners.docker import DockerOptions
    from segmap.service.schema import read_section

    defaults = read_section(DockerOptions, {}, "runner.docker", None)
    assert defaults == DockerOptions() and defaults.read_only_root and defaults.pids_limit == 1024
    with pytest.raises(Exception, match=r"runner\.docker\.tmpfs_size"):
        read_section(DockerOptions, {"tmpfs_size": "lots"}, "runner.docker", None)


def test_explicit_user_owns_the_outputs(runner, probe, tmp_path):
    from segmap.service.runners.docker import DockerRunner

    r = DockerRunner(user="1234:1234")
    r.made = []
    inp, out = job_folder(tmp_path)
    spec = spec_for(r, probe, inp, out)
    try:
        r.start(spec)
        assert wait_finished(r, spec.name).state == "succeeded", r.logs(spec.name)
        assert (out / "uid").read_text().strip() == "1234" and (out / "uid").stat().st_uid == 1234
    finally:
        r.cancel(spec.name)


def test_nonzero_exit_and_out_of_memory_are_one_line_each(runner, probe, tmp_path):
    (tmp_path / "a").mkdir()
    inp, out = job_folder(tmp_path / "a")
    spec = spec_for(runner, probe, inp, out, env={"EXIT_CODE": "3"})
    runner.start(spec)
    status = wait_finished(runner, spec.name)
    assert (status.state, status.exit_code, status.error) == ("failed", 3, "exited with code 3: probe says hello")

    (tmp_path / "b").mkdir()
    inp, out = job_folder(tmp_path / "b")
    spec = spec_for(runner, probe, inp, out, env={"ALLOC_MB": "400"}, memory="64m")
    runner.start(spec)
    status = wait_finished(runner, spec.name)
    assert status.state == "failed" and status.error == "killed: out of memory (limit 64m)"


# ------------------------------------------------------------------------------------------------ engine errors


def test_gpu_request_reaches_the_engine(runner, probe, tmp_path):
    """No GPU here: the engine refuses the device request, which shows it was made; nothing is left behind."""
    import docker

    try:
        has_gpu_runtime = "nvidia" in (docker.from_env().info().get("Runtimes") or {})
    except Exception:
        has_gpu_runtime = False
    inp, out = job_folder(tmp_path)
    spec = spec_for(runner, probe, inp, out, gpus=["0"])
    if has_gpu_runtime:
        runner.start(spec)
        assert containers_named(spec.name)[0].attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["0"]
        return
    with pytest.raises(RunnerError, match=rf"run {spec.name}: the Docker engine could not start it: .*device"):
        runner.start(spec)
    assert containers_named(spec.name) == []


def test_missing_image_and_unreachable_engine_are_one_line(runner, tmp_path, monkeypatch):
    from segmap.service.runners.docker import DockerRunner

    inp, out = job_folder(tmp_path)
    with pytest.raises(RunnerError, match="image segmap-test/no-such-image:0 is not in the Docker engine"):
        runner.image_digest("segmap-test/no-such-image:0")
    with pytest.raises(RunnerError, match="image segmap-test/no-such-image:0 is not in the Docker engine"):
        runner.start(spec_for(runner, "segmap-test/no-such-image:0", inp, out))
    with pytest.raises(RunnerError, match="input folder .*nowhere does not exist"):
        runner.start(spec_for(runner, "segmap-test/no-such-image:0", tmp_path / "nowhere", out))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(RunnerError, match=r"cannot reach the Docker engine at unix://.*no-engine.sock"):
        DockerRunner()


# ------------------------------------------------------------------------------------------------ seeded UIDs


def segmap_run(inp: Path, out: Path, *extra: str) -> pydicom.Dataset:
    proc = subprocess.run([sys.executable, "-m", "segmap.cli", "run", "-m", str(MODEL), "-t", str(TASK), "-i",
                           str(inp), "-o", str(out), "--device", "cpu", "--no-overlay", *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pydicom.dcmread(out / "segmentation.dcm", stop_before_pixels=True) if (out / "segmentation.dcm").exists() \
        else None


@pytest.mark.e2e
def test_uid_seed_gives_the_same_seg_uids_every_run(phantom, tmp_path):
    seed = "7f" * 32
    a = segmap_run(phantom["dicom_dir"], tmp_path / "a", "--uid-seed", seed)
    b = segmap_run(phantom["dicom_dir"], tmp_path / "b", "--uid-seed", seed)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID) == seg_uids(seed)
    c = segmap_run(phantom["dicom_dir"], tmp_path / "c")
    d = segmap_run(phantom["dicom_dir"], tmp_path / "d")
    fresh = {(x.SeriesInstanceUID, x.SOPInstanceUID) for x in (a, c, d)}
    assert len(fresh) == 3 and c.SeriesInstanceUID != d.SeriesInstanceUID


@pytest.mark.e2e
def test_uid_seed_gives_each_study_of_a_multi_study_input_its_own_uids(phantom, tmp_path):
    """One seed, two studies: each SEG gets UIDs of its own, or a receiver would keep only one of them."""
    import shutil

    from segmap.demo.phantom import write_phantom_study

    inp = tmp_path / "in"
    shutil.copytree(phantom["dicom_dir"], inp / "one")
    write_phantom_study(tmp_path / "other", shape_zyx=(24, 96, 96), seed=12)
    shutil.copytree(tmp_path / "other" / "dicom", inp / "two")
    segmap_run(inp, tmp_path / "out", "--uid-seed", "7f" * 32)
    segs = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "out").glob("study-*/*.dcm"))]
    assert len(segs) == 2
    assert len({s.SOPInstanceUID for s in segs}) == 2 and len({s.SeriesInstanceUID for s in segs}) == 2
    # the MONAI Deploy application (what a MAP runs) gives each study the same UIDs as `segmap run`
    pytest.importorskip("holoscan")
    app = tmp_path / "app"
    proc = subprocess.run([sys.executable, str(ROOT / "app"), "-i", str(inp), "-o", str(app), "-m", str(MODEL)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SEGMAP_TASK_FILE": str(TASK), "SEGMAP_DEVICE": "cpu",
                               "SEGMAP_OVERLAY": "false", "SEGMAP_UID_SEED": "7f" * 32})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.parent.name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for p in app.glob("study-*/*.dcm")} == {
        p.parent.name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in (tmp_path / "out").glob("study-*/*.dcm")}
