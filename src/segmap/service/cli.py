"""The command lines of ``segmap serve`` and ``segmap jobs`` (``segmap submit``, a client of the service, is
:mod:`segmap.submit`). What they do is :mod:`.commands`, imported when one of them runs: ``segmap`` builds every
command line for every command, and the service's libraries (pydicom, requests, prometheus_client) would add seconds
to ``segmap run``'s start."""

from __future__ import annotations

import argparse

from .states import State

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
  segmap jobs -c service.yaml reprocess 1.2.840.113619.2.5.1  # close a series that could not be closed, now
"""


def add_service_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run the PACS job service (DICOM listener / Orthanc follower -> MAP -> SEG back)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EPILOG)
    p.add_argument("-c", "--config", help="the service configuration file (YAML)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.add_argument("--example", action="store_true", help="print a commented example configuration and exit")
    p.set_defaults(func=_command("serve"))

    p = sub.add_parser("jobs", help="list, show, retry or cancel the job service's jobs",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=JOBS_EPILOG)
    p.add_argument("-c", "--config", required=True, help="the service configuration file (YAML)")
    p.add_argument("action", nargs="?", default="list", choices=("list", "show", "retry", "cancel", "series",
                                                                    "reprocess"))
    p.add_argument("job", nargs="?", help="job key (or a unique prefix of 6+ characters) or id, for show/retry/cancel; "
                   "a Series Instance UID for reprocess")
    p.add_argument("--state", action="append", choices=tuple(State), help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50, help="how many jobs to list (newest first; default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_command("jobs"))


def _command(name: str):
    def run(args: argparse.Namespace) -> int:
        from . import commands  # lazy: see the module docstring

        return getattr(commands, name)(args)

    return run
