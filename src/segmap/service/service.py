"""``segmap serve``: the loop that turns complete series into MAP runs and delivered results.

Each tick, in order (every step reads the store and makes one transaction per change, so a ``kill -9`` anywhere
resumes at the next start):

1. **close** series versions quiet for ``quiet_period_s`` (Orthanc's: also stable -- its ``StableSeries`` change,
   or ``IsStable`` when the change was lost to an Orthanc restart); fetch what is still remote; route; queue one
   job per matching MAP (the key is UNIQUE, so an unchanged re-send queues nothing);
2. **advance** the jobs this worker holds (taking over those whose holder's lease ran out): a running job whose
   container is missing is started (its series re-checked: a newer version supersedes it), a finished container's
   result is collected;
3. **claim** queued jobs while container slots are free;
4. **export** finished results to their destinations until every destination confirmed every instance.

Containers and SEG UIDs are named after the job key, so after a restart a running container is adopted and a
re-sent SEG is the same instance at the destination.

Beside the tick: a heartbeat thread renews this worker's leases every third of ``lease_s`` however long a tick takes
(a slow destination, a slow engine), so a live worker's job is never taken over; retention deletes the files of jobs
finished long enough ago (at most once a minute); a failure that repeats is logged once with its traceback, then
once a minute (:class:`FailureLog`). A series that cannot be closed is never dropped: it stays open with its reason
(``segmap jobs series``), counted by :meth:`JobStore.count_unprocessed_series`, and is tried again with back-off, at
once when any of its instances is sent again, or on ``segmap jobs reprocess SERIES``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pydicom

from segmap.dicom.loading import scan_dicom_folder
from segmap.errors import DestinationUnavailable, ExportError, OrthancError, RunnerError, SegmapError
from segmap.orthanc import OrthancClient
from segmap.text import first_line, one_line

from .config import ServiceConfig
from .export import make_destination
from .intake.listener import DicomListener
from .intake.orthanc import OrthancFollower
from .keys import job_key, run_name, seg_uids
from .routing import load_routable_tasks, route
from .runners import make_runner
from .runners.base import RunSpec
from .spool import Spool
from .states import State
from .store import Job, JobStore, NewJob, SeriesVersion
from .studies import Loop, close_due_studies, study_input_dir
from .security import web_auth
from .web import make_server
from .workspace import append_attempt_log, fresh_folder

log = logging.getLogger("segmap.service")

#: How long a quiet Orthanc series may wait for Orthanc to call it stable before it counts as held (deleted there?).
UNSTABLE_AFTER_S = 600.0
#: How often retention looks for files to delete, and how often a repeating failure is summarised in the log.
RETENTION_EVERY_S = 60.0
SUMMARY_EVERY_S = 60.0
DAY_S = 86400.0


class FailureLog:
    """One line per distinct failure, not a flood: the first occurrence of a failure (by exception type and first
    line) is logged with its traceback, then one summary line per ``every_s`` while failures go on, and one line when
    the next try succeeds."""

    def __init__(self, what: str, logger: logging.Logger = log, every_s: float = SUMMARY_EVERY_S, clock=time.monotonic):
        self.what, self.log, self.every_s, self.clock = what, logger, every_s, clock
        self._since: float | None = None
        self._seen: set[tuple[str, str]] = set()
        self._count = 0  # failures since the last line
        self._total = 0
        self._last_line = 0.0

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        key = (type(exc).__name__, first_line(exc))
        self._total += 1
        if key not in self._seen:
            self._seen.add(key)
            self._since = now if self._since is None else self._since
            self._count, self._last_line = 0, now
            self.log.error("%s failed: %s: %s (logged once; a summary follows every %.0f s while it lasts)",
                           self.what, type(exc).__name__, one_line(exc, 300), self.every_s, exc_info=exc)
            return
        self._count += 1
        if now - self._last_line >= self.every_s:
            self.log.error("%s still failing for %.0f s: %s: %s (%d more time(s) since the last line)", self.what,
                           now - self._since, type(exc).__name__, one_line(exc, 300), self._count)
            self._count, self._last_line = 0, now

    def succeeded(self) -> None:
        if self._since is None:
            return
        self.log.warning("%s works again after %.0f s (%d failure(s))", self.what, self.clock() - self._since,
                         self._total)
        self._since, self._seen, self._count, self._total = None, set(), 0, 0


def seg_files(folder: Path) -> list[Path]:
    """The DICOM SEG instances a MAP wrote under ``folder`` (sorted)."""
    found = []
    for p in sorted(Path(folder).rglob("*.dcm")) if Path(folder).is_dir() else []:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 -- anything that is not a readable DICOM file is not a result
            continue
        if str(ds.get("Modality", "")) == "SEG":
            found.append(p)
    return found


class Service:
    """The job service of one worker. ``start()`` starts intake and the web page; ``run(stop)`` loops."""

    #: Seconds between the summary lines of a failure that repeats (:class:`FailureLog`).
    failure_summary_every_s = SUMMARY_EVERY_S

    def __init__(self, config: ServiceConfig, *, runner=None, destinations=None):
        self.cfg = config
        self.worker = config.worker
        self.node = socket.gethostname()
        self.workspace = config.workspace
        self.workspace.create()
        self.store = JobStore(config.store_location)
        self.tasks = load_routable_tasks(config.maps)
        self.runner = runner if runner is not None else make_runner(config)
        if destinations is None:
            destinations = {name: make_destination(name, cfg) for name, cfg in config.destinations.items()}
        self.destinations = destinations
        self.spool = Spool(self.workspace.spool_dir)
        self.listener = None
        self.follower = None
        self.web = None
        self._digests: dict[str, str] = {}
        self._watching: set[str] = set()  # keys of the runs this process started or adopted
        self._held_back: set[int] = set()  # series versions whose "cannot close yet" was logged
        self._next_retention = 0.0
        self._paused_for_space = False
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._export_retries = 0  # since this process started (/metrics: segmap_export_retries_total)
        self._workdir_bytes: tuple[float, int] | None = None  # (when measured, bytes): walked at most once a minute

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        cfg = self.cfg
        if cfg.orthanc is not None and cfg.does_intake:
            client = OrthancClient(cfg.orthanc.url, cfg.orthanc.username, cfg.orthanc.password)
            self.follower = OrthancFollower(client, self.store, self.spool, name=cfg.orthanc.name)
            self._spawn(self._follow, "orthanc-follower")
            log.info("following %s's changes at %s", cfg.orthanc.source, cfg.orthanc.url)
        if cfg.listener is not None and cfg.does_intake:
            self.spool.remove_partial()  # temp files of writes a crash interrupted
            lc = cfg.listener
            self.listener = DicomListener.from_config(lc, spool=self.spool, on_arrival=self.store.record_instance,
                                                      base=cfg.path.parent, below_floor=self.below_floor)
            self.listener.start()
            log.info("DICOM listener %s on %s:%d", lc.ae_title, *self.listener.address[:2])
        # Last: /healthz answering means the intake is listening.
        if cfg.http.port:
            self.web = make_server(self.store, host=cfg.http.host, port=cfg.http.port, auth=web_auth(cfg),
                                   viewer_url=cfg.http.viewer_url, process_figures=self.process_figures)
            self.web.serve_in_thread()
            log.info("job page on http://%s:%d/ (metrics /metrics, health /healthz)", cfg.http.host,
                     self.web.server_address[1])

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _follow(self) -> None:
        interval = self.cfg.orthanc.poll_interval_s
        down = False
        failures = FailureLog("Orthanc follower", every_s=self.failure_summary_every_s)
        while not self._stop.is_set():
            if self._pause_for_space():
                self._stop.wait(interval)
                continue
            try:
                new = self.follower.poll_once()
                failures.succeeded()
                if down:
                    log.info("Orthanc answers again at %s", self.cfg.orthanc.url)
                    down = False
                if new:
                    log.info("%d new instance(s) from %s", new, self.cfg.orthanc.source)
            except OrthancError as e:
                if not down:
                    log.warning("%s; retrying every %.0f s", e, interval)
                    down = True
            except Exception as e:  # noqa: BLE001 -- the follower must outlive any one bad change
                failures.failed(e)
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.stop()
        if self.web is not None:
            self.web.shutdown()
        for t in self._threads:
            t.join(timeout=10)

    def run(self, stop: threading.Event | None = None) -> None:
        """Tick until ``stop`` (or :meth:`stop`) is set. A failing tick is logged and retried, never fatal."""
        stop = stop or self._stop
        log.info("%s %s (%s): %d MAP(s) (%s), runner %s with %d slot(s), quiet period %.0f s, %s",
                 self.cfg.role if self.cfg.role != "all" else "worker", self.worker, self.node, len(self.cfg.maps),
                 ", ".join(m.name for m in self.cfg.maps), self.cfg.runner.kind, self.cfg.runner.max_concurrent,
                 self.cfg.quiet_period_s, self.store)
        if self.cfg.does_work:
            self._spawn(lambda: self._heartbeat(stop), "lease-heartbeat")
        failures = FailureLog("service tick", every_s=self.failure_summary_every_s)
        while not stop.is_set() and not self._stop.is_set():
            try:
                self.tick()
                failures.succeeded()
            except Exception as e:  # noqa: BLE001 -- a service keeps running; the store holds the state to resume
                failures.failed(e)
            stop.wait(self.cfg.poll_s)

    def tick(self, now: float | None = None) -> None:
        if self.cfg.does_intake:
            self._pause_for_space()  # logs when the free-space floor is crossed (the listener asks on its own)
            self.close_due_series(now)
            close_due_studies(Loop(self.store, self.workspace, self.cfg, self.tasks, self._digest), now)
        if self.cfg.does_work:
            self.advance_held(now)
            self.claim(now)
            self.export_due(now)
        if now is not None or time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + RETENTION_EVERY_S
            self.apply_retention(now)

    # ------------------------------------------------------------------------------------------- leases
    def _heartbeat(self, stop: threading.Event) -> None:
        """Renew this worker's leases every third of ``lease_s``, whatever the tick is doing (the tick may wait on
        a destination or the engine for longer than a lease)."""
        every = self.cfg.lease_s / 3
        failures = FailureLog("lease heartbeat", every_s=self.failure_summary_every_s)
        while not self._stop.wait(every) and not stop.is_set():
            try:
                self.store.heartbeat(self.worker, self.cfg.lease_s)
                failures.succeeded()
            except Exception as e:  # noqa: BLE001 -- the next beat tries again; the lease still has 2/3 to run
                failures.failed(e)
        self.store.close()  # this thread's connection

    # ------------------------------------------------------------------------------------------- free space
    def process_figures(self) -> dict[str, float]:
        """This process's own figures for /metrics (counters since it started, and the workdir's size)."""
        figures: dict[str, float] = {"export_retries": self._export_retries}
        if self.listener is not None:
            figures.update(self.listener.counters())
        now = time.monotonic()
        if self._workdir_bytes is None or now - self._workdir_bytes[0] > 60:
            self._workdir_bytes = (now, self.workspace.usage_bytes())
        figures["workdir_bytes"] = self._workdir_bytes[1]
        return figures

    def below_floor(self) -> bool:
        """Less free space where the workdir lies than ``free_space_floor_mb`` (intake refuses instances)."""
        return self.workspace.below_floor(self.cfg.free_space_floor_mb * 2**20)

    def _pause_for_space(self) -> bool:
        """True while the follower must pause for the free-space floor; logs the change either way."""
        below = self.below_floor()
        if below != self._paused_for_space:
            self._paused_for_space = below
            if below:
                log.warning("less than %.0f MiB free in %s: the Orthanc follower pauses (and the listener answers "
                            "C-STORE with out of resources) until there is", self.cfg.free_space_floor_mb,
                            self.workspace.root)
            else:
                log.info("free space in %s is above %.0f MiB again: the Orthanc follower goes on",
                         self.workspace.root, self.cfg.free_space_floor_mb)
        return below

    # ------------------------------------------------------------------------------------------- retention
    def apply_retention(self, now: float | None = None) -> int:
        """Delete the files of jobs finished more than ``retain_done_days`` (done) or ``retain_failed_days`` (failed,
        cancelled) ago -- their output, then, once every job of a series version is purged, its input links and the
        spool files no other version needs. Job records, events and decisions stay. Returns how many jobs."""
        now = time.time() if now is None else now
        done_days, failed_days = self.cfg.retain_done_days, self.cfg.retain_failed_days
        done_before = now - done_days * DAY_S if done_days else None
        failed_before = now - failed_days * DAY_S if failed_days else None
        purged = 0
        for job in self.store.jobs_past_retention(done_before, failed_before):
            if job.output_dir:
                self.workspace.remove_tree(Path(job.output_dir))
            days = done_days if job.state == State.DONE else failed_days
            self.store.mark_job_purged(job, f"images and outputs deleted ({job.state} more than {days:g} days ago)",
                                       now)
            purged += 1
        for version in self.store.series_past_retention(done_before):
            self.workspace.remove_tree(self.workspace.series_dir(version.id))
            paths = self.store.unshared_paths(version.id)
            self.workspace.remove_spool_files(paths)
            self.store.mark_series_purged(version.id, paths, now)
        if purged:
            log.info("retention: deleted the images and outputs of %d finished job(s)", purged)
        return purged

    # ------------------------------------------------------------------------------------------- 1. close
    def close_due_series(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for version in self.store.due_series(self.cfg.quiet_period_s, now):
            try:
                self._close(version, now)
            except (SegmapError, OSError) as e:  # Orthanc or the engine unreachable, the image or a spool file gone
                self._hold(version, now, str(e))
            except Exception as e:  # noqa: BLE001 -- e.g. a file pydicom cannot read: held with the reason too
                if version.id not in self._held_back:
                    log.error("series %s v%d: closing failed", version.series_uid, version.version, exc_info=e)
                self._hold(version, now, f"{type(e).__name__}: {e}")

    def _hold(self, v: SeriesVersion, now: float, why: str) -> None:
        """Keep a version that cannot be closed open, with its reason, and try again with back-off (half the time it
        has been held, at most ``close_retry_max_s``); never drop it. Logged once per version."""
        since = self.store.held_since(v.id) or now
        delay = min(self.cfg.close_retry_max_s, max(self.cfg.poll_s, (now - since) / 2))
        self.store.hold_series(v.id, why, now + delay, now)
        if v.id not in self._held_back:
            self._held_back.add(v.id)
            log.warning("series %s v%d: cannot be closed yet, kept open and retried with back-off (at most every "
                        "%.0f s; at once when it is sent again, or `segmap jobs reprocess %s`): %s", v.series_uid,
                        v.version, self.cfg.close_retry_max_s, v.series_uid, one_line(why, 300))

    def _close(self, v: SeriesVersion, now: float) -> None:
        if v.source.startswith("orthanc:") and v.stable_at is None:
            if self.follower is None or not self.follower.is_stable(v.series_uid):
                if now - v.last_seen >= UNSTABLE_AFTER_S:
                    raise OrthancError(f"Orthanc has not called series {v.series_uid} stable for "
                                       f"{now - v.last_seen:.0f} s (deleted there?)")
                return
            self.store.mark_stable(v.id)
        instances = self.store.instances(v.id)
        remote = [(i.sop_uid, i.remote_id) for i in instances if not i.path or not Path(i.path).is_file()]
        if remote:
            if self.follower is None:
                raise FileNotFoundError(f"{len(remote)} instance file(s) are missing from the spool")
            paths = self.follower.fetch(v.study_uid, v.series_uid, [r for r in remote if r[1]])
            self.store.set_instance_paths(v.id, {Path(p).name[:-4]: str(p) for p in paths})
            instances = self.store.instances(v.id)
        folder = self.workspace.link_series(v.id, [(i.sop_uid, i.path) for i in instances])
        scan = scan_dicom_folder(folder)
        routes = route(scan, self.cfg.maps, self.tasks, self.store.is_our_output)
        jobs = []
        for r in routes:
            if not r.matched:
                continue
            m = self.cfg.map(r.map_name)
            digest = self._digest(m.image)
            key = job_key(v.series_uid, [i.sop_uid for i in instances], digest, map_name=m.name,
                          destinations=m.destinations)
            name = run_name(key)
            jobs.append(NewJob(key=key, map_name=m.name, image=m.image, image_digest=digest, run_name=name,
                               seg_series_uid=seg_uids(key)[0], destinations=m.destinations,
                               max_attempts=self.cfg.max_attempts,
                               output_dir=str(self.workspace.output_dir(name)),
                               log_path=str(self.workspace.log_path(name))))
        decision = "; ".join(f"{r.map_name}: {'job' if r.matched else 'no job, ' + r.reason}" for r in routes)
        result = self.store.close_series(v.id, jobs, decision, instance_count=len(instances))
        if result is None:
            log.info("series %s v%d: more instances arrived while closing; waiting again", v.series_uid, v.version)
            return
        created, existing = result
        where = f"series {v.series_uid} v{v.version} ({v.modality or '?'}, {len(instances)} instances, {v.source})"
        if v.held_reason:
            self._held_back.discard(v.id)
            log.info("%s: closed after being held (%s)", where, one_line(v.held_reason, 200))
        for r in routes:
            if not r.matched:
                log.info("%s: no job for %s: %s", where, r.map_name, r.reason)
        for j in jobs:
            if j.key in created:
                log.info("%s: queued job %s for %s", where, j.key[:12], j.map_name)
            else:
                log.info("%s: no new job for %s: the same instances were already processed by job %s", where,
                         j.map_name, j.key[:12])

    def _digest(self, image: str) -> str:
        if image not in self._digests:
            self._digests[image] = self.runner.image_digest(image)
        return self._digests[image]

    # ------------------------------------------------------------------------------------------- 2. advance
    def advance_held(self, now: float | None = None) -> None:
        for job in self.store.held_jobs(self.worker, self.cfg.lease_s, now):
            if job.state != State.RUNNING:
                continue
            try:
                self._advance(job)
            except RunnerError as e:
                log.warning("job %s: %s", job.key[:12], e)

    def _spec(self, job: Job) -> RunSpec:
        rc = self.cfg.runner
        image = job.image_digest if self.runner.runs_digest and job.image_digest.startswith("sha256:") else job.image
        input_dir = study_input_dir(self.store, self.workspace, job) or self.workspace.series_dir(job.series_id)
        return RunSpec(name=job.run_name, image=image, input_dir=input_dir,
                       output_dir=Path(job.output_dir), env={"SEGMAP_UID_SEED": job.key}, cpus=rc.cpus,
                       memory=rc.memory, gpus=rc.gpus, timeout_s=rc.timeout_s,
                       labels={"segmap.job": job.key, "segmap.map": job.map_name})

    def _advance(self, job: Job) -> None:
        status = self.runner.status(job.run_name)
        short = job.key[:12]
        if status.state == "missing":
            newer = self.store.newer_version(job.series_id)
            if newer is not None:
                self.store.supersede(job, self.worker, newer.version)
                log.info("job %s: superseded by version %d of series %s (more instances arrived)", short,
                         newer.version, job.series_uid)
                return
            if not self._input_ready(job):
                return
            fresh_folder(Path(job.output_dir))
            started = self.runner.start(self._spec(job))
            self._watching.add(job.key)
            log.info("job %s: started container %s (attempt %d of %d, %s; %s)", short, job.run_name, job.attempts,
                     job.max_attempts, job.map_name, started.state)
            if self.store.get_job(job.key).state == State.CANCELLED:
                self.runner.cancel(job.run_name)
            return
        if job.key not in self._watching:
            # Found, not started by this process: a restart (or a takeover) adopts it instead of starting another.
            self._watching.add(job.key)
            log.info("job %s: adopted container %s (%s) that an earlier service process started", short,
                     job.run_name, status.state)
            # That process may have died between creating the run and starting it (a Docker container left
            # 'created' never starts by itself): the runner finishes what it left half-done.
            status = self.runner.adopt(job.run_name)
        if not status.finished:
            return
        self._watching.discard(job.key)
        self._save_log(job)
        if status.state == "succeeded":  # a RunStatus state, not a job state
            segs = seg_files(Path(job.output_dir))
            if segs:
                self.store.run_succeeded(job, self.worker, status.exit_code or 0, node=status.node,
                                         run_finished_at=status.finished_at)
                log.info("job %s: run succeeded in %.1f s: %d SEG file(s)", short,
                         (status.finished_at or time.time()) - (status.started_at or job.started_at or time.time()),
                         len(segs))
                self.runner.remove(job.run_name)
                return
            status_error, exit_code = "the MAP exited 0 but wrote no DICOM SEG", status.exit_code
        else:
            status_error, exit_code = status.error or f"exit code {status.exit_code}", status.exit_code
        delay = self.cfg.retry_backoff_s * (2 ** max(0, job.attempts - 1))
        after = self.store.run_failed(job, self.worker, status_error, exit_code, delay, node=status.node)
        if after is not None:
            log.warning("job %s: run failed (%s); %s", short, status_error,
                        f"retry in {delay:.0f} s" if after.state == State.QUEUED else "no attempts left: failed")
        self.runner.remove(job.run_name)

    def _input_ready(self, job: Job) -> bool:
        """False (and the attempt failed, saying what to do) when retention deleted the job's input and it was not
        sent again; when it was, the input folder is linked again from the spool."""
        if self.workspace.series_dir(job.series_id).is_dir():
            return True
        instances = self.store.instances(job.series_id)
        if instances and all(i.path and Path(i.path).is_file() for i in instances):
            self.workspace.link_series(job.series_id, [(i.sop_uid, i.path) for i in instances])
            return True
        if self.store.series_version(job.series_id).purged_at is None:
            return True  # not deleted by retention: the runner reports what is wrong
        error = (f"the input images of series {job.series_uid} were deleted (retention); send the series again, "
                 f"then retry the job")
        self.store.run_failed(job, self.worker, error, None, self.cfg.retry_backoff_s)
        log.warning("job %s: %s", job.key[:12], error)
        return False

    def _save_log(self, job: Job) -> None:
        if not job.log_path:
            return
        try:
            text = self.runner.logs(job.run_name, tail=5000)
        except RunnerError as e:
            text = f"(container log unavailable: {e})"
        append_attempt_log(Path(job.log_path), job.attempts, text)

    # ------------------------------------------------------------------------------------------- 3. claim
    def claim(self, now: float | None = None) -> None:
        while True:
            job = self.store.claim(self.worker, self.cfg.lease_s, self.cfg.runner.max_concurrent, now,
                                   node=self.node if self.runner.local else None)
            if job is None:
                return
            log.info("job %s: claimed (%s, series %s, waited %.1f s)", job.key[:12], job.map_name, job.series_uid,
                     (job.started_at or 0) - job.created_at)
            try:
                self._advance(job)
            except RunnerError as e:
                log.warning("job %s: %s", job.key[:12], e)

    # ------------------------------------------------------------------------------------------- 4. export
    def export_due(self, now: float | None = None) -> None:
        for job in self.store.jobs_due_for_export(self.worker, now):
            self._export(job, time.time() if now is None else now)

    def _export(self, job: Job, now: float) -> None:
        short = job.key[:12]
        files = seg_files(Path(job.output_dir))
        if not files:
            self.store.export_failed(job, self.worker, f"no SEG file in {job.output_dir} to send")
            return
        for name in job.destinations:
            if name in job.delivered:
                continue
            dest = self.destinations[name]
            try:
                dest.send(files)
                if not dest.confirm(files):
                    raise DestinationUnavailable(f"{name} did not confirm every instance yet")
            except DestinationUnavailable as e:
                waited = now - (job.export_started_at or now)
                if waited > self.cfg.export_give_up_s:
                    self.store.export_failed(job, self.worker, f"{name}: gave up after {waited:.0f} s: {e}")
                    log.error("job %s: export to %s given up after %.0f s: %s", short, name, waited, e)
                else:
                    delay = min(self.cfg.export_backoff_max_s, max(1.0, waited / 2))
                    self.store.export_retry(job, self.worker, f"{name}: {e}", delay)
                    self._export_retries += 1
                    log.warning("job %s: %s unavailable (%s); retry in %.0f s", short, name, e, delay)
                return
            except (ExportError, SegmapError) as e:
                self.store.export_failed(job, self.worker, f"{name}: {e}")
                log.error("job %s: export to %s failed: %s", short, name, e)
                return
            job = self.store.delivered_to(job, self.worker, name) or job
            log.info("job %s: %d SEG instance(s) confirmed at %s", short, len(files), name)
        done = self.store.export_done(job, self.worker)
        if done is not None:
            log.info("job %s: done in %.1f s after the last instance arrived", short, done.timings.get("total", 0))
