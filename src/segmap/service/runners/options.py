"""The runners' sections of the service configuration, declared without importing any runner's client library
(``segmap serve --check`` and ``segmap jobs`` must work where the kubernetes package is not installed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from segmap.service import schema
from segmap.service.schema import setting


@dataclass(frozen=True)
class KubernetesOptions:
    """``runner.kubernetes``: where and how the Kubernetes runner creates its Jobs (checked without contacting
    anything, and without importing the Kubernetes client)."""

    pvc_name: str = setting(help="the PersistentVolumeClaim that holds the service's workdir and is mounted into "
                                 "every MAP pod")
    namespace: str | None = setting(None, "namespace of the Jobs (default: the one segmap serve runs in)",
                                    check=schema.dns_label)
    service_account: str | None = setting(None, "service account of the MAP pods")
    node_selector: Mapping[str, str] = setting({}, "node labels the MAP pods must match")
    image_pull_secrets: tuple[str, ...] = setting((), "secrets for pulling the MAP images")
    run_as_user: int = setting(65532, "user id of the MAP container (not root)",
                               check=lambda v: None if v > 0 else f"must be a non-root user id (1 or more), got {v}")
    ttl_seconds_after_finished: int = setting(86400, "seconds until the cluster deletes a finished Job",
                                              check=schema.not_negative)
    delete_wait_s: float = setting(10.0, "seconds to wait for a deleted Job to go", check=schema.not_negative)
