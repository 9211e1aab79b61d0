"""Image builds from a written context, with the Docker SDK's low-level API (progress goes to the log)."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import __version__
from .docker_engine import DockerEngineError, connect, follow

log = logging.getLogger(__name__)


#: Builds read a long silent step (copying the Python environment) without timing out.
BUILD_TIMEOUT_S = 3600


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    image_id: str
    size_bytes: int
    seconds: float


def source_revision(source: str | Path | None) -> str:
    """The git commit of the source tree the image is built from ("unknown" outside a git checkout); "-dirty" is
    appended when tracked files differ from it, so a label never claims a commit the image does not match."""
    if source is None or shutil.which("git") is None:
        return "unknown"
    try:
        rev = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty else "")


def source_url(source: str | Path | None) -> str:
    """Where the image's source lives (the OCI ``source`` label): ``SEGMAP_SOURCE_URL`` at package time, else the
    source tree's git ``origin``, else "unknown" (a local path would mean nothing to whoever inspects the image)."""
    if os.environ.get("SEGMAP_SOURCE_URL"):
        return os.environ["SEGMAP_SOURCE_URL"]
    if source is not None and shutil.which("git"):
        try:
            url = subprocess.run(["git", "-C", str(source), "remote", "get-url", "origin"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        if url.returncode == 0 and url.stdout.strip():
            return url.stdout.strip()
    return "unknown"


def created_timestamp() -> str:
    """RFC 3339 UTC build time; ``SOURCE_DATE_EPOCH`` (reproducible builds) wins over the clock."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch and epoch.isdigit() \
        else datetime.datetime.now(datetime.timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def image_labels(*, variant: str, version: str, task_name: str, model_name: str, model_sha256: str | None = None,
                 source: str | Path | None = None, base_image: str | None = None, ref: str | None = None,
                 created: str | None = None, revision: str | None = None) -> dict[str, str]:
    """OCI labels that say what an image is without running it (``docker inspect``)."""
    labels = {
        "org.opencontainers.image.title": f"segmap {task_name} ({variant})",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": created or created_timestamp(),
        "org.opencontainers.image.revision": revision or source_revision(source),
        "org.opencontainers.image.source": source_url(source),
        "io.segmap.variant": variant,
        "io.segmap.task": task_name,
        "io.segmap.model": model_name,
        "io.segmap.model.sha256": model_sha256 or "unknown",
        "io.segmap.version": __version__,
    }
    if base_image:
        labels["org.opencontainers.image.base.name"] = base_image
    if ref:
        labels["org.opencontainers.image.ref.name"] = ref
    return labels


def build_image(context: str | Path, tag: str, *, buildargs: Mapping[str, str] | None = None,
                labels: Mapping[str, str] | None = None, nocache: bool = False, api: Any = None) -> BuiltImage:
    """``docker build`` ``context`` as ``tag``; raise :class:`DockerEngineError` with the failing step's last line."""
    context = Path(context)
    if not (context / "Dockerfile").is_file():
        raise DockerEngineError(f"{context}: no Dockerfile; write the context first (segmap package --dry-run)")
    api = api or connect(timeout=BUILD_TIMEOUT_S)
    start = time.monotonic()
    log.info("building %s from %s", tag, context)
    try:
        stream = api.build(path=str(context), tag=tag, rm=True, forcerm=True, decode=True, nocache=nocache,
                           buildargs=dict(buildargs or {}), labels=dict(labels or {}))
        follow(stream, f"docker build of {tag}")
    except DockerEngineError:
        raise
    except Exception as e:  # APIError, connection reset by a dying engine, ...
        detail = getattr(e, "explanation", None) or str(e)
        raise DockerEngineError(f"docker build of {tag} failed: {str(detail).strip().splitlines()[-1]}") from e
    info = api.inspect_image(tag)
    built = BuiltImage(tag=tag, image_id=info["Id"], size_bytes=int(info.get("Size", 0)),
                       seconds=time.monotonic() - start)
    log.info("built %s (%s, %.0f MB) in %.0f s", tag, built.image_id[:19], built.size_bytes / 1e6, built.seconds)
    return built
