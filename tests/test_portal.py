"""The segmentation portal end to end: a real `segmap portal` process, real Orthanc with its DICOMweb plugin, and
clients nobody here wrote (MONAI Label's ``MONAILabelClient``, MONet-Bundle's ``MONet_remote_inference``).

Each answer is compared with ``segmap run`` on the same input, voxel for voxel. Inputs are small phantoms (one
sliding-window tile each) so that the module runs in a few minutes on two CPU cores.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from pacs import Orthanc, free_port, wait_for
from test_app import dciodvfy_errors  # noqa: E402
from segmap.demo.phantom import make_phantom, write_dicom_series, write_nifti

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "demo-spleen" / "model.ts"
SPLEEN_TASK = ROOT / "tasks" / "spleen.yaml"
TOKEN = "portal-test-token-0123456789abcdef"
QUEUE = 4
MAX_UPLOAD_MB = 1
#: One sliding-window tile of the demo model (patch 32 x 48 x 48 at 3 mm).
SHAPE, SPACING = (24, 48, 48), (3.0, 3.0, 3.0)



def need_module(name: str, install: str):
    """Import a client or server package; skip without it outside CI, fail in CI (the Makefile installs them)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: {install}")
        pytest.skip(f"{name} is not installed: {install}", allow_module_level=True)


monailabel_client = need_module("monailabel.client", "pip install --no-deps monailabel==0.8.5")
need_module("fastapi", "pip install 'segmap[portal]'")


# ------------------------------------------------------------------------------------------------ fixtures


class PortalProcess:
    """``segmap portal -c portal.yaml`` as a child process on a free loopback port; its log in ``folder``."""

    def __init__(self, folder: Path, config: dict) -> None:
        self.folder, self.port = folder, free_port()
        config["portal"]["port"] = self.port
        self.config_path = folder / "portal.yaml"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = folder / "portal.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PortalProcess":
        env = {**os.environ, "SEGMAP_PORTAL_TOKEN": TOKEN}
        self.proc = subprocess.Popen([sys.executable, "-m", "segmap.cli", "portal", "-c", str(self.config_path)],
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env)
        wait_for(self._up, 300, f"the portal on port {self.port} (log: {self.log_path})", interval=0.5)
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the portal exited with {self.proc.returncode}: {self.log()[-3000:]}")
        try:
            return requests.get(self.url + "/auth/", timeout=2).ok
        except requests.RequestException:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.url + "/metrics", headers=AUTH, timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A phantom as NIfTI and as a DICOM study holding the CT and an MR series (which the task's rules refuse)."""
    root = tmp_path_factory.mktemp("portal-data")
    phantom = make_phantom(SHAPE, SPACING, seed=23)
    write_nifti(phantom, root / "image.nii.gz")
    ct = write_dicom_series(phantom, root / "study" / "ct", study_uid="1.2.826.0.1.3680043.10.543.1",
                            series_uid="1.2.826.0.1.3680043.10.543.1.1")
    mr = write_dicom_series(make_phantom((6, 48, 48), SPACING, seed=2), root / "study" / "mr", modality="MR",
                            study_uid="1.2.826.0.1.3680043.10.543.1", series_uid="1.2.826.0.1.3680043.10.543.1.2",
                            series_number=2, series_description="MR localizer")
    return {"root": root, "nifti": root / "image.nii.gz", "ct": ct, "mr": mr,
            "study_uid": "1.2.826.0.1.3680043.10.543.1", "ct_uid": "1.2.826.0.1.3680043.10.543.1.1",
            "mr_uid": "1.2.826.0.1.3680043.10.543.1.2"}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, data):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port(), dicomweb=True).start()
    for path in data["ct"] + data["mr"]:
        server.upload(path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def portal(tmp_path_factory, orthanc):
    folder = tmp_path_factory.mktemp("portal")
    model = {"model": str(DEMO_MODEL), "task": str(SPLEEN_TASK), "settings": {"device": "cpu", "overlay": False}}
    config = {"portal": {"host": "127.0.0.1", "queue_length": QUEUE, "max_upload_mb": MAX_UPLOAD_MB,
                         "auth": {"required": True},
                         "datastore": {"kind": "dicomweb", "dicomweb_url": orthanc.dicomweb_url, "store_seg": True,
                                       "cache_dir": str(folder / "cache"), "cache_max_images": 30}},
              # MONet's client asks for the model by the name MAIA's portal gives every model: MONetBundle.
              "models": {"spleen": {**model, "description": "demo spleen"}, "MONetBundle": model}}
    server = PortalProcess(folder, config).start()
    yield server
    server.stop()
    assert "PHANTOM^DEMO" not in server.log() and "PHANTOM-0001" not in server.log()  # no patient data logged


@pytest.fixture(scope="module")
def run_nifti(tmp_path_factory):
    """``segmap run`` on a NIfTI file (in this process, as the command line does) -> (labels zyx, affine)."""
    from segmap.cli import main

    def run(path: Path) -> tuple[np.ndarray, np.ndarray]:
        out = tmp_path_factory.mktemp("run")
        assert main(["run", "--model", str(DEMO_MODEL), "--task", str(SPLEEN_TASK), "-i", str(path), "-o",
                     str(out), "--device", "cpu", "--no-overlay"]) == 0
        return read_nifti(out / "segmentation.nii.gz")

    return run


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def client(portal):
    """MONAI Label's client, logged in as 3D Slicer does: auth enabled? then a token for a user name and password."""
    c = monailabel_client.MONAILabelClient(portal.url, tmpdir=str(portal.folder))
    assert c.auth_enabled()
    c.update_auth(c.auth_token("anyone", TOKEN))
    assert c.auth_valid_token()
    return c


def seg_labels(seg_path: Path, series_folder: Path) -> np.ndarray:
    from segmap.dicom.loading import scan_dicom_folder
    from segmap.dicom.series_volume import series_to_volume
    from segmap.outputs.seg import read_seg_labels

    [series] = scan_dicom_folder(series_folder).series
    return read_seg_labels(seg_path, series_to_volume(series).meta["sop_instance_uids"])


@pytest.fixture(scope="module")
def segmap_run_seg(tmp_path_factory, data):
    """``segmap run`` on the DICOM study folder (the task's rules pick the CT) -> the SEG's label map."""
    from segmap.cli import main

    out = tmp_path_factory.mktemp("run-dicom")
    assert main(["run", "--model", str(DEMO_MODEL), "--task", str(SPLEEN_TASK), "-i", str(data["root"] / "study"),
                 "-o", str(out), "--device", "cpu", "--no-overlay"]) == 0
    [seg] = out.glob("*.dcm")
    return seg_labels(seg, data["root"] / "study" / "ct")


# ------------------------------------------------------------------------------------------------ MONAI Label's client


def test_monai_label_client_lists_the_models(portal):
    info = client(portal).info()
    assert set(info["models"]) == {"spleen", "MONetBundle"}
    spleen = info["models"]["spleen"]
    assert spleen["labels"] == {"Spleen": 1} and spleen["dimension"] == 3
    assert spleen["label_colors"] == {"Spleen": [157, 108, 162]} and spleen["description"] == "demo spleen"
    metadata = spleen["metadata"]
    assert metadata["inputs"]["image"]["modality"] == "CT"
    assert metadata["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "spleen"}


def test_monai_label_client_nifti_upload_equals_segmap_run(portal, data, run_nifti, tmp_path):
    expected, affine = run_nifti(data["nifti"])
    assert (expected == 1).sum() > 100  # the phantom's spleen is found: a non-trivial comparison
    c = client(portal)
    label_path, params = c.infer("spleen", "ignored", {}, file=str(data["nifti"]))
    got, got_affine = read_nifti(Path(label_path))
    assert np.array_equal(got, expected)
    assert np.array_equal(got_affine, affine)
    assert params["segments"][0]["name"] == "Spleen" and params["latencies"]["inference"] > 0

    # The same image put into the datastore first, then inferred by its ID (3D Slicer's upload path).
    image_id = c.upload_image(str(data["nifti"]), image_id="phantom-23")["image"]
    assert image_id == "phantom-23"
    label_path, _ = c.infer("spleen", image_id, {})
    assert np.array_equal(read_nifti(Path(label_path))[0], expected)
    # A session (3D Slicer's upload of a local image) works the same way.
    r = requests.put(portal.url + "/session/", headers=AUTH, files={"files": ("x.nii.gz", data["nifti"].read_bytes())},
                     timeout=60)
    assert r.ok, r.text
    label_path, _ = c.infer("spleen", "", {}, session_id=r.json()["session_id"])
    assert np.array_equal(read_nifti(Path(label_path))[0], expected)


def test_monai_label_client_dicom_series_by_uid_gives_a_seg_stored_in_orthanc(portal, orthanc, data, segmap_run_seg,
                                                                                tmp_path):
    datastore = requests.get(portal.url + "/datastore/?output=all", headers=AUTH, timeout=10).json()
    assert data["ct_uid"] in datastore["objects"]

    c = client(portal)
    label_path, params = c.infer("spleen", data["ct_uid"], {})
    assert params["series"] == {"image": data["ct_uid"]}
    labels_xyz, _ = read_nifti(Path(label_path))
    assert np.array_equal(labels_xyz.transpose(2, 1, 0), segmap_run_seg)  # the label map on the CT's grid

    # The SEG the portal stored back with STOW-RS: valid, referencing the CT, equal to segmap run's.
    seg_uid = params["stored_seg_series"]
    [stored] = [s for s in orthanc.series_of_modality("SEG") if s["MainDicomTags"]["SeriesInstanceUID"] == seg_uid]
    instance = orthanc.get(f"/series/{stored['ID']}")["Instances"][0]
    seg_path = tmp_path / "stored-seg.dcm"
    seg_path.write_bytes(requests.get(f"{orthanc.url}/instances/{instance}/file", timeout=30).content)
    assert dciodvfy_errors(seg_path) == []
    seg = pydicom.dcmread(seg_path)
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {data["ct_uid"]}
    assert str(seg.StudyInstanceUID) == data["study_uid"]
    assert np.array_equal(seg_labels(seg_path, data["root"] / "study" / "ct"), segmap_run_seg)

    # output=dicom_seg answers with the SEG itself.
    r = requests.post(f"{portal.url}/infer/spleen", params={"image": data["ct_uid"], "output": "dicom_seg"},
                      data={"params": "{}"}, headers=AUTH, timeout=300)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    (tmp_path / "answer.dcm").write_bytes(r.content)
    assert dciodvfy_errors(tmp_path / "answer.dcm") == []


# ------------------------------------------------------------------------------------------------ MONet-Bundle's client


def monet_remote_inference(portal, home: Path, *args: str) -> subprocess.CompletedProcess:
    """MONet-Bundle's ``MONet_remote_inference`` as shipped, with only its lookup of the portal's URL in MAIA's
    central registry replaced by this portal's URL; its confirmation prompt answered ``y`` on stdin."""
    (home / ".monet").mkdir(parents=True, exist_ok=True)
    (home / ".monet" / "tester_auth.json").write_text(json.dumps({"access_token": TOKEN}))
    script = ("import sys; import MONet_scripts.MONet_remote_inference as m; "
              f"m.get_available_models = lambda token, username: {{'spleen': {portal.url + '/'!r}}}; "
              "sys.argv = ['MONet_remote_inference'] + sys.argv[1:]; m.main()")
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-c", script, *args, "--username", "tester", "--model", "spleen"],
                          input="y\n", capture_output=True, text=True, env=env, timeout=600)


def test_monet_remote_inference_nifti(portal, data, run_nifti, tmp_path):
    need_module("MONet_scripts.MONet_remote_inference", "pip install --no-deps monet-bundle==1.3")
    out = tmp_path / "monet-label.nii.gz"
    done = monet_remote_inference(portal, tmp_path / "home", "-i", str(data["nifti"]), "-o", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Segmentation saved to" in done.stdout, done.stdout[-2000:]
    expected, affine = run_nifti(data["nifti"])
    got, got_affine = read_nifti(out)
    assert np.array_equal(got, expected) and np.array_equal(got_affine, affine)


def test_monet_remote_inference_dicom_by_study_uid(portal, orthanc, data, segmap_run_seg, tmp_path):
    """The DICOM flow: the study is in the PACS, the client asks for ``image=<StudyInstanceUID>``,
    ``output=dicom_seg``; the task's rules pick the CT among the study's series. The client then C-STOREs the SEG
    with pynetdicom's storescu app, which fails as shipped under pynetdicom 3 (it passes "storescu" as the peer's
    address): the portal's own STOW-RS has stored the SEG already."""
    need_module("MONet_scripts.MONet_remote_inference", "pip install --no-deps monet-bundle==1.3")
    out = tmp_path / "monet-seg.dcm"
    segs_before = len(orthanc.series_of_modality("SEG"))
    done = monet_remote_inference(portal, tmp_path / "home", "-i", data["study_uid"], "-o", str(out))
    assert "Segmentation saved to" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {data["ct_uid"]}
    assert np.array_equal(seg_labels(out, data["root"] / "study" / "ct"), segmap_run_seg)
    assert len(orthanc.series_of_modality("SEG")) == segs_before + 1


# ------------------------------------------------------------------------------------------------ bad requests


def test_bad_requests_get_one_clear_4xx_and_the_portal_keeps_serving(portal, data, tmp_path):
    def post(model="spleen", files=None, timeout=120, **params):
        return requests.post(f"{portal.url}/infer/{model}", params=params, files=files or {"params": (None, "{}")},
                             headers=AUTH, timeout=timeout)

    cases = {
        "unknown model": (post(model="liver", image="x"), 404, "unknown model 'liver'"),
        "missing image": (post(), 400, "no image"),
        "image not anywhere": (post(image="1.2.3.4.5"), 404, "neither a SeriesInstanceUID nor a StudyInstanceUID"),
        "corrupt upload": (post(files={"file": ("ct.nii.gz", os.urandom(5000))}), 422, "not a readable NIfTI"),
        "not a NIfTI name": (post(files={"file": ("ct.dcm", b"DICM")}), 415, "not a NIfTI image"),
        "series the rules refuse": (post(image=data["mr_uid"]), 422, "MR"),
        "over the size limit": (post(files={"file": ("big.nii.gz", os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 10))}),
                                413, "over the portal's limit of 1 MB"),
        "params not JSON": (post(files={"params": (None, "{nope"), "file": ("ct.nii.gz", b"x")}), 400,
                            "params is not valid JSON"),
        "SEG of a NIfTI": (post(output="dicom_seg", files={"file": ("ct.nii.gz", data["nifti"].read_bytes())}), 400,
                           "output=dicom_seg needs a DICOM image"),
        "no token": (requests.get(portal.url + "/info/", timeout=10), 401, "bearer token is required"),
        "wrong token": (requests.get(portal.url + "/info/", headers={"Authorization": "Bearer nope"}, timeout=10),
                        401, "bearer token is required"),
    }
    for what, (r, status, fragment) in cases.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        detail = r.json()["detail"]
        assert fragment in detail and "\n" not in detail and "Traceback" not in detail, (what, detail)
    assert "Traceback" not in portal.log()
    assert requests.get(portal.url + "/info/", headers=AUTH, timeout=10).ok
    # MONAI Label's login: the token as the password gives it back as the access token.
    r = requests.post(portal.url + "/auth/token", data={"username": "anyone", "password": TOKEN}, timeout=10)
    assert r.json()["access_token"] == TOKEN
    assert requests.get(portal.url + "/auth/", timeout=10).json()["enabled"] is True


# ------------------------------------------------------------------------------------------------ queue


def test_twenty_concurrent_requests_with_a_queue_of_four(portal, tmp_path):
    from segmap.cli import main

    inputs = []
    for i in range(20):  # different sizes: an answer that belongs to another request cannot match
        path = tmp_path / f"in-{i}.nii.gz"
        write_nifti(make_phantom((12 + i, 48, 48), SPACING, seed=100 + i), path)
        inputs.append(path)
    answers: list = [None] * 20
    barrier = threading.Barrier(20)

    def send(i: int) -> None:
        barrier.wait()
        answers[i] = requests.post(f"{portal.url}/infer/spleen", params={"output": "image"}, headers=AUTH,
                                   files={"params": (None, "{}"), "file": (inputs[i].name, inputs[i].read_bytes())},
                                   timeout=600)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [i for i, r in enumerate(answers) if r.status_code == 200]
    busy = [i for i, r in enumerate(answers) if r.status_code == 503]
    assert len(ok) == QUEUE and len(busy) == 20 - QUEUE, [r.status_code for r in answers]
    for i in busy:
        assert int(answers[i].headers["Retry-After"]) >= 1 and "queue full" in answers[i].json()["detail"]
    for i in ok:
        got = tmp_path / f"got-{i}.nii.gz"
        got.write_bytes(answers[i].content)
        out = tmp_path / f"run-{i}"
        assert main(["run", "--model", str(DEMO_MODEL), "--task", str(SPLEEN_TASK), "-i", str(inputs[i]), "-o",
                     str(out), "--device", "cpu", "--no-overlay"]) == 0
        expected, affine = read_nifti(out / "segmentation.nii.gz")
        labels, got_affine = read_nifti(got)
        assert "inference;dur=" in answers[i].headers["Server-Timing"]
        assert labels.shape == expected.shape and np.array_equal(labels, expected), i
        assert np.array_equal(got_affine, affine)
    assert portal.metric("segmap_portal_slot_requests", slot="cpu") == 0
    assert portal.metric("segmap_portal_requests_total", model="spleen", status="503") >= 16


def test_a_client_that_disconnects_gives_up_its_queued_request(portal, data, tmp_path):
    """One request runs; a second waits behind it and its client hangs up: the second never runs."""
    body = data["nifti"].read_bytes()
    # The running request segments a larger volume, so that it still runs while the second one queues and hangs up
    # (the demo phantom alone takes about a second on an idle CPU).
    write_nifti(make_phantom(tuple(2 * n for n in SHAPE), SPACING, seed=5), tmp_path / "large.nii.gz")
    large = (tmp_path / "large.nii.gz").read_bytes()
    answers = []
    running = threading.Thread(target=lambda: answers.append(requests.post(
        f"{portal.url}/infer/spleen", params={"output": "image"}, headers=AUTH, timeout=600,
        files={"params": (None, "{}"), "file": ("a.nii.gz", large)}).status_code))
    # Earlier tests' requests (the 20 concurrent ones) may still be draining: start from an idle slot.
    wait_for(lambda: portal.metric("segmap_portal_slot_requests", slot="cpu") == 0, 300, "an idle slot first")
    dropped_before = portal.metric("segmap_portal_requests_total", model="spleen", status="499")
    running.start()
    wait_for(lambda: portal.metric("segmap_portal_slot_requests", slot="cpu") >= 1 or answers, 60,
             "the first request")
    assert not answers, f"the first request ended before the second could queue behind it ({answers})"
    # The second request, sent by hand so that the connection can be closed while it waits.
    boundary = "segmapportaltest"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.nii.gz\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=30)
    conn.request("POST", "/infer/spleen?output=image", body=form,
                 headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    wait_for(lambda: portal.metric("segmap_portal_slot_requests", slot="cpu") >= 2, 30, "the second request queued")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: portal.metric("segmap_portal_requests_total", model="spleen", status="499") > dropped_before,
             60, "the portal to drop the disconnected request")
    running.join(timeout=600)
    wait_for(lambda: portal.metric("segmap_portal_slot_requests", slot="cpu") == 0, 60, "an idle slot")
    assert "the client disconnected while queued" in portal.log()
    # Per-request timing reached the log and the metrics.
    assert "inference" in portal.log() and portal.metric("segmap_portal_request_seconds_count", model="spleen",
                                                         stage="total") > 0
