"""The service's read-only operations pages: the job list, one job's detail, ``/metrics`` and ``/healthz``.

Everything is read from the job store at request time, so the pages and the metrics always agree with
``segmap jobs``. The server only answers GET and HEAD (405 for anything else) and binds to localhost unless told
otherwise. Pages show UIDs, job keys and state -- the store holds no patient name, ID or birth date; a container log
line that still carried one of those DICOM attributes is redacted before it is shown.

The standard library's threading HTTP server is enough for a page a few operators refresh every few seconds and a
Prometheus scrape; ``prometheus_client`` renders the metrics from a collector that reads the store on each scrape.
"""

from __future__ import annotations

import html
import json
import logging
import re
import sqlite3
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, HistogramMetricFamily

from segmap.errors import ServiceConfigError
from segmap.service.operations import job_log
from segmap.service.states import UNFINISHED, State
from segmap.service.store import Job, JobStore
from segmap.text import first_line

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
#: A log line naming one of these attributes (a dataset dump in a traceback, say) is shown without its value.
_PATIENT_LINE = re.compile(r"(?i)(patient'?s?[ _]?(name|id|birth[ _]?date)|\(0010,\s*00(10|20|30)\))(.*)")


def redact_patient_lines(text: str) -> str:
    """Replace whatever follows a patient name / ID / birth date attribute on a line with ``[redacted]``."""
    return _PATIENT_LINE.sub(lambda m: m.group(1) + " [redacted]", text)


# --------------------------------------------------------------------------------------------------- metrics
class StoreCollector:
    """Prometheus collector over the job store: read at each scrape, so the figures survive restarts."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        up = GaugeMetricFamily("segmap_up", "1 when the service's job store can be read, else 0")
        try:
            counts = self.store.count_by_state()
            # The store keeps every job, so histograms over its finished jobs are cumulative as Prometheus expects.
            jobs = self.store.list_jobs(limit=_ALL)
        except STORE_ERRORS as e:
            log.warning("metrics: job store unreadable (%s)", first_line(e))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        by_state = GaugeMetricFamily("segmap_jobs", "Jobs in the store by state", labels=["state"])
        for state in State:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state

        waiting = [j for j in jobs if j.state == "queued"]
        oldest = GaugeMetricFamily("segmap_oldest_queued_job_age_seconds",
                                   "Age of the oldest queued job (0 when none): a stuck queue grows here")
        oldest.add_metric([], max((j.age_s for j in waiting), default=0.0))
        yield oldest

        finished = [j for j in jobs if j.state in ("done", "failed")]
        yield _histogram("segmap_job_duration_seconds",
                         "Finished jobs: last instance received to finished (done or failed)", "total", finished,
                         by_state=True)
        yield _histogram("segmap_job_queue_wait_seconds", "Jobs started: queued to container started",
                         "queued_to_started", jobs)
        yield _histogram("segmap_job_run_seconds", "Container runs that ended: started to exit", "run", jobs)
        yield _histogram("segmap_job_export_seconds", "Exports that finished: container exit to destinations confirmed",
                         "export", [j for j in jobs if j.state == "done"])


def _histogram(name: str, documentation: str, timing: str, jobs: Iterable[Job],
               by_state: bool = False) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["state"] if by_state else [])
    groups: dict[tuple[str, ...], list[float]] = {}
    for job in jobs:
        value = job.timings.get(timing)
        if value is not None:
            groups.setdefault((job.state,) if by_state else (), []).append(float(value))
    if not by_state:
        groups.setdefault((), [])
    for labels, values in sorted(groups.items()):
        buckets = [(str(b), sum(v <= b for v in values)) for b in BUCKETS] + [("+Inf", len(values))]
        family.add_metric(list(labels), buckets, sum(values))
    return family


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


def job_list_page(store: JobStore, state: str | None = None) -> bytes:
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
            f'<td class="err">{_E(j.error or "")}</td></tr>')
    table = ("<table><thead><tr><th>job</th><th>MAP</th><th>state</th><th>attempts</th><th>age</th>"
             "<th>duration</th><th>node / worker</th><th>series (version, instances)</th><th>error</th></tr></thead>"
             f"<tbody>{''.join(rows) or '<tr><td colspan=9>no jobs</td></tr>'}</tbody></table>")
    shown = f" ({_E(state)})" if state else ""
    body = (f"<h1>segmap jobs{shown}</h1><p class=counts>{links} <a href='/'>all</a></p>{table}"
            f"<p><small>{len(jobs)} shown, newest first; refreshes every {REFRESH_S} s; "
            f"<a href='/api/jobs'>JSON</a> &middot; <a href='/metrics'>metrics</a></small></p>")
    return _page("segmap jobs", body)


def job_detail_page(store: JobStore, job: Job) -> bytes:
    fields = job.as_dict()
    timings = fields.pop("timings")
    for name in ("received_at", "created_at", "updated_at", "started_at", "run_finished_at", "finished_at",
                 "export_started_at", "next_attempt_at", "lease_expires"):
        fields[name] = _when(fields[name])
    fields["age"], fields["duration"] = human_seconds(job.age_s), human_seconds(job.duration_s)
    rows = "".join(f"<tr><th>{_E(k)}</th><td>{_E(_text(v))}</td></tr>" for k, v in fields.items())
    timing_rows = "".join(f"<tr><th>{_E(k)}</th><td class=num>{v:.3f} s</td></tr>" for k, v in timings.items())
    log_text = redact_patient_lines(job_log(store, job))
    body = (f"<p><a href='/'>&larr; all jobs</a></p><h1>job <code>{_E(job.key[:12])}</code> "
            f"<span class='state-{_E(job.state)}'>{_E(job.state)}</span></h1>"
            f"<table>{rows}</table><h2>timings</h2><table>{timing_rows or '<tr><td>none yet</td></tr>'}</table>"
            f"<h2>log</h2><pre>{_E(log_text) or '(empty)'}</pre>")
    return _page(f"segmap job {job.key[:12]}", body, refresh=job.state in UNFINISHED)


# --------------------------------------------------------------------------------------------------- server
class _Handler(BaseHTTPRequestHandler):
    server: "WebServer"
    server_version = "segmap"
    sys_version = ""

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
        try:
            status, body, ctype = self._route(store, path, query)
        except STORE_ERRORS as e:
            log.warning("web: job store unreadable (%s)", first_line(e))
            status, body, ctype = (HTTPStatus.SERVICE_UNAVAILABLE, f"job store unreadable: {first_line(e)}\n".encode(),
                                   "text/plain; charset=utf-8")
        finally:
            store.close()  # each request runs in its own thread; its SQLite connection ends with it
        self._send(status, body, ctype, head=head)

    def _route(self, store: JobStore, path: str, query: dict) -> tuple[int, bytes, str]:
        state = (query.get("state") or [None])[0]
        if state is not None and state not in tuple(State):
            return HTTPStatus.BAD_REQUEST, f"unknown state {state!r}; one of {', '.join(State)}\n".encode(), \
                "text/plain; charset=utf-8"
        if path == "/":
            return HTTPStatus.OK, job_list_page(store, state), "text/html; charset=utf-8"
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
                job = store.get_job(ref) if ref else None
                if job is None:
                    message = f"no job {ref!r} (give a job id, its key or a unique key prefix of 6+ characters)"
                    if api:
                        return HTTPStatus.NOT_FOUND, _json({"error": message}), "application/json"
                    return HTTPStatus.NOT_FOUND, _page("not found", f"<p>{_E(message)}</p><p><a href='/'>all jobs"
                                                                     f"</a></p>", refresh=False), \
                        "text/html; charset=utf-8"
                if api:
                    doc = {**job.as_dict(), "log": redact_patient_lines(job_log(store, job))}
                    return HTTPStatus.OK, _json(doc), "application/json"
                return HTTPStatus.OK, job_detail_page(store, job), "text/html; charset=utf-8"
        return HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8"

    def _health(self, store: JobStore) -> tuple[int, bytes, str]:
        try:
            counts = store.count_by_state()
        except STORE_ERRORS as e:
            doc = {"status": "error", "error": f"job store unreadable: {first_line(e)}", "store": str(store)}
            return HTTPStatus.SERVICE_UNAVAILABLE, _json(doc), "application/json"
        doc = {"status": "ok", "store": str(store), "jobs": counts,  # str(store) hides a database password
               "uptime_s": round(time.monotonic() - self.server.started, 1)}
        return HTTPStatus.OK, _json(doc), "application/json"

    def _send(self, status: int, body: bytes, ctype: str, head: bool = False, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # No scripts at all: even an escaped value that slipped through could not run.
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
        log.debug("%s %s", self.address_string(), format % args)


def _json(doc) -> bytes:
    return (json.dumps(doc, indent=1, default=str) + "\n").encode()


class WebServer(ThreadingHTTPServer):
    """The operations web server over one job store; ``serve_in_thread()`` starts it, ``shutdown()`` stops it."""

    daemon_threads = True

    def __init__(self, store: JobStore, host: str, port: int):
        self.store = store
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(store))
        self.started = time.monotonic()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_in_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="segmap-web", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self) -> None:
        if self._thread is not None:
            super().shutdown()
            self._thread.join(10)
            self._thread = None
        self.server_close()


def make_server(store: JobStore, host: str = "127.0.0.1", port: int = 8642) -> WebServer:
    """The web server bound to ``host:port`` (port 0: any free port; see ``.url``). Not started yet."""
    return WebServer(store, host, port)
