"""Scale-out on real parts: one PostgreSQL job store, one intake process (DICOM listener) and three worker
processes sharing a workdir, the real MAP image on the Docker engine, an Orthanc as the destination. A worker is
killed with SIGKILL mid-job; its job is taken over after its lease and completes; every input gets exactly one SEG.
"""

from __future__ import annotations

import time
import pydicom
import pytest

from conftest import record_figure
from pacs import Orthanc, free_port, storescu, wait_for
from service_harness import ServiceProcess
from segmap.demo.phantom import write_phantom_study
from segmap.service.keys import seg_uids

LEASE_S = 6


def _orthanc_seg_uids(server: Orthanc) -> list[tuple[str, str, frozenset]]:
    import io

    import requests
    out = []
    for series in server.series_of_modality("SEG"):
        for inst in series["Instances"]:
            ds = pydicom.dcmread(io.BytesIO(requests.get(f"{server.url}/instances/{inst}/file", timeout=10).content))
            out.append((str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                        frozenset(str(r.SeriesInstanceUID) for r in ds.ReferencedSeriesSequence)))
    return out


@pytest.fixture
def cluster(tmp_path, images, postgres_server):
    dest = Orthanc(tmp_path / "dest", free_port(), free_port()).start()
    url = postgres_server.fresh_database("scaleout")
    shared = tmp_path / "shared-workdir"
    common = {"database": url, "workdir": str(shared), "lease_s": LEASE_S, "quiet_period_s": 1}
    destinations = {"orthanc": {"kind": "orthanc", "url": dest.url}}
    intake = ServiceProcess(tmp_path / "intake", images[0], destinations=destinations,
                            extra={"service": {**common, "role": "intake", "worker": "intake"}})
    workers = [ServiceProcess(tmp_path / f"w{i}", images[0], listener=False, destinations=destinations,
                              extra={"service": {**common, "role": "worker", "worker": f"w{i}"}})
               for i in (1, 2, 3)]
    procs = [intake, *workers]
    yield intake, workers, dest
    for p in procs:
        p.stop()
    dest.stop()


def test_three_workers_twenty_jobs_and_a_dead_worker(cluster, tmp_path):
    import docker

    intake, workers, dest = cluster
    client = docker.from_env()
    since = int(time.time()) - 1
    intake.start()
    for w in workers:
        w.start()
    studies = [write_phantom_study(tmp_path / f"s{i}", seed=100 + i, shape_zyx=(10, 64, 64)) for i in range(20)]
    t0 = time.time()
    for s in studies:
        storescu(s["dicom_files"], intake.port, "SEGMAP")

    # Kill w1 while it runs a job (its container keeps running on the shared engine).
    victim = wait_for(lambda: next((j for j in intake.jobs("running") if j.lease_owner == "w1"), None), 120,
                      "a job running on w1")
    killed_at = time.time()
    workers[0].kill9()

    jobs = intake.wait_jobs("done", 20, timeout=600)
    wall = time.time() - t0
    taken = intake.store().get_job(victim.key)
    assert taken.state == "done" and taken.worker in ("w2", "w3")
    events = intake.store().events(taken)
    takeover = [e for e in events if e["state"] == "takeover"]
    assert takeover and takeover[0]["at"] >= victim.lease_expires - 0.5, "taken over only after the lease ran out"
    record_figure(f"scale-out: 20 studies, 3 workers (one killed) in {wall:.1f} s; the dead worker's job finished "
                  f"{taken.finished_at - killed_at:.1f} s after the kill (lease {LEASE_S} s), by {taken.worker}")

    # Exactly one SEG per input at the destination, with the UIDs of its job.
    segs = _orthanc_seg_uids(dest)
    assert len(segs) == 20
    by_series = {next(iter(refs)): (series, sop) for series, sop, refs in segs}
    assert set(by_series) == {s["series_uid"] for s in studies}
    assert all(by_series[j.series_uid] == seg_uids(j.key) for j in jobs)
    # No job ran twice: every run name was created exactly once on the engine, and no attempt was repeated.
    created = [e["Actor"]["Attributes"].get("name") for e in client.events(
        since=since, until=int(time.time()) + 1, decode=True, filters={"type": "container", "event": "create"})]
    names = [n for n in created if n and n.startswith("segmap-")]
    ours = {j.run_name for j in jobs}
    assert sorted(n for n in names if n in ours) == sorted(ours), "one container per job"
    assert all(j.attempts == 1 for j in jobs)
    assert {j.worker for j in jobs} <= {"w1", "w2", "w3"} and len({j.worker for j in jobs}) >= 2
