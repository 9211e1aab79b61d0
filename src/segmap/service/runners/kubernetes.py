"""The Kubernetes runner: one ``batch/v1`` Job per segmap job, through the official ``kubernetes`` client.

The Job is named after the job's idempotency key (:func:`segmap.service.keys.run_name`), so the API server's
uniqueness of names is what makes ``start`` idempotent: a 409 AlreadyExists means an earlier attempt (or an earlier
``segmap serve`` process) created it, and the runner adopts that Job instead of creating a second one. Nothing about
a run is kept in this process: ``status`` reads the Job and its pod every time, so after a restart the cluster's
view is the source of truth.

Input and output travel through one PersistentVolumeClaim that ``segmap serve`` also mounts at ``workdir_root``:
the RunSpec's folders are mounted into the MAP's pod with ``subPath`` (input read-only). The Job retries nothing
(``backoffLimit: 0``) because the job store owns attempts and back-off; ``activeDeadlineSeconds`` is the run's
timeout. It counts from the Job's start, so time spent unschedulable (waiting for a GPU) counts too.

What the runner cannot do that the Docker runner does: see the registry (see :meth:`KubernetesRunner.image_digest`),
pick GPU device ids (the scheduler assigns ``nvidia.com/gpu`` devices; only their number matters), and cut the
network by itself (``deploy/`` holds a NetworkPolicy that denies all traffic to MAP pods, which the cluster's
network plugin must enforce).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from segmap.errors import RunnerError, ServiceConfigError
from segmap.text import one_line
from segmap.service.runners.base import CONTAINER_INPUT, CONTAINER_OUTPUT, RunSpec, RunStatus
from segmap.service.runners.options import KubernetesOptions

log = logging.getLogger(__name__)

MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "app.kubernetes.io/component"
RUN_LABEL = "segmap/run"
#: The pods of MAP runs carry this component label; deploy/'s NetworkPolicy selects it to deny all their traffic.
MAP_COMPONENT = "map-run"
CONTAINER_NAME = "map"
WORK_VOLUME = "work"
#: Finished Jobs (and their pods, with the logs) are deleted by the cluster after a day unless segmap removed them
#: first; the outputs stay on the volume.
DEFAULT_TTL_S = KubernetesOptions.ttl_seconds_after_finished
#: (connect, read) seconds for each API call: the service loop must not hang on an unreachable API server.
REQUEST_TIMEOUT = (5, 30)

#: Reasons a container waits that the kubelet will not resolve by itself within the run's deadline: the run is
#: reported failed at once (the store retries later with back-off) instead of hanging until activeDeadlineSeconds.
STUCK_REASONS = frozenset({"ErrImageNeverPull", "InvalidImageName", "ImagePullBackOff", "CreateContainerConfigError",
                           "CreateContainerError"})
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DOCKER_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([bkmgt]?)b?$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------- the manifest


def job_manifest(spec: RunSpec, *, pvc_name: str, workdir_root: str | Path, service_account: str | None = None,
                 node_selector: Mapping[str, str] | None = None, image_pull_secrets: Sequence[str] = (),
                 run_as_user: int = KubernetesOptions.run_as_user,
                 ttl_seconds_after_finished: int = DEFAULT_TTL_S) -> k8s.V1Job:
    """The ``batch/v1`` Job that runs ``spec`` once; pure (no API calls), so it is tested field by field.

    ``workdir_root`` is where ``segmap serve`` mounts the PersistentVolumeClaim ``pvc_name``: the RunSpec's input and
    output folders must lie under it, and reach the MAP's pod as ``subPath`` mounts of the same claim.
    """
    if not _DNS_LABEL.match(spec.name) or len(spec.name) > 63:
        raise RunnerError(f"run name {spec.name!r} is not a DNS-1123 label of at most 63 characters")
    if run_as_user <= 0:
        raise RunnerError(f"run_as_user must be a non-root user id (1 or more), got {run_as_user}")
    labels = {**sanitise_labels(spec.labels), MANAGED_BY: "segmap", COMPONENT: MAP_COMPONENT, RUN_LABEL: spec.name}
    resources = _resources(spec)
    gid = run_as_user
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=spec.image,
        # A pinned digest never needs a second pull; a tag keeps what the node has, as the job key keeps the tag.
        image_pull_policy="IfNotPresent",
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in sorted(spec.env.items())],
        resources=resources,
        security_context=k8s.V1SecurityContext(
            run_as_non_root=True, run_as_user=run_as_user, run_as_group=gid, allow_privilege_escalation=False,
            privileged=False, read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        volume_mounts=[
            k8s.V1VolumeMount(name=WORK_VOLUME, mount_path=CONTAINER_INPUT, read_only=True,
                              sub_path=_sub_path(spec.input_dir, workdir_root, "input")),
            k8s.V1VolumeMount(name=WORK_VOLUME, mount_path=CONTAINER_OUTPUT,
                              sub_path=_sub_path(spec.output_dir, workdir_root, "output")),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
        termination_message_policy="FallbackToLogsOnError",
    )
    pod_spec = k8s.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        # The MAP talks to nobody: no API token, no service environment variables.
        automount_service_account_token=False,
        enable_service_links=False,
        service_account_name=service_account,
        node_selector=dict(node_selector) if node_selector else None,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=s) for s in image_pull_secrets] or None,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=run_as_user, run_as_group=gid, fs_group=gid,
            # Only the volume's root is re-owned when it differs: a recursive chown of a large workdir per job
            # would make every start slow.
            fs_group_change_policy="OnRootMismatch",
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        volumes=[
            k8s.V1Volume(name=WORK_VOLUME,
                         persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=pvc_name)),
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi")),
        ],
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(name=spec.name, labels=labels),
        spec=k8s.V1JobSpec(
            # The store counts attempts and backs off; a Job that retried by itself would run twice per attempt.
            backoff_limit=0,
            completions=1,
            parallelism=1,
            active_deadline_seconds=max(1, int(math.ceil(spec.timeout_s))),
            ttl_seconds_after_finished=int(ttl_seconds_after_finished),
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=pod_spec),
        ),
    )


def sanitise_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` made valid for Kubernetes: keys ``[prefix/]name``, values at most 63 of ``[A-Za-z0-9-_.]``.

    Characters outside the set become ``-`` and long values are cut to 63 (a DICOM UID has up to 64 characters);
    a key that cannot be made valid is dropped rather than failing the run over a label.
    """
    out: dict[str, str] = {}
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/")
        prefix = re.sub(r"[^a-z0-9.-]", "-", prefix.lower()).strip("-.")[:253]
        name = _label_text(name)
        if not name or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
            log.warning("label %r dropped from the Job: it cannot be made a valid Kubernetes label key", key)
            continue
        out[f"{prefix}/{name}" if prefix else name] = _label_text(str(value))
    return out


def _label_text(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", text)


def _sub_path(folder: str | Path, root: str | Path, what: str) -> str:
    folder_p, root_p = PurePosixPath(str(folder)), PurePosixPath(str(root))
    try:
        rel = folder_p.relative_to(root_p)
    except ValueError:
        raise RunnerError(f"the run's {what} folder {folder} is not under the runner's workdir_root {root}: "
                          "the MAP's pod sees only the shared volume") from None
    if str(rel) in ("", ".") or ".." in rel.parts:
        raise RunnerError(f"the run's {what} folder {folder} must be a folder inside workdir_root {root}")
    return str(rel)


def _resources(spec: RunSpec) -> k8s.V1ResourceRequirements | None:
    # Requests equal limits (Guaranteed QoS): the MAP sizes its work to its memory limit, and a node that cannot
    # give the whole limit should not take the pod.
    limits: dict[str, str] = {}
    if spec.cpus:
        limits["cpu"] = cpu_quantity(spec.cpus)
    if spec.memory:
        limits["memory"] = memory_quantity(spec.memory)
    if spec.gpus:
        limits["nvidia.com/gpu"] = str(len(spec.gpus))
    if not limits:
        return None
    return k8s.V1ResourceRequirements(limits=dict(limits), requests=dict(limits))


def cpu_quantity(cpus: float) -> str:
    """CPUs as a Kubernetes quantity: ``2`` or ``1500m``."""
    if cpus <= 0:
        raise RunnerError(f"runner cpus must be positive, got {cpus}")
    milli = int(round(cpus * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def memory_quantity(memory: str) -> str:
    """A memory size as a Kubernetes quantity.

    Kubernetes binary quantities (``8Gi``, ``512Mi``) and plain byte counts pass unchanged; anything else is read
    the way ``docker run --memory`` reads it (``8g``, ``512m``, ``8G``: binary units, any case), because the service
    configuration shares one ``memory`` value between both runners. (In Kubernetes ``512m`` would mean half a byte.)
    """
    text = str(memory).strip()
    if re.match(r"^\d+((Ki|Mi|Gi|Ti))?$", text):
        return text
    match = _DOCKER_MEMORY.match(text)
    if not match:
        raise RunnerError(f"runner memory {memory!r} is neither a Docker size (8g, 512m) nor a Kubernetes "
                          "binary quantity (8Gi)")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = number * 1024 ** {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]
    for suffix, scale in (("Ti", 1024 ** 4), ("Gi", 1024 ** 3), ("Mi", 1024 ** 2), ("Ki", 1024)):
        if size >= scale and size % scale == 0:
            return f"{int(size // scale)}{suffix}"
    return str(int(size))


# ---------------------------------------------------------------------------------------------------- the runner


class KubernetesRunner:
    """Runs each MAP as a Kubernetes Job in ``namespace`` (see the module docstring).

    ``api_client`` is a configured :class:`kubernetes.client.ApiClient`; without one, the in-cluster service account
    is used, or else the local kubeconfig. ``namespace`` None means the namespace ``segmap serve`` itself runs in
    (``POD_NAMESPACE``, set by deploy/'s Deployment, or the service account's namespace file).
    """

    kind = "kubernetes"
    runs_digest = False  # a Job names its image as configured: a digest without the repository is not pullable
    local = False

    def __init__(self, namespace: str | None, *, api_client: k8s.ApiClient | None = None, pvc_name: str,
                 workdir_root: str | Path, service_account: str | None = None,
                 node_selector: Mapping[str, str] | None = None, image_pull_secrets: Sequence[str] = (),
                 run_as_user: int = KubernetesOptions.run_as_user, ttl_seconds_after_finished: int = DEFAULT_TTL_S,
                 delete_wait_s: float = KubernetesOptions.delete_wait_s):
        namespace = namespace or current_namespace()
        if not namespace or not _DNS_LABEL.match(namespace):
            raise RunnerError(f"Kubernetes namespace {namespace!r} is not a DNS-1123 label")
        self.namespace = namespace
        self.api_client = api_client if api_client is not None else _default_api_client()
        self.batch = k8s.BatchV1Api(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        self.pvc_name = pvc_name
        self.workdir_root = Path(workdir_root)
        self.service_account = service_account
        self.node_selector = dict(node_selector or {})
        self.image_pull_secrets = tuple(image_pull_secrets)
        self.run_as_user = int(run_as_user)
        self.ttl_seconds_after_finished = int(ttl_seconds_after_finished)
        self.delete_wait_s = delete_wait_s
        self._warned_tags: set[str] = set()

    @classmethod
    def from_options(cls, options: KubernetesOptions, *, workdir_root: str | Path,
                     api_client: k8s.ApiClient | None = None, where: str = "runner.kubernetes") -> "KubernetesRunner":
        """The runner the service configuration's ``runner.kubernetes`` section describes (read and checked by
        :func:`segmap.service.config.load_config`); ``where`` prefixes an error (pass
        ``f"{config.path}: runner.kubernetes"``)."""
        opts = dict(options.__dict__)
        try:
            return cls(opts.pop("namespace"), api_client=api_client, workdir_root=workdir_root, **opts)
        except RunnerError as exc:
            raise ServiceConfigError(f"{where}: {exc}") from None

    # -- Runner protocol ----------------------------------------------------------------------------------------

    def image_digest(self, image: str) -> str:
        """``sha256:...`` for an image pinned as ``name@sha256:...``; ``tag:<image>`` otherwise.

        Unlike the Docker runner, this one has no engine that pulled the image: the registry is reached by the
        nodes' kubelets, with credentials the service does not hold. So the digest comes from the reference itself.
        For a tag, the key falls back to the tag's text: a new image pushed under the same tag is then *not* a new
        key, and a series already processed is not redone with it, which is why a pinned reference is recommended
        and an unpinned one is warned about (once per image).
        """
        name, at, digest = image.partition("@")
        if at:
            if not name or not _DIGEST.match(digest):
                raise RunnerError(f"image {image!r}: the part after '@' must be sha256: and 64 hex digits")
            return digest
        if image not in self._warned_tags:
            self._warned_tags.add(image)
            log.warning("image %s is not pinned by digest (name@sha256:...): jobs are keyed by the tag, so a new "
                        "image pushed under the same tag will not re-run series already processed", image)
        return f"tag:{image}"

    def start(self, spec: RunSpec) -> RunStatus:
        """Create the Job named ``spec.name``, or adopt the one that already exists (HTTP 409)."""
        body = job_manifest(spec, pvc_name=self.pvc_name, workdir_root=self.workdir_root,
                            service_account=self.service_account, node_selector=self.node_selector,
                            image_pull_secrets=self.image_pull_secrets, run_as_user=self.run_as_user,
                            ttl_seconds_after_finished=self.ttl_seconds_after_finished)
        deadline = time.monotonic() + self.delete_wait_s
        while True:
            try:
                # Strict: a field this client knows but the cluster's API version does not (an older cluster) is
                # refused instead of silently dropped -- a dropped securityContext field would weaken the pod.
                job = self.batch.create_namespaced_job(self.namespace, body, field_validation="Strict",
                                                       _request_timeout=REQUEST_TIMEOUT)
                log.info("created Kubernetes Job %s in namespace %s", spec.name, self.namespace)
                return self._status_of(job)
            except ApiException as exc:
                if exc.status != 409:
                    raise self._error("create", spec.name, exc) from None
            except Exception as exc:  # noqa: BLE001 - connection errors of urllib3 and the like
                raise self._unreachable("create", spec.name, exc) from None
            existing = self._read_job(spec.name)
            if existing is None:
                continue  # deleted between our create and our read: create again
            labels = (existing.metadata.labels or {}) if existing.metadata else {}
            if labels.get(MANAGED_BY) != "segmap" or labels.get(RUN_LABEL) != spec.name:
                raise RunnerError(f"Kubernetes Job {spec.name} in namespace {self.namespace} exists but was not "
                                  "created by segmap for this run; refusing to adopt it")
            if existing.metadata.deletion_timestamp is None:
                log.info("adopted the existing Kubernetes Job %s in namespace %s", spec.name, self.namespace)
                return self._status_of(existing)
            # A Job being deleted (a retry right after remove/cancel): its name frees up in a moment.
            if time.monotonic() > deadline:
                raise RunnerError(f"Kubernetes Job {spec.name} in namespace {self.namespace} is still being "
                                  f"deleted after {self.delete_wait_s:g} s; try again later")
            time.sleep(0.5)

    def adopt(self, name: str) -> RunStatus:
        """Nothing to finish: the API server creates a Job whole, and its controller makes the pod."""
        return self.status(name)

    def status(self, name: str) -> RunStatus:
        job = self._read_job(name)
        if job is None:
            return RunStatus(state="missing")
        return self._status_of(job)

    def logs(self, name: str, tail: int = 200) -> str:
        job = self._read_job(name)
        pod = self._pod_of(job) if job is not None else None
        if pod is None:
            return ""
        try:
            text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container=CONTAINER_NAME,
                                                     tail_lines=tail, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status in (400, 404):  # the container has not started yet, or the pod is gone
                return ""
            raise self._error("read the log of", name, exc) from None
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("read the log of", name, exc) from None
        return text or ""

    def cancel(self, name: str) -> None:
        self._delete(name, "cancel")

    def remove(self, name: str) -> None:
        self._delete(name, "remove")

    # -- helpers ------------------------------------------------------------------------------------------------

    def _delete(self, name: str, why: str) -> None:
        try:
            # Background: the Job goes now, its pods are stopped and collected by the garbage collector.
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background",
                                             _request_timeout=REQUEST_TIMEOUT)
            log.info("deleted Kubernetes Job %s in namespace %s (%s)", name, self.namespace, why)
        except ApiException as exc:
            if exc.status != 404:
                raise self._error("delete", name, exc) from None
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("delete", name, exc) from None

    def _read_job(self, name: str) -> k8s.V1Job | None:
        try:
            return self.batch.read_namespaced_job(name, self.namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._error("read", name, exc) from None
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("read", name, exc) from None

    def _pod_of(self, job: k8s.V1Job) -> k8s.V1Pod | None:
        """The Job's newest pod; pods left by an earlier Job of the same name (deleted, recreated) are skipped by
        their owner reference."""
        name = job.metadata.name
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{RUN_LABEL}={name}",
                                                 _request_timeout=REQUEST_TIMEOUT).items or []
        except ApiException as exc:
            raise self._error("list the pods of", name, exc) from None
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("list the pods of", name, exc) from None
        uid = job.metadata.uid
        if uid:
            pods = [p for p in pods if any(o.uid == uid for o in (p.metadata.owner_references or []))]
        if not pods:
            return None
        return max(pods, key=lambda p: _ts(p.metadata.creation_timestamp) or 0.0)

    def _status_of(self, job: k8s.V1Job) -> RunStatus:
        st = job.status or k8s.V1JobStatus()
        conditions = {c.type: c for c in (st.conditions or []) if c.status == "True"}
        pod = self._pod_of(job)
        node = pod.spec.node_name if pod is not None and pod.spec is not None else None
        terminated = _terminated(pod)
        exit_code = terminated.exit_code if terminated is not None else None
        started = _ts(st.start_time)
        if "Failed" in conditions:
            cond = conditions["Failed"]
            if cond.reason == "DeadlineExceeded":
                limit = job.spec.active_deadline_seconds if job.spec else None
                error = f"timed out after {limit} s" if limit else "timed out"
            else:
                error = one_line(f"{cond.reason or 'Failed'}: {cond.message or ''}".rstrip(": "), 500)
                if terminated is not None:
                    error += f" (exit code {terminated.exit_code}" + \
                             (f", {terminated.reason})" if terminated.reason else ")")
            return RunStatus(state="failed", exit_code=exit_code, error=error, started_at=started,
                             finished_at=_ts(cond.last_transition_time) or _ts(st.completion_time), node=node)
        if "Complete" in conditions or ((st.succeeded or 0) >= 1 and not st.active):
            return RunStatus(state="succeeded", exit_code=0 if exit_code is None else exit_code,
                             started_at=started, finished_at=_ts(st.completion_time), node=node)
        # Active, or not yet seen by the Job controller. A pod that is scheduled and started is running; one that
        # waits for a node, an image pull or a GPU is pending -- unless what it waits for will not come by itself.
        waiting = _waiting(pod)
        if waiting is not None and waiting.reason in STUCK_REASONS:
            error = one_line(f"{waiting.reason}: {waiting.message or spec_image(job)}", 500)
            return RunStatus(state="failed", error=error, started_at=started, finished_at=time.time(), node=node)
        phase = pod.status.phase if pod is not None and pod.status is not None else None
        if phase == "Running" or (phase is None and (st.ready or 0) > 0):
            running = _running_since(pod)
            return RunStatus(state="running", started_at=running or started, node=node)
        return RunStatus(state="pending", started_at=started, node=node)

    def _error(self, verb: str, name: str, exc: ApiException) -> RunnerError:
        message = ""
        try:
            body = json.loads(exc.body or "")
            message = body.get("message", "") if isinstance(body, dict) else ""
        except (TypeError, ValueError):
            message = (exc.body or "").strip()
        return RunnerError(one_line(f"Kubernetes API refused to {verb} Job {name} in namespace {self.namespace}: "
                                    f"HTTP {exc.status} {exc.reason or ''}"
                                    + (f": {message}" if message else ""), 500))

    def _unreachable(self, verb: str, name: str, exc: Exception) -> RunnerError:
        host = getattr(self.api_client.configuration, "host", "?")
        return RunnerError(one_line(f"cannot {verb} Kubernetes Job {name}: API server {host} not reachable "
                                    f"({type(exc).__name__}: {exc})", 500))


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def current_namespace() -> str | None:
    """The namespace this process runs in, when it runs in a pod; None elsewhere."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"].strip()
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def _default_api_client() -> k8s.ApiClient:
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, OSError) as exc:
            raise RunnerError(f"no Kubernetes credentials: not in a cluster and no usable kubeconfig ({exc})") \
                from None
    return k8s.ApiClient()


def _container_state(pod: k8s.V1Pod | None, which: str) -> Any:
    """The MAP container's ``state.terminated`` or ``state.waiting`` (``which``), None when it is not in it."""
    if pod is None or pod.status is None:
        return None
    for cs in pod.status.container_statuses or []:
        if cs.name == CONTAINER_NAME and cs.state is not None and getattr(cs.state, which) is not None:
            return getattr(cs.state, which)
    return None


def _terminated(pod: k8s.V1Pod | None) -> Any:
    return _container_state(pod, "terminated")


def _waiting(pod: k8s.V1Pod | None) -> Any:
    return _container_state(pod, "waiting")
    for cs in pod.status.container_statuses or []:
        if cs.name == CONTAINER_NAME and cs.state is not None and cs.state.waiting is not None:
            return cs.state.waiting
    return None


def spec_image(job: k8s.V1Job) -> str:
    try:
        return job.spec.template.spec.containers[0].image
    except (AttributeError, IndexError, TypeError):
        return ""


def _running_since(pod: k8s.V1Pod | None) -> float | None:
    if pod is None or pod.status is None:
        return None
    for cs in pod.status.container_statuses or []:
        if cs.name == CONTAINER_NAME and cs.state is not None and cs.state.running is not None:
            return _ts(cs.state.running.started_at)
    return None


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None
