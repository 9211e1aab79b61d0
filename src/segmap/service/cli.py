"""``segmap serve`` and ``segmap jobs`` (``segmap submit``, a client of the service, is :mod:`segmap.submit`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from segmap import signals
from segmap.errors import SegmapError

from . import operations
from .config import EXAMPLE, load_config
from .operations import OperationRefused
from .runners import make_runner
from .states import State
from .store import JobStore
from .web import human_seconds

log = logging.getLogger("segmap.service")

SERVE_EPILOG = """\
The configuration file (YAML) names the intake (a DICOM listener and/or an Orthanc to follow), the MAP images with
the task files whose rules route series to them, where results go, and the runner's limits. Print a commented
example with `segmap serve --example`; check a file without starting anything with `segmap serve -c FILE --check`.

examples:
  segmap serve --example > segmap-service.yaml
  segmap serve -c segmap-service.yaml
  segmap jobs -c segmap-service.yaml
  segmap jobs -c segmap-service.yaml show 3f9a2c
"""

JOBS_EPILOG = """\
examples:
  segmap jobs -c service.yaml                 # newest jobs first: key, MAP, state, attempts, age, duration, error
  segmap jobs -c service.yaml --state failed
  segmap jobs -c service.yaml show 3f9a2c     # one job (key prefix or id) with its history and container log
  segmap jobs -c service.yaml retry 3f9a2c    # queue a failed or cancelled job again
  segmap jobs -c service.yaml cancel 3f9a2c   # cancel a queued/running/exporting job (stops its container)
  segmap jobs -c service.yaml series          # series versions received and what was decided for each
"""


def add_service_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run the PACS job service (DICOM listener / Orthanc follower -> MAP -> SEG back)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EPILOG)
    p.add_argument("-c", "--config", help="the service configuration file (YAML)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--example", action="store_true", help="print a commented example configuration and exit")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("jobs", help="list, show, retry or cancel the job service's jobs",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=JOBS_EPILOG)
    p.add_argument("-c", "--config", required=True, help="the service configuration file (YAML)")
    p.add_argument("action", nargs="?", default="list", choices=("list", "show", "retry", "cancel", "series"))
    p.add_argument("job", nargs="?", help="job key (or a unique prefix of 6+ characters) or id, for show/retry/cancel")
    p.add_argument("--state", action="append", choices=tuple(State), help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50, help="how many jobs to list (newest first; default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_jobs)


def _load(args):
    if not args.config:
        raise SegmapError("give the service configuration with -c FILE (see `segmap serve --example`)")
    return load_config(args.config)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(EXAMPLE)
        return 0
    config = _load(args)
    if args.check:
        print(f"OK: {config.path}: {len(config.maps)} MAP(s), "
              f"intake: {', '.join(x for x in ('listener' if config.listener else '', config.orthanc.source if config.orthanc else '') if x)}, "
              f"runner {config.runner.kind}, workdir {config.workdir}")
        return 0
    # Lazy: the intake's network libraries (pynetdicom, requests) load only for `segmap serve`, not for every
    # segmap command that builds this parser.
    from .service import Service

    stop = signals.stop_event("stopping (running containers keep running and are adopted at the next start)", log)
    service = Service(config)
    service.start()
    try:
        service.run(stop)
    finally:
        service.stop()
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
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
        return 0
    if args.action == "series":
        for v in store.series_versions(args.limit):
            print(f"{v.series_uid} v{v.version} {v.modality or '?'} {v.instance_count} inst. {v.source} {v.state}"
                  f"{': ' + v.decision if v.decision else ''}")
        return 0
    if not args.job:
        raise SegmapError(f"`segmap jobs {args.action}` needs a job key (or prefix) or id")
    job = operations.find_job(store, args.job)
    if args.action == "show":
        if args.json:
            print(json.dumps({**job.as_dict(), "events": store.events(job)}, indent=1))
            return 0
        for k, v in job.as_dict().items():
            print(f"{k}: {v}")
        print()
        print(operations.job_log(store, job))
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
