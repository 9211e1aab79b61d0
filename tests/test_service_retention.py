"""A bounded workdir (issue 20, point 3): retention and the free-space floor, on SQLite and PostgreSQL.

Retention: with the clock moved past ``retain_done_days``, no ``.dcm`` of a done job remains under the workdir (its
output, its series' input links, its spool files) while ``segmap jobs show KEY`` still shows the job and its history;
a failed job's files stay until ``retain_failed_days``; the workdir gauge (``Workspace.usage_bytes``) falls.
The floor: below ``free_space_floor_mb`` the listener answers C-STORE with 0xA700 (over real TCP) and records
nothing, while job-store transitions still commit; above it, the same instance is stored.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from conftest import record_figure
from segmap.demo.phantom import write_phantom_study
from segmap.service.states import State
from segmap.service.store import Arrival
from service_harness import arrive, in_process_service, write_seg

DAY = 86400.0


def _finished(service, folder: Path, seed: int, at: float, state: State):
    """A job the service queued for a phantom series that arrived at ``at``, run and then done or failed."""
    files = write_phantom_study(folder, seed=seed, shape_zyx=(8, 48, 48))["dicom_files"]
    for p in files:
        arrive(service, p)
    before = {j.key for j in service.store.list_jobs()}
    service.close_due_series(now=time.time())
    (job,) = [j for j in service.store.list_jobs() if j.key not in before]
    store, worker = service.store, service.worker
    job = store.claim(worker, 60, 10, now=at)
    job = store.run_succeeded(job, worker, now=at + 10)
    write_seg(Path(job.output_dir))
    if state == State.DONE:
        return store.export_done(job, worker, now=at + 20)
    return store.export_failed(job, worker, "pacs: refused (0xA700)", now=at + 20)


def _dcm(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


def test_retention_deletes_finished_jobs_images_and_keeps_their_records(tmp_path, database):
    service = in_process_service(tmp_path / "svc", database=database, quiet_period_s=0, retain_done_days=7,
                                 retain_failed_days=30)
    t = time.time()
    done = _finished(service, tmp_path / "a", 51, t, State.DONE)
    failed = _finished(service, tmp_path / "b", 52, t, State.FAILED)
    root = service.workspace.root
    before, files_before = service.workspace.usage_bytes(), len(_dcm(root))

    service.tick(now=t + 6 * DAY)
    assert len(_dcm(root)) == files_before, "nothing is deleted before its time"

    service.tick(now=t + 8 * DAY)
    after_done = service.workspace.usage_bytes()
    left = _dcm(root)
    assert not [p for p in left if done.series_uid in p.as_posix() or done.run_name in p.as_posix()
                or f"series/{done.series_id}/" in p.as_posix()], "no .dcm of the done job remains"
    assert any(failed.run_name in p.as_posix() for p in left), "a failed job's files stay until retain_failed_days"
    assert after_done < before

    shown = subprocess.run([sys.executable, "-m", "segmap.cli", "jobs", "-c", str(service.cfg.path), "show",
                            done.key[:12]], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **({"SEGMAP_DATABASE_URL": database} if database else {})})
    assert shown.returncode == 0, shown.stderr
    assert f"key: {done.key}" in shown.stdout and "state: done" in shown.stdout
    assert "retention: images and outputs deleted" in shown.stdout, "the history says so"

    service.tick(now=t + 31 * DAY)
    assert _dcm(root) == [], "every .dcm of finished jobs is gone"
    after_all = service.workspace.usage_bytes()
    assert after_all < after_done
    for job in (done, failed):
        kept = service.store.get_job(job.key)
        assert kept.state == job.state and kept.purged_at is not None and service.store.history(kept)
    record_figure(f"retention ({'PostgreSQL' if database else 'SQLite'}): workdir {before} -> {after_done} -> "
                  f"{after_all} bytes; {files_before} .dcm -> 0; job records and histories kept")
    service.stop()


def test_a_resent_series_after_retention_is_stored_again_and_deleted_again(tmp_path):
    service = in_process_service(tmp_path / "svc", quiet_period_s=0, retain_done_days=7)
    t = time.time()
    done = _finished(service, tmp_path / "a", 53, t, State.DONE)
    service.tick(now=t + 8 * DAY)
    assert _dcm(service.workspace.spool_dir) == []
    for p in sorted((tmp_path / "a" / "dicom").glob("*.dcm")):
        arrive(service, p)  # the same instances again: already processed, no new job
    assert len(service.store.list_jobs()) == 1 and _dcm(service.workspace.spool_dir)
    service.tick(now=t + 9 * DAY)
    assert _dcm(service.workspace.spool_dir) == [], "the re-sent files are deleted too"
    assert service.store.get_job(done.key).state == State.DONE
    service.stop()


@pytest.mark.service
def test_below_the_free_space_floor_the_listener_answers_out_of_resources(tmp_path):
    from pynetdicom import AE

    service = in_process_service(tmp_path / "svc", free_space_floor_mb=2.0**40, quiet_period_s=0)
    service.start()
    try:
        path = write_phantom_study(tmp_path / "s", seed=54, shape_zyx=(4, 32, 32))["dicom_files"][0]
        ds = pydicom.dcmread(path)

        def c_store() -> int:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", service.listener.address[1], ae_title="SEGMAP")
            assert assoc.is_established
            status = assoc.send_c_store(ds)
            assoc.release()
            return int(status.Status)

        assert service.below_floor()
        assert c_store() == 0xA700
        assert _dcm(service.workspace.spool_dir) == [] and service.store.series_versions() == []
        service.store.record_instance(Arrival("listener", "1.2", "1.2.3", "1.2.3.4"))  # the store still commits
        assert len(service.store.series_versions()) == 1

        service.cfg = dataclasses.replace(service.cfg, free_space_floor_mb=0.0)
        assert c_store() == 0x0000
        assert len(_dcm(service.workspace.spool_dir)) == 1
    finally:
        service.stop()
