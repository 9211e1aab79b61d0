"""The service's read-only operations pages: the job list, one job's detail, ``/metrics`` and ``/healthz``; the
probes ``/livez`` and ``/readyz``.

Everything is read from the job store at request time, so the pages and the metrics always agree with
``segmap jobs``. The server only answers GET and HEAD (405 for anything else) and binds to localhost unless told
otherwise. With :class:`~segmap.webauth.WebAuth` credentials every path but the probes answers 401 without them.
Pages show UIDs, job keys and state; every error and log line passes :func:`segmap.privacy.redact` (patient data,
URL passwords) before it is shown, and the store's location is shown without its user-info.

The probes say nothing about jobs: ``/livez`` answers while the process serves HTTP at all (a database outage must
not make a kubelet restart the pod), ``/readyz`` answers 503 while the job store cannot be read.

The standard library's HTTP server is enough for a page a few operators refresh every few seconds and a Prometheus
scrape, but its threading variant gives every connection a thread for as long as the peer keeps it open. Here a
connection waits in one selector thread until its request starts to arrive, and only then takes one of a few worker
threads, with a socket timeout for the rest of the request (:class:`WebServer`); ``prometheus_client`` renders the
metrics from a collector whose figures the database aggregates.
"""

from __future__ import annotations

import html
import json
import logging
import selectors
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)

from segmap import __version__
from segmap.errors import ServiceConfigError
from segmap.outputs.overlay import OVERLAY_NAME
from segmap.outputs.report import REPORT_NAME
from segmap.privacy import redact
from segmap.service.operations import job_log
from segmap.service.states import UNFINISHED, State
from segmap.service.store import Job, JobStore
from segmap.text import first_line
from segmap.webauth import WebAuth

log = logging.getLogger(__name__)


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store that cannot be read raises: SQLite's and psycopg's errors, or ours when a connection fails."""
    errors: list[type[BaseException]] = [sqlite3.Error, ServiceConfigError]
    try:
        import psycopg
    except ImportError:  # a SQLite-only installation
        pass
    else:
        errors.append(psycopg.Error)
    return tuple(errors)


STORE_ERRORS = _store_errors()
#: list_jobs' limit meaning "all" on SQLite and PostgreSQL alike (neither takes -1 the same way).
_ALL = 2**31 - 1

REFRESH_S = 5
#: Histogram buckets in seconds: from a quick CPU job to a long GPU queue.
BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: Worker threads that answer requests (connections waiting for their request hold none).
WORKERS = 8
#: Seconds a connection may sit before its request starts, and seconds per read/write once it has.
IDLE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
#: Connections that may wait for their request at once; beyond it the longest-waiting is closed.
MAX_WAITING = 256


# --------------------------------------------------------------------------------------------------- metrics
class StoreCollector:
    """Prometheus collector over the job store: read at each scrape, so the figures survive restarts. Every figure
    is an aggregate the database computes (counts, a minimum, histogram buckets): a scrape loads no job."""

    def __init__(self, store: JobStore, process_figures: Callable[[], dict[str, float]] | None = None):
        self.store = store
        #: The serving process's own figures (:meth:`segmap.service.service.Service.process_figures`).
        self.process_figures = process_figures

    def collect(self):
        yield from self._process_metrics()
        yield from self._store_metrics()

    def _process_metrics(self):
        figures = self.process_figures() if self.process_figures is not None else {}
        for key, (name, kind, documentation) in PROCESS_METRICS.items():
            if key in figures:
                family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, documentation)
                family.add_metric([], figures[key])
                yield family

    def _store_metrics(self):
        info = InfoMetricFamily("segmap_build", "The segmap version that serves this page")
        info.add_metric([], {"version": __version__})
        yield info
        up = GaugeMetricFamily("segmap_up", "1 when the service's job store can be read, else 0")
        try:
            counts = self.store.count_by_state()
            unprocessed = self.store.count_unprocessed_series()
            oldest_at = self.store.oldest_queued_at()
            histograms = [(name, doc, self.store.timing_histogram(timing, BUCKETS, by_state), by_state)
                          for name, doc, timing, by_state in HISTOGRAMS]
        except STORE_ERRORS as e:
            self.store.close()  # this thread's connection is broken: connect afresh next time
            log.warning("metrics: job store unreadable (%s)", redact(first_line(e)))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        by_state = GaugeMetricFamily("segmap_jobs", "Jobs in the store by state", labels=["state"])
        for state in State:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state

        # The store keeps every job record, so finished jobs only ever grow: a counter.
        finished = CounterMetricFamily("segmap_jobs_finished", "Jobs that reached a final state, by state",
                                       labels=["state"])
        for state in (State.DONE, State.FAILED, State.CANCELLED):
            finished.add_metric([state], counts.get(state, 0))
        yield finished

        held = GaugeMetricFamily("segmap_series_unprocessed", "Series that could not be closed yet (engine, image, "
                                 "Orthanc or a spool file missing): kept open and retried, never dropped")
        held.add_metric([], unprocessed)
        yield held

        oldest = GaugeMetricFamily("segmap_oldest_queued_job_age_seconds",
                                   "Age of the oldest queued job (0 when none): a stuck queue grows here")
        oldest.add_metric([], max(0.0, time.time() - oldest_at) if oldest_at is not None else 0.0)
        yield oldest

        for name, documentation, groups, labelled in histograms:
            family = HistogramMetricFamily(name, documentation, labels=["state"] if labelled else [])
            if not labelled:
                groups.setdefault((), ([0] * len(BUCKETS), 0, 0.0))
            for labels, (cumulative, count, total) in sorted(groups.items()):
                buckets = [(str(b), n) for b, n in zip(BUCKETS, cumulative)] + [("+Inf", count)]
                family.add_metric(list(labels), buckets, total)
            yield family


#: The serving process's figures: key -> (metric, kind, help). Counters count since the process started.
PROCESS_METRICS = {
    "instances_received": ("segmap_instances_received", "counter", "DICOM instances received and recorded"),
    "instances_refused": ("segmap_instances_refused", "counter",
                          "DICOM instances answered with a failure status (too large, conflicting, no space, ...)"),
    "associations_refused": ("segmap_associations_refused", "counter",
                             "DICOM connections refused (peer address, calling AE title, TLS handshake)"),
    "export_retries": ("segmap_export_retries", "counter", "Exports to a destination put off to be retried"),
    "workdir_bytes": ("segmap_workdir_bytes", "gauge",
                      "Bytes under the workdir (spool, series, job outputs; measured at most once a minute)"),
}

#: (metric, help, timing of :data:`~segmap.service.store.TIMINGS`, labelled by state)
HISTOGRAMS = (
    ("segmap_job_duration_seconds", "Finished jobs: last instance received to finished (done or failed)", "total",
     True),
    ("segmap_job_queue_wait_seconds", "Jobs started: queued to container started", "queued_to_started", False),
    ("segmap_job_run_seconds", "Container runs that ended: started to exit", "run", False),
    ("segmap_job_export_seconds", "Exports that finished: container exit to destinations confirmed", "export",
     False),
)


# --------------------------------------------------------------------------------------------------- pages
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;width:100%}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,pre{font:12px/1.35 ui-monospace,monospace}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;
white-space:pre-wrap}.counts span{display:inline-block;margin-right:1em;padding:.2em .6em;border-radius:4px;
background:#eee}.state-done{color:#1a7f37}.state-failed{color:#c62828;font-weight:600}.state-running,
.state-exporting{color:#1565c0}.state-cancelled{color:#777}.err{color:#c62828;max-width:40em;overflow-wrap:anywhere}
"""
_E = html.escape


def _page(title: str, body: str, refresh: bool = True) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}<title>{_E(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>").encode()


def human_seconds(value: float | None) -> str:
    """A duration for people: "12.0 s", "3.5 min", "1.2 h", "2.0 d" ("" for none)."""
    if value is None:
        return ""
    value = max(0.0, value)
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


def _text(value) -> str:
    if value is None:
        return ""
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z" if ts else ""


def viewer_link(job: Job, viewer_url: str | None) -> str | None:
    """The viewer's address of a done job's study (``service.http.viewer_url`` filled in), or None."""
    if not viewer_url or job.state != State.DONE:
        return None
    return viewer_url.format(study_uid=job.study_uid, series_uid=job.series_uid,
                             seg_series_uid=job.seg_series_uid or "")


def job_result(job: Job) -> tuple[list[dict], Path | None]:
    """A done job's segments (label, voxels, volume in mL) from its run report, and its overlay picture when it is
    still there (retention may have deleted the outputs: then ``([], None)``)."""
    if job.state != State.DONE or not job.output_dir:
        return [], None
    out = Path(job.output_dir)
    try:
        segments = json.loads((out / REPORT_NAME).read_text()).get("segments") or []
    except (OSError, ValueError, AttributeError):
        segments = []
    overlay = out / OVERLAY_NAME
    return [s for s in segments if isinstance(s, dict)], (overlay if overlay.is_file() else None)


def _result_section(job: Job, viewer_url: str | None) -> str:
    if job.state != State.DONE:
        return ""
    link = viewer_link(job, viewer_url)
    segments, overlay = job_result(job)
    parts = ["<h2>result</h2>"]
    if link:
        parts.append(f'<p><a class="viewer" href="{_E(link)}">open the study in the viewer</a> (the SEG is stored '
                     f"next to the images)</p>")
    if segments:
        rows = "".join(f"<tr><td>{_E(str(s.get('name', '')))}</td><td class=num>{int(s.get('voxels', 0))}</td>"
                       f"<td class=num>{float(s.get('volume_ml', 0.0)):.1f}</td></tr>" for s in segments)
        parts.append(f"<table class=segments><thead><tr><th>segment</th><th>voxels</th><th>volume (mL)</th></tr>"
                     f"</thead><tbody>{rows}</tbody></table>")
    if overlay is not None:
        parts.append(f'<p><img class="overlay" src="/jobs/{_E(job.key[:12])}/{OVERLAY_NAME}" alt="the segments over '
                     f'the image" style="max-width:100%"></p>')
    if not segments and overlay is None:
        parts.append("<p>(the outputs are no longer kept)</p>")
    return "".join(parts)


def job_list_page(store: JobStore, state: str | None = None, viewer_url: str | None = None) -> bytes:
    counts = store.count_by_state()
    jobs = store.list_jobs(states=[state] if state else None)
    links = " ".join(f'<span class="state-{s}"><a href="/?state={s}">{s}</a> {counts.get(s, 0)}</span>'
                     for s in State)
    rows = []
    for j in jobs:
        rows.append(
            f'<tr class="job" data-key="{_E(j.key)}"><td><a href="/jobs/{_E(j.key[:12])}"><code>{_E(j.key[:12])}'
            f'</code></a></td><td>{_E(j.map_name)}</td><td class="state-{_E(j.state)}">{_E(j.state)}</td>'
            f'<td class="num">{j.attempts}/{j.max_attempts}</td><td class="num">{human_seconds(j.age_s)}</td>'
            f'<td class="num">{human_seconds(j.duration_s)}</td><td>{_E(j.node or "")} {_E(j.worker or "")}</td>'
            f'<td><code>{_E(j.series_uid)}</code> v{j.version} ({j.instance_count})</td>'
            f'<td class="err">{_E(j.error or "")}</td><td>{_viewer_cell(j, viewer_url)}</td></tr>')
    table = ("<table><thead><tr><th>job</th><th>MAP</th><th>state</th><th>attempts</th><th>age</th>"
             "<th>duration</th><th>node / worker</th><th>series (version, instances)</th><th>error</th><th>result</th>"
             f"</tr></thead><tbody>{''.join(rows) or '<tr><td colspan=10>no jobs</td></tr>'}</tbody></table>")
    shown = f" ({_E(state)})" if state else ""
    body = (f"<h1>segmap jobs{shown}</h1><p class=counts>{links} <a href='/'>all</a></p>{table}"
            f"<p><small>{len(jobs)} shown, newest first; refreshes every {REFRESH_S} s; "
            f"<a href='/api/jobs'>JSON</a> &middot; <a href='/metrics'>metrics</a></small></p>")
    return _page("segmap jobs", body)


def _viewer_cell(job: Job, viewer_url: str | None) -> str:
    link = viewer_link(job, viewer_url)
    return f'<a class="viewer" href="{_E(link)}">view</a>' if link else ""


def job_detail_page(store: JobStore, job: Job, viewer_url: str | None = None) -> bytes:
    fields = job.as_dict()
    timings = fields.pop("timings")
    for name in ("received_at", "created_at", "updated_at", "started_at", "run_finished_at", "finished_at",
                 "export_started_at", "next_attempt_at", "lease_expires"):
        fields[name] = _when(fields[name])
    fields["age"], fields["duration"] = human_seconds(job.age_s), human_seconds(job.duration_s)
    rows = "".join(f"<tr><th>{_E(k)}</th><td>{_E(_text(v))}</td></tr>" for k, v in fields.items())
    timing_rows = "".join(f"<tr><th>{_E(k)}</th><td class=num>{v:.3f} s</td></tr>" for k, v in timings.items())
    log_text = job_log(store, job)  # redacted by job_log
    body = (f"<p><a href='/'>&larr; all jobs</a></p><h1>job <code>{_E(job.key[:12])}</code> "
            f"<span class='state-{_E(job.state)}'>{_E(job.state)}</span></h1>"
            f"{_result_section(job, viewer_url)}<table>{rows}</table><h2>timings</h2><table>{timing_rows or '<tr><td>none yet</td></tr>'}</table>"
            f"<h2>log</h2><pre>{_E(log_text) or '(empty)'}</pre>")
    return _page(f"segmap job {job.key[:12]}", body, refresh=job.state in UNFINISHED)


# --------------------------------------------------------------------------------------------------- server
class _Handler(BaseHTTPRequestHandler):
    server: "WebServer"
    server_version = "segmap"
    sys_version = ""
    #: Seconds per socket read or write once the request started (StreamRequestHandler applies it).
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: only GET and HEAD\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse  # noqa: N815

    def _answer(self, head: bool) -> None:
        store = self.server.store
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        auth = self.server.auth
        if not auth.allows(path, self.headers.get("Authorization")):
            self._send(HTTPStatus.UNAUTHORIZED, b"authentication required\n", "text/plain; charset=utf-8", head=head,
                       extra={"WWW-Authenticate": auth.challenge()})
            return
        if path == "/livez":  # the process answers: nothing else is asked, the database least of all
            self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8", head=head)
            return
        try:
            status, body, ctype = self._route(store, path, query)
        except STORE_ERRORS as e:
            log.warning("web: job store unreadable (%s)", redact(first_line(e)))
            status, body, ctype = (HTTPStatus.SERVICE_UNAVAILABLE,
                                   f"job store unreadable: {redact(first_line(e))}\n".encode(),
                                   "text/plain; charset=utf-8")
        finally:
            store.close()  # a fresh connection per request: a replaced or restored database is seen at once
        self._send(status, body, ctype, head=head)

    def _route(self, store: JobStore, path: str, query: dict) -> tuple[int, bytes, str]:
        if path == "/readyz":
            try:
                store.count_by_state()
            except STORE_ERRORS:
                store.close()
                return HTTPStatus.SERVICE_UNAVAILABLE, b"not ready: the job store cannot be read\n", \
                    "text/plain; charset=utf-8"
            return HTTPStatus.OK, b"ready\n", "text/plain; charset=utf-8"
        state = (query.get("state") or [None])[0]
        if state is not None and state not in tuple(State):
            return HTTPStatus.BAD_REQUEST, f"unknown state {state!r}; one of {', '.join(State)}\n".encode(), \
                "text/plain; charset=utf-8"
        if path == "/":
            return HTTPStatus.OK, job_list_page(store, state, self.server.viewer_url), "text/html; charset=utf-8"
        if path == "/healthz":
            return self._health(store)
        if path == "/metrics":
            return HTTPStatus.OK, generate_latest(self.server.registry), CONTENT_TYPE_LATEST
        if path == "/api/jobs":
            jobs = store.list_jobs(states=[state] if state else None)
            doc = {"counts": store.count_by_state(), "jobs": [j.as_dict() for j in jobs]}
            return HTTPStatus.OK, _json(doc), "application/json"
        for prefix, api in (("/jobs/", False), ("/api/jobs/", True)):
            if path.startswith(prefix):
                ref = path[len(prefix):].strip("/")
                ref, _, part = ref.partition("/")
                if part not in ("", OVERLAY_NAME) or (part and api):
                    break
                job = store.get_job(ref) if ref else None
                if job is None:
                    message = f"no job {ref!r} (give a job id, its key or a unique key prefix of 6+ characters)"
                    if api:
                        return HTTPStatus.NOT_FOUND, _json({"error": message}), "application/json"
                    return HTTPStatus.NOT_FOUND, _page("not found", f"<p>{_E(message)}</p><p><a href='/'>all jobs"
                                                                     f"</a></p>", refresh=False), \
                        "text/html; charset=utf-8"
                if api:
                    doc = {**job.as_dict(), "log": job_log(store, job),
                           "viewer_url": viewer_link(job, self.server.viewer_url), "segments": job_result(job)[0]}
                    return HTTPStatus.OK, _json(doc), "application/json"
                if part == OVERLAY_NAME:
                    overlay = job_result(job)[1]
                    if overlay is None:
                        return HTTPStatus.NOT_FOUND, b"no overlay for this job\n", "text/plain; charset=utf-8"
                    return HTTPStatus.OK, overlay.read_bytes(), "image/png"
                return HTTPStatus.OK, job_detail_page(store, job, self.server.viewer_url), "text/html; charset=utf-8"
        return HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8"

    def _health(self, store: JobStore) -> tuple[int, bytes, str]:
        where = redact(str(store))  # str(store) already leaves a URL's user-info and password= out
        try:
            counts = store.count_by_state()
        except STORE_ERRORS as e:
            store.close()
            doc = {"status": "error", "error": f"job store unreadable: {redact(first_line(e))}", "store": where}
            return HTTPStatus.SERVICE_UNAVAILABLE, _json(doc), "application/json"
        doc = {"status": "ok", "store": where, "jobs": counts, "version": __version__,
               "uptime_s": round(time.monotonic() - self.server.started, 1)}
        return HTTPStatus.OK, _json(doc), "application/json"

    def _send(self, status: int, body: bytes, ctype: str, head: bool = False, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # No scripts at all: even an escaped value that slipped through could not run.
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
        log.debug("%s %s", self.address_string(), redact(format % args))


def _json(doc) -> bytes:
    return (json.dumps(doc, indent=1, default=str) + "\n").encode()


class WebServer(HTTPServer):
    """The operations web server over one job store; ``serve_in_thread()`` starts it, ``shutdown()`` stops it.

    Threads are bounded: an accepted connection waits in a selector (one thread for all of them) until its request
    starts to arrive or ``idle_timeout_s`` passes, then one of ``workers`` threads answers it, with
    ``REQUEST_TIMEOUT_S`` per socket read. 150 idle connections therefore hold no thread, and a slow client holds
    one worker for at most the timeout per read."""

    def __init__(self, store: JobStore, host: str, port: int, auth: WebAuth | None = None, *,
                 workers: int = WORKERS, idle_timeout_s: float = IDLE_TIMEOUT_S, max_waiting: int = MAX_WAITING,
                 viewer_url: str | None = None, process_figures: Callable[[], dict[str, float]] | None = None):
        self.store = store
        self.auth = auth or WebAuth()
        #: ``service.http.viewer_url``: where a done job's study is shown (None: no link).
        self.viewer_url = viewer_url
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(store, process_figures))
        self.started = time.monotonic()
        self.idle_timeout_s, self.max_waiting = idle_timeout_s, max_waiting
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="segmap-web")
        self._waiting = selectors.DefaultSelector()
        self._waiting_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._waiting.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # Called by serve_forever for each accepted connection: park it instead of answering now.
    def process_request(self, request, client_address) -> None:
        with self._waiting_lock:
            parked = [k for k in self._waiting.get_map().values() if k.data is not None]
            if len(parked) >= self.max_waiting:
                oldest = min(parked, key=lambda k: k.data[1])
                self._waiting.unregister(oldest.fileobj)
                self.shutdown_request(oldest.fileobj)
            self._waiting.register(request, selectors.EVENT_READ, (client_address, time.monotonic()))
        self._wake_w.send(b"\0")

    def _watch(self) -> None:
        while not self._closed.is_set():
            ready = self._waiting.select(timeout=min(1.0, self.idle_timeout_s))
            with self._waiting_lock:
                for key, _ in ready:
                    if key.data is None:  # the wake-up socket: a new connection was parked
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        continue
                    self._waiting.unregister(key.fileobj)
                    self._pool.submit(self._answer, key.fileobj, key.data[0])
                deadline = time.monotonic() - self.idle_timeout_s
                for key in [k for k in self._waiting.get_map().values() if k.data is not None and
                            k.data[1] < deadline]:
                    self._waiting.unregister(key.fileobj)
                    self.shutdown_request(key.fileobj)

    def _answer(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 -- one broken connection must not end the worker
            log.debug("web: request from %s failed", client_address[0], exc_info=True)
        finally:
            self.shutdown_request(request)

    def serve_in_thread(self) -> threading.Thread:
        self._watcher = threading.Thread(target=self._watch, name="segmap-web-waiting", daemon=True)
        self._watcher.start()
        self._thread = threading.Thread(target=self.serve_forever, name="segmap-web", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self) -> None:
        if self._thread is not None:
            super().shutdown()
            self._thread.join(10)
            self._thread = None
        self._closed.set()
        if self._watcher is not None:
            self._wake_w.send(b"\0")
            self._watcher.join(10)
            self._watcher = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._waiting_lock:
            for key in list(self._waiting.get_map().values()):
                self._waiting.unregister(key.fileobj)
                if key.data is not None:
                    self.shutdown_request(key.fileobj)
        self._waiting.close()
        self._wake_r.close()
        self._wake_w.close()
        self.server_close()


def make_server(store: JobStore, host: str = "127.0.0.1", port: int = 8642, auth: WebAuth | None = None,
                viewer_url: str | None = None,
                process_figures: Callable[[], dict[str, float]] | None = None) -> WebServer:
    """The web server bound to ``host:port`` (port 0: any free port; see ``.url``), asking for ``auth``'s
    credentials when it has any, linking done jobs to ``viewer_url``. Not started yet."""
    return WebServer(store, host, port, auth, viewer_url=viewer_url, process_figures=process_figures)
