"""The connection to the Docker engine, shared by image builds and base-image imports."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable

from ..errors import DockerEngineError

log = logging.getLogger(__name__)

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")



def docker_host() -> str:
    """The engine address the Docker SDK will use (``DOCKER_HOST`` or the default socket)."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def connect(timeout: int = 600) -> Any:
    """A low-level ``docker.APIClient`` with a negotiated API version, or a one-line :class:`DockerEngineError`."""
    try:
        import docker
        from docker.utils import kwargs_from_env
    except ImportError as e:  # pragma: no cover - docker is a declared extra
        raise DockerEngineError("the Docker SDK for Python is not installed: pip install 'segmap[package]'") from e
    try:
        api = docker.APIClient(version="auto", timeout=timeout, **kwargs_from_env())
        api.ping()
    except Exception as e:  # DockerException, requests' ConnectionError, PermissionError on the socket...
        hint = ""
        if "Permission denied" in str(e) or isinstance(e.__context__, PermissionError):
            hint = " (permission denied on the socket: run as root or join the docker group)"
        raise DockerEngineError(f"cannot reach the Docker engine at {docker_host()}: start dockerd or use --dry-run"
                                + hint) from e
    return api


def image_exists(api: Any, name: str) -> bool:
    """Whether the engine holds an image by that name (no registry is asked)."""
    import docker

    try:
        api.inspect_image(name)
    except docker.errors.ImageNotFound:
        return False
    return True


_NOISE = re.compile(r"^(Step \d+/\d+ :|---> |Removing intermediate container|Successfully (built|tagged))")


def follow(lines: Iterable[dict], what: str) -> str | None:
    """Log a decoded Docker progress stream line by line; return the last image id.

    An error record raises :class:`DockerEngineError` naming the failing step and its last line of output (the
    engine's own message only repeats the whole command).
    """
    image_id = None
    step = ""
    last_output = ""
    for item in lines:
        if "error" in item:
            detail = str(item.get("error", "")).strip().splitlines()
            reason = last_output or (detail[-1] if detail else "unknown error")
            where = f" at {step}" if step else ""
            raise DockerEngineError(f"{what} failed{where}: {reason[:300]}")
        text = item.get("stream") or item.get("status")
        if text:
            for line in _ANSI.sub("", str(text)).rstrip().splitlines():
                line = line.rstrip()
                if not line.strip():
                    continue
                log.info("%s", line)
                if line.startswith("Step "):
                    step, last_output = line.split(" :", 1)[0], ""
                elif not _NOISE.match(line.strip()):
                    last_output = line.strip()
        aux = item.get("aux")
        if isinstance(aux, dict) and aux.get("ID"):
            image_id = aux["ID"]
    return image_id
