"""deploy/overlays: a single-node overlay (SQLite on a ReadWriteOnce volume, no database Secret) and a PostgreSQL
overlay, both naming the service image `make service-image` builds, built with `kubectl kustomize` and every object
read back through the official client's models (tests/test_service_k8s.py `validated`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes")
from test_service_k8s import validated  # noqa: E402  (the models check, not its tests)

from segmap.packager.service_image import DEFAULT_TAG  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MODELS = {"ServiceAccount": "V1ServiceAccount", "ConfigMap": "V1ConfigMap", "Service": "V1Service",
          "PersistentVolumeClaim": "V1PersistentVolumeClaim", "Deployment": "V1Deployment", "Role": "V1Role",
          "RoleBinding": "V1RoleBinding", "NetworkPolicy": "V1NetworkPolicy", "StatefulSet": "V1StatefulSet",
          "Namespace": "V1Namespace"}


def built(overlay: str) -> dict[tuple[str, str], object]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds the overlays: kustomize's patches)")
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    objects = {}
    for doc in yaml.safe_load_all(done.stdout):
        if doc:
            assert doc["kind"] in MODELS, doc["kind"]
            objects[(doc["kind"], doc["metadata"]["name"])] = validated(doc, MODELS[doc["kind"]])
    return objects


def serve_container(objects):
    [container] = objects[("Deployment", "segmap")].spec.template.spec.containers
    return container


def secrets_named(objects) -> set[str]:
    names = set()
    for obj in objects.values():
        template = getattr(getattr(obj, "spec", None), "template", None)
        for c in (template.spec.containers if template else []):
            names |= {e.value_from.secret_key_ref.name for e in c.env or []
                      if e.value_from and e.value_from.secret_key_ref}
    return names


def test_single_node_needs_no_database_and_one_node_volume():
    objects = built("single-node")
    container = serve_container(objects)
    assert container.image == DEFAULT_TAG
    assert container.command is None and container.args == ["-c", "/etc/segmap/config/segmap.yaml"]  # tini first
    assert "SEGMAP_DATABASE_URL" not in {e.name for e in container.env or []}
    assert secrets_named(objects) == set()
    claim = objects[("PersistentVolumeClaim", "segmap-work")]
    assert claim.spec.access_modes == ["ReadWriteOnce"]
    assert not [k for k in objects if k[0] == "StatefulSet"]


def test_postgres_overlay_brings_its_database_and_reads_the_secret():
    objects = built("postgres")
    container = serve_container(objects)
    assert container.image == DEFAULT_TAG
    env = {e.name: e for e in container.env}
    assert env["SEGMAP_DATABASE_URL"].value_from.secret_key_ref.name == "segmap-database"
    db = objects[("StatefulSet", "segmap-db")]
    [pg] = db.spec.template.spec.containers
    assert {e.name for e in pg.env} >= {"POSTGRES_PASSWORD", "POSTGRES_USER", "POSTGRES_DB"}
    assert db.spec.template.spec.security_context.run_as_non_root
    assert objects[("Service", "segmap-db")].spec.ports[0].port == 5432
    assert secrets_named(objects) == {"segmap-database"}
    # The url in the Secret points at this Service (deploy/overlays/postgres/kustomization.yaml says how to make it).
    assert "@segmap-db:5432/segmap" in (DEPLOY / "overlays" / "postgres" / "kustomization.yaml").read_text()
