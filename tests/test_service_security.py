"""Who may read the job service's pages, what it refuses to expose, and where its secrets come from.

The real web server over a real job store (SQLite; PostgreSQL for the database URL), and `segmap serve` as a
process: authentication on every page but the probes, the probes' split (liveness does not ask the database),
refusal of a non-loopback bind without protection (one line naming the setting), the ``insecure`` escape hatch,
secrets from files and the environment, and warnings for those left in plaintext.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from pacs import free_port, wait_for
from segmap.errors import ServiceConfigError
from segmap.service.config import EXAMPLE, load_config
from segmap.service.security import exposure_problems, secret_warnings, web_auth
from segmap.service.store import JobStore
from segmap.service.web import make_server
from segmap.service.workspace import Workspace
from segmap.webauth import WebAuth
from service_harness import seed_job

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-3f9a2c-0123456789abcdef"
PAGES = ("/", "/jobs/{key}", "/api/jobs", "/api/jobs/{key}", "/metrics", "/healthz")


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def store(tmp_path):
    store = JobStore(tmp_path / "store.sqlite")
    key = seed_job(store, "1.2.826.0.1.3680043.10.999.1.1", at=time.time(), study_uid="1.2.826.0.1.3680043.10.999.1",
                   image="img", digest="sha256:ab", workspace=Workspace(tmp_path)).key
    yield store, key
    store.close()


@pytest.fixture
def server(store):
    store, key = store
    server = make_server(store, port=0, auth=WebAuth(tokens=(TOKEN,), user="ops", password="pw-9d8c"))
    server.serve_in_thread()
    yield server, store, key
    server.shutdown()


@pytest.mark.parametrize("page", PAGES)
def test_every_page_needs_credentials(server, page):
    server, _, key = server
    url = server.url + page.format(key=key[:12])
    for headers in ({}, {"Authorization": "Bearer wrong"}, basic("ops", "wrong"), basic("other", "pw-9d8c"),
                    {"Authorization": "Basic !!!notbase64"}):
        r = requests.get(url, headers=headers, timeout=10)
        assert r.status_code == 401, (headers, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert key not in r.text and "segmap_jobs" not in r.text
    assert requests.head(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200
    assert requests.get(url, headers=basic("ops", "pw-9d8c"), timeout=10).status_code == 200
    assert requests.get(url, auth=("ops", "pw-9d8c"), timeout=10).status_code == 200


def test_probes_are_open_and_liveness_survives_a_database_outage(server):
    server, store, _ = server
    for probe in ("/livez", "/readyz"):
        r = requests.get(server.url + probe, timeout=10)
        assert r.status_code == 200 and len(r.text) < 20  # nothing about jobs
    store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(store.path) + suffix).unlink(missing_ok=True)
    store.path.write_bytes(b"this is not an SQLite database" * 100)
    assert requests.get(server.url + "/livez", timeout=10).status_code == 200
    ready = requests.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and "job store" in ready.text
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 401


def test_a_bearer_only_server_challenges_with_bearer(store):
    store, _ = store
    server = make_server(store, port=0, auth=WebAuth(tokens=(TOKEN,)))
    server.serve_in_thread()
    try:
        r = requests.get(server.url + "/metrics", timeout=10)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=10).status_code == 200
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------ configuration


def write_config(tmp_path: Path, edit) -> Path:
    shutil.copy(ROOT / "tasks" / "spleen.yaml", tmp_path / "spleen.yaml")
    doc = yaml.safe_load(EXAMPLE.replace("/var/lib/segmap", str(tmp_path / "work")))
    edit(doc)
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def serve(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "segmap.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_web_credentials_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = write_config(tmp_path, lambda d: d["service"]["http"].update(
        auth={"token_file": str(tmp_path / "token"), "user": "ops", "password_env": "SEGMAP_TEST_WEB_PW"}))
    monkeypatch.setenv("SEGMAP_TEST_WEB_PW", "pw-from-env")
    auth = web_auth(load_config(path))
    assert auth.tokens == (TOKEN,) and auth.user == "ops" and auth.password == "pw-from-env"
    assert "pw-from-env" not in repr(load_config(path))

    # Never the YAML itself: a plaintext token is an unknown key, a user alone is not enough.
    for auth_doc, words in (({"token": TOKEN}, "service.http.auth.token: unknown key"),
                            ({"user": "ops"}, "service.http.auth: give user together with password_file"),
                            ({"token_file": str(tmp_path / "missing")}, "no such file"),
                            ({"token_env": "SEGMAP_TEST_UNSET_VAR"}, "SEGMAP_TEST_UNSET_VAR is not set")):
        bad = write_config(tmp_path, lambda d: d["service"]["http"].update(auth=auth_doc))
        with pytest.raises(ServiceConfigError, match=words):
            load_config(bad)


@pytest.mark.parametrize("edit, setting", [
    (lambda d: d["service"]["http"].update(host="0.0.0.0"), "service.http.auth"),
    (lambda d: d["listener"].update(host="0.0.0.0"), "listener.allowed_peers"),
])
def test_serve_refuses_an_unprotected_non_loopback_bind(tmp_path, edit, setting):
    path = write_config(tmp_path, edit)
    for args in (("--check",), ()):
        done = serve("-c", str(path), *args)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("segmap: error:") and f"{setting}:" in lines[0], lines
        assert "refusing to start" in lines[0]
    assert not (tmp_path / "work").exists()  # refused before anything was created


def test_what_makes_a_non_loopback_bind_acceptable(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMAP_TEST_WEB_TOKEN", TOKEN)
    ok = write_config(tmp_path, lambda d: (d["service"]["http"].update(host="0.0.0.0",
                                                                        auth={"token_env": "SEGMAP_TEST_WEB_TOKEN"}),
                                           d["listener"].update(host="0.0.0.0", allowed_peers=["10.1.2.3"])))
    assert exposure_problems(load_config(ok)) == []
    done = serve("-c", str(ok), "--check")
    assert done.returncode == 0 and done.stdout.startswith("OK:"), done.stderr

    # The explicit escape hatch: starts, and says so loudly, naming each problem.
    risky = write_config(tmp_path, lambda d: (d["service"].update(insecure=True),
                                              d["service"]["http"].update(host="0.0.0.0"),
                                              d["listener"].update(host="0.0.0.0")))
    done = serve("-c", str(risky), "--check")
    assert done.returncode == 0, done.stderr
    warnings = [ln for ln in done.stderr.splitlines() if "INSECURE" in ln]
    assert len(warnings) == 2 and "WARNING" in done.stderr
    assert any("service.http.auth" in w for w in warnings) and any("listener.allowed_peers" in w for w in warnings)


def test_secrets_from_files_and_the_environment_and_plaintext_warnings(tmp_path, monkeypatch):
    (tmp_path / "orthanc-pw").write_text("orthanc-S3cret\n")
    monkeypatch.setenv("SEGMAP_TEST_STOW_PW", "stow-S3cret")
    monkeypatch.setenv("SEGMAP_TEST_DB_URL", "postgresql://segmap:db-S3cret@db.example:5432/segmap")

    def edit(d):
        d["orthanc"].update(username="segmap", password_file=str(tmp_path / "orthanc-pw"))
        d["destinations"]["stow"] = {"kind": "stow", "url": "https://pacs.example/dicom-web", "username": "segmap",
                                     "password_env": "SEGMAP_TEST_STOW_PW"}
        d["service"]["database_env"] = "SEGMAP_TEST_DB_URL"

    config = load_config(write_config(tmp_path, edit))
    assert config.orthanc.password == "orthanc-S3cret"
    assert config.destinations["stow"]["password"] == "stow-S3cret"
    assert config.database.endswith("@db.example:5432/segmap")
    assert {k: v.source for k, v in config.secrets.items()} == {
        "orthanc.password": f"file {tmp_path / 'orthanc-pw'}", "destinations.stow.password": "env SEGMAP_TEST_STOW_PW",
        "service.database": "env SEGMAP_TEST_DB_URL"}
    assert secret_warnings(config) == []
    assert "S3cret" not in repr(config.secrets)

    def plaintext(d):
        d["orthanc"].update(username="segmap", password="orthanc-S3cret")
        d["destinations"]["orthanc"]["password"] = "dest-S3cret"
        d["service"]["database"] = "postgresql://segmap@db.example/segmap?password=db-S3cret"

    path = write_config(tmp_path, plaintext)
    warned = secret_warnings(load_config(path))
    assert len(warned) == 3 and all("password_file" in w or "database_file" in w for w in warned)
    done = serve("-c", str(path), "--check")
    assert done.returncode == 0, done.stderr
    for where in ("orthanc.password", "destinations.orthanc.password", "service.database"):
        assert f"{where} is written in the configuration file in plaintext" in done.stderr
    assert "S3cret" not in done.stderr + done.stdout

    # A URL without a password is no secret; two forms at once is a mistake.
    quiet = write_config(tmp_path, lambda d: d["service"].update(database="postgresql://segmap@db.example/segmap"))
    assert secret_warnings(load_config(quiet)) == []
    both = write_config(tmp_path, lambda d: d["orthanc"].update(password="x", password_env="SEGMAP_TEST_STOW_PW"))
    with pytest.raises(ServiceConfigError, match="orthanc: give one of password_env, password, not several"):
        load_config(both)


def test_healthz_never_shows_the_database_password(postgres_server, tmp_path):
    """The store URL carries its password twice (user-info and ?password=); PostgreSQL trusts loopback, so the
    password is simply ignored by the server -- and must be ignored by every page too."""
    url = postgres_server.fresh_database("securityhealthz")
    user_host, db = url.split("://", 1)[1].rsplit("/", 1)
    user, host = user_host.split("@")
    secret_url = f"postgresql://{user}:S3cret@{host}/{db}?password=S3cret&connect_timeout=5"
    store = JobStore(secret_url)
    server = make_server(store, port=0)
    server.serve_in_thread()
    try:
        for path in ("/healthz", "/readyz", "/livez", "/metrics", "/api/jobs"):
            r = requests.get(server.url + path, timeout=30)
            assert r.status_code == 200 and "S3cret" not in r.text, (path, r.text[:300])
        assert "postgresql job store postgresql://" in requests.get(server.url + "/healthz", timeout=30).json()["store"]
        assert "S3cret" not in str(store)
    finally:
        server.shutdown()
        store.close()


def test_a_started_service_asks_for_its_token(tmp_path):
    """`segmap serve` itself (a worker-only process: no intake) puts the configured credentials on its pages."""
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    path = write_config(tmp_path, lambda d: (
        d["service"].update(role="worker", worker="w1"),
        d["service"]["http"].update(host="0.0.0.0", port=port, auth={"token_file": str(tmp_path / "token")}),
        d.pop("listener"), d.pop("orthanc")))
    proc = subprocess.Popen([sys.executable, "-m", "segmap.cli", "serve", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def live() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return requests.get(f"http://127.0.0.1:{port}/livez", timeout=1).ok
            except requests.RequestException:
                return False
        wait_for(live, 60, "segmap serve to answer /livez")
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 401
        ok = requests.get(f"http://127.0.0.1:{port}/healthz", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=10)
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert TOKEN not in out
