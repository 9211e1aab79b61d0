"""Base images for MAPs.

Where no container registry can be reached, the CPU base image is made locally: ``debootstrap`` lays out a minimal
Debian root filesystem with Python and ``docker import`` turns it into an image. Debian bookworm ships Python 3.11,
which matches the wheels a host with Python 3.11 downloads.

Users with GPUs start from a CUDA runtime image instead (``--base-image``); the Dockerfile installs Python there
with apt when the image lacks it.

Run ``python -m segmap.packager.baseimage`` to make :data:`CPU_BASE_IMAGE` (``--force`` remakes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import BaseImageError, SegmapError
from .docker_engine import DockerEngineError, connect, image_exists

log = logging.getLogger(__name__)

#: Made locally with :func:`build_cpu_base`; the base of ``segmap package --cpu``.
CPU_BASE_IMAGE = "segmap/base-cpu:bookworm"
#: The default base for GPU images: NVIDIA's CUDA runtime on Ubuntu 24.04 (Python 3.12 from apt).
GPU_BASE_IMAGE = "nvidia/cuda:13.0.0-runtime-ubuntu24.04"

#: Python (major.minor) of the base images segmap knows; other images are asked (see :func:`probe_python`).
KNOWN_PYTHON = {CPU_BASE_IMAGE: "3.11", GPU_BASE_IMAGE: "3.12"}

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: libgomp1: the OpenMP runtime, in case a torch wheel relies on the system one.
PACKAGES = ("python3", "python3-venv", "ca-certificates", "libgomp1")
IMAGE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["/bin/bash"]',
)



def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive this machine's apt uses (deb822 ``.sources`` or one-line ``.list`` files)."""
    files = sorted(sources_dir.glob("sources.list.d/*.sources")) + sorted(sources_dir.glob("sources.list.d/*.list"))
    files.append(sources_dir / "sources.list")
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for uri in re.findall(r"^\s*URIs:\s*(\S+)", text, flags=re.M) + \
                re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, flags=re.M):
            if re.search(r"/debian/?$", uri):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _run(cmd: list[str], what: str) -> None:
    log.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.debug("%s", line.rstrip())
        tail = (tail + [line.rstrip()])[-5:]
    if proc.wait() != 0:
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        raise BaseImageError(f"{what} failed (exit {proc.returncode}): {last}")


def _tar_stream(rootfs: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The root filesystem as a tar stream (``tar`` keeps device nodes, owners and modes as debootstrap made them)."""
    proc = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", "-", "."], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    while data := proc.stdout.read(chunk):
        yield data
    if proc.wait() != 0:
        err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
        raise BaseImageError(f"packing the root filesystem failed: {err[-1] if err else proc.returncode}")


def build_cpu_base(name: str = CPU_BASE_IMAGE, *, mirror: str | None = None, suite: str = SUITE,
                   packages: tuple[str, ...] = PACKAGES, api: Any = None) -> str:
    """Make ``name`` from a debootstrapped Debian ``suite`` with Python; return the image id.

    Needs root, ``debootstrap`` and ``tar`` on the host, and the Debian mirror reachable.
    """
    if shutil.which("debootstrap") is None:
        raise BaseImageError("debootstrap is not installed: apt-get install -y debootstrap "
                             "(or run .ci/docker-setup.sh)")
    api = api or connect()
    mirror = mirror or debian_mirror()
    repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="segmap-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", suite, str(rootfs), mirror],
             f"debootstrap {suite} from {mirror}")
        # Package caches only add size; apt lists can be fetched again by a Dockerfile that needs apt.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        log.info("importing %s", name)
        result = api.import_image(src=_tar_stream(rootfs), repository=repository, tag=tag,
                                  changes=list(IMAGE_CHANGES), stream_src=True)
    records = [json.loads(line) for line in str(result).splitlines() if line.strip().startswith("{")]
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        raise DockerEngineError(f"docker import of {name} failed: {errors[-1]}")
    image_id = api.inspect_image(name)["Id"]
    log.info("made %s (%s) in %.0f s", name, image_id[:19], time.monotonic() - start)
    return image_id


def ensure_cpu_base(name: str = CPU_BASE_IMAGE, *, force: bool = False, api: Any = None) -> str:
    """Make the CPU base image unless the engine already holds it; return its name."""
    api = api or connect()
    if force or not image_exists(api, name):
        build_cpu_base(name, api=api)
    return name


def probe_python(image: str, api: Any = None) -> str | None:
    """Python major.minor inside a local ``image``, or None when the image is absent or has no ``python3``."""
    if image in KNOWN_PYTHON:
        return KNOWN_PYTHON[image]
    api = api or connect()
    if not image_exists(api, image):
        return None
    container = api.create_container(image, entrypoint=["python3", "-c",
                                                        "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     network_disabled=True)
    try:
        try:
            api.start(container)
        except Exception:  # no python3 in the image
            return None
        if api.wait(container).get("StatusCode") != 0:
            return None
        out = api.logs(container, stdout=True, stderr=False).decode().strip()
    finally:
        api.remove_container(container, force=True)
    return out if re.fullmatch(r"\d+\.\d+", out) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segmap.packager.baseimage",
                                description=f"Make the local CPU base image ({CPU_BASE_IMAGE}) with debootstrap.")
    p.add_argument("--name", default=CPU_BASE_IMAGE)
    p.add_argument("--mirror", default=None, help="Debian mirror (default: the one apt uses here)")
    p.add_argument("--force", action="store_true", help="remake the image even when it exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        api = connect()
        if not args.force and image_exists(api, args.name):
            print(f"{args.name} exists")
            return 0
        build_cpu_base(args.name, mirror=args.mirror, api=api)
        print(f"{args.name} made")
        return 0
    except SegmapError as e:
        print(f"segmap: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
