"""The Python packages that go into a MAP, as wheels in the build context.

Images are built without network access, so every package is installed from ``wheelhouse/`` with
``pip install --no-index --find-links``. Three sets are installed:

* ``requirements.txt``, with dependencies: segmap's own run-time dependencies and the torch pin of its ``app``
  extra (read from the segmap wheel, so ``pyproject.toml`` stays the one source of truth), and what
  ``monai.deploy.core`` and ``holoscan`` import when an application starts (:data:`SDK_RUNTIME`);
* ``requirements-nodeps.txt``, without dependencies: the MONAI Deploy App SDK and Holoscan pins of the ``app``
  extra.
  Their declared dependencies add ``holoscan-cli`` (the packaging tool), ``cupy`` (~250 MB installed) and
  ``tritonclient[all]``'s CUDA and aiohttp clients, none of which a MAP imports to run its graph;
* the segmap wheel itself, built here reproducibly (``SOURCE_DATE_EPOCH``) from the project source, holding only
  what runs: the packager, the demo, the job service and the portal (:data:`NOT_IN_IMAGE`) stay out of the image.
"""

from __future__ import annotations

import email.parser
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from ..errors import WheelhouseError

log = logging.getLogger(__name__)

#: Imported by ``monai.deploy.core`` / ``holoscan`` at start-up: tritonclient (``monai.deploy.core.models`` imports
#: ``tritonclient.http`` and ``tritonclient.grpc``), and holoscan's own small dependencies. wheel-axle-runtime makes
#: holoscan's shared-library links the first time Python starts, which the Dockerfile triggers as root.
SDK_RUNTIME = (
    "cloudpickle>=3.0,<4.0",
    "wheel-axle-runtime<1.0",
    "colorama>=0.4.1",
    "typeguard>=3.0.0",
    "tritonclient[grpc]>=2.53.0",
    "geventhttpclient>=2.3.3",
    "greenlet<3.4.0",
    # holoscan-cu13 links against libcudart.so.13 but leaves it to the system; CPU base images have none.
    "nvidia-cuda-runtime>=13,<14",
)
#: The extra of segmap's pyproject.toml that pins what the application runs on (SDK, Holoscan, torch).
APP_EXTRA = "app"
#: Newest glibc the wheels may need (holoscan-cu13 needs 2.35); Debian bookworm has 2.36, Ubuntu 24.04 2.39.
GLIBC = (2, 35)
#: A fixed build date for the segmap wheel, so that the same source gives the same bytes (1980-01-01, zip's epoch).
SOURCE_DATE_EPOCH = "315532800"
#: Sub-packages of segmap that a MAP never runs, left out of the image's segmap wheel.
NOT_IN_IMAGE = ("segmap/packager", "segmap/demo", "segmap/service", "segmap/submit", "segmap/portal")
_SOURCE_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "README.rst", "LICENSE", "MANIFEST.in")



def _tail(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def _ignore_build_junk(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", "build", "dist") or n.endswith((".pyc", ".pyo", ".egg-info"))]


_built: dict[str, tuple[str, bytes]] = {}


def _source_digest(project: Path) -> str:
    """A digest of what goes into the wheel: the files :func:`build_segmap_wheel` copies, with their modes."""
    h = hashlib.sha256()
    paths = [project / n for n in _SOURCE_FILES if (project / n).is_file()]
    if (project / "src").is_dir():
        for p in sorted((project / "src").rglob("*")):
            parts = p.relative_to(project).parts
            junk = any(part in ("__pycache__", "build", "dist") or part.endswith(".egg-info") for part in parts)
            if p.is_file() and not junk and p.suffix not in (".pyc", ".pyo"):
                paths.append(p)
    for p in paths:
        h.update(str(p.relative_to(project)).encode() + b"\0" + oct(p.stat().st_mode & 0o777).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def build_segmap_wheel(project: Path, dest: Path) -> Path:
    """Build the wheel of the project at ``project`` into ``dest``; the same source gives byte-identical wheels.

    The source is copied to a temporary folder first, so the build writes nothing into the working tree. A wheel
    already built in this process from the same source is reused.
    """
    project = Path(project)
    if not (project / "pyproject.toml").is_file():
        raise WheelhouseError(f"{project}: not a Python project (no pyproject.toml); pass the segmap source root")
    dest.mkdir(parents=True, exist_ok=True)
    digest = _source_digest(project)
    if digest not in _built:
        _built[digest] = _build_wheel(project)
    name, data = _built[digest]
    target = dest / name
    target.write_bytes(data)
    target.chmod(0o644)
    return target


def _build_wheel(project: Path) -> tuple[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="segmap-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in _SOURCE_FILES:
            if (project / name).is_file():
                shutil.copy2(project / name, src / name)
        if (project / "src").is_dir():
            shutil.copytree(project / "src", src / "src", ignore=_ignore_build_junk)
            for sub in NOT_IN_IMAGE:
                shutil.rmtree(src / "src" / sub, ignore_errors=True)
        out = Path(tmp) / "out"
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PYTHONHASHSEED="0")
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                               "--no-index", "--wheel-dir", str(out), str(src)],
                              capture_output=True, text=True, env=env)
        wheels = sorted(out.glob("*.whl")) if out.is_dir() else []
        if proc.returncode != 0 or len(wheels) != 1:
            reason = _tail(proc.stderr + proc.stdout)
            raise WheelhouseError(f"building the segmap wheel from {project} failed: {reason}")
        return wheels[0].name, wheels[0].read_bytes()


def wheel_requirements(wheel: Path, extra: str | None = None) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel, in the wheel's order: the unconditional ones, or those of ``extra``
    (without their marker)."""
    with zipfile.ZipFile(wheel) as zf:
        name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            raise WheelhouseError(f"{wheel}: not a wheel (no .dist-info/METADATA)")
        meta = email.parser.Parser().parsestr(zf.read(name).decode("utf-8"))
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        wanted = re.search(r"\bextra\s*==\s*[\"']([^\"']+)[\"']", marker)
        if (wanted.group(1) if wanted else None) == extra:
            out.append((requirement if extra else line).strip())
    return out


def requirement_sets(segmap_wheel: Path) -> tuple[list[str], list[str]]:
    """``(with_deps, no_deps)`` requirement lines for the image, in a stable order."""
    pins = wheel_requirements(segmap_wheel, APP_EXTRA)
    torch = [r for r in pins if re.match(r"torch\b", r)]
    with_deps = torch + [r for r in wheel_requirements(segmap_wheel) if not re.match(r"torch\b", r)]
    with_deps += [r for r in SDK_RUNTIME if r not in with_deps]
    return with_deps, [r for r in pins if r not in torch]


def sdk_version(no_deps: Sequence[str]) -> str:
    """The MONAI Deploy App SDK version pinned among the image's requirements (app.json ``sdkVersion``)."""
    for r in no_deps:
        m = re.match(r"monai-deploy-app-sdk\s*==\s*([\w.]+)", r)
        if m:
            return m.group(1)
    raise WheelhouseError("segmap's app extra pins no monai-deploy-app-sdk version")


def copy_wheels(source: Path, dest: Path) -> list[Path]:
    """Put every ``*.whl`` of ``source`` into ``dest`` (hard links where possible: wheels are large)."""
    source = Path(source)
    if not source.is_dir():
        raise WheelhouseError(f"{source}: wheelhouse folder not found")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for whl in sorted(source.glob("*.whl")):
        if whl.name.startswith("segmap-"):
            continue  # the context's own segmap wheel wins over a stale one in the user's wheelhouse
        target = dest / whl.name
        if target.exists():
            target.unlink()
        try:
            os.link(whl, target)
        except OSError:
            shutil.copyfile(whl, target)
        out.append(target)
    if not out:
        raise WheelhouseError(f"{source}: wheelhouse holds no .whl files")
    return out


def platform_tags(glibc: tuple[int, int] = GLIBC, arch: str = "x86_64") -> list[str]:
    """Every manylinux tag a system with ``glibc`` accepts (pip takes ``--platform`` values literally)."""
    tags = [f"manylinux_{glibc[0]}_{minor}_{arch}" for minor in range(glibc[1], 16, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def download_wheels(dest: Path, with_deps: Sequence[str], no_deps: Sequence[str], *, python_version: str,
                    glibc: tuple[int, int] = GLIBC) -> list[Path]:
    """``pip download`` the image's packages for ``python_version`` on x86-64 Linux (pip's index settings apply).

    For CPU-only images point pip at a CPU build of torch
    (e.g. ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu``), or pass a ready ``--wheelhouse``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    platforms = [arg for tag in platform_tags(glibc) for arg in ("--platform", tag)]
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest), "--only-binary=:all:",
            *platforms, "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for reqs, extra in ((with_deps, []), (no_deps, ["--no-deps"])):
        if not reqs:
            continue
        log.info("downloading wheels for Python %s: %s", python_version, " ".join(reqs))
        proc = subprocess.run(base + extra + list(reqs), capture_output=True, text=True)
        if proc.returncode != 0:
            raise WheelhouseError(f"pip download for Python {python_version} failed: {_tail(proc.stderr)} "
                                  "(pass --wheelhouse DIR to build offline)")
    return sorted(dest.glob("*.whl"))
