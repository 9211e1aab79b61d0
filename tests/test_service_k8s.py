"""The Kubernetes runner against an HTTP server that answers like the API server, and the deploy/ manifests.

No Kubernetes cluster can run here (see tests/k8s_stub.py): these tests show that what the runner sends is a valid
``batch/v1`` Job by the official client's own OpenAPI models, that it creates at most one Job per run name, and how
it reads the states a Job and its pod go through. Scheduling, pulling, GPUs, volumes and the deadline being enforced
are the cluster's part and need a real one.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

k8s = pytest.importorskip("kubernetes.client")

from k8s_stub import K8sStub  # noqa: E402

from segmap.errors import RunnerError, SegmapError, ServiceConfigError  # noqa: E402
from segmap.service.keys import job_key, run_name  # noqa: E402
from segmap.service.runners.base import CONTAINER_INPUT, CONTAINER_OUTPUT, RunSpec  # noqa: E402
from segmap.service.runners.options import KubernetesOptions  # noqa: E402
from segmap.service.schema import read_section  # noqa: E402
from service_harness import seed_job  # noqa: E402
from segmap.service.runners.kubernetes import (  # noqa: E402
    KubernetesRunner, job_manifest, memory_quantity, sanitise_labels)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WORKDIR = Path("/var/lib/segmap")
NS = "segmap"
DIGEST = "sha256:" + "ab" * 32


def validated(body: dict, model: str):
    """``body`` read with the client's deserializer into ``model``; fails when a key is unknown to the model or a
    value has the wrong type: the model, serialized back, must give exactly ``body`` again."""
    api = k8s.ApiClient()
    obj = api.deserialize(json.dumps(body), model, "application/json")
    again = api.sanitize_for_serialization(obj)
    assert again == body, f"{model}: keys or values the model does not know:\n{_diff(body, again)}"
    return obj


def _diff(sent, model, path="") -> str:
    if isinstance(sent, dict) and isinstance(model, dict):
        lines = [f"{path}.{k}: sent, not in the model" for k in sent if k not in model]
        lines += [_diff(sent[k], model[k], f"{path}.{k}") for k in sent if k in model]
        return "\n".join(x for x in lines if x)
    if isinstance(sent, list) and isinstance(model, list):
        return "\n".join(_diff(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(sent, model)))
    return "" if sent == model else f"{path}: {sent!r} != {model!r}"


def make_spec(key_seed: str = "1.2.3", **kw) -> RunSpec:
    key = job_key(key_seed, ["1.2.3.1", "1.2.3.2"], DIGEST, map_name="spleen", destinations=())
    name = run_name(key)
    args = dict(name=name, image=f"registry.example/segmap/spleen@{DIGEST}",
                input_dir=WORKDIR / "jobs" / name / "input", output_dir=WORKDIR / "jobs" / name / "output",
                env={"SEGMAP_UID_SEED": key}, cpus=2, memory="8g", gpus=("0",), timeout_s=1800,
                labels={"segmap/map": "spleen", "segmap/series": "1.2.826.0.1.3680043.8.498." + "1" * 40})
    args.update(kw)
    return RunSpec(**args)


@pytest.fixture
def stub():
    with K8sStub() as server:
        yield server


def make_runner(stub: K8sStub, **kw) -> KubernetesRunner:
    api = k8s.ApiClient(k8s.Configuration(host=stub.url))
    return KubernetesRunner(NS, api_client=api, pvc_name="segmap-work", workdir_root=WORKDIR,
                            service_account="segmap-map", **kw)


# ------------------------------------------------------------------------------------------------ the Job manifest


def test_submitted_job_validates_against_the_clients_models(stub):
    spec = make_spec()
    make_runner(stub, node_selector={"nvidia.com/gpu.present": "true"}, image_pull_secrets=["regcred"]).start(spec)
    [body] = stub.created_bodies
    job = validated(body, "V1Job")
    assert stub.calls("POST")[0]["query"]["fieldValidation"] == "Strict"  # the server refuses unknown fields

    assert (job.api_version, job.kind, job.metadata.name) == ("batch/v1", "Job", spec.name)
    labels = job.metadata.labels
    assert labels["app.kubernetes.io/managed-by"] == "segmap" and labels["segmap/run"] == spec.name
    assert job.spec.template.metadata.labels == labels  # the pods carry them too (logs, NetworkPolicy)
    assert job.spec.backoff_limit == 0 and job.spec.active_deadline_seconds == 1800
    assert job.spec.ttl_seconds_after_finished > 0
    pod = job.spec.template.spec
    assert pod.restart_policy == "Never" and pod.automount_service_account_token is False
    assert pod.service_account_name == "segmap-map" and pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [s.name for s in pod.image_pull_secrets] == ["regcred"]
    assert pod.security_context.run_as_non_root and pod.security_context.run_as_user == 65532
    [c] = pod.containers
    assert c.image == spec.image
    assert {e.name: e.value for e in c.env} == {"SEGMAP_UID_SEED": spec.env["SEGMAP_UID_SEED"]}
    sc = c.security_context
    assert sc.run_as_non_root and sc.run_as_user == 65532 and sc.run_as_group == 65532
    assert sc.allow_privilege_escalation is False and sc.read_only_root_filesystem is True
    assert sc.capabilities.drop == ["ALL"]
    assert c.resources.limits == c.resources.requests == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    mounts = {m.mount_path: m for m in c.volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    inp, out = mounts[CONTAINER_INPUT], mounts[CONTAINER_OUTPUT]
    assert inp.read_only is True and not out.read_only
    assert (inp.sub_path, out.sub_path) == (f"jobs/{spec.name}/input", f"jobs/{spec.name}/output")
    assert inp.name == out.name and volumes[inp.name].persistent_volume_claim.claim_name == "segmap-work"
    assert volumes[mounts["/tmp"].name].empty_dir is not None  # the only writable place besides the output


def test_model_check_catches_unknown_keys_and_wrong_types():
    body = k8s.ApiClient().sanitize_for_serialization(job_manifest(
        make_spec(), pvc_name="w", workdir_root=WORKDIR))
    validated(body, "V1Job")
    typo = json.loads(json.dumps(body))
    typo["spec"]["backofLimit"] = 0
    with pytest.raises(AssertionError, match="backofLimit"):
        validated(typo, "V1Job")
    wrong_type = json.loads(json.dumps(body))
    wrong_type["spec"]["activeDeadlineSeconds"] = "1800"
    with pytest.raises(ValueError, match="activeDeadlineSeconds"):  # pydantic's ValidationError
        validated(wrong_type, "V1Job")
    nameless = json.loads(json.dumps(body))
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        validated(nameless, "V1Job")


def test_the_stub_refuses_unknown_fields_like_a_strict_api_server(stub):
    import requests

    body = k8s.ApiClient().sanitize_for_serialization(job_manifest(make_spec(), pvc_name="w", workdir_root=WORKDIR))
    body["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    answer = requests.post(f"{stub.url}/apis/batch/v1/namespaces/{NS}/jobs?fieldValidation=Strict", json=body,
                           timeout=10)
    assert answer.status_code == 400 and answer.json()["reason"] == "BadRequest"
    assert 'unknown field "spec.template.spec.containers[0].securityContext.readOnlyRootFs"' in answer.json()["message"]
    assert stub.jobs == {}


def test_resources_follow_the_run_spec():
    cpu_only = job_manifest(make_spec(gpus=(), cpus=1.5, memory="512m"), pvc_name="w", workdir_root=WORKDIR)
    res = cpu_only.spec.template.spec.containers[0].resources
    assert res.limits == {"cpu": "1500m", "memory": "512Mi"}  # no nvidia.com/gpu: the pod fits CPU nodes
    two = job_manifest(make_spec(gpus=("0", "1")), pvc_name="w", workdir_root=WORKDIR)
    assert two.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
    bare = job_manifest(make_spec(gpus=(), cpus=None, memory=None, timeout_s=59.2), pvc_name="w",
                        workdir_root=WORKDIR)
    assert bare.spec.template.spec.containers[0].resources is None
    assert bare.spec.active_deadline_seconds == 60
    # Docker's notation (the service's one memory setting) is binary; Kubernetes' own binary quantities pass.
    assert [memory_quantity(m) for m in ("8g", "8G", "1.5g", "8Gi", "1073741824")] == \
        ["8Gi", "8Gi", "1536Mi", "8Gi", "1073741824"]
    with pytest.raises(RunnerError, match="'lots'"):
        memory_quantity("lots")


def test_folders_outside_the_shared_volume_are_refused():
    with pytest.raises(RunnerError, match="/tmp/elsewhere/input.*workdir_root /var/lib/segmap"):
        job_manifest(make_spec(input_dir=Path("/tmp/elsewhere/input")), pvc_name="w", workdir_root=WORKDIR)
    with pytest.raises(RunnerError, match="inside workdir_root"):
        job_manifest(make_spec(output_dir=WORKDIR), pvc_name="w", workdir_root=WORKDIR)
    with pytest.raises(RunnerError, match="DNS-1123"):
        job_manifest(make_spec(name="Segmap_Job"), pvc_name="w", workdir_root=WORKDIR)
    with pytest.raises(RunnerError, match="non-root user id"):
        job_manifest(make_spec(), pvc_name="w", workdir_root=WORKDIR, run_as_user=0)


def test_labels_are_made_valid():
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"  # 64 characters
    labels = sanitise_labels({"segmap/series": uid, "segmap/map": "Spleen CT (v2)", "bad key!": "x", "/": "y"})
    assert labels["segmap/series"] == uid[:63]
    assert labels["segmap/map"] == "Spleen-CT--v2"
    assert labels["bad-key"] == "x" and "/" not in labels and "" not in labels


# ------------------------------------------------------------------------------------------- against the API stub


def test_create_then_conflict_adopts_and_never_creates_a_second_job(stub):
    spec = make_spec()
    first = make_runner(stub)
    assert first.start(spec).state == "pending"
    assert first.start(spec).state == "pending"  # 409: adopted
    stub.schedule(spec.name, node="gpu-node-7")
    stub.run(spec.name)
    restarted = make_runner(stub)  # segmap serve restarted: a new runner knows nothing but the name
    status = restarted.start(spec)
    assert (status.state, status.node) == ("running", "gpu-node-7")

    assert len(stub.jobs) == 1 and len(stub.pods_of(spec.name)) == 1
    assert len(stub.calls("POST")) == 3  # every start asked, the server refused twice
    assert restarted.status(spec.name).state == "running"
    # What an operator's `kubectl get jobs -l app.kubernetes.io/managed-by=segmap` shows: one Job.
    listed = k8s.BatchV1Api(restarted.api_client).list_namespaced_job(
        NS, label_selector="app.kubernetes.io/managed-by=segmap").items
    assert [j.metadata.name for j in listed] == [spec.name]


def test_a_job_of_that_name_not_made_by_segmap_is_not_adopted(stub):
    spec = make_spec()
    stub.put_job({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": spec.name, "labels": {"team": "x"}},
                  "spec": {"template": {"metadata": {}, "spec": {"containers": [{"name": "c", "image": "busybox"}],
                                                                 "restartPolicy": "Never"}}}})
    with pytest.raises(RunnerError, match=f"{spec.name}.*not created by segmap"):
        make_runner(stub).start(spec)


def test_status_follows_the_job_through_success(stub):
    runner, spec = make_runner(stub), make_spec()
    assert runner.status(spec.name).state == "missing"
    runner.start(spec)
    assert runner.status(spec.name).state == "pending"
    stub.schedule(spec.name, node="gpu-node-2")
    pending = runner.status(spec.name)  # scheduled, image being pulled: not running yet
    assert (pending.state, pending.node) == ("pending", "gpu-node-2") and pending.started_at
    assert runner.logs(spec.name) == ""  # the API answers 400 while the container waits
    stub.run(spec.name)
    running = runner.status(spec.name)
    assert (running.state, running.node, running.finished) == ("running", "gpu-node-2", False)
    stub.succeed(spec.name, log="".join(f"line {i}\n" for i in range(500)))
    done = runner.status(spec.name)
    assert (done.state, done.exit_code, done.error, done.node) == ("succeeded", 0, None, "gpu-node-2")
    assert done.finished and done.finished_at >= done.started_at
    assert runner.logs(spec.name, tail=2) == "line 498\nline 499\n"


def test_status_of_a_failed_job_has_its_reason_and_exit_code(stub):
    runner, spec = make_runner(stub), make_spec()
    runner.start(spec)
    stub.schedule(spec.name)
    stub.run(spec.name)
    stub.fail(spec.name, exit_code=137, container_reason="OOMKilled")
    st = runner.status(spec.name)
    assert (st.state, st.exit_code) == ("failed", 137)
    assert st.error == "BackoffLimitExceeded: Job has reached the specified backoff limit (exit code 137, OOMKilled)"
    assert "\n" not in st.error and st.node == "gpu-node-1"


def test_a_job_past_its_deadline_is_reported_timed_out(stub):
    runner, spec = make_runner(stub), make_spec(timeout_s=60)
    runner.start(spec)
    assert stub.job(spec.name)["spec"]["activeDeadlineSeconds"] == 60
    stub.schedule(spec.name)
    stub.run(spec.name)
    stub.deadline(spec.name)  # the controller deletes the pod: no exit code, no node any more
    st = runner.status(spec.name)
    assert (st.state, st.error, st.exit_code) == ("failed", "timed out after 60 s", None)


def test_an_image_that_cannot_be_pulled_fails_the_run_instead_of_waiting_for_the_deadline(stub):
    runner, spec = make_runner(stub), make_spec()
    runner.start(spec)
    stub.schedule(spec.name, node="gpu-node-3")
    stub.wait(spec.name, "ErrImagePull", "rpc error: code = Unknown desc = failed to pull")
    assert runner.status(spec.name).state == "pending"  # one failed pull may be a hiccup: the kubelet retries
    stub.wait(spec.name, "ImagePullBackOff", f'Back-off pulling image "{spec.image}"')
    st = runner.status(spec.name)
    assert (st.state, st.node, st.exit_code) == ("failed", "gpu-node-3", None)
    assert st.error == f'ImagePullBackOff: Back-off pulling image "{spec.image}"'


def test_cancel_deletes_the_job_in_the_background_and_a_missing_job_is_fine(stub):
    runner, spec = make_runner(stub), make_spec()
    runner.start(spec)
    stub.schedule(spec.name)
    stub.run(spec.name)
    runner.cancel(spec.name)
    [delete] = stub.calls("DELETE")
    assert delete["path"].endswith(f"/namespaces/{NS}/jobs/{spec.name}")
    assert (delete["query"].get("propagationPolicy") or delete["body"]["propagationPolicy"]) == "Background"
    assert stub.job(spec.name) is None and stub.pods_of(spec.name) == []
    assert runner.status(spec.name).state == "missing" and runner.logs(spec.name) == ""
    runner.cancel(spec.name)  # 404
    runner.remove(spec.name)
    assert len(stub.calls("DELETE")) == 3


def test_retry_after_remove_creates_a_fresh_job(stub):
    """The store's retry: remove the failed Job, start again: a new Job whose status is not the old pod's."""
    runner, spec = make_runner(stub), make_spec()
    runner.start(spec)
    stub.schedule(spec.name)
    stub.fail(spec.name, exit_code=1)
    assert runner.status(spec.name).state == "failed"
    runner.remove(spec.name)
    assert runner.start(spec).state == "pending"
    assert len(stub.jobs) == 1 and stub.job(spec.name)["status"] == {}


def test_start_waits_for_a_job_of_that_name_that_is_still_being_deleted(stub):
    runner, spec = make_runner(stub, delete_wait_s=5), make_spec()
    runner.start(spec)
    old_uid = stub.job(spec.name)["metadata"]["uid"]
    stub.deletion_delay_s = 0.5
    runner.remove(spec.name)
    assert stub.job(spec.name)["metadata"]["deletionTimestamp"]  # the name is not free yet
    assert runner.start(spec).state == "pending"  # not adopted: it waited and created a new Job
    fresh = stub.job(spec.name)["metadata"]
    assert fresh["uid"] != old_uid and "deletionTimestamp" not in fresh

    stub.deletion_delay_s = 30
    runner.remove(spec.name)
    impatient = make_runner(stub, delete_wait_s=0.3)
    with pytest.raises(RunnerError, match=f"{spec.name} .* still being deleted after 0.3 s"):
        impatient.start(spec)


def test_api_errors_become_one_line_runner_errors(stub):
    runner, spec = make_runner(stub), make_spec()
    stub.fail_next(403, "Forbidden", 'jobs.batch is forbidden: User "system:serviceaccount:segmap:segmap" cannot '
                   'create resource "jobs" in API group "batch" in the namespace "segmap"')
    with pytest.raises(RunnerError) as err:
        runner.start(spec)
    assert isinstance(err.value, SegmapError) and "\n" not in str(err.value)
    assert "HTTP 403" in str(err.value) and "cannot create resource" in str(err.value) and spec.name in str(err.value)
    stub.fail_next(500, "InternalError", "etcdserver: request timed out")
    with pytest.raises(RunnerError, match="HTTP 500.*etcdserver"):
        runner.status(spec.name)
    with pytest.raises(RunnerError, match="DNS-1123"):
        runner.start(make_spec(name="x" * 64))
    assert stub.jobs == {}


def test_an_unreachable_api_server_is_a_runner_error():
    with K8sStub() as gone:
        url = gone.url
    cfg = k8s.Configuration(host=url)
    cfg.retries = 0
    runner = KubernetesRunner(NS, api_client=k8s.ApiClient(cfg), pvc_name="w", workdir_root=WORKDIR)
    t0 = time.monotonic()
    with pytest.raises(RunnerError, match="not reachable"):
        runner.status("segmap-00000000000000000000")
    assert time.monotonic() - t0 < 10


def test_image_digest_comes_from_a_pinned_reference(stub, caplog):
    runner = make_runner(stub)
    assert runner.image_digest(f"registry.example/segmap/spleen@{DIGEST}") == DIGEST
    with caplog.at_level(logging.WARNING, logger="segmap.service.runners.kubernetes"):
        assert runner.image_digest("segmap/spleen:latest") == "tag:segmap/spleen:latest"
        assert runner.image_digest("segmap/spleen:latest") == "tag:segmap/spleen:latest"
    assert sum("not pinned by digest" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RunnerError, match="sha256: and 64 hex"):
        runner.image_digest("segmap/spleen@sha256:abc")
    assert stub.requests == []  # no registry, no API call


def test_namespace_defaults_to_the_pods_own(monkeypatch):
    monkeypatch.setenv("POD_NAMESPACE", "radiology")
    runner = KubernetesRunner(None, api_client=k8s.ApiClient(), pvc_name="w", workdir_root=WORKDIR)
    assert runner.namespace == "radiology"
    monkeypatch.setenv("POD_NAMESPACE", "Not_A_Namespace")
    with pytest.raises(RunnerError, match="Not_A_Namespace"):
        KubernetesRunner(None, api_client=k8s.ApiClient(), pvc_name="w", workdir_root=WORKDIR)


# ------------------------------------------------------------------------------------------------------- deploy/

#: (apiVersion, kind) of every object deploy/ may hold -> the client's model.
MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}


def _validate_documents(docs: list[dict]) -> dict[tuple[str, str], object]:
    objects = {}
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in MODELS, f"{key} is not a kind deploy/ is expected to hold"
        obj = validated(doc, MODELS[key])
        assert obj.metadata.name and not obj.metadata.namespace  # the namespace is chosen at apply time
        assert (key[1], obj.metadata.name) not in objects, f"{key[1]} {obj.metadata.name} twice"
        objects[(key[1], obj.metadata.name)] = obj
    return objects


def _base_documents() -> list[dict]:
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in (DEPLOY / "base").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every manifest in deploy/base is listed in kustomization.yaml, and only those"
    return [d for name in listed for d in yaml.safe_load_all((DEPLOY / "base" / name).read_text()) if d]


@pytest.fixture(scope="module")
def deployed():
    return _validate_documents(_base_documents())


def test_every_manifest_validates_against_the_clients_models(deployed):
    kinds = sorted({kind for kind, _ in deployed})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy", "PersistentVolumeClaim", "Role",
                     "RoleBinding", "Service", "ServiceAccount"]


def test_kustomize_build_validates_too():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (neither it nor helm installs from the registries here)")
    proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "base")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    built = _validate_documents([d for d in yaml.safe_load_all(proc.stdout) if d])
    assert built.keys() == _validate_documents(_base_documents()).keys()
    deployment = built[("Deployment", "segmap")]
    assert deployment.metadata.labels["app.kubernetes.io/part-of"] == "segmap"
    assert "app.kubernetes.io/part-of" not in deployment.spec.selector.match_labels  # selectors stay as written
    [container] = deployment.spec.template.spec.containers
    assert container.image == "segmap/segmap-service:latest"


def test_rbac_allows_what_the_runner_calls_and_nothing_more(deployed, stub):
    role = deployed[("Role", "segmap-runner")]
    allowed = {(group, resource, verb) for rule in role.rules for group in rule.api_groups
               for resource in rule.resources for verb in rule.verbs}
    assert not any("*" in x for x in allowed)
    assert {r for _, r, _ in allowed} == {"jobs", "pods", "pods/log"}
    assert not [k for k in deployed if k[0].startswith("Cluster")]
    binding = deployed[("RoleBinding", "segmap-runner")]
    deployment = deployed[("Deployment", "segmap")]
    assert binding.role_ref.name == role.metadata.name and binding.role_ref.kind == "Role"
    assert [(s.kind, s.name) for s in binding.subjects] == \
        [("ServiceAccount", deployment.spec.template.spec.service_account_name)]

    # Every request the runner makes in a full life cycle maps onto a rule of the Role.
    runner, spec = make_runner(stub), make_spec()
    runner.start(spec)
    runner.start(spec)
    stub.schedule(spec.name)
    stub.run(spec.name)
    stub.succeed(spec.name, log="done\n")
    runner.status(spec.name)
    runner.logs(spec.name)
    runner.cancel(spec.name)
    verbs = {"POST": "create", "DELETE": "delete"}
    needed = set()
    for req in stub.requests:
        parts = req["path"].strip("/").split("/")
        group = "batch" if parts[0] == "apis" else ""
        rest = parts[parts.index("namespaces") + 2:]
        resource = "/".join([rest[0], *rest[2:]])
        verb = verbs.get(req["method"]) or ("get" if len(rest) > 1 else "list")
        needed.add((group, resource, verb))
    assert needed <= allowed, needed - allowed
    assert {r for _, r, _ in needed} == {"jobs", "pods", "pods/log"}


def test_deployment_wiring(deployed):
    deployment = deployed[("Deployment", "segmap")]
    pod = deployment.spec.template.spec
    [c] = pod.containers
    ports = {p.name: p.container_port for p in c.ports}
    assert ports == {"dicom": 11112, "http": 8642}
    # The probes are the open paths: liveness asks the process only, readiness the job store.
    for probe, path in ((c.liveness_probe, "/livez"), (c.startup_probe, "/livez"), (c.readiness_probe, "/readyz")):
        assert probe.http_get.path == path and ports[probe.http_get.port] == 8642
    env = {e.name: e for e in c.env}
    ref = env["SEGMAP_DATABASE_URL"].value_from.secret_key_ref
    assert (ref.name, ref.key) == ("segmap-database", "url") and env["SEGMAP_DATABASE_URL"].value is None
    assert env["POD_NAMESPACE"].value_from.field_ref.field_path == "metadata.namespace"
    assert c.security_context.read_only_root_filesystem and pod.security_context.run_as_non_root
    assert c.security_context.capabilities.drop == ["ALL"] and c.security_context.allow_privilege_escalation is False
    assert deployment.spec.selector.match_labels.items() <= deployment.spec.template.metadata.labels.items()

    service = deployed[("Service", "segmap")]
    assert service.spec.selector.items() <= deployment.spec.template.metadata.labels.items()
    assert {(p.port, p.target_port) for p in service.spec.ports} == {(11112, "dicom"), (8642, "http")}

    mounts = {m.name: m.mount_path for m in c.volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    claim = volumes["work"].persistent_volume_claim.claim_name
    assert ("PersistentVolumeClaim", claim) in deployed
    config_map = deployed[("ConfigMap", volumes["config"].config_map.name)]
    config_path = Path(c.args[c.args.index("--config") + 1])
    assert config_path.parent == Path(mounts["config"]) and config_path.name in config_map.data

    # The service configuration agrees with the manifests around it.
    config = yaml.safe_load(config_map.data[config_path.name])
    assert config["service"]["workdir"] == mounts["work"]
    assert config["service"]["http"]["port"] == ports["http"] and config["listener"]["port"] == ports["dicom"]
    assert config["runner"]["kind"] == "kubernetes"
    assert config["runner"]["kubernetes"]["pvc_name"] == claim
    assert ("ServiceAccount", config["runner"]["kubernetes"]["service_account"]) in deployed
    for m in config["maps"]:
        assert Path(m["task"]).parent == Path(mounts["tasks"])


def test_the_config_map_is_a_valid_service_configuration(deployed, tmp_path, monkeypatch):
    """The lead's config parser takes it, and the runner the service would make from it is a Kubernetes runner
    in the pod's namespace on the deployed claim, with pinned images."""
    from segmap.service.config import parse_config

    from segmap.service.security import exposure_problems, secret_warnings

    doc = yaml.safe_load(deployed[("ConfigMap", "segmap-config")].data["segmap.yaml"])
    for m in doc["maps"]:  # the tasks ConfigMap is the operator's; use the repository's task of that name
        m["task"] = str(ROOT / "tasks" / Path(m["task"]).name)
    token_file = Path(doc["service"]["http"]["auth"]["token_file"])  # the Secret's file, made here
    (tmp_path / token_file.name).write_text("a-token\n")
    doc["service"]["http"]["auth"]["token_file"] = str(tmp_path / token_file.name)
    cfg = parse_config(doc, tmp_path / "segmap.yaml")
    assert cfg.runner.kind == "kubernetes"
    # Bound to all of the pod's interfaces, yet neither refused nor insecure: a token, and allowed peers.
    assert exposure_problems(cfg) == [] and not cfg.insecure and secret_warnings(cfg) == []
    monkeypatch.setenv("POD_NAMESPACE", "radiology")
    runner = KubernetesRunner.from_options(cfg.runner.options, workdir_root=cfg.workdir, api_client=k8s.ApiClient())
    assert (runner.namespace, runner.pvc_name, runner.service_account) == ("radiology", "segmap-work", "segmap-map")
    assert runner.workdir_root == Path("/var/lib/segmap")
    for m in cfg.maps:
        assert runner.image_digest(m.image).startswith("sha256:")


def test_bad_runner_options_name_the_key(monkeypatch):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)

    def make(**opts):
        return read_section(KubernetesOptions, opts, "runner.kubernetes", Path("segmap.yaml"))
    with pytest.raises(ServiceConfigError, match=r"^segmap.yaml: runner.kubernetes.pvc: unknown key"):
        make(pvc="x")
    with pytest.raises(ServiceConfigError, match=r"runner.kubernetes.pvc_name: is required"):
        make(namespace="ns")
    with pytest.raises(ServiceConfigError, match=r"runner.kubernetes.node_selector: must be a mapping"):
        make(pvc_name="w", node_selector="gpu=true")
    with pytest.raises(ServiceConfigError, match=r"runner.kubernetes.run_as_user: must be a whole number"):
        make(pvc_name="w", run_as_user=True)
    with pytest.raises(ServiceConfigError, match=r"runner.kubernetes.run_as_user: must be a non-root user id"):
        make(pvc_name="w", run_as_user=0)
    with pytest.raises(ServiceConfigError, match=r"runner.kubernetes.namespace: must be a DNS-1123 .*'GPU_Nodes'"):
        make(pvc_name="w", namespace="GPU_Nodes")
    with pytest.raises(ServiceConfigError, match=r"runner.kubernetes.ttl_seconds_after_finished: must be 0 or more"):
        make(pvc_name="w", ttl_seconds_after_finished=-1)
    # Reading contacts nothing; left-out keys get the declared defaults (namespace None: the pod's own).
    opts = make(pvc_name="w", node_selector=None)
    assert (opts.pvc_name, opts.namespace, opts.node_selector, opts.run_as_user) == ("w", None, {}, 65532)
    with pytest.raises(ServiceConfigError, match=r"^segmap.yaml: runner.kubernetes: .*namespace"):
        KubernetesRunner.from_options(opts, workdir_root=WORKDIR, api_client=k8s.ApiClient(),
                                      where="segmap.yaml: runner.kubernetes")


def test_network_policy_isolates_exactly_the_map_pods(deployed):
    policy = deployed[("NetworkPolicy", "segmap-map-runs-isolated")]
    assert sorted(policy.spec.policy_types) == ["Egress", "Ingress"]
    assert not policy.spec.ingress and not policy.spec.egress  # no rule: nothing in, nothing out
    job = job_manifest(make_spec(), pvc_name="segmap-work", workdir_root=WORKDIR)
    map_pod_labels = job.spec.template.metadata.labels
    assert policy.spec.pod_selector.match_labels.items() <= map_pod_labels.items()
    serve_labels = deployed[("Deployment", "segmap")].spec.template.metadata.labels
    assert not policy.spec.pod_selector.match_labels.items() <= serve_labels.items()


# ------------------------------------------------------------------------------ the service loop with this runner


def _write_seg(folder: Path, sop_uid: str) -> None:
    """What the MAP would leave in its output: a DICOM file whose Modality is SEG (the service only looks at that)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, sop_uid, "SEG"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "seg.dcm", enforce_file_format=True)


@pytest.fixture
def service_on_stub(stub, tmp_path):
    """A Service configured for the Kubernetes runner, the runner talking to the stub, one job queued."""
    pytest.importorskip("segmap.service.spool", reason="the service needs the intake's spool module")
    from segmap.service.config import parse_config
    from segmap.service.service import Service

    doc = {"service": {"workdir": str(tmp_path / "work"), "retry_backoff_s": 0, "worker": "serve-0"},
           "listener": {"port": 11112},
           "runner": {"kind": "kubernetes", "timeout_s": 600, "gpus": ["0"],
                      "kubernetes": {"namespace": NS, "pvc_name": "segmap-work", "service_account": "segmap-map"}},
           "maps": [{"name": "spleen", "image": f"registry.example/segmap/spleen@{DIGEST}",
                     "task": str(ROOT / "tasks" / "spleen.yaml"), "destinations": ["orthanc"]}],
           "destinations": {"orthanc": {"kind": "orthanc", "url": "http://127.0.0.1:9"}}}
    cfg = parse_config(doc, tmp_path / "segmap.yaml")

    def start_service():  # a fresh process: a new runner and service that know nothing but the store
        api = k8s.ApiClient(k8s.Configuration(host=stub.url))
        runner = KubernetesRunner.from_options(cfg.runner.options, workdir_root=cfg.workdir, api_client=api)
        return Service(cfg, runner=runner, destinations={})

    svc = start_service()
    job = seed_job(svc.store, "1.2.3", at=100, image=cfg.maps[0].image,
                   digest=svc.runner.image_digest(cfg.maps[0].image), max_attempts=3, workspace=cfg.workspace)
    return svc, start_service, job.key, job.run_name


def test_the_jobs_status_drives_the_service_and_survives_its_restart(stub, service_on_stub):
    svc, start_service, key, name = service_on_stub
    svc.claim()
    assert svc.store.get_job(key).state == "running" and list(stub.jobs) == [(NS, name)]
    body = stub.job(name)
    [container] = body["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m.get("subPath") for m in container["volumeMounts"]}
    assert container["env"] == [{"name": "SEGMAP_UID_SEED", "value": key}]
    assert mounts[CONTAINER_OUTPUT] == f"jobs/{name}/output"

    restarted = start_service()  # segmap serve restarted while the Job waits for a node
    restarted.advance_held()
    stub.schedule(name, node="gpu-node-5")
    stub.run(name)
    restarted.advance_held()
    assert restarted.store.get_job(key).state == "running"
    _write_seg(Path(restarted.store.get_job(key).output_dir), "1.2.3.999")
    stub.succeed(name, log="segmap: wrote 1 SEG\n")
    restarted.advance_held()

    job = restarted.store.get_job(key)
    assert (job.state, job.node, job.exit_code) == ("exporting", "gpu-node-5", 0)
    assert len(stub.calls("POST")) == 1, "the restarted service adopted the Job, it did not create another"
    assert stub.job(name) is None, "the finished Job was removed once its result was collected"
    assert "segmap: wrote 1 SEG" in Path(job.log_path).read_text()


def test_a_failed_job_is_retried_as_a_fresh_job_and_a_timeout_is_reported(stub, service_on_stub):
    svc, _, key, name = service_on_stub
    svc.claim()
    stub.schedule(name)
    stub.run(name)
    stub.fail(name, exit_code=137, container_reason="OOMKilled", log="Killed\n")
    svc.advance_held()
    job = svc.store.get_job(key)
    assert (job.state, job.exit_code, job.attempts) == ("queued", 137, 1)
    assert "OOMKilled" in job.error and stub.job(name) is None

    svc.claim()  # back-off 0: the second attempt is a new Job of the same name
    assert len(stub.calls("POST")) == 2 and stub.job(name)["status"] == {}
    stub.schedule(name)
    stub.deadline(name)
    svc.advance_held()
    job = svc.store.get_job(key)
    assert (job.state, job.attempts, job.error) == ("queued", 2, "timed out after 600 s")


# ------------------------------------------------------------------------------------ deploy/: security (issue 21)


def test_secrets_live_in_a_secret_not_the_config_map(deployed):
    """The ConfigMap names secret files only; the Deployment mounts the Secret where those names point."""
    config_map = deployed[("ConfigMap", "segmap-config")]
    config = yaml.safe_load(config_map.data["segmap.yaml"])

    def keys(node, where=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield f"{where}.{k}".lstrip("."), v
                yield from keys(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from keys(v, f"{where}[{i}]")

    plain = [k for k, v in keys(config) if k.rsplit(".", 1)[-1] in ("password", "token", "database") and v]
    assert not plain, plain
    assert "service.database" not in dict(keys(config))  # the store's URL comes from the Secret segmap-database
    files = [Path(v) for k, v in keys(config) if k.endswith("_file")]
    assert files, "the web token must come from a file"

    pod = deployed[("Deployment", "segmap")].spec.template.spec
    [c] = pod.containers
    mounts = {m.name: m for m in c.volume_mounts}
    secret_volumes = {v.name: v.secret for v in pod.volumes if v.secret is not None}
    assert set(secret_volumes) == {"secrets"} and secret_volumes["secrets"].secret_name == "segmap-secrets"
    assert mounts["secrets"].read_only
    for f in files:
        assert f.parent == Path(mounts["secrets"].mount_path), f
    assert secret_volumes["secrets"].default_mode == 0o440  # the pod's group (fsGroup) reads, nobody else


def test_the_service_pod_takes_dicom_from_one_network_and_http_from_monitoring(deployed):
    import ipaddress

    policy = deployed[("NetworkPolicy", "segmap-serve-ingress")]
    serve_labels = deployed[("Deployment", "segmap")].spec.template.metadata.labels
    assert policy.spec.pod_selector.match_labels.items() <= serve_labels.items()
    map_labels = job_manifest(make_spec(), pvc_name="segmap-work", workdir_root=WORKDIR).spec.template.metadata.labels
    assert not policy.spec.pod_selector.match_labels.items() <= map_labels.items()
    assert policy.spec.policy_types == ["Ingress"]

    rules = {r.ports[0].port: r for r in policy.spec.ingress}
    assert set(rules) == {"dicom", "http"} and all(len(r.ports) == 1 for r in policy.spec.ingress)
    [dicom_from] = rules["dicom"]._from
    network = ipaddress.ip_network(dicom_from.ip_block.cidr)
    assert network.prefixlen >= 8 and not dicom_from.ip_block._except
    [http_from] = rules["http"]._from
    assert http_from.namespace_selector.match_labels == {"kubernetes.io/metadata.name": "monitoring"}
    assert http_from.ip_block is None and http_from.pod_selector is None

    # The listener's own allowed peers sit inside the network the policy lets in.
    config = yaml.safe_load(deployed[("ConfigMap", "segmap-config")].data["segmap.yaml"])
    peers = config["listener"]["allowed_peers"]
    assert peers and all(ipaddress.ip_address(p) in network for p in peers)


def test_the_namespace_enforces_pod_security_restricted_and_both_pods_meet_it(deployed):
    """The labels, and what "restricted" checks, on segmap serve's pod and on a MAP run's pod."""
    [namespace] = [obj for (kind, _), obj in deployed.items() if kind == "Namespace"]
    labels = namespace.metadata.labels
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"

    serve = deployed[("Deployment", "segmap")].spec.template.spec
    run = job_manifest(make_spec(), pvc_name="segmap-work", workdir_root=WORKDIR).spec.template.spec
    for pod in (serve, run):
        assert pod.security_context.run_as_non_root and pod.security_context.seccomp_profile.type == "RuntimeDefault"
        assert not pod.host_network and not pod.host_pid and not pod.host_ipc
        assert all(v.host_path is None for v in pod.volumes or [])
        for c in pod.containers + (pod.init_containers or []):
            sc = c.security_context
            assert sc.allow_privilege_escalation is False and sc.capabilities.drop == ["ALL"]
            assert not sc.capabilities.add and not sc.privileged
            assert sc.run_as_user is None or sc.run_as_user > 0
            assert not any(p.host_port for p in c.ports or [])
