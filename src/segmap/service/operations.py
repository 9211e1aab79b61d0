"""What an operator may do to a job -- retry, cancel -- and the rules for when, in one place for the CLI
(``segmap jobs``) and the job page.

Each operation takes the job as the operator saw it and raises :class:`OperationRefused` (one line, naming the job
and why) when the rule says no; the store then refuses a job that moved meanwhile (the transition is made only
from the state the operator saw).

Running a done job again is not an operation: the job key is the promise that one input for one MAP runs once.
``reprocess`` is about a *series* that made no job because it could not be closed (the engine or Orthanc down, the
image missing, a spool file gone): it is tried again at the next tick instead of after its back-off.
"""

from __future__ import annotations

from typing import Callable

from segmap.errors import SegmapError
from segmap.privacy import redact

from .runners.base import Runner
from .states import RETRYABLE, UNFINISHED, State
from .store import Job, JobStore
from .workspace import log_tail


class OperationRefused(SegmapError):
    """The job is not in a state the operation applies to (or it moved meanwhile)."""


def find_job(store: JobStore, ref: str) -> Job:
    job = store.get_job(ref)
    if job is None:
        raise OperationRefused(f"no job matches {ref!r} (give 6+ characters of its key, or its id)")
    return job


def can_retry(job: Job) -> bool:
    return job.state in RETRYABLE


def can_cancel(job: Job) -> bool:
    return job.state in UNFINISHED


def retry(store: JobStore, job: Job) -> Job:
    """Queue a failed or cancelled job again with fresh attempts."""
    if not can_retry(job):
        raise OperationRefused(f"job {job.key[:12]} is {job.state}: only "
                               f"{' or '.join(RETRYABLE)} jobs can be retried")
    return _arrived(job, store.retry(job.key), State.QUEUED)


def cancel(store: JobStore, job: Job, runner: Callable[[], Runner]) -> Job:
    """Cancel an unfinished job and stop its container; ``runner`` makes the runner only when one must be
    stopped. A container that cannot be stopped raises the runner's error after the job was cancelled."""
    if not can_cancel(job):
        raise OperationRefused(f"job {job.key[:12]} is already {job.state}: only "
                               f"{', '.join(UNFINISHED[:-1])} or {UNFINISHED[-1]} jobs can be cancelled")
    after = _arrived(job, store.cancel(job.key), State.CANCELLED)
    runner().cancel(job.run_name)
    return after


def _arrived(job: Job, after: Job | None, state: State) -> Job:
    """``after`` when the store moved the job to ``state``; otherwise it changed between looking and asking."""
    if after is None or after.state != state:
        raise OperationRefused(f"job {job.key[:12]} changed meanwhile (now {after.state if after else 'gone'}); "
                               f"try again")
    return after


def job_log(store: JobStore, job: Job, tail: int = 200) -> str:
    """The job's event history and the last ``tail`` lines of its container log (when written), redacted
    (:func:`segmap.privacy.redact`): a MAP may print a patient's name, a URL with its password."""
    lines = store.history(job)
    container = log_tail(job.log_path, tail)
    if container:
        lines += ["", f"--- container log ({job.log_path}) ---", *container]
    return redact("\n".join(lines))


def reprocess(store: JobStore, series_uid: str) -> list[str]:
    """Try again, at the next tick, to close every version of ``series_uid`` that is held (could not be closed) or
    that an older release abandoned; one line per version. Refused when there is none (a closed series' jobs are
    retried with :func:`retry`)."""
    versions = store.latest_versions(series_uid.strip())
    if not versions:
        raise OperationRefused(f"no series {series_uid!r} was received (see `segmap jobs series`)")
    done = []
    for v in versions:
        if store.retry_series_now(v.id):
            why = v.held_reason or v.decision
            reason = f" (it could not be closed: {why})" if why else ""
            done.append(f"series {v.series_uid} v{v.version} from {v.source}: will be closed at the next tick{reason}")
    if not done:
        jobs = [j for v in versions for j in store.series_jobs(v.id)]
        made = ", ".join(f"{j.key[:12]} {j.state}" for j in jobs) or "no job: " + (versions[0].decision or "?")
        raise OperationRefused(f"series {series_uid} is closed ({made}); a failed or cancelled job is queued again "
                               f"with `segmap jobs retry KEY`")
    return done
