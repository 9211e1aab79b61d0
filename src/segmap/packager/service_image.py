"""The job service's own image (``segmap serve``), built from the same base as the MAPs.

    python -m segmap.packager.service_image [--tag segmap/service:VERSION] [--base-image IMAGE] [--dry-run DIR]

(``make service-image`` runs it.) Like ``segmap package``, the image is built without network access: the wheels
are downloaded here first (pip's own index settings apply; ``--wheelhouse DIR`` builds offline) and installed with
``--no-index``. The image holds segmap's full wheel (the job service included) and its run-time dependencies and
those of the ``service`` extra, except torch: the service never segments, its MAP containers do.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import __version__
from ..errors import ContextError, SegmapError, WheelhouseError
from .baseimage import CPU_BASE_IMAGE
from .context import DEFAULT_GID, DEFAULT_UID, resolve_python
from .wheelhouse import SOURCE_DATE_EPOCH, copy_wheels, download_wheels, wheel_requirements

log = logging.getLogger(__name__)

DEFAULT_TAG = f"segmap/service:{__version__}"
#: Not installed in the service image (the MAP containers run the models).
NOT_IN_SERVICE = re.compile(r"^(torch|nvidia-)", re.IGNORECASE)
SERVICE_EXTRA = "service"


def _template() -> str:
    return (Path(__file__).parent / "templates" / "Dockerfile.service").read_text()


def render_service_dockerfile(*, base_image: str, uid: int = DEFAULT_UID, gid: int = DEFAULT_GID) -> str:
    text = _template()
    for arg, value in (("BASE_IMAGE", base_image), ("SERVICE_UID", uid), ("SERVICE_GID", gid)):
        text, n = re.subn(rf"^ARG {arg}=.*$", f"ARG {arg}={value}", text, flags=re.MULTILINE)
        if not n:
            raise ContextError(f"Dockerfile.service: no ARG {arg}")
    return text


def build_full_wheel(source: Path, dest: Path) -> Path:
    """segmap's wheel with everything (the job service too), built from ``source`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segmap-service-wheel-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv", "out", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "bench"))
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                               "--no-index", "--wheel-dir", str(dest), str(copy)], capture_output=True, text=True,
                              env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})
    wheels = sorted(dest.glob("segmap-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise WheelhouseError(f"building segmap's wheel from {source} failed: {tail[0]}")
    return wheels[0]


def service_requirements(wheel: Path) -> list[str]:
    """segmap's run-time requirements and its service extra's, without torch."""
    reqs = wheel_requirements(wheel) + wheel_requirements(wheel, SERVICE_EXTRA)
    return list(dict.fromkeys(r for r in reqs if not NOT_IN_SERVICE.match(r)))


def write_service_context(out: Path, *, source: Path, base_image: str = CPU_BASE_IMAGE, uid: int = DEFAULT_UID,
                          gid: int = DEFAULT_GID, wheelhouse: Path | None = None,
                          python_version: str | None = None) -> Path:
    """The build context of the service image in ``out`` (replaced if it is one already)."""
    if out.exists():
        if any(out.iterdir()) and not (out / "Dockerfile").is_file():
            raise ContextError(f"{out}: folder is not empty and is not a build context; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wheel = build_full_wheel(source, out / "wheelhouse" / "segmap")
    reqs = service_requirements(wheel)
    (out / "requirements.txt").write_text("".join(f"{r}\n" for r in reqs))
    deps = out / "wheelhouse" / "deps"
    if wheelhouse is not None:
        copy_wheels(wheelhouse, deps)
    else:
        download_wheels(deps, reqs, [], python_version=resolve_python(base_image, python_version))
    (out / "Dockerfile").write_text(render_service_dockerfile(base_image=base_image, uid=uid, gid=gid))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segmap.packager.service_image",
                                description="Build the job service's image (segmap serve) on the MAPs' base image.")
    p.add_argument("--tag", default=DEFAULT_TAG, help=f"image name and version (default: {DEFAULT_TAG})")
    p.add_argument("--base-image", default=CPU_BASE_IMAGE,
                   help=f"base image (default: {CPU_BASE_IMAGE}, made by .ci/docker-setup.sh; a site with registry "
                        "access may name e.g. debian:bookworm-slim)")
    p.add_argument("--uid", type=int, default=DEFAULT_UID, help=f"the service's user id (default {DEFAULT_UID})")
    p.add_argument("--gid", type=int, default=DEFAULT_GID, help=f"the service's group id (default {DEFAULT_GID})")
    p.add_argument("--wheelhouse", default=None, metavar="DIR", help="wheels to use instead of downloading them")
    p.add_argument("--python-version", default=None, metavar="3.N", help="the base image's Python, for the wheels")
    p.add_argument("--source", default=None, metavar="DIR", help="segmap source tree (default: this checkout)")
    p.add_argument("--dry-run", default=None, metavar="DIR", help="write the build context to DIR and stop")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from .cli import find_source_root

        source = Path(args.source) if args.source else find_source_root()
        api = None
        if args.dry_run is None:
            from .docker_engine import connect, image_exists

            api = connect()
            if args.base_image == CPU_BASE_IMAGE and not image_exists(api, CPU_BASE_IMAGE):
                raise ContextError(f"base image {CPU_BASE_IMAGE} not found: run .ci/docker-setup.sh (or pass "
                                   "--base-image with a Debian/Ubuntu image your registry serves)")
        with tempfile.TemporaryDirectory(prefix="segmap-service-") as tmp:
            ctx = write_service_context(Path(args.dry_run or Path(tmp) / "ctx"), source=source,
                                        base_image=args.base_image, uid=args.uid, gid=args.gid,
                                        wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
                                        python_version=args.python_version)
            if args.dry_run is not None:
                print(f"build context {ctx} -> docker build -t {args.tag} {ctx}")
                return 0
            from .build import build_image

            built = build_image(ctx, args.tag, api=api, labels={
                "org.opencontainers.image.title": "segmap service",
                "org.opencontainers.image.version": __version__})
        print(f"built {built.tag} ({built.size_bytes / 1e6:.0f} MB) in {built.seconds:.0f} s")
        return 0
    except SegmapError as e:
        print(f"segmap: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
