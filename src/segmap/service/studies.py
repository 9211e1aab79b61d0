"""Study-level jobs: a MAP whose task has several modalities runs once per complete study.

Series are closed one by one, as for single-series MAPs (:mod:`.service`, step 1). A study is looked at again for
each multi-modality MAP whenever one of its series versions closed since the last look, once none of its series is
still collecting and the last instance arrived at least ``quiet_period_s`` ago. The look (:func:`decide`) applies
the task's rules to every closed image series of the study with the selection code ``segmap run`` uses
(:func:`segmap.dicom.selection.select_for_task`: ranking, one patient and frame of reference, "passed over"
reasons), so the service chooses exactly what the MAP will choose from its input:

- every modality filled -> one job whose input is exactly the chosen series versions (hard links under
  ``jobs/RUN/input/``). Its key (:func:`study_job_key`) is made of the study UID, each modality's chosen series and
  SOP Instance UIDs, the MAP name, its destinations and the image digest; the store's UNIQUE key makes a later series
  that changes no choice queue nothing (logged), and one that changes a choice (a newer FLAIR) queue one new job;
- some modality not filled -> the study is ``waiting`` with what it lacks (``segmap jobs`` shows it) until
  ``study_give_up_s`` after it was first seen, then ``failed`` with that reason. No partial job is ever queued;
- no modality matched at all -> ``none``: the study is not for this MAP (not shown as waiting).

A MAP's ``trigger`` must hold on the series chosen for the task's first modality.

Everything is derived from the ``series`` table (which versions closed after the last look), and a look's outcome
(the study's row, the job and its inputs) is one transaction: a ``kill -9`` anywhere makes the next start look again
and reach the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from segmap.dicom.loading import DicomScan, DicomSeries, scan_dicom_folder
from segmap.dicom.selection import SeriesSelection, select_for_task, select_series
from segmap.errors import InputError, SegmapError
from segmap.tasks import SegmentationTask
from segmap.text import one_line

from .config import MapConfig, ServiceConfig
from .keys import run_name, seg_uids
from .routing import not_a_trigger, trigger_holds
from .states import State
from .store import JobStore, NewJob, SeriesVersion, _series
from .workspace import Workspace, link_files

log = logging.getLogger("segmap.service")

#: What a study is for one multi-modality MAP (the ``studies.state`` column).
WAITING, COMPLETE, FAILED, NONE = "waiting", "complete", "failed", "none"
STUDY_STATES = (WAITING, COMPLETE, FAILED, NONE)


def study_job_key(study_uid: str, chosen: Mapping[str, tuple[str, Iterable[str]]], map_name: str,
                  destinations: Sequence[str], image_digest: str) -> str:
    """64 hex digits identifying (these series versions filling these modalities, this MAP, its destinations, its
    image). ``chosen``: modality key -> (Series Instance UID, its SOP Instance UIDs)."""
    if not study_uid or not chosen or not map_name or not image_digest:
        raise ValueError("a study job key needs a study UID, the chosen series, a MAP name and an image digest")
    lines = ["segmap-study-job-v1", str(study_uid), str(map_name), str(image_digest), json.dumps(list(destinations))]
    for key in sorted(chosen):
        series_uid, sops = chosen[key]
        uids = sorted({str(u) for u in sops})
        if not series_uid or not uids:
            raise ValueError(f"modality {key!r}: a study job key needs a series UID and its SOP Instance UIDs")
        lines += [f"modality {key}", str(series_uid), *uids]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def is_study_map(task: SegmentationTask) -> bool:
    """Whether a MAP with this task is triggered per study (several modalities) rather than per series."""
    return len(task.modalities) > 1


# ----------------------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class StudyDecision:
    """What one look at a study decided for one MAP."""

    state: str
    #: The study decision log: which series filled which modality and why the others were passed over.
    text: str
    #: What a waiting study lacks (one line), else "".
    lacking: str = ""
    #: modality key -> the chosen series (complete only), in task order.
    chosen: Mapping[str, SeriesSelection] = field(default_factory=dict)


def decide(scan: DicomScan, task: SegmentationTask, map_cfg: MapConfig) -> StudyDecision:
    """Apply ``task``'s rules to the image series of one study (``scan``)."""
    lacking = []
    for m in task.modalities:
        try:
            select_series(scan, m.rules, modality_key=m.key)
        except InputError as e:
            lacking.append(f"modality '{m.key}': {one_line(e, 300)}")
    if len(lacking) == len(task.modalities):
        return StudyDecision(NONE, "no series matches any modality of the task")
    if lacking:
        text = "lacks " + "; ".join(lacking)
        return StudyDecision(WAITING, text, lacking=text)
    try:
        chosen = select_for_task(scan, {m.key: m.rules for m in task.modalities})
    except InputError as e:
        text = f"the series found cannot be used together: {one_line(e, 300)}"
        return StudyDecision(WAITING, text, lacking=text)
    first = chosen[task.modalities[0].key].series
    if map_cfg.trigger is not None and not trigger_holds(first, map_cfg):
        return StudyDecision(NONE, f"trigger {map_cfg.trigger.tag} does not contain {map_cfg.trigger.contains!r} "
                                   f"(series chosen for '{task.modalities[0].key}')")
    return StudyDecision(COMPLETE, describe(chosen), chosen=chosen)


def describe(chosen: Mapping[str, SeriesSelection]) -> str:
    """``T1 <- <uid> (summary) by 'selection'; ...; passed over for T1: <uid> (summary): reason; ...``."""
    parts = [f"{key} <- {sel.series.series_instance_uid} ({sel.series.summary()}) by '{sel.selection_name}'"
             for key, sel in chosen.items()]
    for key, sel in chosen.items():
        for entry in sel.passed_over:
            if "more" in entry:
                parts.append(f"passed over for {key}: {entry['more']} more")
            else:
                parts.append(f"passed over for {key}: {entry['series_instance_uid']} ({entry['summary']}): "
                             f"{entry['reason']}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- the store side


@dataclass(frozen=True)
class Study:
    """One study as seen by one multi-modality MAP (a row of the ``studies`` table)."""

    study_uid: str
    map_name: str
    state: str
    first_seen: float
    evaluated_at: float | None
    decision: str | None
    lacking: str | None
    job_key: str | None


class StudyBook:
    """The study rows and study job inputs of a :class:`~.store.JobStore` (the tables of its migration 2)."""

    def __init__(self, store: JobStore):
        self.store = store

    def due(self, map_name: str, quiet_s: float, now: float) -> list[tuple[str, float]]:
        """(study UID, latest closed_at) of the studies to look at again for ``map_name``: a series version closed
        since the last look, none collecting, the last instance ``quiet_s`` ago."""
        rows = self.store._db().execute(
            "SELECT g.study_uid, g.closed_at FROM (SELECT study_uid, MAX(last_seen) AS last_seen, "
            "MAX(closed_at) AS closed_at, SUM(CASE WHEN state = 'collecting' THEN 1 ELSE 0 END) AS open "
            "FROM series GROUP BY study_uid) g LEFT JOIN studies st ON st.study_uid = g.study_uid AND "
            "st.map_name = ? WHERE g.open = 0 AND g.last_seen <= ? AND g.closed_at IS NOT NULL AND "
            "(st.id IS NULL OR g.closed_at > st.seen_closed_at) ORDER BY g.last_seen",
            (map_name, now - quiet_s)).fetchall()
        return [(r["study_uid"], r["closed_at"]) for r in rows]

    def closed_versions(self, study_uid: str) -> list[SeriesVersion]:
        """The latest version of each series of the study, closed (not abandoned): the study's candidates."""
        rows = self.store._db().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.series_id = s.id) AS instance_count FROM series s "
            "WHERE s.study_uid = ? AND s.version = (SELECT MAX(o.version) FROM series o WHERE o.source = s.source "
            "AND o.series_uid = s.series_uid) ORDER BY s.id", (study_uid,)).fetchall()
        return [_series(r) for r in rows
                if r["state"] == "closed" and not (r["decision"] or "").startswith("abandoned")]

    def record(self, study_uid: str, map_name: str, decision: StudyDecision, seen_closed_at: float,
               job: NewJob | None = None, inputs: Sequence[tuple[str, SeriesVersion]] = (),
               now: float | None = None) -> bool | None:
        """Record one look (and queue its job) in one transaction. Returns True when the job was queued now, False
        when its key already existed, None without a job."""
        now = time.time() if now is None else now
        created = None
        with self.store._tx() as db:
            old = db.execute("SELECT state FROM studies WHERE study_uid = ? AND map_name = ?",
                             (study_uid, map_name)).fetchone()
            state = decision.state
            if old is not None and old["state"] == FAILED and state == WAITING:
                state = FAILED  # still incomplete: it stays failed (a series that completes it reopens it)
            if job is not None:
                first = inputs[0][1]
                count = sum(v.instance_count for _, v in inputs)
                received = max(v.last_seen for _, v in inputs)
                cur = db.execute(
                    "INSERT INTO jobs (key, map_name, image, image_digest, series_id, study_uid, series_uid, "
                    "version, instance_count, state, max_attempts, received_at, created_at, updated_at, run_name, "
                    "log_path, output_dir, seg_series_uid, destinations) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    f"'{State.QUEUED}', ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                    (job.key, job.map_name, job.image, job.image_digest, first.id, study_uid, first.series_uid,
                     first.version, count, job.max_attempts, received, now, now, job.run_name, job.log_path,
                     job.output_dir, job.seg_series_uid, json.dumps(list(job.destinations))))
                inserted = cur.fetchone()
                created = inserted is not None
                if created:
                    for order, (key, v) in enumerate(inputs):
                        db.execute("INSERT INTO job_inputs (job_key, input_order, modality_key, series_id) "
                                   "VALUES (?, ?, ?, ?)", (job.key, order, key, v.id))
                    self.store._event(db, inserted["id"], State.QUEUED,
                                      f"study complete: {', '.join(f'{k} <- {v.series_uid} v{v.version}' for k, v in inputs)}",
                                      now)
            text = decision.text if created is not False else f"{decision.text} (unchanged: job {job.key[:12]})"
            if old is None:
                db.execute("INSERT INTO studies (study_uid, map_name, state, first_seen, evaluated_at, seen_closed_at, "
                           "decision, lacking, job_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (study_uid, map_name, state, now, now, seen_closed_at, text, decision.lacking or None,
                            job.key if job else None))
            else:
                db.execute("UPDATE studies SET state = ?, evaluated_at = ?, seen_closed_at = ?, decision = ?, "
                           "lacking = ?, job_key = COALESCE(?, job_key) WHERE study_uid = ? AND map_name = ?",
                           (state, now, seen_closed_at, text if state != FAILED else f"failed: {text}",
                            decision.lacking or None, job.key if job else None, study_uid, map_name))
        return created

    def give_up(self, give_up_s: float, now: float | None = None) -> list[Study]:
        """Fail the studies waiting since more than ``give_up_s``, with what they lack; returns them."""
        now = time.time() if now is None else now
        with self.store._tx() as db:
            rows = db.execute(f"SELECT * FROM studies WHERE state = '{WAITING}' AND first_seen <= ?",
                              (now - give_up_s,)).fetchall()
            for r in rows:
                db.execute(f"UPDATE studies SET state = '{FAILED}', decision = ? WHERE id = ?",
                           (f"failed: incomplete after {now - r['first_seen']:.0f} s: {r['lacking']}", r["id"]))
        return [_study({**dict(r), "state": FAILED}) for r in rows]

    def studies(self, states: Sequence[str] | None = None, limit: int = 200) -> list[Study]:
        states = tuple(states or STUDY_STATES)
        q = ",".join("?" * len(states))
        rows = self.store._db().execute(f"SELECT * FROM studies WHERE state IN ({q}) ORDER BY id DESC LIMIT ?",
                                        (*states, limit)).fetchall()
        return [_study(dict(r)) for r in rows]

    def get(self, study_uid: str, map_name: str) -> Study | None:
        row = self.store._db().execute("SELECT * FROM studies WHERE study_uid = ? AND map_name = ?",
                                       (study_uid, map_name)).fetchone()
        return _study(dict(row)) if row else None

    def inputs(self, job_key: str) -> list[tuple[str, int]]:
        """(modality key, series version id) of a study job, in task order; [] for a series job."""
        rows = self.store._db().execute("SELECT modality_key, series_id FROM job_inputs WHERE job_key = ? "
                                        "ORDER BY input_order", (job_key,)).fetchall()
        return [(r["modality_key"], r["series_id"]) for r in rows]


def _study(d: dict) -> Study:
    return Study(study_uid=d["study_uid"], map_name=d["map_name"], state=d["state"], first_seen=d["first_seen"],
                 evaluated_at=d["evaluated_at"], decision=d["decision"], lacking=d["lacking"], job_key=d["job_key"])


def study_lines(store: JobStore, states: Sequence[str] | None = (WAITING, FAILED), limit: int = 200) -> list[str]:
    """One line per study of a multi-modality MAP (``segmap jobs``: waiting and failed; ``segmap jobs series``:
    every study with its decision)."""
    return [f"study {s.study_uid} {s.map_name} {s.state}: {s.decision or ''}"
            for s in StudyBook(store).studies(states, limit)]


# ----------------------------------------------------------------------------------------------- the loop's step


def study_input_dir(store: JobStore, workspace: Workspace, job) -> Path | None:
    """The input folder of a study job (``jobs/RUN/input``, refilled from its series versions when a restart or a
    cleanup lost it); None for a series job."""
    inputs = StudyBook(store).inputs(job.key)
    if not inputs:
        return None
    folder = Path(job.output_dir).parent / "input"
    for key, series_id in inputs:
        src = workspace.series_dir(series_id)
        link_files(folder / str(series_id), [(p.name, p) for p in sorted(src.glob("*.dcm"))])
    return folder


@dataclass(frozen=True)
class Loop:
    """What the service loop lends this step: its store, workdir, configuration, tasks and image digests."""

    store: JobStore
    workspace: Workspace
    cfg: ServiceConfig
    tasks: Mapping[str, SegmentationTask]
    digest: Callable[[str], str]


def _study_scan(service: Loop, versions: Sequence[SeriesVersion]) -> tuple[DicomScan, dict[str, SeriesVersion]]:
    """The image series of the study's closed versions (never-trigger series left out), and series UID -> version."""
    series: list[DicomSeries] = []
    by_uid = {}
    for v in versions:
        folder = service.workspace.series_dir(v.id)
        if not folder.is_dir():
            continue
        try:
            scan = scan_dicom_folder(folder)
        except InputError:
            continue
        if not_a_trigger(scan, service.store.is_our_output):
            continue
        series += scan.series
        by_uid[v.series_uid] = v
    series.sort(key=lambda s: (s.study_instance_uid, s.series_number is None, s.series_number or 0,
                               s.series_instance_uid))
    return DicomScan(folder=service.workspace.root, series=series), by_uid


def close_due_studies(service: Loop, now: float | None = None) -> None:
    """Step 1b of the service loop: look at the studies due for each multi-modality MAP; fail those waiting too
    long."""
    now = time.time() if now is None else now
    maps = [m for m in service.cfg.maps if is_study_map(service.tasks[m.name])]
    if not maps:
        return
    book = StudyBook(service.store)
    for m in maps:
        for study_uid, seen_closed_at in book.due(m.name, service.cfg.quiet_period_s, now):
            try:
                _look(service, book, m, study_uid, seen_closed_at, now)
            except (SegmapError, OSError) as e:
                log.warning("study %s: cannot decide for %s yet: %s", study_uid, m.name, one_line(e, 300))
    for s in book.give_up(service.cfg.study_give_up_s, now):
        log.warning("study %s: no job for %s: %s", s.study_uid, s.map_name, s.decision)


def _look(service: Loop, book: StudyBook, m: MapConfig, study_uid: str, seen_closed_at: float,
          now: float) -> None:
    scan, by_uid = _study_scan(service, book.closed_versions(study_uid))
    task = service.tasks[m.name]
    decision = decide(scan, task, m) if scan.series else StudyDecision(NONE, "no image series")
    if decision.state != COMPLETE:
        book.record(study_uid, m.name, decision, seen_closed_at, now=now)
        if decision.state == WAITING:
            log.info("study %s: waiting for %s: %s", study_uid, m.name, decision.text)
        else:
            log.info("study %s: no job for %s: %s", study_uid, m.name, decision.text)
        return
    inputs = [(key, by_uid[sel.series.series_instance_uid]) for key, sel in decision.chosen.items()]
    sops = {key: (v.series_uid, [i.sop_uid for i in service.store.instances(v.id)]) for key, v in inputs}
    digest = service.digest(m.image)
    key = study_job_key(study_uid, sops, m.name, m.destinations, digest)
    name = run_name(key)
    output_dir = service.workspace.output_dir(name)
    for mk, v in inputs:  # the input exists before the job does
        link_files(output_dir.parent / "input" / str(v.id),
                   [(p.name, p) for p in sorted(service.workspace.series_dir(v.id).glob("*.dcm"))])
    job = NewJob(key=key, map_name=m.name, image=m.image, image_digest=digest, run_name=name,
                 seg_series_uid=seg_uids(key)[0], destinations=m.destinations, max_attempts=service.cfg.max_attempts,
                 output_dir=str(output_dir), log_path=str(service.workspace.log_path(name)))
    created = book.record(study_uid, m.name, decision, seen_closed_at, job, inputs, now=now)
    chosen = ", ".join(f"{k} <- {v.series_uid} v{v.version}" for k, v in inputs)
    if created:
        log.info("study %s: queued job %s for %s (%s)", study_uid, key[:12], m.name, chosen)
    else:
        log.info("study %s: no new job for %s: the series it chose (%s) were already processed by job %s", study_uid,
                 m.name, chosen, key[:12])
