"""Leases that mean what they say (issue 20, point 5), on SQLite and on PostgreSQL.

A worker renews its leases from a heartbeat thread, not from its tick, so a tick that waits on a slow destination
for longer than two leases never lets a second worker take the job over; and lease times are set and compared on
the database's clock, so a worker whose host clock is an hour off neither loses its jobs nor takes others'.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pacs import wait_for
from segmap.service.states import State
from segmap.service.store import JobStore
from service_harness import in_process_service, seed_job, write_seg

LEASE_S = 1.0


class SlowDestination:
    """Answers after ``delay_s`` (a PACS that takes its time), then confirms."""

    def __init__(self, delay_s: float):
        self.delay_s, self.sends = delay_s, 0

    def send(self, files):
        time.sleep(self.delay_s)
        self.sends += 1

    def confirm(self, files) -> bool:
        return True


@pytest.mark.service  # 3 s a store: not in make test-fast
def test_a_tick_slower_than_two_leases_is_never_taken_over(tmp_path, database):
    shared = str(tmp_path / "shared")
    common = dict(database=database, workdir=shared, lease_s=LEASE_S, poll_s=0.05)
    slow = SlowDestination(2.5 * LEASE_S)
    w1 = in_process_service(tmp_path / "w1", worker="w1", dest_objects={"pacs": slow}, **common)
    w2 = in_process_service(tmp_path / "w2", worker="w2", dest_objects={"pacs": SlowDestination(0)}, **common)
    seed_job(w1.store, "1.2.3", at=time.time() - 20, destinations=("pacs",), workspace=w1.workspace)
    job = w1.store.claim("w1", LEASE_S, 1)
    job = w1.store.run_succeeded(job, "w1")
    write_seg(Path(job.output_dir))

    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in (w1, w2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: w2.store.get_job(job.key).state == State.DONE, 30, "the job done")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        w1.stop(), w2.stop()
    took = time.monotonic() - t0
    done = w2.store.get_job(job.key)
    takeovers = [e for e in w2.store.events(done) if e["state"] == "takeover"]
    assert takeovers == [], f"a live worker's job was taken over: {takeovers}"
    assert done.worker == "w1" and slow.sends == 1, "w1 exported it, once"
    assert took >= 2 * LEASE_S
    print(f"export tick of {took:.1f} s (lease {LEASE_S:.0f} s) on {'PostgreSQL' if database else 'SQLite'}: "
          f"no takeover")


def test_leases_are_set_and_compared_on_the_database_clock(tmp_path, database, monkeypatch):
    location = database or tmp_path / "store.sqlite"
    w1, w2 = JobStore(location), JobStore(location)
    seed_job(w1, "1.2.3", at=time.time() - 20)
    host = time.time
    monkeypatch.setattr(time, "time", lambda: host() - 3600)  # w1's host clock is an hour behind
    job = w1.claim("w1", 30, 1)
    w1.heartbeat("w1", 30)
    monkeypatch.undo()
    assert w2.held_jobs("w2", 30) == [], "w1's lease still runs, whatever w1's clock says"
    assert abs(job.lease_expires - (w2.database_time() + 30)) < 5, "the lease runs on the database's clock"
    monkeypatch.setattr(time, "time", lambda: host() + 3600)  # w2's host clock is an hour ahead
    assert w2.held_jobs("w2", 30) == [], "nor does w2's clock end it"
    monkeypatch.undo()
    # A lease that did run out on the database's clock is taken over.
    w1.heartbeat("w1", -1)
    (taken,) = w2.held_jobs("w2", 30)
    assert taken.key == job.key and taken.lease_owner == "w2"
    w1.close(), w2.close()
