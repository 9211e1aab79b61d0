"""``segmap portal -c portal.yaml``: the segmentation portal (MONAI Label's API over warm models).

This module imports nothing beyond the standard library and segmap's ground floor, so that ``segmap --help`` works
where the ``portal`` extra (FastAPI, uvicorn) is not installed; the command then says what to install.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SegmapError


def _cmd_portal(args: argparse.Namespace) -> int:
    from .config import EXAMPLE, load_config

    if args.example:
        print(EXAMPLE, end="")
        return 0
    if not args.config:
        raise SegmapError("segmap portal: give the configuration file with -c portal.yaml (`segmap portal "
                          "--example` prints one)")
    config = load_config(Path(args.config))
    if args.host:
        config = _replace(config, host=args.host)
    if args.port is not None:
        config = _replace(config, port=args.port)
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SegmapError(f"segmap portal needs the portal extra ({e.name} is missing): pip install "
                          f"'segmap[portal]'") from None
    from ..privacy import install_log_redaction
    from .server import serve

    install_log_redaction()
    serve(config)
    return 0


def _replace(config, **values):
    import dataclasses

    return dataclasses.replace(config, **values)


def add_portal_parser(sub) -> None:
    p = sub.add_parser("portal", help="the segmentation portal: MONAI Label's API (3D Slicer, OHIF, scripts) over "
                                      "warm models", description="Serve the configured models through MONAI Label's "
                                      "REST API: /info/, /infer/{model}, /datastore/, /metrics. See docs/portal.md.")
    p.add_argument("-c", "--config", default=None, help="portal.yaml (`segmap portal --example` prints one)")
    p.add_argument("--host", default=None, help="bind address instead of portal.host (non-loopback needs a token)")
    p.add_argument("--port", type=int, default=None, help="port instead of portal.port")
    p.add_argument("--example", action="store_true", help="print an example configuration and exit")
    p.set_defaults(func=_cmd_portal)
