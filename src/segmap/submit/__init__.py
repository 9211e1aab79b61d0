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
    p.set_defaults(func=_cmd_submit)


def _cmd_submit(args: argparse.Namespace) -> int:
    from .client import submit  # lazy: see the module docstring

    t0 = time.monotonic()
    paths = submit(Path(args.study), args.to, calling_ae=args.calling_ae, query=args.query, out_dir=Path(args.out),
                   timeout_s=args.timeout, progress=lambda line: print(line, file=sys.stderr, flush=True))
    for p in paths:
        print(p)
    print(f"segmap submit: {len(paths)} SEG file(s) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0
