"""One machine, one command: deploy/compose/ brought up with Debian's docker-compose on this machine's engine
(Orthanc with DICOMweb, OHIF behind nginx, `segmap serve` with the demo MAP), a phantom study sent with DCMTK's
storescu to the stack's Orthanc, the SEG found in the same study, and headless Chromium showing it over the CT in
the task's colour (screenshot under out/test-artifacts/).

Orthanc and the viewer are built from Debian's packages and npm's @ohif/app on the local base image (no registry
image is pulled). Slow: service tier. Skips only when docker-compose or chromium is missing outside CI.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import record_figure
from deploy_images import service_image, socket_gid
from pacs import free_port, storescu, wait_for
from segmap.demo.phantom import write_phantom_study
from segmap.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose"
ARTIFACTS = ROOT / "out" / "test-artifacts"
ORTHANC_TAG = os.environ.get("SEGMAP_TEST_ORTHANC_TAG", "segmap-test/orthanc:ci")
VIEWER_TAG = os.environ.get("SEGMAP_TEST_VIEWER_TAG", "segmap-test/viewer:ci")

OHIF_VERSION_ARG = re.compile(r"^ARG OHIF_VERSION=(\S+)$", re.MULTILINE)

pytestmark = pytest.mark.service
#: The job page's bearer token in the test's stack.
TOKEN = "compose-test-token"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI needs {what}")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def stack(engine, images, tmp_path_factory):
    compose = shutil.which("docker-compose")
    if compose is None:
        _missing("docker-compose (Debian's docker-compose package)")
    service = service_image()
    folder = tmp_path_factory.mktemp("stack")
    work = folder / "work"
    work.mkdir()
    uid, gid = (int(x) for x in json.loads(subprocess.run(
        ["docker", "image", "inspect", service], capture_output=True, text=True, check=True).stdout)[0]["Config"][
        "User"].split(":"))
    os.chown(work, uid, gid)
    ports = {"ORTHANC_DICOM_PORT": free_port(), "VIEWER_PORT": free_port(), "SEGMAP_HTTP_PORT": free_port()}
    # The shipped configuration with the test's MAP image, work folder and ports, and short waits.
    config = yaml.safe_load((COMPOSE / "segmap.yaml").read_text())
    config["service"].update(workdir=str(work), quiet_period_s=1, poll_s=0.2)
    config["maps"][0]["image"] = images[0]
    config["orthanc"]["poll_interval_s"] = 0.5
    config["service"]["http"]["viewer_url"] = config["service"]["http"]["viewer_url"].replace(
        "127.0.0.1:3000", f"127.0.0.1:{ports['VIEWER_PORT']}")
    (folder / "segmap.yaml").write_text(yaml.safe_dump(config))
    (folder / "segmap.yaml").chmod(0o644)
    viewer_context = folder / "viewer"  # the viewer's context with OHIF's npm tarball, as `make stack-images` makes it
    shutil.copytree(COMPOSE / "viewer", viewer_context)
    version = OHIF_VERSION_ARG.search((COMPOSE / "viewer" / "Dockerfile").read_text()).group(1)
    npm = shutil.which("npm")
    if npm is None:
        _missing("npm (it fetches OHIF's prebuilt viewer)")
    packed = subprocess.run([npm, "pack", f"@ohif/app@{version}"], cwd=viewer_context, capture_output=True,
                            text=True, timeout=900)
    assert packed.returncode == 0, packed.stderr[-2000:]
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "SEGMAP_CONFIG": str(folder / "segmap.yaml"),
           "SEGMAP_TASKS": str(ROOT / "tasks"), "SEGMAP_WORKDIR": str(work), "SEGMAP_SERVICE_IMAGE": service,
           "ORTHANC_IMAGE": ORTHANC_TAG, "VIEWER_IMAGE": VIEWER_TAG, "VIEWER_CONTEXT": str(viewer_context),
           "DOCKER_GID": str(socket_gid()), "SEGMAP_WEB_TOKEN": TOKEN}
    project = f"segmaptest{uuid.uuid4().hex[:8]}"
    base = [compose, "-p", project, "-f", str(COMPOSE / "docker-compose.yml")]
    t = time.perf_counter()
    built = subprocess.run(base + ["build", "orthanc", "viewer"], capture_output=True, text=True, env=env,
                           timeout=1800)
    assert built.returncode == 0, (built.stderr + built.stdout)[-4000:]
    record_figure(f"compose stack: orthanc and viewer images built in {time.perf_counter() - t:.0f} s")
    up = subprocess.run(base + ["up", "-d", "--no-build"], capture_output=True, text=True, env=env, timeout=600)
    info = {"env": env, "ports": ports, "base": base, "folder": folder}
    try:
        assert up.returncode == 0, (up.stderr + up.stdout)[-4000:]
        yield info
    finally:
        logs = subprocess.run(base + ["logs", "--no-color"], capture_output=True, text=True, env=env, timeout=120)
        (folder / "compose.log").write_text(logs.stdout + logs.stderr)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "compose-stack.log").write_text(logs.stdout[-200_000:])
        subprocess.run(base + ["down", "-v", "--remove-orphans"], capture_output=True, text=True, env=env,
                       timeout=300)


def get(url: str, **kw):
    import requests

    try:
        return requests.get(url, timeout=5, **kw)
    except requests.RequestException:
        return None


def test_stack_segments_a_study_and_the_viewer_shows_it(stack, tmp_path):
    ports = stack["ports"]
    viewer = f"http://127.0.0.1:{ports['VIEWER_PORT']}"
    jobs = f"http://127.0.0.1:{ports['SEGMAP_HTTP_PORT']}"
    wait_for(lambda: (r := get(viewer + "/dicom-web/studies")) is not None and r.status_code == 200, 120,
             "Orthanc's DICOMweb through the viewer's nginx", interval=1)
    wait_for(lambda: (r := get(jobs + "/readyz")) is not None and r.status_code == 200, 120,
             f"the job service's /healthz ({stack['folder'] / 'compose.log'} after the test)", interval=1)
    index = get(viewer + "/viewer?StudyInstanceUIDs=1.2.3")  # a deep link: the single-page-app fallback
    assert index is not None and index.status_code == 200 and "app-config.js" in index.text

    study = write_phantom_study(tmp_path / "study", seed=11, shape_zyx=(24, 96, 96))
    t0 = time.monotonic()
    storescu(study["dicom_files"], ports["ORTHANC_DICOM_PORT"], "ORTHANC")

    def seg_series():
        r = get(f"{viewer}/dicom-web/studies/{study['study_uid']}/series")
        if r is None or r.status_code != 200:
            return None
        return [s for s in r.json() if s.get("00080060", {}).get("Value") == ["SEG"]]

    segs = wait_for(seg_series, 180, f"a SEG in study {study['study_uid']} (the same study)", interval=1)
    to_seg = time.monotonic() - t0
    record_figure(f"compose stack: storescu to SEG in the same study in {to_seg:.0f} s")
    print(f"time to SEG: {to_seg:.1f} s")
    assert len(segs) == 1

    # The job page links the done job to the viewer on its study: open that link.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert get(jobs + "/api/jobs").status_code == 401, "the job page answers only with the token"
    def done_job():
        r = get(jobs + "/api/jobs?state=done", headers=auth)
        return r is not None and r.status_code == 200 and [
            j for j in r.json()["jobs"] if j["study_uid"] == study["study_uid"]]

    done = wait_for(done_job, 60, "the job done", interval=1)
    job = get(f"{jobs}/api/jobs/{done[0]['key']}", headers=auth).json()
    url = job["viewer_url"]
    assert url == f"{viewer}/viewer?StudyInstanceUIDs={study['study_uid']}&hangingProtocolId=@ohif/seg"
    assert job["segments"] and job["segments"][0]["volume_ml"] > 0
    page = get(f"{jobs}/jobs/{done[0]['key'][:12]}", headers=auth).text
    assert f'href="{html.escape(url)}"' in page and "overlay.png" in page
    rgb = tuple(load_task(ROOT / "tasks" / "spleen.yaml").segments[0].color_rgb)
    # The viewer draws the SEG once it has fetched and decoded it, in software WebGL: on a busy 2-core machine that
    # can outlast Chromium's virtual-time budget, so a screenshot without the segment is taken again with a longer
    # budget (a wrong colour never reaches the threshold, however long the viewer is given).
    for attempt, budget_s in enumerate((30, 60, 120), start=1):
        shot = screenshot(url, tmp_path / f"attempt-{attempt}", budget_s)
        found, closest = colour_pixels(shot, rgb)
        if found >= 200:
            break
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "compose-viewer-seg.png")
    record_figure(f"compose stack: viewer screenshot (attempt {attempt}, {budget_s} s budget), {found} coloured "
                  f"pixels within 20 of the segment's colour {rgb} (closest pixel {closest})")
    print(f"segment colour {rgb}: {found} pixels near it, closest {closest}")
    assert found >= 200, f"the segment's colour {rgb} is not in the viewport (closest pixel {closest}); see {shot}"


def screenshot(url: str, tmp_path: Path, budget_s: int = 30) -> Path:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        _missing("chromium")
    tmp_path.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "viewer.png"
    done = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
                           "--enable-unsafe-swiftshader", "--no-first-run", "--disable-background-networking",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
                           f"--virtual-time-budget={budget_s * 1000}", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=240 + 2 * budget_s)
    assert shot.is_file(), done.stderr[-2000:]
    return shot


def colour_pixels(png: Path, rgb: tuple[int, int, int], tolerance: int = 20) -> tuple[int, tuple[int, ...]]:
    """How many coloured pixels lie within ``tolerance`` (per channel) of ``rgb``, and the closest one's colour.

    Grey pixels never count (channels at most 30 apart): the CT's own greys would otherwise match a dull colour.
    """
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h, w, _ = image.shape
    # The viewport: right of the study panel, below the toolbar, above the notice banner (1400x900 window).
    pixels = image[int(h * 0.07):int(h * 0.87), int(w * 0.21):int(w * 0.97)].reshape(-1, 3)
    coloured = pixels[(pixels.max(axis=1) - pixels.min(axis=1)) > 30]
    if not len(coloured):
        return 0, ()
    distance = np.abs(coloured - np.array(rgb)).max(axis=1)
    return int((distance <= tolerance).sum()), tuple(int(v) for v in coloured[distance.argmin()])
