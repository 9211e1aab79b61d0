"""The job store's state machine, versions and idempotency (real SQLite files, several connections).

On SQLite these are fast tests (``make test-fast``); each also runs on a fresh PostgreSQL database (the service tier).
"""

from __future__ import annotations

import itertools
import multiprocessing

import pytest

from segmap.service.keys import seg_uids
from segmap.service.states import TRANSITIONS, IllegalTransition, State
from segmap.service.store import Arrival, JobStore
from service_harness import new_job, seed_job

_databases = itertools.count()


def arrival(sop: int, series: str = "1.2.3", source: str = "listener") -> Arrival:
    return Arrival(source, "1.2", series, f"{series}.{sop}", "CT", path=f"/spool/{sop}.dcm")


def close(store: JobStore, now: float):
    (version,) = store.due_series(5, now=now)
    created, existing = store.close_series(version.id, [new_job(store, version)], "spleen: job",
                                           instance_count=version.instance_count, now=now)
    return version, created, existing


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.unit),
                        pytest.param("postgresql", marks=pytest.mark.service)])
def location(request, tmp_path):
    """Where a fresh store lives: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return tmp_path / "store.sqlite"
    return request.getfixturevalue("postgres_server").fresh_database(f"store{next(_databases)}")


@pytest.fixture
def store(location):
    s = JobStore(location)
    yield s
    s.close()


def test_a_series_is_due_only_after_the_quiet_period(store):
    for i in range(3):
        assert store.record_instance(arrival(i), now=100 + i)
    assert not store.record_instance(arrival(1), now=103), "a repeated instance is not new"
    assert store.due_series(5, now=106) == []
    (v,) = store.due_series(5, now=107)
    assert (v.version, v.instance_count, v.state) == (1, 3, "collecting")


def test_unchanged_resend_makes_no_job_and_one_more_instance_makes_a_new_version(store):
    for i in range(3):
        store.record_instance(arrival(i), now=100)
    v1, created, _ = close(store, 110)
    assert len(created) == 1
    # The same three instances again: nothing new, no version, no job.
    assert not any(store.record_instance(arrival(i), now=120) for i in range(3))
    assert store.due_series(5, now=200) == []
    # One more instance: version 2 holds all four (never a silent merge into version 1's job).
    assert store.record_instance(arrival(3), now=130)
    v2, created2, existing2 = close(store, 140)
    assert (v2.version, v2.instance_count) == (2, 4)
    assert len(created2) == 1 and created2 != created and existing2 == []
    assert store.newer_version(v1.id).id == v2.id


def test_the_same_key_is_never_queued_twice(store):
    for i in range(2):
        store.record_instance(arrival(i), now=100)
    v1, created, _ = close(store, 110)
    # A second version with the same instance set (e.g. an instance deleted and sent again) has the same key.
    store.record_instance(arrival(5, series="9.9"), now=100)  # unrelated series, just to exercise versions
    (v9,) = store.due_series(5, now=120)
    job = new_job(store, v1)
    result = store.close_series(v9.id, [job], "spleen: job", instance_count=v9.instance_count, now=120)
    assert result == ([], [job.key])
    with pytest.raises(Exception, match="(?i)unique"):
        store._db().execute("INSERT INTO jobs SELECT * FROM jobs")  # the UNIQUE key holds in the schema itself


def test_close_is_refused_when_instances_arrived_meanwhile(store):
    store.record_instance(arrival(0), now=100)
    (v,) = store.due_series(5, now=110)
    store.record_instance(arrival(1), now=111)
    assert store.close_series(v.id, [new_job(store, v)], "x", instance_count=1, now=112) is None
    assert store.series_version(v.id).state == "collecting"


def test_state_machine_with_retries_export_and_timings(store):
    store.record_instance(arrival(0), now=100)
    close(store, 110)
    job = store.claim("w1", lease_s=30, max_running=1, now=120)
    assert (job.state, job.attempts, job.lease_owner) == ("running", 1, "w1")
    assert store.claim("w1", lease_s=30, max_running=1, now=120) is None, "one slot"
    job = store.run_failed(job, "w1", "exit 1\nTraceback...", 1, retry_after_s=10, now=130)
    assert (job.state, job.error, job.next_attempt_at) == ("queued", "exit 1 Traceback...", 140)
    assert store.claim("w1", 30, 1, now=135) is None, "not before its next attempt"
    job = store.claim("w1", 30, 1, now=141)
    job = store.run_succeeded(job, "w1", now=150)
    assert job.state == "exporting"
    job = store.export_retry(job, "w1", "orthanc: connection refused", 5, now=151)
    assert store.jobs_due_for_export("w1", now=152) == []
    (job,) = store.jobs_due_for_export("w1", now=157)
    job = store.delivered_to(job, "w1", "orthanc", now=158)
    job = store.export_done(job, "w1", now=160)
    assert job.state == "done" and job.delivered == ("orthanc",)
    assert job.timings == {"received_to_queued": 10, "queued_to_started": 31, "run": 9, "export": 10, "total": 60}
    states = [e["state"] for e in store.events(job)]
    assert states == ["queued", "running", "queued", "running", "exporting", "exporting", "exporting", "done"]


def test_last_attempt_failure_fails_the_job_and_retry_requeues_it(store):
    store.record_instance(arrival(0), now=100)
    close(store, 110)
    for t in (120, 200):
        job = store.claim("w1", 30, 1, now=t)
        job = store.run_failed(job, "w1", "boom", 1, retry_after_s=10, now=t + 1)
    assert job.state == "failed" and job.attempts == 2
    assert store.retry(job.key[:8]).state == "queued"
    assert store.cancel(job.key).state == "cancelled"
    assert store.count_by_state() == {"queued": 0, "running": 0, "exporting": 0, "done": 0, "failed": 0,
                                      "cancelled": 1}


def test_a_dead_workers_job_is_taken_over_after_its_lease(store):
    store.record_instance(arrival(0), now=100)
    close(store, 110)
    job = store.claim("w1", lease_s=30, max_running=1, now=120)
    assert store.held_jobs("w2", 30, now=140) == [], "w1's lease still runs"
    (taken,) = store.held_jobs("w2", 30, now=151)
    assert taken.lease_owner == "w2"
    assert store.run_succeeded(job, "w1", now=152) is None, "w1 no longer holds it"
    assert store.run_succeeded(taken, "w2", now=152).state == "exporting"


def _claim_many(path, worker, out):
    s = JobStore(path)
    got = []
    while (job := s.claim(worker, 60, 100)) is not None:
        got.append(job.key)
    out.put(got)


def test_concurrent_workers_never_claim_the_same_job(location):
    store = JobStore(location)
    for n in range(30):
        store.record_instance(arrival(0, series=f"1.2.{n}"), now=100)
    for v in store.due_series(5, now=110):
        store.close_series(v.id, [new_job(store, v)], "x", instance_count=1, now=110)
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claim_many, args=(location, f"w{i}", out))
             for i in range(3)]
    for p in procs:
        p.start()
    claimed = [k for _ in procs for k in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
    assert len(claimed) == 30 and len(set(claimed)) == 30


def test_orthanc_cursor_moves_with_its_arrivals(store):
    src = "orthanc:main"
    assert store.cursor(src) == 0
    new = store.record_changes(src, 7, [arrival(0, source=src), arrival(1, source=src)], ["1.2.3"], now=100)
    assert new == 2 and store.cursor(src) == 7
    (v,) = store.due_series(0, now=100)
    assert v.stable_at == 100
    with pytest.raises(ValueError):
        store.record_changes(src, 9, [Arrival(src, "1.2", "1.2.3", None)], now=101)  # a bad page changes nothing
    assert store.cursor(src) == 7 and store.series_version(v.id).instance_count == 2


def test_get_job_by_prefix_and_our_outputs(store):
    store.record_instance(arrival(0), now=100)
    _, (key,), _ = close(store, 110)
    assert store.get_job(key[:6]).key == key
    assert store.get_job("segmap-" + key[:20]).key == key
    assert store.get_job(key[:3]) is None
    assert store.is_our_output(seg_uids(key)[0])
    assert not store.is_our_output("1.2.3")


def test_schema_is_versioned_and_migrated_once(location):
    from segmap.service.store import SCHEMA_VERSION
    first = JobStore(location)
    assert first.schema_version() == SCHEMA_VERSION
    first.record_instance(arrival(0), now=100)
    again = JobStore(location)  # a second worker starting: nothing is re-created, nothing lost
    assert again.schema_version() == SCHEMA_VERSION and again.due_series(0, now=200)[0].instance_count == 1


def test_an_illegal_transition_is_refused_and_changes_nothing(store):
    job = seed_job(store, "1.2.3", at=100)
    with pytest.raises(IllegalTransition, match=r"cannot move from queued to done"):
        store.export_done(job, "w1", now=120)  # never claimed, never run
    job = store.claim("w1", 30, 1, now=120)
    done = store.export_done(store.run_succeeded(job, "w1", now=130), "w1", now=140)
    events = store.events(done)
    for move in (lambda: store.run_succeeded(done, "w1", now=150),        # done -> exporting
                 lambda: store.run_failed(done, "w1", "x", 1, 0, now=150),  # done -> failed
                 lambda: store.supersede(done, "w1", 2, now=150)):         # done -> cancelled
        with pytest.raises(IllegalTransition, match=r"from done: none: it is final"):
            move()
    after = store.get_job(done.key)
    assert (after.state, after.updated_at, store.events(after)) == ("done", done.updated_at, events)


def test_the_schema_accepts_exactly_the_states_of_the_table(store):
    assert set(TRANSITIONS) == set(State) and all(to <= set(State) for to in TRANSITIONS.values())
    job = seed_job(store, "1.2.3", at=100)
    with pytest.raises(Exception, match="(?i)check"):
        with store._tx() as db:
            db.execute("UPDATE jobs SET state = 'paused' WHERE id = ?", (job.id,))
    assert store.get_job(job.key).state == State.QUEUED



# ------------------------------------------------------------------------------------------------ issue 20, point 1


def test_a_series_that_cannot_be_closed_stays_open_counted_and_a_resend_retries_it_at_once(store):
    for i in range(3):
        store.record_instance(arrival(i), now=100)
    (v,) = store.due_series(5, now=110)
    held = store.hold_series(v.id, "cannot reach the Docker engine", retry_at=410, now=110)
    assert (held.state, held.held_reason, held.retry_at) == ("collecting", "cannot reach the Docker engine", 410)
    assert held.decision == "not closed yet: cannot reach the Docker engine", "visible in `segmap jobs series`"
    assert store.count_unprocessed_series() == 1 and [s.id for s in store.held_series()] == [v.id]
    assert store.due_series(5, now=200) == [], "not before its retry time"
    store.record_instance(arrival(1), now=201)  # the sender sends one of them again
    (again,) = store.due_series(5, now=202)
    assert again.id == v.id and again.instance_count == 3, "a re-send retries at once, nothing added"
    v, created, _ = close(store, now=203)
    assert created and store.count_unprocessed_series() == 0


def test_a_series_an_older_release_abandoned_is_not_a_dead_end(store):
    """Older releases closed a series they could not close for an hour without a job ("abandoned: ..."); sending
    it again opens a new version (before: a repeat, never processed), and `reprocess` reopens it."""
    from segmap.service import operations

    for i in range(3):
        store.record_instance(arrival(i), now=100)
    (v,) = store.due_series(5, now=110)
    store.close_series(v.id, [], "abandoned: cannot reach the Docker engine", instance_count=3, now=4000)
    assert store.count_unprocessed_series() == 0
    store.record_instance(arrival(0), now=4100)
    (v2,) = store.due_series(5, now=4110)
    assert (v2.version, v2.instance_count) == (2, 3)
    v2, created, _ = close(store, now=4110)
    assert created

    for i in range(2):
        store.record_instance(arrival(i, series="7.7"), now=100)
    (w,) = store.due_series(5, now=5000)
    store.close_series(w.id, [], "abandoned: Orthanc never called it stable", instance_count=2, now=5000)
    (line,) = operations.reprocess(store, "7.7")
    assert "will be closed at the next tick" in line and store.count_unprocessed_series() == 1
    (w_again,) = store.due_series(5, now=5001)
    assert w_again.id == w.id and w_again.state == "collecting"
    with pytest.raises(operations.OperationRefused, match="a failed or cancelled job is queued again"):
        operations.reprocess(store, "1.2.3")  # closed with a job: nothing to reprocess
