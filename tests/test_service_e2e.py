"""The PACS job service end to end, with real parts on loopback: Debian's Orthanc, DCMTK's storescu/storescp, the
Docker engine running the demo model's real MAP image, `segmap serve` as its own process (killed with SIGKILL in
every state), dciodvfy on the SEGs that arrive.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from conftest import record_figure
from pacs import Orthanc, StoreSCP, chromium, free_port, need, storescu, wait_for
from service_harness import ServiceProcess, elapsed
from segmap.demo.phantom import write_phantom_study
from segmap.service.keys import seg_uids

SECRETS = ("SECRET^PATIENT", "SECRET-ID-4711", "19010203")
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"


def phantom(folder: Path, seed: int = 0, slices: int = 16, **kw) -> dict:
    """A small CT phantom study whose patient has a name, an ID and a birth date that must never be logged."""
    study = write_phantom_study(folder, seed=seed, shape_zyx=(slices, 80, 80), patient_name=SECRETS[0],
                                patient_id=SECRETS[1], **kw)
    for p in study["dicom_files"]:
        ds = pydicom.dcmread(p)
        ds.PatientBirthDate = SECRETS[2]
        ds.save_as(p)
    return study


def dciodvfy_ok(path: Path) -> None:
    exe = need("dciodvfy", "dicom3tools")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors[:20])


def references(seg: pydicom.Dataset) -> set[str]:
    return {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}


def no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked"


def store_dump(path: Path) -> str:
    import sqlite3
    db = sqlite3.connect(path)
    return "\n".join(db.iterdump())


@pytest.fixture
def orthanc_server(tmp_path):
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port(), stable_age=2).start()
    yield server
    server.stop()


@pytest.fixture
def service_factory(tmp_path, images):
    started: list[ServiceProcess] = []

    def make(**kw) -> ServiceProcess:
        svc = ServiceProcess(tmp_path / f"service{len(started)}", images[0], **kw)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


def orthanc_segs(server: Orthanc) -> list[pydicom.Dataset]:
    import io

    import requests
    out = []
    for series in server.series_of_modality("SEG"):
        for inst in series["Instances"]:
            data = requests.get(f"{server.url}/instances/{inst}/file", timeout=10).content
            out.append(pydicom.dcmread(io.BytesIO(data)))
    return out


def test_orthanc_series_gives_exactly_one_seg_in_orthanc(orthanc_server, service_factory, tmp_path):
    """Orthanc (followed over /changes) -> MAP -> SEG stored back in Orthanc; our SEG and an unchanged re-send make
    no job; one more instance makes one new job."""
    svc = service_factory(listener=False, orthanc_url=orthanc_server.url,
                          destinations={"orthanc": {"kind": "orthanc", "url": orthanc_server.url}}).start()
    study = phantom(tmp_path / "study", slices=16)
    t0 = time.monotonic()
    storescu(study["dicom_files"][:-1], orthanc_server.dicom_port, orthanc_server.aet)
    (job,) = svc.wait_jobs("done", 1)
    record_figure(f"service, Orthanc intake: storescu -> SEG confirmed in Orthanc in {elapsed(t0):.1f} s "
                  f"(StableAge 2 s, quiet period 1 s; job timings {job.timings})")
    segs = orthanc_segs(orthanc_server)
    assert len(segs) == 1
    seg = segs[0]
    assert references(seg) == {study["series_uid"]}
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == seg_uids(job.key)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    dciodvfy_ok(path)

    # Our SEG came back through the changes feed: it was closed without a job, with the reason logged.
    wait_for(lambda: "modality SEG is not an image series" in svc.log(), 30, "the SEG's no-job line")
    # The same instances again: no new job.
    storescu(study["dicom_files"][:-1], orthanc_server.dicom_port, orthanc_server.aet)
    time.sleep(4)
    assert len(svc.jobs()) == 1
    # One more instance: a new version, one new job, a second SEG (for the longer series).
    storescu(study["dicom_files"][-1:], orthanc_server.dicom_port, orthanc_server.aet)
    jobs = svc.wait_jobs("done", 2)
    assert len(svc.jobs()) == 2 and jobs[0].instance_count == 16 and jobs[1].instance_count == 15
    assert len(orthanc_segs(orthanc_server)) == 2

    # The operator's job page, in a real browser: both jobs of this run, done; a screenshot for the artifacts.
    page = f"http://127.0.0.1:{svc.http_port}/"
    dom = chromium("--dump-dom", page, profile=tmp_path / "chromium").stdout
    assert all(f'data-key="{j.key}"' in dom for j in jobs) and dom.count(">done<") >= 2, dom[-2000:]
    shot = ARTIFACTS / "service-jobs-page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1280,800", page, profile=tmp_path / "chromium2")
    assert shot.stat().st_size > 10_000
    import requests
    metrics = requests.get(page + "metrics", timeout=10).text
    assert 'segmap_jobs{state="done"} 2.0' in metrics
    no_secrets(svc.log(), store_dump(svc.store_path), dom, metrics)


def test_listener_to_storescp_with_refusals_and_a_destination_down(service_factory, tmp_path):
    """DICOM listener intake -> MAP -> C-STORE to DCMTK storescp; unknown AE and garbage refused; destination down
    for a while -> retries, then delivery."""
    scp = StoreSCP(tmp_path / "storescp-in", free_port())  # not started yet: the destination is down
    svc = service_factory(allowed_calling_ae_titles=("MODALITY",),
                          destinations={"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": scp.port,
                                                 "ae_title": scp.aet}}).start()
    study = phantom(tmp_path / "study", seed=3)

    refused = storescu(study["dicom_files"], svc.port, "SEGMAP", calling_aet="STRANGER", check=False)
    assert refused.returncode != 0
    with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as s:
        s.sendall(b"\x01\x00garbage" * 100)
    storescu(study["dicom_files"], svc.port, "SEGMAP", calling_aet="MODALITY")
    # A series no task selects (MR for the CT task): no job, and the log says why.
    mr = phantom(tmp_path / "mr", seed=4, slices=6, modality="MR")
    storescu(mr["dicom_files"], svc.port, "SEGMAP", calling_aet="MODALITY")

    (job,) = svc.wait_jobs("exporting", 1)
    wait_for(lambda: f"series {mr['series_uid']} v1" in svc.log() and "task rules do not select it" in svc.log(), 60,
             "the MR series' no-job line")
    wait_for(lambda: (j := svc.store().get_job(job.key)).error and "pacs" in j.error, 60, "an export retry")
    time.sleep(3)
    scp.start()
    try:
        (job,) = svc.wait_jobs("done", 1, timeout=120)
        files = scp.files()
        assert len(files) == 1
        seg = pydicom.dcmread(files[0])
        assert seg.Modality == "SEG" and references(seg) == {study["series_uid"]}
        dciodvfy_ok(files[0])
    finally:
        scp.stop()
    assert len(svc.jobs()) == 1, "no job for the MR series"
    assert "STRANGER" in svc.log(), "the refusal is logged with the calling AE title"
    import requests
    metrics = requests.get(f"http://127.0.0.1:{svc.http_port}/metrics", timeout=10).text
    figures = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
               if line and not line.startswith("#")}
    sent = len(study["dicom_files"]) + len(mr["dicom_files"])
    assert figures["segmap_instances_received_total"] == sent, metrics
    assert figures["segmap_associations_refused_total"] >= 1  # STRANGER
    assert figures["segmap_export_retries_total"] >= 1  # the destination was down
    assert figures["segmap_series_unprocessed"] == 0 and figures["segmap_workdir_bytes"] > 0
    assert [v for k, v in figures.items() if k.startswith("segmap_build_info{")] == [1.0]
    no_secrets(svc.log(), store_dump(svc.store_path), *(Path(j.log_path).read_text() for j in svc.jobs()))


def test_five_studies_sent_concurrently_give_five_segs(service_factory, tmp_path):
    orthanc_dest = Orthanc(tmp_path / "dest", free_port(), free_port()).start()
    try:
        svc = service_factory(max_concurrent=2,
                              destinations={"orthanc": {"kind": "orthanc", "url": orthanc_dest.url}}).start()
        studies = [phantom(tmp_path / f"study{i}", seed=i, slices=12) for i in range(5)]
        t0 = time.monotonic()
        # Four modalities send with storescu; the fifth study goes with `segmap submit`, which waits for its SEG.
        threads = [threading.Thread(target=storescu, args=(s["dicom_files"], svc.port, "SEGMAP")) for s in studies[1:]]
        submit = subprocess.Popen([sys.executable, "-m", "segmap.cli", "submit", str(studies[0]["dicom_dir"]),
                                   "--to", f"127.0.0.1:{svc.port}/SEGMAP", "--query", f"orthanc+{orthanc_dest.url}",
                                   "--out", str(tmp_path / "submitted"), "--timeout", "300"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out, err = submit.communicate(timeout=320)
        assert submit.returncode == 0, err[-2000:]
        (saved,) = [Path(line) for line in out.splitlines() if line.strip()]
        assert references(pydicom.dcmread(saved)) == {studies[0]["series_uid"]}
        jobs = svc.wait_jobs("done", 5, timeout=300)
        record_figure(f"service: 5 studies sent at once -> 5 SEGs confirmed in {elapsed(t0):.1f} s (2 slots)")
        assert len(svc.jobs()) == 5
        segs = orthanc_segs(orthanc_dest)
        assert len(segs) == 5
        assert sorted(uid for s in segs for uid in references(s)) == sorted(s["series_uid"] for s in studies)
        assert {j.seg_series_uid for j in jobs} == {str(s.SeriesInstanceUID) for s in segs}
    finally:
        orthanc_dest.stop()


def _wait_state(svc: ServiceProcess, state: str, count: int = 1, timeout: float = 120):
    return svc.wait_jobs(state, count, timeout)


def test_kill9_in_every_state_then_restart_gives_exactly_one_seg_per_series(service_factory, tmp_path):
    """kill -9 while receiving, while queued and running, while exporting; every restart resumes; one SEG each."""
    scp = StoreSCP(tmp_path / "storescp-in", free_port())
    svc = service_factory(quiet_period_s=3, max_concurrent=1,
                          destinations={"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": scp.port,
                                                 "ae_title": scp.aet}}).start()
    studies = [phantom(tmp_path / f"study{i}", seed=10 + i, slices=12) for i in range(3)]

    # Receiving: half of study 0 arrives, the service dies inside the quiet period, the sender sends it all again.
    storescu(studies[0]["dicom_files"][:6], svc.port, "SEGMAP")
    svc.restart_after_kill9()
    assert svc.jobs() == [], "no job from half a series"
    storescu(studies[0]["dicom_files"], svc.port, "SEGMAP")
    # Queued and running: two series, one slot. Kill while one runs and the other waits.
    storescu(studies[1]["dicom_files"], svc.port, "SEGMAP")
    wait_for(lambda: svc.jobs("running") and svc.jobs("queued") and svc.containers(), 60,
             "one job running in its container while the other waits for the slot")
    svc.restart_after_kill9()
    # Exporting: the destination is down, so the finished jobs wait in 'exporting'; kill there too.
    _wait_state(svc, "exporting", 2, timeout=180)
    svc.restart_after_kill9()
    storescu(studies[2]["dicom_files"], svc.port, "SEGMAP")
    scp.start()
    try:
        jobs = svc.wait_jobs("done", 3, timeout=300)
        assert {j.instance_count for j in jobs} == {12}
        segs = [pydicom.dcmread(p) for p in scp.files()]
        per_series = {}
        for s in segs:
            for uid in references(s):
                per_series.setdefault(uid, set()).add(str(s.SOPInstanceUID))
        assert per_series == {s["series_uid"]: {seg_uids(j.key)[1]} for s in studies for j in jobs
                              if j.series_uid == s["series_uid"]}
        # Each job ran in exactly one container per attempt: the adopted run was not started twice.
        assert all(j.attempts == 1 for j in jobs), [(j.key[:8], j.attempts) for j in jobs]
    finally:
        scp.stop()
    assert "adopted" in svc.log()


def test_orthanc_restart_inside_the_stable_window_loses_nothing(orthanc_server, service_factory, tmp_path):
    svc = service_factory(listener=False, orthanc_url=orthanc_server.url,
                          destinations={"orthanc": {"kind": "orthanc", "url": orthanc_server.url}}).start()
    study = phantom(tmp_path / "study", seed=21, slices=12)
    storescu(study["dicom_files"], orthanc_server.dicom_port, orthanc_server.aet)
    orthanc_server.restart()  # before StableAge: Orthanc's in-memory StableSeries event is lost
    svc.kill9()  # and the service dies too, to resume from its cursor
    svc.start()
    (job,) = svc.wait_jobs("done", 1, timeout=180)
    assert len(orthanc_segs(orthanc_server)) == 1
    assert references(orthanc_segs(orthanc_server)[0]) == {study["series_uid"]}


def _arrive(service, path: Path) -> None:
    """One instance as the listener records it, straight into a service ticked by hand in this process."""
    from segmap.service.store import Arrival

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    stored = service.spool.write(path.read_bytes(), *uids)
    service.store.record_instance(Arrival("listener", *uids, "CT", path=str(stored)))


def test_a_series_that_grows_before_its_job_starts_supersedes_it(images, tmp_path):
    """Completeness is re-checked when the job is claimed: instances that arrived after the series was closed (but
    before its job started) open a new version; the old job is cancelled as superseded, the new one runs."""
    from segmap.service.config import load_config
    from segmap.service.service import Service

    svc_proc = ServiceProcess(tmp_path / "svc", images[0], quiet_period_s=0)
    service = Service(load_config(svc_proc.config_path))  # in this process, ticked by hand; no listener started
    study = phantom(tmp_path / "study", seed=31, slices=12)
    for p in study["dicom_files"][:-1]:
        _arrive(service, p)
    service.close_due_series()
    (first,) = service.store.list_jobs()
    assert first.state == "queued" and first.instance_count == 11
    _arrive(service, study["dicom_files"][-1])  # the series grew before the job was claimed
    service.claim()
    assert service.store.get_job(first.key).state == "cancelled"
    assert "superseded" in service.store.get_job(first.key).error
    wait_for(lambda: (service.tick(), [j for j in service.store.list_jobs() if j.state == "done"])[1], 180,
             "the new version's job")
    done = [j for j in service.store.list_jobs() if j.state == "done"]
    assert len(done) == 1 and done[0].instance_count == 12 and done[0].version == 2
    service.stop()


def test_a_run_created_but_never_started_is_started_by_the_next_process(images, tmp_path, monkeypatch):
    """The service died between creating a job's container and starting it: the next process starts that same
    container (a 'created' container never starts by itself), and the job finishes with one attempt."""
    import docker.models.containers

    from segmap.service.config import load_config
    from segmap.service.service import Service

    config = load_config(ServiceProcess(tmp_path / "svc", images[0], quiet_period_s=0).config_path)
    first = Service(config)
    study = phantom(tmp_path / "study", seed=33, slices=12)
    for p in study["dicom_files"]:
        _arrive(first, p)
    first.close_due_series()

    class Died(BaseException):
        """Stands for kill -9: nothing after it runs, no clean-up."""

    def die(self, *args, **kwargs):
        raise Died()

    monkeypatch.setattr(docker.models.containers.Container, "start", die)
    with pytest.raises(Died):
        first.claim()
    monkeypatch.undo()
    (job,) = first.store.list_jobs()
    assert job.state == "running"
    assert docker.from_env().containers.get(job.run_name).status == "created"

    second = Service(config)
    try:
        wait_for(lambda: (second.tick(), second.store.get_job(job.key).state == "done")[1], 180, "the job done")
    finally:
        second.stop()
    assert second.store.get_job(job.key).attempts == 1
