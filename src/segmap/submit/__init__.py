"""``segmap submit``: send a study to a DICOM node and wait for the SEG the job service makes of it
(:mod:`.client`). This module holds its command line only; the client (pydicom, pynetdicom, requests) is imported
when the command runs, because ``segmap`` builds every command line for every command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUBMIT_EPILOG = """\
examples:
  segmap submit study/ --to 127.0.0.1:11112/SEGMAP --query orthanc+http://127.0.0.1:8042 --out seg/
  segmap submit study/ --to pacs:104/PACS --query dicom://pacs:104/PACS --out seg/"""


def add_submit_parser(sub) -> None:
    p = sub.add_parser("submit", help="send a DICOM study to a segmap service or PACS and wait for its SEG",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SUBMIT_EPILOG)
    p.add_argument("study", help="folder with the DICOM files of one study")
    p.add_argument("--to", required=True, metavar="HOST:PORT[/AE]", help="where to C-STORE the study")
    p.add_argument("--query", required=True, metavar="URL",
                   help="where the SEG will appear: orthanc+http://HOST:PORT or dicom://HOST:PORT/AE")
    p.add_argument("--out", required=True, help="folder to save the SEG into")
    p.add_argument("--calling-ae", default="SEGMAP-SUBMIT", help="our AE title (default SEGMAP-SUBMIT)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the SEG (default 600)")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--config", metavar="FILE", help="the service's configuration: wait for the SEG of every MAP "
                                                      "(every job) it makes of this study")
    wait.add_argument("--expect", type=int, default=None, metavar="N",
                      help="wait for N SEG series (one per job the study makes; default 1)")
    p.set_defaults(func=_cmd_submit)


def _cmd_submit(args: argparse.Namespace) -> int:
    from .client import SubmitError, expected_results, submit  # lazy: see the module docstring

    t0 = time.monotonic()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    expect = args.expect or 1
    if args.config:
        counts = expected_results(args.config, args.study)
        if not counts:
            raise SubmitError(f"--config {args.config}: no MAP of the service makes a job of {args.study}")
        expect = sum(counts.values())
        say(f"the service makes {expect} job(s) of this study: "
            + ", ".join(f"{name} x{n}" for name, n in counts.items()))
    paths = submit(Path(args.study), args.to, calling_ae=args.calling_ae, query=args.query, out_dir=Path(args.out),
                   timeout_s=args.timeout, progress=say, expect=expect)
    for p in paths:
        print(p)
    print(f"segmap submit: {len(paths)} SEG file(s) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0
