"""What ``segmap serve`` and ``segmap jobs`` do (their command lines are :mod:`.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from segmap import signals
from segmap.errors import SegmapError, ServiceConfigError
from segmap.privacy import install_log_redaction, redact

from . import operations
from .config import EXAMPLE, ServiceConfig, load_config
from .operations import OperationRefused
from .security import exposure_problems, secret_warnings
from .runners import make_runner
from .routing import load_routable_tasks
from .service import Service
from .store import JobStore
from .studies import study_lines
from .web import human_seconds

log = logging.getLogger("segmap.service")


def _load(args):
    if not args.config:
        raise SegmapError("give the service configuration with -c FILE (see `segmap serve --example`)")
    return load_config(args.config)


def check_exposure(config: ServiceConfig) -> list[str]:
    """Refuse (one line naming the setting to add) a service exposed without protection, unless the file says
    ``service.insecure: true``; then each problem is a warning line, returned for the caller to show."""
    problems = exposure_problems(config)
    if problems and not config.insecure:
        raise ServiceConfigError(f"{config.path}: refusing to start: {'; '.join(problems)} "
                                 f"(service.insecure: true starts anyway)")
    return [f"INSECURE (service.insecure: true): {p}" for p in problems]


def serve(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(EXAMPLE)
        return 0
    # Every line the service logs passes the one redaction function (patient data, URL passwords).
    install_log_redaction()
    config = _load(args)
    warnings = check_exposure(config) + secret_warnings(config)
    for line in warnings:
        log.warning("%s", line)
    if args.check:
        load_routable_tasks(config.maps)  # what Service() checks of the MAPs before it serves
        print(f"OK: {config.path}: {len(config.maps)} MAP(s), "
              f"intake: {', '.join(x for x in ('listener' if config.listener else '', config.orthanc.source if config.orthanc else '') if x)}, "
              f"runner {config.runner.kind}, workdir {config.workdir}")
        return 0
    stop = signals.stop_event("stopping (running containers keep running and are adopted at the next start)", log)
    service = Service(config)
    service.start()
    try:
        service.run(stop)
    finally:
        service.stop()
    return 0


def jobs(args: argparse.Namespace) -> int:
    config = _load(args)
    location = config.store_location
    if isinstance(location, Path) and not location.is_file():
        raise SegmapError(f"no job store at {location} yet: has `segmap serve -c {args.config}` run?")
    store = JobStore(location)
    if args.action == "list":
        jobs = store.list_jobs(args.state, limit=args.limit)
        if args.json:
            print(json.dumps([j.as_dict() for j in jobs], indent=1))
            return 0
        counts = store.count_by_state()
        print("  ".join(f"{k}: {v}" for k, v in counts.items()))
        print(f"{'KEY':<12} {'MAP':<12} {'STATE':<10} {'TRY':<5} {'AGE':>9} {'TIME':>9} {'WORKER':<12} SERIES / ERROR")
        for j in jobs:
            print(f"{j.key[:12]:<12} {j.map_name[:12]:<12} {j.state:<10} {j.attempts}/{j.max_attempts:<3} "
                  f"{human_seconds(j.age_s):>9} {human_seconds(j.duration_s):>9} {(j.worker or '-')[:12]:<12} "
                  f"{j.error or j.series_uid}")
        for line in study_lines(store):  # studies of multi-modality MAPs waiting for a modality, or failed
            print(line)
        return 0
    if args.action == "series":
        for v in store.series_versions(args.limit):
            print(f"{v.series_uid} v{v.version} {v.modality or '?'} {v.instance_count} inst. {v.source} {v.state}"
                  f"{': ' + v.decision if v.decision else ''}")
        for line in study_lines(store, states=None):  # which series filled which modality, what was passed over
            print(line)
        return 0
    if args.action == "reprocess":  # args.job is a Series Instance UID here
        if not args.job:
            raise SegmapError("`segmap jobs reprocess` needs the Series Instance UID of a series that made no job")
        print("\n".join(operations.reprocess(store, args.job)))
        return 0
    if not args.job:
        raise SegmapError(f"`segmap jobs {args.action}` needs a job key (or prefix) or id")
    job = operations.find_job(store, args.job)
    if args.action == "show":
        if args.json:
            events = [{**e, "message": redact(e["message"])} for e in store.events(job)]
            print(json.dumps({**job.as_dict(), "events": events}, indent=1))
            return 0
        for k, v in job.as_dict().items():
            print(f"{k}: {v}")  # the error is redacted when read from the store
        print()
        print(operations.job_log(store, job))  # redacted: the container log may name the patient
        return 0
    if args.action == "retry":
        operations.retry(store, job)
        print(f"job {job.key[:12]} queued again")
        return 0
    try:
        operations.cancel(store, job, lambda: make_runner(config))
    except OperationRefused:
        raise
    except SegmapError as e:
        print(f"job {job.key[:12]} cancelled; its container could not be stopped: {e}", file=sys.stderr)
        return 1
    print(f"job {job.key[:12]} cancelled")
    return 0
