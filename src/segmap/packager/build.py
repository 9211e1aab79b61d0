"""Image builds from a written context, with the Docker SDK's low-level API (progress goes to the log)."""

from __future__ import annotations

import logging
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


def image_labels(*, variant: str, version: str, task_name: str, model_name: str) -> dict[str, str]:
    """OCI labels that say what an image is without running it."""
    return {
        "org.opencontainers.image.title": f"segmap {task_name} ({variant})",
        "org.opencontainers.image.version": version,
        "io.segmap.variant": variant,
        "io.segmap.task": task_name,
        "io.segmap.model": model_name,
        "io.segmap.version": __version__,
    }


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
