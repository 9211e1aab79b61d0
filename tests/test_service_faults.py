"""The job service under faults (issue 20, points 1 and 4): nothing dropped silently, one line per failure.

- A series that cannot be closed (its MAP image missing on the Docker engine, a spool file gone) stays open with
  its reason, counted by ``count_unprocessed_series`` (the ``segmap_series_unprocessed`` gauge), for as long as it
  takes -- two hours here, where older releases abandoned it after one -- and is processed when the cause is gone:
  by itself (the image appears) or when its instances are sent again.
- Two MAPs that use one image and send to different destinations are two jobs: one SEG at each destination.
- A store that keeps failing is logged once with its traceback, then once per summary period, then once when it
  works again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid

import docker
import pytest

from conftest import record_figure
from pacs import Orthanc, free_port, wait_for
from segmap.demo.phantom import write_phantom_study
from segmap.service.states import State
from service_harness import arrive, in_process_service

HOURS_2 = 7200.0


def _study(folder, seed: int) -> list:
    return write_phantom_study(folder, seed=seed, shape_zyx=(10, 64, 64))["dicom_files"]


@pytest.fixture
def missing_image(images):
    """A MAP image name the engine does not have (yet); ``tag()`` makes it the real MAP image."""
    client = docker.from_env()
    name = f"segmap-test/missing:{uuid.uuid4().hex[:12]}"

    class Missing:
        def __init__(self):
            self.name = name

        def tag(self):
            repo, tag = name.split(":")
            client.images.get(images[0]).tag(repo, tag)

    yield Missing()
    try:
        client.images.remove(name)
    except docker.errors.ImageNotFound:
        pass


def test_a_series_whose_image_is_missing_is_held_for_hours_then_processed_by_itself(tmp_path, missing_image):
    from segmap.service.runners.docker import DockerRunner

    service = in_process_service(tmp_path / "svc", runner=DockerRunner(), image=missing_image.name,
                                 quiet_period_s=0)
    for p in _study(tmp_path / "study", seed=41):
        arrive(service, p)
    t = time.time()
    service.close_due_series(now=t)
    service.close_due_series(now=t + HOURS_2)  # older releases abandoned it after an hour: never processed
    (version,) = service.store.series_versions()
    assert version.state == "collecting" and service.store.list_jobs() == [], version.decision
    (held,) = service.store.held_series()
    assert missing_image.name in held.held_reason and held.decision.startswith("not closed yet: ")
    assert service.store.count_unprocessed_series() == 1

    missing_image.tag()  # the cause is gone: the image was pulled
    service.close_due_series(now=t + HOURS_2 + service.cfg.close_retry_max_s)
    (job,) = service.store.list_jobs()
    assert job.state == State.QUEUED and job.image == missing_image.name
    assert service.store.count_unprocessed_series() == 0
    service.stop()


def test_a_spool_file_gone_is_held_and_sending_it_again_processes_it(tmp_path, images):
    from segmap.service.runners.docker import DockerRunner

    service = in_process_service(tmp_path / "svc", runner=DockerRunner(), image=images[0], quiet_period_s=0)
    files = _study(tmp_path / "study", seed=42)
    spooled = [arrive(service, p) for p in files]
    spooled[3].unlink()  # a spool file gone (a disk error, an operator's clean-up)
    t = time.time()
    service.close_due_series(now=t)
    service.close_due_series(now=t + HOURS_2)
    (version,) = service.store.series_versions()
    assert version.state == "collecting" and service.store.list_jobs() == [], version.decision
    (held,) = service.store.held_series()
    assert "missing from the spool" in held.held_reason

    arrive(service, files[3])  # the sender sends it again: retried at once, not after the back-off
    service.close_due_series(now=t + HOURS_2 + 1)
    (job,) = service.store.list_jobs()
    assert job.state == State.QUEUED and job.instance_count == len(files)
    assert service.store.count_unprocessed_series() == 0
    service.stop()


def test_two_maps_with_one_image_and_two_destinations_make_two_jobs_and_one_seg_at_each(tmp_path, images):
    from segmap.service.runners.docker import DockerRunner

    a = Orthanc(tmp_path / "pacs-a", free_port(), free_port()).start()
    b = Orthanc(tmp_path / "pacs-b", free_port(), free_port()).start()
    try:
        service = in_process_service(
            tmp_path / "svc", runner=DockerRunner(), image=images[0], quiet_period_s=0,
            destinations={"clinical": {"kind": "orthanc", "url": a.url}, "research": {"kind": "orthanc", "url": b.url}},
            maps=[{"name": "spleen", "image": images[0], "destinations": ["clinical"]},
                  {"name": "spleen-research", "image": images[0], "destinations": ["research"]}])
        for p in _study(tmp_path / "study", seed=43):
            arrive(service, p)
        service.close_due_series()
        jobs = service.store.list_jobs()
        assert sorted((j.map_name, j.destinations) for j in jobs) == [("spleen", ("clinical",)),
                                                                       ("spleen-research", ("research",))]
        t0 = time.monotonic()
        wait_for(lambda: (service.tick(), all(service.store.get_job(j.key).state == State.DONE for j in jobs))[1],
                 400, "both jobs done")
        assert len(a.series_of_modality("SEG")) == 1 and len(b.series_of_modality("SEG")) == 1
        record_figure(f"two MAPs, one image, two destinations: 2 jobs, one SEG at each, in "
                      f"{time.monotonic() - t0:.0f} s")
        service.stop()
    finally:
        a.stop()
        b.stop()


@pytest.mark.service
def test_a_failing_store_is_one_traceback_then_a_line_per_period_then_one_when_it_recovers(tmp_path, caplog):
    """The store raising (SQLite's "database or disk is full") on every tick for 2.5 s at 50 ticks a second, with
    a summary period of 0.5 s: one traceback, about five summary lines, one recovery line -- not 125 tracebacks."""
    service = in_process_service(tmp_path / "svc", poll_s=0.02)
    service.failure_summary_every_s = 0.5
    full = threading.Event()
    real = service.store.due_series

    def due_series(*args, **kwargs):
        if full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args, **kwargs)

    service.store.due_series = due_series
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(stop,), daemon=True)
    caplog.set_level(logging.INFO, logger="segmap.service")
    loop.start()
    time.sleep(0.3)
    full.set()
    time.sleep(2.5)
    full.clear()
    time.sleep(0.5)
    stop.set()
    loop.join(timeout=10)
    service.stop()
    lines = [r for r in caplog.records if r.name == "segmap.service" and r.levelno >= logging.WARNING]
    tracebacks = [r for r in lines if r.exc_info]
    summaries = [r for r in lines if "still failing" in r.getMessage()]
    recovered = [r for r in lines if "works again" in r.getMessage()]
    assert len(tracebacks) == 1 and "disk is full" in tracebacks[0].getMessage()
    assert 3 <= len(summaries) <= 6, [r.getMessage() for r in summaries]
    assert len(recovered) == 1 and len(lines) == 1 + len(summaries) + 1
    record_figure(f"store failing for 2.5 s at 50 ticks/s: {len(lines)} log lines ({len(tracebacks)} traceback, "
                  f"{len(summaries)} summaries, 1 recovery)")
