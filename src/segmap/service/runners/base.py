"""The one small interface every runner implements, and the values that cross it.

A run is named after the job's idempotency key (:func:`segmap.service.keys.run_name`), so ``start`` is idempotent:
when a run of that name already exists (the service restarted while it ran), the runner adopts it instead of
starting a second one. ``status`` is the source of truth after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Protocol, Sequence

#: Where a MAP reads its input and writes its output inside the container (Holoscan's defaults).
CONTAINER_INPUT = "/var/holoscan/input"
CONTAINER_OUTPUT = "/var/holoscan/output"

RunState = Literal["pending", "running", "succeeded", "failed", "missing"]


@dataclass(frozen=True)
class RunSpec:
    """One container run of a MAP image for one job.

    ``input_dir`` (the series' DICOM files) is mounted read-only at :data:`CONTAINER_INPUT`, ``output_dir`` writable
    at :data:`CONTAINER_OUTPUT`. ``timeout_s`` is wall-clock from the start; a run past it is killed and reported
    failed. ``gpus`` are device ids ("0", "1"); empty means CPU only.
    """

    name: str
    image: str
    input_dir: Path
    output_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: float | None = None
    memory: str | None = None
    gpus: Sequence[str] = ()
    timeout_s: float = 1800.0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStatus:
    """What a runner knows about a run. ``error`` is one line (for the job list) when ``state`` is ``failed``."""

    state: RunState
    exit_code: int | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    node: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")


class Runner(Protocol):
    """Runs MAP containers. Implementations: :mod:`.docker` (local engine), :mod:`.kubernetes` (one Job per run)."""

    kind: str
    #: True when the run may be given the image by its content digest (the engine resolves ``sha256:...`` itself).
    runs_digest: bool
    #: True when runs happen on this host (the job's node is this host's name; otherwise the runner reports it).
    local: bool

    def image_digest(self, image: str) -> str:
        """The content digest of ``image`` (``sha256:...``), part of the job's idempotency key."""

    def start(self, spec: RunSpec) -> RunStatus:
        """Start the run, or adopt the existing run named ``spec.name`` (never a second one)."""

    def status(self, name: str) -> RunStatus:
        """The run's state; ``missing`` when no run of that name exists."""

    def adopt(self, name: str) -> RunStatus:
        """Take over a run that an earlier process started: finish what that process may have left half-done (a
        Docker container created but never started), then the run's state."""

    def logs(self, name: str, tail: int = 200) -> str:
        """The last ``tail`` lines of the run's output ('' when missing)."""

    def cancel(self, name: str) -> None:
        """Stop and remove the run; nothing happens when it does not exist."""

    def remove(self, name: str) -> None:
        """Remove a finished run after its result was collected; nothing happens when it does not exist."""
