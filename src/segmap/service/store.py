"""The durable job store (SQLite in WAL mode): series versions, their instances, jobs and the intake cursors.

Two engines behind one class: SQLite (WAL) for one machine, PostgreSQL (``postgresql://...``) for several workers on
several hosts. Every state change is one transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL row locks, ``FOR UPDATE
SKIP LOCKED`` to claim, an advisory lock per series to record instances), so a ``kill -9`` at any point leaves either
the state before or the state after, never half of it. The schema is versioned (:data:`MIGRATIONS`) and brought up
to date when a store is opened. The job state machine is
:mod:`.states`: every change of a job's state goes through :meth:`JobStore._transition`, which refuses (with
:class:`~segmap.service.states.IllegalTransition`, changing nothing) a move that :data:`~.states.TRANSITIONS` lacks.

A job's ``key`` (:func:`segmap.service.keys.job_key`) is UNIQUE: the same input for the same MAP image is never queued
twice. A series arrives as instances; instances of a series whose last version is closed open a new version, which
starts from the closed version's instances (the whole series as now known) -- an unchanged re-send therefore gives
the same key and no new job, one more instance a new key and a new job.

Why not a queue library (procrastinate, persist-queue): the job is a state machine with more states than
queued/done (running, exporting with per-destination delivery, superseded, cancelled), its key must be UNIQUE across
every version of a series, and the same code must run on SQLite (one machine, nothing to operate) and PostgreSQL;
procrastinate is PostgreSQL-only and owns its own job table, so the state would live in two places.

Leases: the worker that claims a job holds it until ``lease_expires``; it renews the lease while it works
(:meth:`JobStore.heartbeat`, called from a thread of its own that never waits for the loop's tick). A job whose lease
ran out may be taken over by any worker (:meth:`JobStore.held_jobs`). Lease times are set and compared on the
database's clock (SQLite's ``julianday('now')``, PostgreSQL's ``now()``), never on each host's: two hosts whose
clocks disagree still agree on who holds a job. (A caller that passes ``now``, as the tests do, uses that instead.)

Series that cannot be closed yet (Orthanc unreachable, the engine down, the image missing, a spool file gone) stay
open with their reason (:meth:`JobStore.hold_series`), are retried with back-off and counted
(:meth:`JobStore.count_unprocessed_series`); a re-send of any of their instances retries them at once.

Retention (:meth:`JobStore.jobs_past_retention`, :meth:`JobStore.series_past_retention`): the files of finished jobs
and of their series are deleted after the configured days; the job rows, their events and the series' decisions stay.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from segmap.errors import ServiceConfigError
from segmap.privacy import redact, strip_userinfo
from segmap.text import first_line, one_line

from .states import RETRYABLE, UNFINISHED, State, check_transition, sql_in

#: Jobs a worker holds a lease on.
_HELD = sql_in((State.RUNNING, State.EXPORTING))

#: Schema migrations, applied in order when a store is opened: (version, statements). ``{id}`` and ``{real}`` are the
#: engine's auto-increment key and floating-point types, ``{job_states}`` the :class:`~.states.State` values. Never edit a released step; append a new one.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE cursors (source TEXT PRIMARY KEY, last_seq BIGINT NOT NULL, updated_at {real} NOT NULL)""",
        """CREATE TABLE series (
            id {id}, source TEXT NOT NULL, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
            version INTEGER NOT NULL, modality TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL CHECK (state IN ('collecting', 'closed')),
            first_seen {real} NOT NULL, last_seen {real} NOT NULL, stable_at {real}, closed_at {real}, decision TEXT,
            UNIQUE (source, series_uid, version))""",
        """CREATE INDEX series_collecting ON series (state, last_seen)""",
        """CREATE TABLE instances (
            series_id BIGINT NOT NULL REFERENCES series (id), sop_uid TEXT NOT NULL,
            path TEXT, remote_id TEXT, calling_ae TEXT, received_at {real} NOT NULL,
            PRIMARY KEY (series_id, sop_uid))""",
        """CREATE TABLE jobs (
            id {id}, key TEXT NOT NULL UNIQUE,
            map_name TEXT NOT NULL, image TEXT NOT NULL, image_digest TEXT NOT NULL,
            series_id BIGINT NOT NULL REFERENCES series (id),
            study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, version INTEGER NOT NULL,
            instance_count INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({job_states})),
            attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
            next_attempt_at {real}, lease_owner TEXT, lease_expires {real}, worker TEXT, node TEXT,
            received_at {real} NOT NULL, created_at {real} NOT NULL, updated_at {real} NOT NULL,
            started_at {real}, run_finished_at {real}, finished_at {real}, export_started_at {real},
            exit_code INTEGER, error TEXT, run_name TEXT NOT NULL, log_path TEXT, output_dir TEXT,
            seg_series_uid TEXT NOT NULL, destinations TEXT NOT NULL, delivered TEXT NOT NULL DEFAULT '[]')""",
        """CREATE INDEX jobs_state ON jobs (state, next_attempt_at)""",
        """CREATE INDEX jobs_seg_series ON jobs (seg_series_uid)""",
        """CREATE TABLE events (
            id {id}, job_id BIGINT NOT NULL REFERENCES jobs (id), at {real} NOT NULL,
            state TEXT NOT NULL, message TEXT NOT NULL)""",
    ]),
    (2, [  # series that cannot be closed yet (held, with a reason and a retry time); retention's marks
        "ALTER TABLE series ADD COLUMN held_reason TEXT",
        "ALTER TABLE series ADD COLUMN held_since {real}",
        "ALTER TABLE series ADD COLUMN retry_at {real}",
        "ALTER TABLE series ADD COLUMN purged_at {real}",
        "ALTER TABLE jobs ADD COLUMN purged_at {real}",
        "CREATE INDEX instances_path ON instances (path)",
        "CREATE INDEX jobs_series ON jobs (series_id)",
        "CREATE INDEX series_purge ON series (state, purged_at)",
    ]),
    # Study-level jobs (:mod:`.studies`): what each multi-modality MAP made of a study, and which series versions
    # are a study job's input. No foreign keys, so that retention may delete jobs and series in any order.
    (3, [
        """CREATE TABLE studies (
            id {id}, study_uid TEXT NOT NULL, map_name TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('waiting', 'complete', 'failed', 'none')),
            first_seen {real} NOT NULL, evaluated_at {real}, seen_closed_at {real} NOT NULL, decision TEXT,
            lacking TEXT, job_key TEXT, UNIQUE (study_uid, map_name))""",
        """CREATE TABLE job_inputs (
            job_key TEXT NOT NULL, input_order INTEGER NOT NULL, modality_key TEXT NOT NULL, series_id BIGINT NOT NULL,
            PRIMARY KEY (job_key, modality_key))""",
        """CREATE INDEX series_study ON series (study_uid)""",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class Arrival:
    """One instance that reached the service (no patient data: UIDs, modality and where the file is)."""

    source: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str = ""
    path: str | None = None
    remote_id: str | None = None
    calling_ae: str | None = None


@dataclass(frozen=True)
class SeriesVersion:
    """One version of a series: the instances known when it was closed (or so far, while ``collecting``)."""

    id: int
    source: str
    study_uid: str
    series_uid: str
    version: int
    modality: str
    state: str
    first_seen: float
    last_seen: float
    stable_at: float | None
    instance_count: int
    #: What routing decided when the version was closed ("spleen: job; liver: no job, ...").
    decision: str | None = None
    #: Why an open version could not be closed yet (None: nothing went wrong), and when it is tried again.
    held_reason: str | None = None
    retry_at: float | None = None
    #: When retention deleted its files (None: not yet).
    purged_at: float | None = None


@dataclass(frozen=True)
class Instance:
    sop_uid: str
    path: str | None
    remote_id: str | None


@dataclass(frozen=True)
class NewJob:
    """What :meth:`JobStore.close_series` needs to queue a job (the key is computed by the caller)."""

    key: str
    map_name: str
    image: str
    image_digest: str
    run_name: str
    seg_series_uid: str
    destinations: tuple[str, ...]
    max_attempts: int
    output_dir: str
    log_path: str


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    map_name: str
    image: str
    image_digest: str
    series_id: int
    study_uid: str
    series_uid: str
    version: int
    instance_count: int
    state: State
    attempts: int
    max_attempts: int
    next_attempt_at: float | None
    lease_owner: str | None
    lease_expires: float | None
    worker: str | None
    node: str | None
    received_at: float
    created_at: float
    updated_at: float
    started_at: float | None
    run_finished_at: float | None
    finished_at: float | None
    export_started_at: float | None
    exit_code: int | None
    error: str | None
    run_name: str
    log_path: str | None
    output_dir: str | None
    seg_series_uid: str
    destinations: tuple[str, ...]
    delivered: tuple[str, ...]
    timings: dict = field(default_factory=dict)
    #: When retention deleted the job's output (and, with its series, its input images); None: not yet.
    purged_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state not in UNFINISHED

    @property
    def age_s(self) -> float:
        return time.time() - self.created_at

    @property
    def duration_s(self) -> float | None:
        """From queued to finished (or to now while unfinished)."""
        return (self.finished_at or time.time()) - self.created_at

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["destinations"], d["delivered"] = list(self.destinations), list(self.delivered)
        return d


def _timings(row: sqlite3.Row) -> dict:
    def span(a, b):
        return round(row[b] - row[a], 3) if row[a] is not None and row[b] is not None else None

    t = {"received_to_queued": span("received_at", "created_at"), "queued_to_started": span("created_at", "started_at"),
         "run": span("started_at", "run_finished_at"), "export": span("run_finished_at", "finished_at"),
         "total": span("received_at", "finished_at")}
    return {k: v for k, v in t.items() if v is not None}


#: The spans :meth:`JobStore.timing_histogram` counts: (start column, end column, job states it applies to; empty: all).
TIMINGS = {
    "total": ("received_at", "finished_at", (State.DONE, State.FAILED)),
    "queued_to_started": ("created_at", "started_at", ()),
    "run": ("started_at", "run_finished_at", ()),
    "export": ("run_finished_at", "finished_at", (State.DONE,)),
}


def _bucket_of(value: str, bounds: Sequence[float], lo: int = 0, hi: int | None = None) -> str:
    """SQL for the index of the first of ``bounds`` that ``value`` is at most (``len(bounds)``: above all of them),
    as a binary search of nested ``CASE`` expressions."""
    hi = len(bounds) if hi is None else hi
    if lo == hi:
        return str(lo)
    mid = (lo + hi) // 2
    return (f"(CASE WHEN {value} <= {float(bounds[mid])!r} THEN {_bucket_of(value, bounds, lo, mid)} "
            f"ELSE {_bucket_of(value, bounds, mid + 1, hi)} END)")


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["destinations"] = tuple(json.loads(d["destinations"]))
    d["delivered"] = tuple(json.loads(d["delivered"]))
    d["state"] = State(d["state"])
    d["error"] = redact(d["error"])  # written redacted; a row from an older segmap may not be
    return Job(**d, timings=_timings(row))


class _SQLite:
    """One file, WAL; ``BEGIN IMMEDIATE`` serialises writers (processes and threads alike)."""

    name, id_type, real_type, skip_locked = "sqlite", "INTEGER PRIMARY KEY", "REAL", ""
    #: The database's clock in seconds since the epoch (leases are compared on it, not on each host's).
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.path)

    def connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def begin(self, db) -> None:
        db.execute("BEGIN IMMEDIATE")

    def lock_series(self, db, source: str, series_uid: str) -> None:
        """Nothing to do: the write transaction already excludes every other writer."""


class _PgConnection:
    """A psycopg connection that takes the store's ``?`` placeholders and answers rows as dicts."""

    def __init__(self, raw):
        self.raw = raw

    def execute(self, sql: str, params: Sequence = ()):
        return self.raw.execute(sql.replace("?", "%s"), tuple(params))

    def close(self) -> None:
        self.raw.close()


class _Postgres:
    """Several workers on several hosts: row locks decide who claims what (``FOR UPDATE SKIP LOCKED``)."""

    name, id_type, real_type, skip_locked = "postgresql", "BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION", \
        " FOR UPDATE SKIP LOCKED"
    now_sql = "CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)"

    def __init__(self, url: str):
        self.url = url

    def __str__(self) -> str:
        return strip_userinfo(self.url)  # never print a password (user-info or ?password=)

    def connect(self):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise ServiceConfigError("a postgresql:// job store needs psycopg: pip install 'segmap[service]'") from None
        try:
            raw = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.OperationalError as e:
            raise ServiceConfigError(f"cannot connect to the job store {self}: {first_line(e)}") from None
        return _PgConnection(raw)

    def begin(self, db) -> None:
        db.execute("BEGIN")

    def lock_series(self, db, source: str, series_uid: str) -> None:
        # Two intake threads or hosts recording instances of one series must not both open a new version.
        db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"{source}\n{series_uid}",))


def is_database_url(text: str) -> bool:
    return str(text).startswith(("postgresql://", "postgres://"))


class JobStore:
    """The job store: a SQLite file (``path``) or a PostgreSQL database (``postgresql://...``), with its schema
    brought up to date when opened. Safe to share between threads (one connection per thread)."""

    def __init__(self, location: str | Path):
        self.engine = _Postgres(str(location)) if is_database_url(str(location)) else _SQLite(Path(location))
        self.path = location
        self._local = threading.local()
        self._migrate()

    def __str__(self) -> str:
        return f"{self.engine.name} job store {self.engine}"

    def _migrate(self) -> None:
        db = self._db()
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        with self._tx() as db:
            if self.engine.name == "postgresql":  # several workers may start at once
                db.execute("LOCK TABLE meta IN EXCLUSIVE MODE")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row["value"]) if row else 0
            if current > SCHEMA_VERSION:
                raise ServiceConfigError(f"{self}: schema version {current} is newer than this segmap's "
                                         f"({SCHEMA_VERSION}); upgrade segmap")
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for sql in statements:
                    db.execute(sql.format(id=self.engine.id_type, real=self.engine.real_type, job_states=sql_in(State)))
                db.execute("DELETE FROM meta WHERE key = 'schema_version'")
                db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),))

    def schema_version(self) -> int:
        row = self._db().execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row["value"])

    # ------------------------------------------------------------------------------------------- plumbing
    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = self.engine.connect()
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator:
        db = self._db()
        self.engine.begin(db)
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @staticmethod
    def _event(db, job_id: int, state: str, message: str, now: float) -> None:
        message = redact(message)  # a container's error line may carry patient data or a URL's password
        db.execute("INSERT INTO events (job_id, at, state, message) VALUES (?, ?, ?, ?)", (job_id, now, state, message))

    # ------------------------------------------------------------------------------------------- intake
    def record_instance(self, arrival: Arrival, now: float | None = None) -> bool:
        """Record one arrived instance; True when it is new (False: already part of the series' latest version)."""
        with self._tx() as db:
            return self._record(db, arrival, time.time() if now is None else now)

    def _record(self, db, a: Arrival, now: float) -> bool:
        if not (a.source and a.study_uid and a.series_uid and a.sop_uid):
            raise ValueError(f"an arrival needs its source and study, series and SOP Instance UIDs, got {a}")
        self.engine.lock_series(db, a.source, a.series_uid)
        row = db.execute("SELECT id, state, version, decision, purged_at FROM series WHERE source = ? AND "
                         "series_uid = ? ORDER BY version DESC LIMIT 1", (a.source, a.series_uid)).fetchone()
        if row is not None and row["state"] == "collecting":
            series_id = row["id"]
        else:
            if row is not None:
                known = db.execute("SELECT path FROM instances WHERE series_id = ? AND sop_uid = ?",
                                   (row["id"], a.sop_uid)).fetchone()
                if known is not None and not self._abandoned(db, row):
                    if a.path and not known["path"]:
                        db.execute("UPDATE instances SET path = ? WHERE series_id = ? AND sop_uid = ?",
                                   (a.path, row["id"], a.sop_uid))
                        if row["purged_at"] is not None:  # the file is back: retention deletes it again
                            db.execute("UPDATE series SET purged_at = NULL WHERE id = ?", (row["id"],))
                    return False  # a repeat of an instance the latest version already holds
            version = row["version"] + 1 if row is not None else 1
            cur = db.execute("INSERT INTO series (source, study_uid, series_uid, version, modality, state, first_seen, "
                             "last_seen) VALUES (?, ?, ?, ?, ?, 'collecting', ?, ?) RETURNING id",
                             (a.source, a.study_uid, a.series_uid, version, a.modality, now, now))
            series_id = cur.fetchone()["id"]
            if row is not None:  # the new version starts as the whole series known so far
                db.execute("INSERT INTO instances (series_id, sop_uid, path, remote_id, calling_ae, received_at) "
                           "SELECT ?, sop_uid, path, remote_id, calling_ae, received_at FROM instances "
                           "WHERE series_id = ?", (series_id, row["id"]))
        cur = db.execute("INSERT INTO instances (series_id, sop_uid, path, remote_id, calling_ae, "
                         "received_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                         (series_id, a.sop_uid, a.path, a.remote_id, a.calling_ae, now))
        if cur.rowcount:
            db.execute("UPDATE series SET last_seen = ?, retry_at = NULL, modality = CASE WHEN modality = '' THEN ? "
                       "ELSE modality END WHERE id = ?", (now, a.modality, series_id))
            return True
        # A re-send of a version that could not be closed: try it again at once (the cause may be gone).
        db.execute("UPDATE series SET retry_at = NULL WHERE id = ? AND retry_at IS NOT NULL", (series_id,))
        if a.path:
            db.execute("UPDATE instances SET path = COALESCE(path, ?) WHERE series_id = ? AND sop_uid = ?",
                       (a.path, series_id, a.sop_uid))
        return False

    def cursor(self, source: str) -> int:
        row = self._db().execute("SELECT last_seq FROM cursors WHERE source = ?", (source,)).fetchone()
        return int(row["last_seq"]) if row else 0

    def record_changes(self, source: str, last_seq: int, arrivals: Sequence[Arrival],
                       stable_series_uids: Iterable[str] = (), now: float | None = None) -> int:
        """Record a page of a change feed and move its cursor, in one transaction. Returns the new instances."""
        now = time.time() if now is None else now
        with self._tx() as db:
            new = sum(self._record(db, a, now) for a in arrivals)
            for uid in stable_series_uids:
                db.execute("UPDATE series SET stable_at = ? WHERE source = ? AND series_uid = ? AND state = "
                           "'collecting'", (now, source, uid))
            db.execute("INSERT INTO cursors (source, last_seq, updated_at) VALUES (?, ?, ?) ON CONFLICT (source) "
                       "DO UPDATE SET last_seq = excluded.last_seq, updated_at = excluded.updated_at",
                       (source, int(last_seq), now))
        return new

    def mark_stable(self, series_id: int, now: float | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET stable_at = ? WHERE id = ?", (time.time() if now is None else now, series_id))

    def set_instance_paths(self, series_id: int, paths: dict[str, str]) -> None:
        """Record where fetched instances of a version (by SOP Instance UID) now lie in the spool."""
        with self._tx() as db:
            for sop, path in paths.items():
                db.execute("UPDATE instances SET path = ? WHERE sop_uid = ? AND series_id IN (SELECT id FROM series "
                           "WHERE series_uid = (SELECT series_uid FROM series WHERE id = ?))", (path, sop, series_id))

    def due_series(self, quiet_s: float, now: float | None = None) -> list[SeriesVersion]:
        """Collecting versions with no new instance for ``quiet_s`` seconds, oldest first."""
        now = time.time() if now is None else now
        rows = self._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "WHERE state = 'collecting' AND last_seen <= ? AND (retry_at IS NULL OR retry_at <= ?) ORDER BY last_seen",
            (now - quiet_s, now)).fetchall()
        return [_series(r) for r in rows]

    def series_version(self, series_id: int) -> SeriesVersion:
        row = self._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "WHERE id = ?", (series_id,)).fetchone()
        return _series(row)

    def instances(self, series_id: int) -> list[Instance]:
        rows = self._db().execute("SELECT sop_uid, path, remote_id FROM instances WHERE series_id = ? ORDER BY sop_uid",
                                  (series_id,)).fetchall()
        return [Instance(r["sop_uid"], r["path"], r["remote_id"]) for r in rows]

    def newer_version(self, series_id: int) -> SeriesVersion | None:
        """A later version of the same series (more instances arrived), if any."""
        row = self._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "JOIN series o ON o.id = ? WHERE s.source = o.source AND s.series_uid = o.series_uid "
            "AND s.version > o.version ORDER BY s.version DESC LIMIT 1", (series_id,)).fetchone()
        return _series(row) if row else None

    def close_series(self, series_id: int, jobs: Sequence[NewJob], decision: str, *, instance_count: int,
                     now: float | None = None) -> tuple[list[str], list[str]] | None:
        """Close a version and queue its jobs in one transaction: (keys queued now, keys that already existed).

        ``instance_count`` is how many instances the caller saw (and computed the keys from); when more arrived
        meanwhile nothing happens and None is returned (the caller looks again after the quiet period).
        """
        now = time.time() if now is None else now
        created, existing = [], []
        with self._tx() as db:
            s = db.execute("SELECT * FROM series WHERE id = ?", (series_id,)).fetchone()
            if s["state"] != "collecting":
                return [], []
            count = db.execute("SELECT COUNT(*) AS n FROM instances WHERE series_id = ?",
                               (series_id,)).fetchone()["n"]
            if count != instance_count:
                return None
            db.execute("UPDATE series SET state = 'closed', closed_at = ?, decision = ? WHERE id = ?",
                       (now, decision, series_id))
            for j in jobs:
                cur = db.execute(
                    "INSERT INTO jobs (key, map_name, image, image_digest, series_id, study_uid, series_uid, "
                    "version, instance_count, state, max_attempts, received_at, created_at, updated_at, run_name, "
                    "log_path, output_dir, seg_series_uid, destinations) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    f"'{State.QUEUED}', ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                    (j.key, j.map_name, j.image, j.image_digest, series_id, s["study_uid"], s["series_uid"],
                     s["version"], count, j.max_attempts, s["last_seen"], now, now, j.run_name, j.log_path,
                     j.output_dir, j.seg_series_uid, json.dumps(list(j.destinations))))
                inserted = cur.fetchone()
                if inserted:
                    created.append(j.key)
                    self._event(db, inserted["id"], State.QUEUED, f"series version {s['version']} complete "
                                                             f"({count} instances)", now)
                else:
                    existing.append(j.key)
        return created, existing

    def is_our_output(self, series_uid: str) -> bool:
        """True when ``series_uid`` is the SEG series of one of our jobs."""
        return self._db().execute("SELECT 1 FROM jobs WHERE seg_series_uid = ? LIMIT 1",
                                  (series_uid,)).fetchone() is not None

    # ------------------------------------------------------------------------------------------- jobs
    def claim(self, worker: str, lease_s: float, max_running: int, now: float | None = None,
              node: str | None = None) -> Job | None:
        """Take the oldest due queued job for ``worker`` when fewer than ``max_running`` of its jobs run."""
        clock, clock_args = self._lease_clock(now)
        now = time.time() if now is None else now
        with self._tx() as db:
            running = db.execute(f"SELECT COUNT(*) AS n FROM jobs WHERE state = '{State.RUNNING}' AND lease_owner = ?",
                                 (worker,)).fetchone()["n"]
            if running >= max_running:
                return None
            row = db.execute(f"SELECT id FROM jobs WHERE state = '{State.QUEUED}' AND (next_attempt_at IS NULL OR "
                             "next_attempt_at <= ?) ORDER BY created_at, id LIMIT 1" + self.engine.skip_locked,
                             (now,)).fetchone()
            if row is None:
                return None
            check_transition(str(row["id"]), State.QUEUED, State.RUNNING)
            db.execute(f"UPDATE jobs SET state = '{State.RUNNING}', attempts = attempts + 1, lease_owner = ?, "
                       f"lease_expires = {clock} + ?, worker = ?, node = COALESCE(?, node), started_at = ?, "
                       "run_finished_at = NULL, exit_code = NULL, error = NULL, next_attempt_at = NULL, updated_at = ? "
                       "WHERE id = ?", (worker, *clock_args, lease_s, worker, node, now, now, row["id"]))
            self._event(db, row["id"], State.RUNNING, f"claimed by {worker}", now)
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def held_jobs(self, worker: str, lease_s: float, now: float | None = None) -> list[Job]:
        """Running/exporting jobs this worker holds, after taking over those whose holder's lease ran out."""
        clock, clock_args = self._lease_clock(now)
        now = time.time() if now is None else now
        with self._tx() as db:
            stale = db.execute(f"SELECT id, lease_owner FROM jobs WHERE state IN ({_HELD}) AND "
                               f"lease_owner != ? AND lease_expires < {clock}", (worker, *clock_args)).fetchall()
            for r in stale:
                db.execute(f"UPDATE jobs SET lease_owner = ?, lease_expires = {clock} + ?, worker = ?, updated_at = ? "
                           f"WHERE id = ? AND lease_expires < {clock}",
                           (worker, *clock_args, lease_s, worker, now, r["id"], *clock_args))
                self._event(db, r["id"], "takeover", f"{worker} took over from {r['lease_owner']} (lease expired)", now)
            db.execute(f"UPDATE jobs SET lease_expires = {clock} + ? WHERE lease_owner = ? AND state IN ({_HELD})",
                       (*clock_args, lease_s, worker))
            rows = db.execute(f"SELECT * FROM jobs WHERE lease_owner = ? AND state IN ({_HELD}) "
                              "ORDER BY id", (worker,)).fetchall()
        return [_job(r) for r in rows]

    # ------------------------------------------------------------------------------------------- leases
    def _lease_clock(self, now: float | None) -> tuple[str, tuple]:
        """(SQL expression, its arguments) for "now" in lease arithmetic: the database's clock, or ``now`` when
        the caller gives one (tests that move time by hand)."""
        return (self.engine.now_sql, ()) if now is None else ("?", (float(now),))

    def heartbeat(self, worker: str, lease_s: float, now: float | None = None) -> int:
        """Renew the leases of every job ``worker`` holds to ``lease_s`` from now (the database's clock); returns
        how many. A job taken over meanwhile is no longer ``worker``'s and is not renewed."""
        clock, clock_args = self._lease_clock(now)
        with self._tx() as db:
            cur = db.execute(f"UPDATE jobs SET lease_expires = {clock} + ? WHERE lease_owner = ? AND "
                             f"state IN ({_HELD})", (*clock_args, lease_s, worker))
            return cur.rowcount

    def database_time(self) -> float:
        """The database's clock (seconds since the epoch): what lease times are compared with."""
        return float(self._db().execute(f"SELECT {self.engine.now_sql} AS t").fetchone()["t"])

    def _transition(self, job: Job, worker: str | None, new_state: State, message: str, now: float | None,
                    **columns) -> Job | None:
        """Move ``job`` to ``new_state`` if it is still where the caller saw it (and held by ``worker``).

        A move that :data:`~.states.TRANSITIONS` lacks raises :class:`~.states.IllegalTransition` before anything
        is written."""
        check_transition(job.key[:12], job.state, new_state)
        now = time.time() if now is None else now
        if columns.get("error"):
            columns["error"] = redact(columns["error"])  # so that a dump of the store is clean too
        sets = ", ".join(f"{k} = ?" for k in columns)
        with self._tx() as db:
            where = "id = ? AND state = ?" + (" AND lease_owner = ?" if worker else "")
            args = [job.id, job.state] + ([worker] if worker else [])
            cur = db.execute(f"UPDATE jobs SET state = ?, updated_at = ?{', ' + sets if sets else ''} WHERE {where}",
                             [new_state, now, *columns.values(), *args])
            if not cur.rowcount:
                return None
            self._event(db, job.id, new_state, message, now)
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone())

    def run_succeeded(self, job: Job, worker: str, exit_code: int = 0, node: str | None = None,
                      run_finished_at: float | None = None, now: float | None = None) -> Job | None:
        """``run_finished_at``: when the container exited, if the runner knows (else now)."""
        now = time.time() if now is None else now
        return self._transition(job, worker, State.EXPORTING, f"run finished (exit {exit_code})", now,
                                exit_code=exit_code, run_finished_at=run_finished_at or now, export_started_at=now,
                                next_attempt_at=None, node=node or job.node)

    def run_failed(self, job: Job, worker: str, error: str, exit_code: int | None, retry_after_s: float,
                   node: str | None = None, now: float | None = None) -> Job | None:
        """Back to queued (after ``retry_after_s``) while attempts are left, else failed."""
        now = time.time() if now is None else now
        error = one_line(error, 500)
        if job.attempts < job.max_attempts:
            return self._transition(job, worker, State.QUEUED, f"attempt {job.attempts} failed: {error}; retry in "
                                                          f"{retry_after_s:.0f} s", now,
                                    exit_code=exit_code, error=error, run_finished_at=now, lease_owner=None,
                                    lease_expires=None, next_attempt_at=now + retry_after_s, node=node or job.node)
        return self._transition(job, worker, State.FAILED, f"attempt {job.attempts} failed, no attempts left: {error}", now,
                                exit_code=exit_code, error=error, run_finished_at=now, finished_at=now,
                                lease_owner=None, lease_expires=None, node=node or job.node)

    def delivered_to(self, job: Job, worker: str, destination: str, now: float | None = None) -> Job | None:
        now = time.time() if now is None else now
        delivered = sorted(set(job.delivered) | {destination})
        return self._transition(job, worker, State.EXPORTING, f"confirmed at {destination}", now,
                                delivered=json.dumps(delivered), error=None)

    def export_done(self, job: Job, worker: str, now: float | None = None) -> Job | None:
        now = time.time() if now is None else now
        return self._transition(job, worker, State.DONE, "every destination confirmed the result", now,
                                finished_at=now, lease_owner=None, lease_expires=None, error=None)

    def export_retry(self, job: Job, worker: str, error: str, retry_after_s: float,
                     now: float | None = None) -> Job | None:
        now = time.time() if now is None else now
        return self._transition(job, worker, State.EXPORTING, f"export will be retried in {retry_after_s:.0f} s: "
                                                          f"{one_line(error, 500)}", now,
                                error=one_line(error, 500), next_attempt_at=now + retry_after_s)

    def export_failed(self, job: Job, worker: str, error: str, now: float | None = None) -> Job | None:
        now = time.time() if now is None else now
        return self._transition(job, worker, State.FAILED, f"export failed: {one_line(error, 500)}", now,
                                error=one_line(error, 500), finished_at=now, lease_owner=None, lease_expires=None)

    def cancel(self, key: str, now: float | None = None) -> Job | None:
        """Cancel an unfinished job (any holder); returns the job as it is now, or None when not found."""
        job = self.get_job(key)
        if job is None or job.finished:
            return job
        return self._transition(job, None, State.CANCELLED, "cancelled by an operator", now,
                                finished_at=time.time() if now is None else now, lease_owner=None,
                                lease_expires=None) or self.get_job(key)

    def supersede(self, job: Job, worker: str, newer_version: int, now: float | None = None) -> Job | None:
        return self._transition(job, worker, State.CANCELLED, f"superseded: version {newer_version} of the series has more "
                                                          f"instances", now,
                                error=f"superseded by series version {newer_version}",
                                finished_at=time.time() if now is None else now, lease_owner=None, lease_expires=None)

    def retry(self, key: str, now: float | None = None) -> Job | None:
        """Queue a failed or cancelled job again with fresh attempts."""
        job = self.get_job(key)
        if job is None or job.state not in RETRYABLE:
            return job
        return self._transition(job, None, State.QUEUED, "retry requested by an operator", now, attempts=0,
                                next_attempt_at=None, finished_at=None, error=None, exit_code=None,
                                delivered="[]") or self.get_job(key)

    # ------------------------------------------------------------------------------------------- reading
    def get_job(self, ref: str | int) -> Job | None:
        """A job by id, full key, or a unique key prefix (at least 6 characters)."""
        db = self._db()
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and len(ref) < 6):
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(ref),)).fetchone()
            return _job(row) if row else None
        ref = str(ref).removeprefix("segmap-")
        if len(ref) < 6:
            return None
        rows = db.execute("SELECT * FROM jobs WHERE key LIKE ? LIMIT 2", (ref + "%",)).fetchall()
        return _job(rows[0]) if len(rows) == 1 else None

    def list_jobs(self, states: Sequence[str] | None = None, limit: int = 200) -> list[Job]:
        db = self._db()
        if states:
            q = ",".join("?" * len(states))
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({q}) ORDER BY id DESC LIMIT ?",
                              (*states, limit)).fetchall()
        else:
            rows = db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def jobs_due_for_export(self, worker: str, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        rows = self._db().execute(f"SELECT * FROM jobs WHERE state = '{State.EXPORTING}' AND lease_owner = ? AND "
                                  "(next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id",
                                  (worker, now)).fetchall()
        return [_job(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(State, 0)
        for row in self._db().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def oldest_queued_at(self) -> float | None:
        """When the oldest queued job was queued (None when none is)."""
        row = self._db().execute(f"SELECT MIN(created_at) AS t FROM jobs WHERE state = '{State.QUEUED}'").fetchone()
        return row["t"]

    def timing_histogram(self, timing: str, buckets: Sequence[float], by_state: bool = False
                         ) -> dict[tuple[str, ...], tuple[list[int], int, float]]:
        """A histogram of one of :data:`TIMINGS` over every job that has it, counted by the database (a scrape of
        100,000 jobs loads none of them): ``{labels: (cumulative count per bucket, count, sum)}``, labels ``(state,)``
        when ``by_state``. Each job's span is computed once and placed in its bucket by a binary search written as
        nested ``CASE`` (four comparisons for fourteen buckets; SQLite has no ``width_bucket``)."""
        start, end, states = TIMINGS[timing]
        where = f"{start} IS NOT NULL AND {end} IS NOT NULL" + (f" AND state IN ({sql_in(states)})" if states else "")
        group = "state, " if by_state else ""
        rows = self._db().execute(
            f"SELECT {group}b, COUNT(*) AS n, SUM(v) AS total FROM (SELECT {group}v, {_bucket_of('v', buckets)} AS b "
            f"FROM (SELECT {group}{end} - {start} AS v FROM jobs WHERE {where}) AS spans) AS placed "
            f"GROUP BY {group}b").fetchall()
        out: dict[tuple[str, ...], tuple[list[int], int, float]] = {}
        for row in rows:
            labels = (row["state"],) if by_state else ()
            per_bucket, count, total = out.get(labels, ([0] * (len(buckets) + 1), 0, 0.0))
            per_bucket[row["b"]] += row["n"]
            out[labels] = (per_bucket, count + row["n"], total + float(row["total"]))
        return {labels: ([sum(per_bucket[:i + 1]) for i in range(len(buckets))], count, total)
                for labels, (per_bucket, count, total) in out.items()}

    def events(self, job: Job) -> list[dict]:
        rows = self._db().execute("SELECT at, state, message FROM events WHERE job_id = ? ORDER BY id", (job.id,))
        return [dict(r) for r in rows]

    def history(self, job: Job) -> list[str]:
        """The job's events, one line each (``2026-01-02 03:04:05Z running: claimed by w1``)."""
        return [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e['at']))}Z {e['state']}: {e['message']}"
                for e in self.events(job)]

    def series_versions(self, limit: int = 200) -> list[SeriesVersion]:
        rows = self._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_series(r) for r in rows]

    # ------------------------------------------------------------------------------------------- held series
    @staticmethod
    def _abandoned(db, series_row) -> bool:
        """A version an older release closed without jobs because it could not be closed ("abandoned: ..."): a
        re-send of its instances opens a new version instead of being a repeat."""
        decision = series_row["decision"] or ""
        if series_row["state"] != "closed" or not decision.startswith("abandoned:"):
            return False
        return db.execute("SELECT 1 FROM jobs WHERE series_id = ? LIMIT 1", (series_row["id"],)).fetchone() is None

    def hold_series(self, series_id: int, reason: str, retry_at: float, now: float | None = None) -> SeriesVersion:
        """Keep an open version open with the reason it could not be closed, until ``retry_at``; the version as it
        is now (``held_since``: when it first failed, kept across tries)."""
        now = time.time() if now is None else now
        reason = one_line(reason, 500)
        with self._tx() as db:
            db.execute("UPDATE series SET held_reason = ?, held_since = COALESCE(held_since, ?), retry_at = ?, "
                       "decision = ? WHERE id = ? AND state = 'collecting'",
                       (reason, now, retry_at, f"not closed yet: {reason}", series_id))
        return self.series_version(series_id)

    def held_since(self, series_id: int) -> float | None:
        row = self._db().execute("SELECT held_since FROM series WHERE id = ?", (series_id,)).fetchone()
        return row["held_since"] if row else None

    def count_unprocessed_series(self) -> int:
        """Open series versions that could not be closed (the ``segmap_series_unprocessed`` gauge)."""
        return int(self._db().execute("SELECT COUNT(*) AS n FROM series WHERE state = 'collecting' AND held_reason IS "
                                      "NOT NULL").fetchone()["n"])

    def held_series(self, limit: int = 200) -> list[SeriesVersion]:
        """The versions :meth:`count_unprocessed_series` counts, oldest first."""
        rows = self._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "WHERE state = 'collecting' AND held_reason IS NOT NULL ORDER BY held_since LIMIT ?", (limit,)).fetchall()
        return [_series(r) for r in rows]

    def latest_versions(self, series_uid: str) -> list[SeriesVersion]:
        """The latest version of ``series_uid`` from each source that sent it."""
        rows = self._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "WHERE series_uid = ? AND version = (SELECT MAX(version) FROM series o WHERE o.source = s.source AND "
            "o.series_uid = s.series_uid) ORDER BY source", (series_uid,)).fetchall()
        return [_series(r) for r in rows]

    def series_jobs(self, series_id: int) -> list[Job]:
        rows = self._db().execute("SELECT * FROM jobs WHERE series_id = ? ORDER BY id", (series_id,)).fetchall()
        return [_job(r) for r in rows]

    def retry_series_now(self, series_id: int) -> bool:
        """An open version tried again at the next tick; an abandoned one (see :meth:`_abandoned`) reopened.
        False when the version is neither."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE id = ?", (series_id,)).fetchone()
            if row is None:
                return False
            if row["state"] == "collecting":
                db.execute("UPDATE series SET retry_at = NULL WHERE id = ?", (series_id,))
                return True
            if not self._abandoned(db, row):
                return False
            db.execute("UPDATE series SET state = 'collecting', closed_at = NULL, retry_at = NULL, held_reason = ?, "
                       "held_since = ?, decision = ? WHERE id = ?",
                       (row["decision"], time.time(), f"not closed yet: {row['decision']}", series_id))
            return True

    # ------------------------------------------------------------------------------------------- retention
    def jobs_past_retention(self, done_before: float | None, failed_before: float | None,
                            limit: int = 100) -> list[Job]:
        """Finished jobs whose files retention has not deleted yet: done before ``done_before``, failed or
        cancelled before ``failed_before`` (None: kept for ever)."""
        clauses, args = [], []
        if done_before is not None:
            clauses.append(f"(state = '{State.DONE}' AND finished_at < ?)")
            args.append(done_before)
        if failed_before is not None:
            clauses.append(f"(state IN ('{State.FAILED}', '{State.CANCELLED}') AND finished_at < ?)")
            args.append(failed_before)
        if not clauses:
            return []
        rows = self._db().execute(f"SELECT * FROM jobs WHERE purged_at IS NULL AND ({' OR '.join(clauses)}) "
                                  "ORDER BY finished_at LIMIT ?", (*args, limit)).fetchall()
        return [_job(r) for r in rows]

    def mark_job_purged(self, job: Job, message: str, now: float | None = None) -> None:
        """Record that the job's files were deleted (its row and events stay); refused (no change) when the job
        was queued again meanwhile."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET purged_at = ? WHERE id = ? AND state = ? AND purged_at IS NULL",
                             (now, job.id, job.state))
            if cur.rowcount:
                self._event(db, job.id, "retention", message, now)

    def series_past_retention(self, closed_before: float | None, limit: int = 100) -> list[SeriesVersion]:
        """Closed versions whose files retention may delete: every job of theirs purged, or no job at all and
        closed before ``closed_before`` (None: those are kept)."""
        no_job = "" if closed_before is None else " OR (NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_id = s.id) " \
                                                   "AND s.closed_at < ?)"
        rows = self._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "WHERE s.state = 'closed' AND s.purged_at IS NULL AND ((EXISTS (SELECT 1 FROM jobs j WHERE j.series_id = "
            "s.id) AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_id = s.id AND j.purged_at IS NULL))"
            f"{no_job}) ORDER BY s.id LIMIT ?", (*(() if closed_before is None else (closed_before,)), limit)).fetchall()
        return [_series(r) for r in rows]

    def unshared_paths(self, series_id: int) -> list[str]:
        """The spool paths of a version's instances that no other version still needing its files refers to
        (versions of one series share the files of the instances they have in common)."""
        rows = self._db().execute(
            "SELECT i.path FROM instances i WHERE i.series_id = ? AND i.path IS NOT NULL AND NOT EXISTS (SELECT 1 "
            "FROM instances o JOIN series v ON v.id = o.series_id WHERE o.path = i.path AND o.series_id != i.series_id "
            "AND v.purged_at IS NULL)", (series_id,)).fetchall()
        return [r["path"] for r in rows]

    def mark_series_purged(self, series_id: int, deleted_paths: Iterable[str], now: float | None = None) -> None:
        """Record that a version's files were deleted: its instances no longer point at them (a re-send puts the
        path back), its decision and its jobs' rows stay."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE series SET purged_at = ? WHERE id = ?", (now, series_id))
            for path in deleted_paths:
                db.execute("UPDATE instances SET path = NULL WHERE path = ? AND series_id IN (SELECT id FROM series "
                           "WHERE purged_at IS NOT NULL)", (path,))


def _series(row: sqlite3.Row) -> SeriesVersion:
    keys = row.keys()
    return SeriesVersion(id=row["id"], source=row["source"], study_uid=row["study_uid"], series_uid=row["series_uid"],
                         version=row["version"], modality=row["modality"], state=row["state"],
                         first_seen=row["first_seen"], last_seen=row["last_seen"], stable_at=row["stable_at"],
                         instance_count=row["instance_count"], decision=row["decision"],
                         held_reason=row["held_reason"] if "held_reason" in keys else None,
                         retry_at=row["retry_at"] if "retry_at" in keys else None,
                         purged_at=row["purged_at"] if "purged_at" in keys else None)

