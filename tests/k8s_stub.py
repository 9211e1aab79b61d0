"""An HTTP server that answers like the Kubernetes API server for the calls the Kubernetes runner makes.

No API server, kind, k3s or kwok installs here, so the runner is tested against this: a real HTTP server in a thread
that the official client talks to over a socket. It keeps Jobs and Pods of any namespace in memory and answers:

- ``POST   /apis/batch/v1/namespaces/{ns}/jobs``         201 with the stored Job; 409 AlreadyExists; 422 Invalid
- ``GET    /apis/batch/v1/namespaces/{ns}/jobs[/{name}]`` the Job or a JobList (``labelSelector``); 404 NotFound
- ``DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}``   200 Status Success (Background: pods go too); 404
- ``GET    /api/v1/namespaces/{ns}/pods``                 PodList (``labelSelector`` with ``k=v`` terms)
- ``GET    /api/v1/namespaces/{ns}/pods/{name}/log``      text/plain (``tailLines``); 400 while the container waits

Error bodies are ``Status`` objects shaped like the real server's (``reason``, ``message``, ``details``, ``code``).
What the Job controller and the kubelet would do is driven by the test: :meth:`K8sStub.schedule`, :meth:`run`,
:meth:`succeed`, :meth:`fail`, :meth:`deadline`. Every request is recorded (method, path, query, JSON body).
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
_POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details is not None:
        body["details"] = details
    return body


def unknown_fields(body, model: str) -> list[str]:
    """Fields of ``body`` that the official client's model ``model`` does not define (dotted paths), as the API
    server's strict field validation reports them."""
    from kubernetes import client

    api = client.ApiClient()
    known = api.sanitize_for_serialization(api.deserialize(json.dumps(body), model, "application/json"))
    found: list[str] = []

    def walk(sent, kept, path):
        if isinstance(sent, dict) and isinstance(kept, dict):
            for k, v in sent.items():
                where = f"{path}.{k}" if path else k
                if k not in kept:
                    found.append(where)
                else:
                    walk(v, kept[k], where)
        elif isinstance(sent, list) and isinstance(kept, list):
            for i, (a, b) in enumerate(zip(sent, kept)):
                walk(a, b, f"{path}[{i}]")

    walk(body, known, "")
    return found


def _matches(labels: dict, selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class K8sStub:
    """The stub server; use as a context manager. ``url`` is what a client's ``Configuration.host`` gets."""

    def __init__(self):
        self.lock = threading.RLock()
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[dict] = []
        self._fail_next: list[tuple[int, str, str]] = []
        #: > 0: a deleted Job stays this long with metadata.deletionTimestamp set (pods being stopped), as on a
        #: real cluster, before its name is free again.
        self.deletion_delay_s = 0.0
        self._rv = 1000
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet test output
                pass

            def _handle(self):
                stub._dispatch(self)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> "K8sStub":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- what tests look at ------------------------------------------------------------------------------------

    def calls(self, method: str, kind: str = "jobs") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and f"/{kind}" in r["path"]]

    @property
    def created_bodies(self) -> list[dict]:
        """The JSON bodies of every Job create request, accepted or not, exactly as received."""
        return [r["body"] for r in self.calls("POST")]

    def job(self, name: str, namespace: str = "segmap") -> dict | None:
        with self.lock:
            return copy.deepcopy(self.jobs.get((namespace, name)))

    def pods_of(self, name: str, namespace: str = "segmap") -> list[dict]:
        with self.lock:
            return [copy.deepcopy(p) for (ns, _), p in self.pods.items()
                    if ns == namespace and p["metadata"]["labels"].get("job-name") == name]

    def fail_next(self, code: int, reason: str, message: str) -> None:
        """The next request (any) is answered with this error Status."""
        self._fail_next.append((code, reason, message))

    def put_job(self, body: dict, namespace: str = "segmap") -> dict:
        """Store a Job as if someone else created it (no validation)."""
        with self.lock:
            return self._store_job(namespace, copy.deepcopy(body))

    # -- the Job controller and the kubelet, driven by tests ------------------------------------------------------

    def schedule(self, name: str, node: str = "gpu-node-1", namespace: str = "segmap") -> str:
        """The controller makes the pod and the scheduler puts it on ``node``; the container is being created."""
        with self.lock:
            job = self.jobs[(namespace, name)]
            template = job["spec"]["template"]
            pod_name = f"{name}-{secrets.token_hex(3)[:5]}"
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": pod_name, "namespace": namespace, "uid": str(uuid.uuid4()), "creationTimestamp": now(),
                    "resourceVersion": self._next_rv(), "labels": dict(template["metadata"]["labels"]),
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                         "uid": job["metadata"]["uid"], "controller": True,
                                         "blockOwnerDeletion": True}],
                },
                "spec": dict(copy.deepcopy(template["spec"]), nodeName=node),
                "status": {"phase": "Pending", "containerStatuses": [{
                    "name": "map", "image": template["spec"]["containers"][0]["image"], "imageID": "",
                    "ready": False, "restartCount": 0, "started": False,
                    "state": {"waiting": {"reason": "ContainerCreating"}}}]},
            }
            self.pods[(namespace, pod_name)] = pod
            job["status"].update(active=1, ready=0, startTime=job["status"].get("startTime") or now(),
                                 uncountedTerminatedPods={})
            return pod_name

    def wait(self, name: str, reason: str, message: str = "", namespace: str = "segmap") -> None:
        """The kubelet cannot start the container (``ImagePullBackOff``, ``CreateContainerConfigError``...)."""
        with self.lock:
            cs = self._pod(name, namespace)["status"]["containerStatuses"][0]
            cs["state"] = {"waiting": {"reason": reason, "message": message}}

    def run(self, name: str, namespace: str = "segmap") -> None:
        with self.lock:
            pod = self._pod(name, namespace)
            pod["status"]["phase"] = "Running"
            cs = pod["status"]["containerStatuses"][0]
            cs.update(ready=True, started=True, state={"running": {"startedAt": now()}})
            self.jobs[(namespace, name)]["status"]["ready"] = 1

    def succeed(self, name: str, log: str = "", namespace: str = "segmap") -> None:
        self._terminate(name, namespace, 0, "Completed", log)
        with self.lock:
            st = self.jobs[(namespace, name)]["status"]
            st.update(active=0, ready=0, succeeded=1, completionTime=now(), conditions=[
                {"type": "SuccessCriteriaMet", "status": "True", "lastProbeTime": now(),
                 "lastTransitionTime": now(), "reason": "CompletionsReached", "message": "Reached expected number "
                 "of succeeded pods"},
                {"type": "Complete", "status": "True", "lastProbeTime": now(), "lastTransitionTime": now(),
                 "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods"}])

    def fail(self, name: str, exit_code: int = 1, container_reason: str = "Error", log: str = "",
             namespace: str = "segmap") -> None:
        self._terminate(name, namespace, exit_code, container_reason, log)
        with self.lock:
            st = self.jobs[(namespace, name)]["status"]
            message = "Job has reached the specified backoff limit"
            st.update(active=0, ready=0, failed=1, conditions=[
                {"type": "FailureTarget", "status": "True", "lastProbeTime": now(), "lastTransitionTime": now(),
                 "reason": "BackoffLimitExceeded", "message": message},
                {"type": "Failed", "status": "True", "lastProbeTime": now(), "lastTransitionTime": now(),
                 "reason": "BackoffLimitExceeded", "message": message}])

    def deadline(self, name: str, namespace: str = "segmap") -> None:
        """activeDeadlineSeconds passed: the controller deletes the pod and fails the Job."""
        with self.lock:
            for key in [k for k, p in self.pods.items()
                        if k[0] == namespace and p["metadata"]["labels"].get("job-name") == name]:
                del self.pods[key]
            st = self.jobs[(namespace, name)]["status"]
            message = "Job was active longer than specified deadline"
            st.update(active=0, ready=0, failed=1, conditions=[
                {"type": "FailureTarget", "status": "True", "lastProbeTime": now(), "lastTransitionTime": now(),
                 "reason": "DeadlineExceeded", "message": message},
                {"type": "Failed", "status": "True", "lastProbeTime": now(), "lastTransitionTime": now(),
                 "reason": "DeadlineExceeded", "message": message}])

    def set_log(self, name: str, text: str, namespace: str = "segmap") -> None:
        with self.lock:
            pod = self._pod(name, namespace)
            self.logs[(namespace, pod["metadata"]["name"])] = text

    # -- internals ------------------------------------------------------------------------------------------------

    def _pod(self, job_name: str, namespace: str) -> dict:
        pods = [p for (ns, _), p in self.pods.items()
                if ns == namespace and p["metadata"]["labels"].get("job-name") == job_name]
        assert pods, f"no pod for Job {job_name}: call schedule() first"
        return pods[-1]

    def _terminate(self, name, namespace, exit_code, reason, log):
        with self.lock:
            pod = self._pod(name, namespace)
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            cs = pod["status"]["containerStatuses"][0]
            started = (cs["state"].get("running") or {}).get("startedAt", now())
            cs.update(ready=False, started=False, state={"terminated": {
                "exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now(),
                "containerID": "containerd://" + secrets.token_hex(32)}})
            if log:
                self.logs[(namespace, pod["metadata"]["name"])] = log

    def _finish_delete(self, ns: str, name: str, job: dict, policy: str | None) -> None:
        with self.lock:
            if self.jobs.get((ns, name)) is job:
                del self.jobs[(ns, name)]
            if policy in ("Background", "Foreground"):  # Orphan would leave the pods running
                for key in [k for k, p in self.pods.items()
                            if k[0] == ns and any(o["uid"] == job["metadata"]["uid"]
                                                  for o in p["metadata"].get("ownerReferences", []))]:
                    del self.pods[key]

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _store_job(self, namespace: str, body: dict) -> dict:
        meta = body.setdefault("metadata", {})
        uid = str(uuid.uuid4())
        meta.update(namespace=namespace, uid=uid, creationTimestamp=now(), resourceVersion=self._next_rv(),
                    generation=1)
        spec = body.setdefault("spec", {})
        template = spec.setdefault("template", {"metadata": {}, "spec": {"containers": []}})
        # What the API server adds to every Job: a selector on the controller's uid, and these pod labels.
        tlabels = template.setdefault("metadata", {}).setdefault("labels", {})
        tlabels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": meta["name"],
                        "controller-uid": uid, "job-name": meta["name"]})
        spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        body["status"] = {}
        self.jobs[(namespace, meta["name"])] = body
        return body

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self.lock:
            self.requests.append({"method": h.command, "path": parts.path, "query": query, "body": body})
            if self._fail_next:
                code, reason, message = self._fail_next.pop(0)
                return self._send(h, code, status_body(code, reason, message))
            code, answer = self._route(h.command, parts.path, query, body)
        if isinstance(answer, str):
            return self._send(h, code, answer, content_type="text/plain")
        return self._send(h, code, answer)

    def _route(self, method: str, path: str, query: dict, body) -> tuple[int, dict | str]:
        m = _JOBS.match(path)
        if m:
            ns, name = m.group(1), m.group(2)
            if method == "POST" and name is None:
                if query.get("fieldValidation") == "Strict":
                    unknown = unknown_fields(body, "V1Job")
                    if unknown:
                        return 400, status_body(400, "BadRequest", "strict decoding error: " + ", ".join(
                            f'unknown field "{u}"' for u in unknown))
                return self._create_job(ns, body)
            if method == "GET" and name is None:
                items = [copy.deepcopy(j) for (n, _), j in self.jobs.items()
                         if n == ns and _matches(j["metadata"].get("labels") or {}, query.get("labelSelector"))]
                return 200, {"kind": "JobList", "apiVersion": "batch/v1",
                             "metadata": {"resourceVersion": str(self._rv)}, "items": items}
            job = self.jobs.get((ns, name))
            if job is None:
                return 404, status_body(404, "NotFound", f'jobs.batch "{name}" not found',
                                        {"name": name, "group": "batch", "kind": "jobs"})
            if method == "GET":
                return 200, copy.deepcopy(job)
            if method == "DELETE":
                policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
                if self.deletion_delay_s > 0:
                    job["metadata"]["deletionTimestamp"] = now()
                    timer = threading.Timer(self.deletion_delay_s, self._finish_delete, (ns, name, job, policy))
                    timer.daemon = True
                    timer.start()
                else:
                    self._finish_delete(ns, name, job, policy)
                return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {"name": name, "group": "batch", "kind": "jobs",
                                         "uid": job["metadata"]["uid"]}}
        m = _PODS.match(path)
        if m and method == "GET":
            items = [copy.deepcopy(p) for (n, _), p in self.pods.items()
                     if n == m.group(1) and _matches(p["metadata"]["labels"], query.get("labelSelector"))]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)},
                         "items": items}
        m = _POD_LOG.match(path)
        if m and method == "GET":
            ns, pod_name = m.groups()
            pod = self.pods.get((ns, pod_name))
            if pod is None:
                return 404, status_body(404, "NotFound", f'pods "{pod_name}" not found',
                                        {"name": pod_name, "kind": "pods"})
            state = pod["status"]["containerStatuses"][0]["state"]
            if "waiting" in state:
                return 400, status_body(400, "BadRequest", f'container "map" in pod "{pod_name}" is waiting to '
                                        f'start: {state["waiting"]["reason"]}')
            lines = self.logs.get((ns, pod_name), "").splitlines(keepends=True)
            if "tailLines" in query:
                lines = lines[-int(query["tailLines"]):]
            return 200, "".join(lines)
        return 404, status_body(404, "NotFound", "the server could not find the requested resource")

    def _create_job(self, ns: str, body) -> tuple[int, dict]:
        if not isinstance(body, dict) or body.get("kind") != "Job" or body.get("apiVersion") != "batch/v1":
            return 400, status_body(400, "BadRequest", "the body is not a batch/v1 Job")
        name = (body.get("metadata") or {}).get("name") or ""
        if not _DNS_LABEL.match(name) or len(name) > 63:
            return 422, status_body(422, "Invalid", f'Job.batch "{name}" is invalid: metadata.name: Invalid value: '
                                    f'"{name}": a lowercase RFC 1123 label must consist of lower case alphanumeric '
                                    "characters or '-'", {"name": name, "group": "batch", "kind": "Job"})
        if (ns, name) in self.jobs:
            return 409, status_body(409, "AlreadyExists", f'jobs.batch "{name}" already exists',
                                    {"name": name, "group": "batch", "kind": "jobs"})
        return 201, copy.deepcopy(self._store_job(ns, copy.deepcopy(body)))

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, payload, content_type: str = "application/json") -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
