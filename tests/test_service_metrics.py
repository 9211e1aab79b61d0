"""``/metrics`` over 100,000 jobs: the database aggregates, the scrape loads no job (issue 20.7).

The store is seeded with one bulk ``INSERT ... SELECT`` (SQLite's recursive CTE, PostgreSQL's ``generate_series``),
then the real web server is scraped; the figures must be right and the answer must take < 0.5 s on both stores.
"""

from __future__ import annotations

import itertools
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import record_figure
from segmap import __version__
from segmap.service.store import Arrival, JobStore
from segmap.service.web import make_server

pytestmark = pytest.mark.service

N = 100_000
T0 = 1_750_000_000.0
_databases = itertools.count()

#: Every job: received at T0+i, queued 1 s later, started 2 s after that, ran 30 s, finished 3 s after the run.
COLUMNS = ("key, map_name, image, image_digest, series_id, study_uid, series_uid, version, instance_count, state, "
           "max_attempts, received_at, created_at, updated_at, started_at, run_finished_at, finished_at, run_name, "
           "seg_series_uid, destinations")
VALUES = ("'k' || i, 'spleen', 'img', 'sha256:ab', {series}, '1.2', '1.2.3', 1, 1, "
          "CASE i - (i / 4) * 4 WHEN 0 THEN 'done' WHEN 1 THEN 'failed' WHEN 2 THEN 'queued' ELSE 'running' END, 3, "
          "{t0} + i, {t0} + i + 1, {t0} + i + 1, {t0} + i + 3, {t0} + i + 33, "
          "CASE WHEN i - (i / 4) * 4 < 2 THEN {t0} + i + 36 END, 'r' || i, '2.25.' || i, '[]'")


def seed(store: JobStore) -> None:
    store.record_instance(Arrival("listener", "1.2", "1.2.3", "1.2.3.4"))
    series = store._db().execute("SELECT id FROM series").fetchone()["id"]
    values = VALUES.format(series=series, t0=T0)
    if store.engine.name == "sqlite":
        sql = (f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {N}) "
               f"INSERT INTO jobs ({COLUMNS}) SELECT {values} FROM n")
    else:
        sql = f"INSERT INTO jobs ({COLUMNS}) SELECT {values} FROM generate_series(1, {N}) AS i"
    store._db().execute(sql)
    if store.engine.name == "postgresql":
        store._db().execute("ANALYZE jobs")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        location = tmp_path / "store.sqlite"
    else:
        location = request.getfixturevalue("postgres_server").fresh_database(f"metrics{next(_databases)}")
    store = JobStore(location)
    seed(store)
    yield store
    store.close()


def test_metrics_of_100000_jobs_in_under_half_a_second(store):
    server = make_server(store, port=0)
    server.serve_in_thread()
    try:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            r = requests.get(server.url + "/metrics", timeout=30)
            times.append(time.perf_counter() - t)
            assert r.status_code == 200
    finally:
        server.shutdown()
    record_figure(f"/metrics over {N} jobs on {store.engine.name}: {min(times) * 1000:.0f} ms "
                  f"(slowest of 5: {max(times) * 1000:.0f} ms)")
    assert min(times) < 0.5, times

    m = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            m[(s.name, frozenset(s.labels.items()))] = s.value
    quarter = N // 4
    done, failed = frozenset({("state", "done")}), frozenset({("state", "failed")})
    assert m[("segmap_build_info", frozenset({("version", __version__)}))] == 1
    assert m[("segmap_up", frozenset())] == 1
    for state in ("done", "failed", "queued", "running"):
        assert m[("segmap_jobs", frozenset({("state", state)}))] == quarter
    assert m[("segmap_jobs_finished_total", done)] == quarter
    assert m[("segmap_jobs_finished_total", failed)] == quarter
    # received to finished: 36 s for every done and failed job
    assert m[("segmap_job_duration_seconds_count", done)] == quarter
    assert m[("segmap_job_duration_seconds_sum", done)] == pytest.approx(36 * quarter)
    assert m[("segmap_job_duration_seconds_bucket", done | {("le", "30")})] == 0
    assert m[("segmap_job_duration_seconds_bucket", done | {("le", "60")})] == quarter
    # every job started (2 s) and ran (30 s); only done jobs exported (3 s)
    assert m[("segmap_job_queue_wait_seconds_count", frozenset())] == N
    assert m[("segmap_job_queue_wait_seconds_bucket", frozenset({("le", "2")}))] == N
    assert m[("segmap_job_queue_wait_seconds_bucket", frozenset({("le", "1")}))] == 0
    assert m[("segmap_job_run_seconds_sum", frozenset())] == pytest.approx(30 * N)
    assert m[("segmap_job_export_seconds_count", frozenset())] == quarter
    assert m[("segmap_job_export_seconds_bucket", frozenset({("le", "5")}))] == quarter
    # the oldest queued job was queued at T0 + 3 (i = 2)
    assert m[("segmap_oldest_queued_job_age_seconds", frozenset())] == pytest.approx(time.time() - T0 - 3, abs=60)
