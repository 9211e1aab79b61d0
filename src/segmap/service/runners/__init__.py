"""Where a job's MAP container runs: the local Docker engine, or a Kubernetes cluster (one Job per segmap job).

:data:`RUNNERS` is the registry: ``runner.kind`` -> a function making that runner from its options section (None
when the kind has none), the service's workdir, and the text that names the section in errors. The service loop
never asks which runner it has; what differs between them is a property of the runner
(:attr:`~.base.Runner.runs_digest`, :attr:`~.base.Runner.local`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .base import Runner


def _docker(options: Any, workdir: Path, where: str) -> Runner:
    from .docker import DockerRunner  # lazy: the Docker SDK is needed only by a service that runs containers here

    return DockerRunner(options=options)


def _kubernetes(options: Any, workdir: Path, where: str) -> Runner:
    from .kubernetes import KubernetesRunner  # lazy: the kubernetes client is heavy and optional

    return KubernetesRunner.from_options(options, workdir_root=workdir, where=where)


#: ``runner.kind`` -> the factory of that runner.
RUNNERS: dict[str, Callable[[Any, Path, str], Runner]] = {"docker": _docker, "kubernetes": _kubernetes}


def make_runner(config) -> Runner:
    """The runner a :class:`~segmap.service.config.ServiceConfig` names."""
    kind = config.runner.kind
    options = getattr(config.runner, "docker", None) if kind == "docker" else config.runner.options
    return RUNNERS[kind](options, config.workdir, f"{config.path}: runner.{kind}")
