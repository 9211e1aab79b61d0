"""The operations pages over a real job store: job list and detail, JSON, /metrics, /healthz, read-only.

The store is filled through its public methods with jobs in every state and known timings; the page is also
loaded in a real headless Chromium (Debian's package), whose screenshot is kept as a test artifact.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pacs import chromium
from segmap.service.store import JobStore
from segmap.privacy import redact
from segmap.service.web import make_server
from segmap.service.workspace import Workspace
from service_harness import seed_job

T0 = 1_750_000_000.0
DIGEST = "sha256:" + "ab" * 32
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"
XSS = "<script>alert('x')</script> container exited with 137"


class Filler:
    """Puts jobs into a store the way the service does (:func:`service_harness.seed_job`), then a worker claims."""

    def __init__(self, store: JobStore, workdir: Path):
        self.store, self.workspace, self.n = store, Workspace(workdir), 0

    def queue(self, at: float, map_name: str = "spleen", max_attempts: int = 3, log: str | None = None):
        self.n += 1
        series = f"1.2.826.0.1.3680043.10.999.{self.n}.1"
        return seed_job(self.store, series, at=at, study_uid=f"1.2.826.0.1.3680043.10.999.{self.n}", sops=3,
                        log=log, map_name=map_name, image=f"segmap/{map_name}:1", digest=DIGEST,
                        max_attempts=max_attempts, workspace=self.workspace).key

    def claim(self, at: float):
        job = self.store.claim("worker-1", lease_s=60, max_running=10, now=at, node="gpu-node-a")
        assert job is not None
        return job


_databases = itertools.count()
BOTH = pytest.mark.parametrize("location", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(params=["sqlite"])
def location(request, tmp_path):
    """A SQLite file by default; tests marked ``BOTH`` also run on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "store.sqlite"
    return request.getfixturevalue("postgres_server").fresh_database(f"web{next(_databases)}")


@pytest.fixture
def filled(location, tmp_path):
    """A store with one job in each state; returns (store, {state: key})."""
    store = JobStore(location)
    fill = Filler(store, tmp_path)
    keys = {}
    keys["done"] = fill.queue(T0, log="loading series\nPatientName: Doe^Jane\nsegmentation written\n")
    job = fill.claim(T0 + 12)
    job = store.run_succeeded(job, "worker-1", now=T0 + 42)           # run 30 s
    store.export_done(job, "worker-1", now=T0 + 45)                   # export 3 s, total 45 s

    keys["failed"] = fill.queue(T0 + 100, map_name="liver", max_attempts=1)
    job = fill.claim(T0 + 111)
    store.run_failed(job, "worker-1", XSS, exit_code=137, retry_after_s=5, now=T0 + 611)   # run 500 s, total 511 s

    keys["exporting"] = fill.queue(T0 + 200)
    store.run_succeeded(fill.claim(T0 + 215), "worker-1", now=T0 + 235)                    # run 20 s

    keys["cancelled"] = fill.queue(T0 + 300)
    store.cancel(keys["cancelled"], now=T0 + 320)

    keys["running"] = fill.queue(T0 + 400)
    fill.claim(T0 + 412)

    keys["queued"] = fill.queue(T0 + 500)
    return store, keys


@pytest.fixture
def web(filled):
    store, keys = filled
    server = make_server(store, port=0)
    server.serve_in_thread()
    yield server, store, keys
    server.shutdown()
    store.close()


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


@BOTH
def test_metrics_count_jobs_by_state_and_time_them(web):
    server, _, _ = web
    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    m = samples(r.text)
    assert m[("segmap_up", frozenset())] == 1
    for state in ("queued", "running", "exporting", "done", "failed", "cancelled"):
        assert m[("segmap_jobs", frozenset({("state", state)}))] == 1, state
    done, failed = frozenset({("state", "done")}), frozenset({("state", "failed")})
    assert m[("segmap_job_duration_seconds_count", done)] == 1
    assert m[("segmap_job_duration_seconds_sum", done)] == pytest.approx(45)
    assert m[("segmap_job_duration_seconds_sum", failed)] == pytest.approx(511)
    assert m[("segmap_job_duration_seconds_bucket", done | {("le", "60")})] == 1
    assert m[("segmap_job_duration_seconds_bucket", done | {("le", "30")})] == 0
    # Runs that ended: done (30 s), failed (500 s), exporting (20 s).
    assert m[("segmap_job_run_seconds_count", frozenset())] == 3
    assert m[("segmap_job_run_seconds_sum", frozenset())] == pytest.approx(550)
    assert m[("segmap_job_run_seconds_bucket", frozenset({("le", "30")}))] == 2
    assert m[("segmap_job_run_seconds_bucket", frozenset({("le", "+Inf")}))] == 3
    assert m[("segmap_job_export_seconds_sum", frozenset())] == pytest.approx(3)
    # Queued to started: 2 s, 1 s, 5 s, 2 s for the four jobs that were claimed.
    assert m[("segmap_job_queue_wait_seconds_count", frozenset())] == 4
    assert m[("segmap_job_queue_wait_seconds_sum", frozenset())] == pytest.approx(10)
    assert m[("segmap_oldest_queued_job_age_seconds", frozenset())] > 0


@BOTH
def test_metrics_follow_the_store(web):
    server, store, keys = web
    store.retry(keys["failed"])
    m = samples(requests.get(server.url + "/metrics", timeout=10).text)
    assert m[("segmap_jobs", frozenset({("state", "failed")}))] == 0
    assert m[("segmap_jobs", frozenset({("state", "queued")}))] == 2


def test_healthz_ok_and_503_when_the_store_cannot_be_read(web):
    server, store, _ = web
    r = requests.get(server.url + "/healthz", timeout=10)
    assert r.status_code == 200
    doc = r.json()
    assert doc["status"] == "ok" and doc["jobs"]["running"] == 1 and doc["store"].startswith("sqlite job store")

    store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(store.path) + suffix).unlink(missing_ok=True)
    store.path.write_bytes(b"this is not an SQLite database" * 100)
    r = requests.get(server.url + "/healthz", timeout=10)
    assert r.status_code == 503 and r.json()["status"] == "error"
    m = samples(requests.get(server.url + "/metrics", timeout=10).text)
    assert m[("segmap_up", frozenset())] == 0
    assert requests.get(server.url + "/", timeout=10).status_code == 503


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/api/jobs", "/metrics", "/jobs/anything"])
def test_read_only(web, method, path):
    server, store, keys = web
    before = store.count_by_state()
    r = requests.request(method, server.url + path, data=b"state=cancelled", timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    assert store.count_by_state() == before


@BOTH
def test_job_list_and_json(web):
    server, _, keys = web
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and '<meta http-equiv="refresh" content="5">' in r.text
    for state, key in keys.items():
        assert f'href="/jobs/{key[:12]}"' in r.text
    assert "&lt;script&gt;" in r.text and "<script>" not in r.text
    doc = requests.get(server.url + "/api/jobs", timeout=10).json()
    assert {j["key"]: j["state"] for j in doc["jobs"]} == {k: s for s, k in keys.items()}
    assert doc["counts"]["done"] == 1
    failed = requests.get(server.url + "/api/jobs?state=failed", timeout=10).json()["jobs"]
    assert [j["key"] for j in failed] == [keys["failed"]] and failed[0]["exit_code"] == 137
    assert requests.get(server.url + "/api/jobs?state=bogus", timeout=10).status_code == 400
    head = requests.head(server.url + "/", timeout=10)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) == len(r.content)


@BOTH
def test_job_detail_escapes_the_error_and_shows_the_log(web):
    server, _, keys = web
    r = requests.get(server.url + f"/jobs/{keys['failed'][:10]}", timeout=10)
    assert r.status_code == 200
    assert "<script>" not in r.text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in r.text
    assert "script-src" not in r.headers["Content-Security-Policy"]  # default-src 'none': no script may run
    assert keys["failed"] in r.text and "exit_code" in r.text
    done = requests.get(server.url + f"/jobs/{keys['done']}", timeout=10).text
    assert "segmentation written" in done and "every destination confirmed" in done
    assert "Doe" not in done and "PatientName: [redacted]" in done
    assert "total" in done and "45.000 s" in done
    api = requests.get(server.url + f"/api/jobs/{keys['done'][:8]}", timeout=10).json()
    assert api["key"] == keys["done"] and "Doe" not in api["log"]
    missing = requests.get(server.url + "/jobs/ffffffffffff", timeout=10)
    assert missing.status_code == 404 and "ffffffffffff" in missing.text


def test_redaction_of_patient_attributes_in_log_lines():
    """The pages' one redaction function (segmap.privacy.redact) on the dump forms a log line carries."""
    text = ("(0010, 0010) Patient's Name PN: 'Doe^Jane'\nPatientID=ID-123 ok\n"
            "Patient's Birth Date DA: '19700101'\nseries 1.2.3 done")
    out = redact(text)
    assert "Doe" not in out and "ID-123" not in out and "19700101" not in out
    assert out.splitlines()[-1] == "series 1.2.3 done"


def test_job_page_in_headless_chromium(web, tmp_path):
    server, _, keys = web
    dom = chromium("--dump-dom", server.url + "/", profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-500:]
    rows = {}
    for key, state in ((k, s) for s, k in keys.items()):
        assert f'data-key="{key}"' in dom.stdout
        rows[key] = dom.stdout.split(f'data-key="{key}"', 1)[1].split("</tr>", 1)[0]
        assert f'class="state-{state}">{state}</td>' in rows[key], (state, rows[key])
    # The error line arrived as text: Chromium's DOM holds no script element that came from it.
    assert "<script>" not in dom.stdout

    png = tmp_path / "jobs.png"
    shot = chromium(f"--screenshot={png}", "--window-size=1280,800", server.url + "/",
                    profile=tmp_path / "profile-png")
    assert shot.returncode == 0, shot.stderr[-500:]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, ARTIFACTS / "jobs-page.png")
    json.loads(requests.get(server.url + "/healthz", timeout=10).text)  # the server outlived the browser


def test_healthz_503_when_the_postgresql_database_is_gone(postgres_server, tmp_path):
    import psycopg

    url = postgres_server.fresh_database(f"web{next(_databases)}")
    store = JobStore(url)
    Filler(store, tmp_path).queue(T0)
    server = make_server(store, port=0)
    server.serve_in_thread()
    try:
        assert requests.get(server.url + "/healthz", timeout=10).json()["jobs"]["queued"] == 1
        store.close()
        with psycopg.connect(postgres_server.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        r = requests.get(server.url + "/healthz", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "error"
        assert "postgresql job store" in r.json()["store"]
        assert samples(requests.get(server.url + "/metrics", timeout=30).text)[("segmap_up", frozenset())] == 0
    finally:
        server.shutdown()


def test_idle_connections_hold_no_threads_and_a_request_is_still_answered(filled):
    """150 connections that never send a request (issue 20.9: they held 152 threads) wait in one selector thread;
    a real request beside them is answered at once, and the idle ones are closed after the idle timeout."""
    import socket
    import threading
    import time

    from segmap.service.web import WebServer

    store, _ = filled
    server = WebServer(store, "127.0.0.1", 0, idle_timeout_s=2.0)
    server.serve_in_thread()
    idle: list[socket.socket] = []
    try:
        requests.get(server.url + "/livez", timeout=10)
        before = threading.active_count()
        for _ in range(150):
            idle.append(socket.create_connection(server.server_address[:2], timeout=5))
        time.sleep(0.5)
        during = threading.active_count()
        t = time.perf_counter()
        r = requests.get(server.url + "/api/jobs", timeout=10)
        answered_s = time.perf_counter() - t
        assert r.status_code == 200 and len(r.json()["jobs"]) == 6
        assert during - before <= 2, (before, during)  # no thread per idle connection
        assert threading.active_count() <= before + 8  # at most the worker pool
        assert answered_s < 1.0, answered_s

        time.sleep(3.5)  # past the idle timeout: the server closed them (the peer reads EOF)
        closed = 0
        for s in idle:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == 150
    finally:
        for s in idle:
            s.close()
        server.shutdown()


def test_a_slow_client_is_cut_off_by_the_socket_timeout(filled, monkeypatch):
    """A client that starts a request and stalls holds one worker only until the per-read timeout."""
    import socket
    import time

    from segmap.service import web

    store, _ = filled
    monkeypatch.setattr(web._Handler, "timeout", 1.0)
    server = web.WebServer(store, "127.0.0.1", 0, workers=1)
    server.serve_in_thread()
    try:
        slow = socket.create_connection(server.server_address[:2], timeout=10)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        t = time.perf_counter()
        r = requests.get(server.url + "/livez", timeout=10)  # waits for the one worker
        assert r.status_code == 200 and time.perf_counter() - t < 5
        slow.settimeout(5)
        assert slow.recv(1024) == b""  # the server gave up on it and closed the connection
        slow.close()
    finally:
        server.shutdown()


def test_a_done_job_links_the_viewer_and_shows_its_overlay_and_volumes(filled, tmp_path):
    """service.http.viewer_url: the list and the job page link a done job's study to the viewer; the page shows the
    overlay picture and the per-segment volumes from the run report; a job whose outputs retention deleted says so."""
    store, keys = filled
    done = store.get_job(keys["done"])
    out = Path(done.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    (out / "overlay.png").write_bytes(png)
    (out / "run_report.json").write_text(json.dumps(
        {"segments": [{"label_value": 1, "name": "Spleen", "voxels": 4242, "volume_ml": 123.4}]}))
    template = "http://pacs.example:8042/viewer?StudyInstanceUIDs={study_uid}"
    server = make_server(store, port=0, viewer_url=template)
    server.serve_in_thread()
    try:
        link = template.format(study_uid=done.study_uid)
        listing = requests.get(server.url + "/", timeout=10).text
        assert listing.count(f'class="viewer" href="{link}"') == 1  # the done job only
        page = requests.get(server.url + f"/jobs/{done.key[:12]}", timeout=10)
        assert f'href="{link}"' in page.text and "Spleen" in page.text and "123.4" in page.text
        assert f'src="/jobs/{done.key[:12]}/overlay.png"' in page.text
        assert "img-src 'self'" in page.headers["Content-Security-Policy"]
        picture = requests.get(server.url + f"/jobs/{done.key[:12]}/overlay.png", timeout=10)
        assert picture.status_code == 200 and picture.headers["Content-Type"] == "image/png"
        assert picture.content == png
        api = requests.get(server.url + f"/api/jobs/{done.key}", timeout=10).json()
        assert api["viewer_url"] == link and api["segments"][0]["volume_ml"] == 123.4
        failed = requests.get(server.url + f"/jobs/{keys['failed'][:12]}", timeout=10).text
        assert 'class="viewer"' not in failed
        assert requests.get(server.url + f"/jobs/{keys['failed'][:12]}/overlay.png", timeout=10).status_code == 404
        assert requests.get(server.url + f"/jobs/{done.key[:12]}/other.txt", timeout=10).status_code == 404

        shutil.rmtree(out)  # retention deleted the outputs: the link stays, the page says why nothing is shown
        page = requests.get(server.url + f"/jobs/{done.key[:12]}", timeout=10).text
        assert f'href="{link}"' in page and "no longer kept" in page
    finally:
        server.shutdown()
