"""The local Docker runner: one detached container per job, named after the job key, driven by the Docker SDK.

Everything the service must know after a restart lives on the container itself: its name (the run name), its labels
(``segmap.deadline``, the epoch second past which it is killed, so a restarted service still enforces the timeout)
and its state (running, exited with a code, OOM-killed). ``start`` is therefore idempotent: a container of that name
is adopted, never started a second time, also when two starters race (the engine answers 409 to the second create).

Each container runs isolated: no network, the input folder mounted read-only, a writable per-job output folder, a
non-root user, CPU and memory limits (swap off, so an out-of-memory run is reported as such instead of crawling),
every capability dropped, no privilege escalation, and GPUs only when the spec names them.

And bounded (:class:`DockerOptions`, ``runner.docker``): a limit on its processes (a fork bomb stops there), a
read-only root filesystem with a small tmpfs at ``/tmp`` (nothing written into the engine's storage), and a cap on
what it writes into its output folder, checked at every status poll while it runs and once when it ends: a run
over the cap is killed and failed with one line, so one MAP cannot fill the disk that holds the spool and the store.
"""

from __future__ import annotations

import logging
import os
import platform
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import RunnerError
from segmap.text import one_line
from ..schema import memory as _memory_check, positive, setting
from .base import CONTAINER_INPUT, CONTAINER_OUTPUT, RunSpec, RunStatus

log = logging.getLogger(__name__)

#: The user segmap's MAP images run as (distroless' "nonroot"); used when an image declares none or root.
MAP_USER = "65532:65532"
#: Label on every container this runner starts: how the service lists its own runs and leaves others alone.
RUN_LABEL = "segmap.run"
DEADLINE_LABEL = "segmap.deadline"
TIMEOUT_LABEL = "segmap.timeout_s"
#: The engine's "never" for StartedAt/FinishedAt.
_ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class DockerOptions:
    """``runner.docker``: what bounds each MAP container besides CPUs, memory and time."""

    pids_limit: int = setting(1024, "processes and threads per container", check=positive)
    read_only_root: bool = setting(True, "the container's root filesystem read-only (writes go to /tmp and the "
                                         "output folder)")
    tmpfs_size: str = setting("512m", "size of the tmpfs at /tmp (in the container's memory)", check=_memory_check)
    max_output_bytes: int = setting(8 << 30, "bytes a run may write into its output folder; past it the run is "
                                             "killed and failed", check=positive)


class DockerRunner:
    """Runs MAP images on the local Docker engine (:class:`~segmap.service.runners.base.Runner`).

    ``client``: a ``docker.DockerClient`` (default: from the environment, ``DOCKER_HOST`` or the local socket).
    ``user``: ``"uid:gid"`` for the containers. By default a service running as root runs them as the image's own
    non-root user (65532 for segmap's images) and hands it the output folder; a service running as a normal user
    runs them as its own uid:gid, so the outputs belong to it.
    """

    kind = "docker"
    runs_digest = True
    local = True

    def __init__(self, client: Any = None, *, user: str | None = None,
                 options: DockerOptions | None = None) -> None:
        if client is None:
            try:
                import docker

                client = docker.from_env(timeout=60)
                client.ping()
            except Exception as e:  # DockerException, requests' ConnectionError, PermissionError on the socket
                raise RunnerError(f"cannot reach the Docker engine at {_docker_host()}: {_reason(e)}") from e
        self.client = client
        self.user = user
        self.options = options or DockerOptions()
        self._node: str | None = None

    # ----------------------------------------------------------------------------------------------- interface

    def image_digest(self, image: str) -> str:
        """The image's content id (``sha256:...``): it changes whenever the image is rebuilt, unlike its tag."""
        import docker

        try:
            return str(self.client.images.get(image).id)
        except docker.errors.ImageNotFound:
            raise RunnerError(f"image {image} is not in the Docker engine (build it with segmap package, or "
                              f"docker pull it)") from None
        except Exception as e:
            raise RunnerError(f"Docker engine: cannot inspect image {image}: {_reason(e)}") from e

    def start(self, spec: RunSpec) -> RunStatus:
        """Start ``spec`` detached, or adopt the container already named ``spec.name`` (never a second one)."""
        import docker

        existing = self._get(spec.name)
        if existing is not None:
            log.info("run %s: adopting the existing container (%s)", spec.name, existing.status)
            return self._adopt(existing)
        user = self._prepare_folders(spec)
        deadline = time.time() + float(spec.timeout_s)
        try:
            container = self.client.containers.create(spec.image, name=spec.name, detach=True, **self._options(
                spec, user, deadline))
        except docker.errors.ImageNotFound:
            raise RunnerError(f"run {spec.name}: image {spec.image} is not in the Docker engine") from None
        except docker.errors.APIError as e:
            if e.status_code == 409:  # another starter created it between our look-up and our create: adopt
                existing = self._wait_for(spec.name)
                if existing is not None:
                    log.info("run %s: created concurrently elsewhere; adopting it", spec.name)
                    return self._adopt(existing)
            raise RunnerError(f"run {spec.name}: the Docker engine refused to create it: {_reason(e)}") from e
        except Exception as e:
            raise RunnerError(f"run {spec.name}: cannot create the container: {_reason(e)}") from e
        try:
            container.start()
        except Exception as e:
            # Leave nothing half-made behind: a created-but-never-started container would be adopted as pending.
            self._remove_quietly(container)
            raise RunnerError(f"run {spec.name}: the Docker engine could not start it: {_reason(e)}") from e
        log.info("run %s: started %s as %s (timeout %.0f s)", spec.name, spec.image, user, spec.timeout_s)
        return self.status(spec.name)

    def status(self, name: str) -> RunStatus:
        """The container's state; a running container past its deadline is killed and reported as timed out."""
        container = self._get(name)
        if container is None:
            return RunStatus("missing")
        state = container.attrs.get("State", {})
        if state.get("Status") in ("running", "restarting", "paused") and self._past_deadline(container):
            timeout = container.labels.get(TIMEOUT_LABEL, "?")
            log.warning("run %s: timed out after %s s; killing it", name, timeout)
            self._kill(container)
            container = self._get(name)
            if container is None:
                return RunStatus("failed", error=f"timed out after {timeout} s")
            state = container.attrs.get("State", {})
        over = self._output_over_cap(container)
        if over is not None:
            if state.get("Status") in ("running", "restarting", "paused"):
                log.warning("run %s: %s; killing it", name, over)
                self._kill(container)
                container = self._get(name) or container
                state = container.attrs.get("State", {})
            return RunStatus("failed", exit_code=state.get("ExitCode"), error=over,
                             started_at=_epoch(state.get("StartedAt")), finished_at=_epoch(state.get("FinishedAt")),
                             node=self._node_name())
        return self._status_of(container, state)

    def _output_over_cap(self, container) -> str | None:
        """One line when the run's output folder holds more than ``max_output_bytes`` (None: within the cap)."""
        cap = self.options.max_output_bytes
        for mount in container.attrs.get("Mounts", []):
            if mount.get("Destination") == CONTAINER_OUTPUT and mount.get("Source"):
                written = _folder_bytes(Path(mount["Source"]), stop_past=cap)
                if written > cap:
                    return f"wrote more than runner.docker.max_output_bytes ({_size(cap)}) into its output folder"
        return None

    def logs(self, name: str, tail: int = 200) -> str:
        container = self._get(name)
        if container is None:
            return ""
        try:
            return container.logs(stdout=True, stderr=True, tail=tail).decode("utf-8", errors="replace")
        except Exception as e:
            raise RunnerError(f"run {name}: cannot read its log from the Docker engine: {_reason(e)}") from e

    def cancel(self, name: str) -> None:
        container = self._get(name)
        if container is None:
            return
        self._kill(container)
        self._remove(container)
        log.info("run %s: cancelled and removed", name)

    def remove(self, name: str) -> None:
        container = self._get(name)
        if container is not None:
            self._remove(container)

    # ----------------------------------------------------------------------------------------------- extras

    def runs(self) -> list[str]:
        """Names of every container this runner started that still exists (running or not), for the service's
        start-up inventory and its GPU-slot count."""
        try:
            found = self.client.containers.list(all=True, filters={"label": RUN_LABEL})
        except Exception as e:
            raise RunnerError(f"Docker engine: cannot list segmap's containers: {_reason(e)}") from e
        return sorted(c.name for c in found)

    # ----------------------------------------------------------------------------------------------- helpers

    def _options(self, spec: RunSpec, user: str, deadline: float) -> dict[str, Any]:
        import docker

        labels = {**{str(k): str(v) for k, v in spec.labels.items()}, RUN_LABEL: spec.name,
                  DEADLINE_LABEL: f"{deadline:.3f}", TIMEOUT_LABEL: f"{float(spec.timeout_s):g}"}
        options: dict[str, Any] = {
            "environment": {str(k): str(v) for k, v in spec.env.items()},
            "labels": labels,
            "user": user,
            "network_mode": "none",
            "volumes": {str(Path(spec.input_dir).resolve()): {"bind": CONTAINER_INPUT, "mode": "ro"},
                        str(Path(spec.output_dir).resolve()): {"bind": CONTAINER_OUTPUT, "mode": "rw"}},
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": self.options.pids_limit,
        }
        if self.options.read_only_root:
            options["read_only"] = True
            # A world-writable, sticky /tmp in the container's memory (counted against its memory limit).
            options["tmpfs"] = {"/tmp": f"rw,nosuid,nodev,size={self.options.tmpfs_size},mode=1777"}
        if spec.cpus:
            options["nano_cpus"] = int(float(spec.cpus) * 1e9)
        if spec.memory:
            # Swap equal to the limit means none: past the limit the kernel kills the run and the engine says so.
            options["mem_limit"] = options["memswap_limit"] = spec.memory
        if spec.gpus:
            options["device_requests"] = [docker.types.DeviceRequest(device_ids=[str(g) for g in spec.gpus],
                                                                     capabilities=[["gpu"]])]
        return options

    def _prepare_folders(self, spec: RunSpec) -> str:
        """The container's ``uid:gid``, after making the input readable and the output writable for it."""
        inp, out = Path(spec.input_dir), Path(spec.output_dir)
        if not inp.is_dir():
            raise RunnerError(f"run {spec.name}: input folder {inp} does not exist")
        out.mkdir(parents=True, exist_ok=True)
        if self.user:
            user = self.user
        elif os.geteuid() != 0:
            return f"{os.getuid()}:{os.getgid()}"  # the folders are already ours
        else:
            user = self._image_user(spec.image)
        uid, gid = _ids(user, spec.name)
        if os.geteuid() == 0:
            # The service (root) owns the folders; the container's user needs to write the output and read the input.
            os.chown(out, uid, gid)
            out.chmod(0o750)
            _grant_read(inp, uid, gid)
        return user

    def _image_user(self, image: str) -> str:
        """The image's declared numeric user, or :data:`MAP_USER` when it declares root, none, or a user name (a
        name cannot be mapped to the uid that must own the output folder)."""
        try:
            declared = str(self.client.images.get(image).attrs.get("Config", {}).get("User") or "")
        except Exception:
            return MAP_USER  # create() reports the missing image with its own message
        uid, _, gid = declared.partition(":")
        if uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()):
            return f"{uid}:{gid or uid}"
        return MAP_USER

    def _get(self, name: str):
        import docker

        try:
            return self.client.containers.get(name)
        except docker.errors.NotFound:
            return None
        except Exception as e:
            raise RunnerError(f"run {name}: cannot ask the Docker engine about it: {_reason(e)}") from e

    def _wait_for(self, name: str, timeout: float = 10.0):
        """The container another starter is creating: the engine reserves the name (409 to us) a moment before the
        container can be inspected."""
        deadline = time.monotonic() + timeout
        while True:
            container = self._get(name)
            if container is not None or time.monotonic() > deadline:
                return container
            time.sleep(0.05)

    def adopt(self, name: str) -> RunStatus:
        container = self._get(name)
        return RunStatus("missing") if container is None else self._adopt(container)

    def _adopt(self, container) -> RunStatus:
        if container.status == "created":  # the earlier starter died between create and start: finish its work
            try:
                container.start()
            except Exception as e:
                raise RunnerError(f"run {container.name}: the Docker engine could not start it: {_reason(e)}") from e
        return self.status(container.name)

    def _past_deadline(self, container) -> bool:
        try:
            return time.time() > float(container.labels.get(DEADLINE_LABEL, "inf"))
        except ValueError:
            return False

    def _status_of(self, container, state: dict) -> RunStatus:
        started, finished = _epoch(state.get("StartedAt")), _epoch(state.get("FinishedAt"))
        node = self._node_name()
        status = state.get("Status", "")
        if status == "created":
            return RunStatus("pending", node=node)
        if status in ("running", "restarting", "paused", "removing"):
            return RunStatus("running", started_at=started, node=node)
        code = state.get("ExitCode")
        if code == 0 and not state.get("OOMKilled"):
            return RunStatus("succeeded", exit_code=0, started_at=started, finished_at=finished, node=node)
        return RunStatus("failed", exit_code=code, error=self._failure(container, state, finished), started_at=started,
                         finished_at=finished, node=node)

    def _failure(self, container, state: dict, finished: float | None) -> str:
        """One line saying why a container failed: out of memory, timed out, or its own last error line."""
        code = state.get("ExitCode")
        if state.get("OOMKilled"):
            limit = container.attrs.get("HostConfig", {}).get("Memory") or 0
            return f"killed: out of memory (limit {_size(limit)})" if limit else "killed: out of memory"
        deadline = container.labels.get(DEADLINE_LABEL)
        if code and finished is not None and deadline and finished >= float(deadline):
            return f"timed out after {container.labels.get(TIMEOUT_LABEL, '?')} s"
        if state.get("Error"):
            return one_line(f"the Docker engine could not run it: {state['Error']}")
        last = _last_error_line(container)
        return one_line(f"exited with code {code}" + (f": {last}" if last else ""))

    def _node_name(self) -> str:
        if self._node is None:
            try:
                self._node = str(self.client.info().get("Name") or platform.node())
            except Exception:
                self._node = platform.node()
        return self._node

    def _kill(self, container) -> None:
        import docker

        try:
            container.kill()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: not running any more, which is what we wanted
                raise RunnerError(f"run {container.name}: the Docker engine could not kill it: {_reason(e)}") from e
        _wait_stopped(container)

    def _remove(self, container) -> None:
        import docker

        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "already in progress" not in str(e):
                raise RunnerError(f"run {container.name}: the Docker engine could not remove it: {_reason(e)}") from e

    def _remove_quietly(self, container) -> None:
        try:
            container.remove(force=True)
        except Exception:  # the start error is the one worth reporting
            pass


# ------------------------------------------------------------------------------------------------ functions


def _folder_bytes(folder: Path, stop_past: int) -> int:
    """Bytes of the files under ``folder`` (symbolic links not followed), counting stopped once past ``stop_past``."""
    total = 0
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
            if total > stop_past:
                return total
    return total


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _reason(e: BaseException) -> str:
    """The engine's own explanation when it gave one, else the exception's text; one line."""
    text = getattr(e, "explanation", None) or str(e) or type(e).__name__
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return one_line(str(text))




def _epoch(text: str | None) -> float | None:
    """The engine's RFC 3339 time (nanoseconds, ``Z``) as epoch seconds; None for its zero time."""
    if not text or text.startswith(_ZERO_TIME[:4]):
        return None
    head, _, frac = text.rstrip("Z").partition(".")
    offset = ""
    for sign in ("+", "-"):  # "...+01:00" offsets after the fraction
        if sign in frac:
            frac, _, rest = frac.partition(sign)
            offset = sign + rest
    try:
        when = datetime.fromisoformat(head + (offset or "+00:00"))
    except ValueError:
        return None
    return when.astimezone(timezone.utc).timestamp() + (float("0." + frac) if frac.isdigit() else 0.0)


def _ids(user: str, run: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise RunnerError(f"run {run}: container user must be numeric uid[:gid], got {user!r}")
    return int(uid), int(gid or uid)


def _grant_read(folder: Path, uid: int, gid: int) -> None:
    """Let ``uid``/``gid`` read ``folder``'s tree without opening it to everyone: files it cannot read already get
    its group and the group read bit (hard links from the spool share the change, which is harmless)."""
    for path in [folder, *folder.rglob("*")]:
        st = path.stat()
        want = stat.S_IRGRP | (stat.S_IXGRP if stat.S_ISDIR(st.st_mode) else 0)
        other = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        if st.st_uid == uid or st.st_mode & other == other:
            continue
        if st.st_gid != gid:
            os.chown(path, -1, gid)
        if st.st_mode & want != want:
            path.chmod(stat.S_IMODE(st.st_mode) | want)


def _wait_stopped(container, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            container.reload()
        except Exception:
            return
        if container.status not in ("running", "restarting", "removing"):
            return
        time.sleep(0.1)


def _last_error_line(container) -> str:
    """The run's ``segmap: error: ...`` line (the MAP's one-line reason), else its last non-empty log line."""
    try:
        text = container.logs(stdout=True, stderr=True, tail=50).decode("utf-8", errors="replace")
    except Exception:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("segmap: error:")]
    return (errors or lines or [""])[-1]


def _size(n: int) -> str:
    for unit, factor in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"
