"""``segmap serve``, ``segmap jobs`` and ``segmap submit``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from segmap.errors import SegmapError

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
    p.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50, help="how many jobs to list (newest first; default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("submit", help="send a DICOM study to a segmap service or PACS and wait for its SEG",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  segmap submit study/ --to 127.0.0.1:11112/SEGMAP "
                              "--query orthanc+http://127.0.0.1:8042 --out seg/\n"
                              "  segmap submit study/ --to pacs:104/PACS --query dicom://pacs:104/PACS --out seg/")
    p.add_argument("study", help="folder with the DICOM files of one study")
    p.add_argument("--to", required=True, metavar="HOST:PORT[/AE]", help="where to C-STORE the study")
    p.add_argument("--query", required=True, metavar="URL",
                   help="where the SEG will appear: orthanc+http://HOST:PORT or dicom://HOST:PORT/AE")
    p.add_argument("--out", required=True, help="folder to save the SEG into")
    p.add_argument("--calling-ae", default="SEGMAP-SUBMIT", help="our AE title (default SEGMAP-SUBMIT)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the SEG (default 600)")
    p.set_defaults(func=_cmd_submit)


def _load(args):
    from .config import load_config

    if not args.config:
        raise SegmapError("give the service configuration with -c FILE (see `segmap serve --example`)")
    return load_config(args.config)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .config import EXAMPLE

    if args.example:
        sys.stdout.write(EXAMPLE)
        return 0
    config = _load(args)
    if args.check:
        print(f"OK: {config.path}: {len(config.maps)} MAP(s), "
              f"intake: {', '.join(x for x in ('listener' if config.listener else '', config.orthanc.source if config.orthanc else '') if x)}, "
              f"runner {config.runner.kind}, workdir {config.workdir}")
        return 0
    from .service import Service

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping (running containers keep running and are adopted at the next start)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service = Service(config)
    service.start()
    try:
        service.run(stop)
    finally:
        service.stop()
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .store import JobStore
    from .web import human_seconds

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
    job = store.get_job(args.job)
    if job is None:
        raise SegmapError(f"no job matches {args.job!r} (give 6+ characters of its key, or its id)")
    if args.action == "show":
        if args.json:
            print(json.dumps({**job.as_dict(), "events": store.events(job)}, indent=1))
            return 0
        for k, v in job.as_dict().items():
            print(f"{k}: {v}")
        print()
        print(store.job_log(job))
        return 0
    if args.action == "retry":
        if job.state not in ("failed", "cancelled"):
            raise SegmapError(f"job {job.key[:12]} is {job.state}: only failed or cancelled jobs can be retried")
        store.retry(job.key)
        print(f"job {job.key[:12]} queued again")
        return 0
    if job.finished:
        raise SegmapError(f"job {job.key[:12]} is already {job.state}: only queued, running or exporting jobs can be "
                          f"cancelled")
    after = store.cancel(job.key)
    if after is None or after.state != "cancelled":
        raise SegmapError(f"job {job.key[:12]} changed meanwhile (now {after.state if after else 'gone'}); try again")
    from .service import make_runner
    try:
        make_runner(config).cancel(job.run_name)
    except SegmapError as e:
        print(f"job {job.key[:12]} cancelled; its container could not be stopped: {e}", file=sys.stderr)
        return 1
    print(f"job {job.key[:12]} cancelled")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from .client import submit

    t0 = time.monotonic()
    paths = submit(Path(args.study), args.to, calling_ae=args.calling_ae, query=args.query, out_dir=Path(args.out),
                   timeout_s=args.timeout, progress=lambda line: print(line, file=sys.stderr, flush=True))
    for p in paths:
        print(p)
    print(f"segmap submit: {len(paths)} SEG file(s) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0
