"""No patient data and no password on any page, log line, job record or metric of the job service (issue 21).

A real `segmap serve` process (the e2e harness), a real DICOM send, and a MAP image built here from segmap's CPU base
whose entrypoint prints a patient's name (``DOE^JOHN``), the same in DICOM JSON (``DOE^JANE``), an accession number
and a URL with its password into its log and exits 1. The destination's URL carries user-info, and on PostgreSQL the
store's URL carries ``password=``. None of those strings may appear on ``/``, ``/jobs/KEY``, ``/api/jobs``,
``/metrics``, ``/healthz``, in the service's log, in ``segmap jobs`` (list, show, show --json) or in a dump of the
job store (``pg_dump``, or SQLite's ``.dump``).
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import tarfile

import pytest
import requests

from pacs import storescu
from postgres import _bin
from segmap.demo.phantom import write_phantom_study
from service_harness import ServiceProcess

pytestmark = pytest.mark.service

LEAKY_TAG = "segmap-test/leaky-map:ci"
JSON_NAME = '"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}'
#: What the failing MAP prints: each form on a line of its own, then all of them on its error line.
LEAK_SCRIPT = f"""\
echo 'loading the study of DOE^JOHN'
echo '{{{JSON_NAME}}}'
echo 'AccessionNumber ACC123'
echo 'pushing to http://u:S3cret@h/dicom-web'
echo 'segmap: error: cannot segment DOE^JOHN {JSON_NAME} AccessionNumber ACC123 at http://u:S3cret@h' >&2
exit 1
"""
#: Nothing the service shows may contain any of these.
LEAKED = ("DOE^JOHN", "DOE^JANE", "ACC123", "S3cret", "PHANTOM^PRIVATE", "PID-90210")


@pytest.fixture(scope="module")
def leaky_image(engine):
    from segmap.packager.baseimage import CPU_BASE_IMAGE
    from segmap.packager.docker_engine import follow

    files = {
        "Dockerfile": (f"FROM {CPU_BASE_IMAGE}\nCOPY leak.sh /leak.sh\nUSER 65532:65532\n"
                       f"ENTRYPOINT {json.dumps(['/usr/bin/tini', '--', '/bin/sh', '/leak.sh'])}\n").encode(),
        "leak.sh": LEAK_SCRIPT.encode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    follow(engine.build(fileobj=buf, custom_context=True, tag=LEAKY_TAG, rm=True, decode=True), "leaky image build")
    return engine.inspect_image(LEAKY_TAG)["Id"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request):
    if request.param == "sqlite":
        return None
    url = request.getfixturevalue("postgres_server").fresh_database("privacy")
    return url + "?password=S3cret&connect_timeout=10"


def dump(svc: ServiceProcess, store_url: str | None) -> str:
    if store_url is None:
        db = sqlite3.connect(svc.store_path)
        try:
            return "\n".join(db.iterdump())
        finally:
            db.close()
    pg_dump = _bin("pg_dump")
    assert pg_dump, "pg_dump is missing (Debian package postgresql-client)"
    done = subprocess.run([pg_dump, "--data-only", "--dbname", store_url.split("?", 1)[0]], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_no_patient_data_or_password_anywhere(leaky_image, store_url, tmp_path):
    extra = {"service": {"max_attempts": 1, **({"database": store_url} if store_url else {})}}
    svc = ServiceProcess(tmp_path / "service", leaky_image, quiet_period_s=0.5,
                         destinations={"pacs": {"kind": "stow", "url": "http://u:S3cret@h"}}, extra=extra)
    study = write_phantom_study(tmp_path / "study", seed=3, shape_zyx=(8, 48, 48), patient_name="PHANTOM^PRIVATE",
                                patient_id="PID-90210")
    try:
        svc.start()
        storescu(study["dicom_files"], svc.port, "SEGMAP")
        (job,) = svc.wait_jobs("failed", 1, timeout=180)
        # The error really came from that log line (so the checks below are about something).
        assert "cannot segment" in job.error and "[redacted]" in job.error
        run_log = (svc.folder / "work").rglob("*.log")
        assert any("DOE^JOHN" in p.read_text(errors="replace") for p in run_log), "the MAP's log was not kept"

        shown: dict[str, str] = {}
        base = f"http://127.0.0.1:{svc.http_port}"
        for path in ("/", f"/jobs/{job.key}", f"/jobs/{job.key[:12]}", "/api/jobs", f"/api/jobs/{job.key}",
                     "/metrics", "/healthz", "/readyz"):
            r = requests.get(base + path, timeout=30)
            assert r.status_code == 200, (path, r.status_code)
            shown[path] = r.text
        assert "cannot segment" in shown[f"/jobs/{job.key}"] and "loading the study of" in shown[f"/jobs/{job.key}"]
        for args in (("list",), ("show", job.key[:12]), ("show", job.key[:12], "--json")):
            done = subprocess.run([sys.executable, "-m", "segmap.cli", "jobs", "-c", str(svc.config_path), *args],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            shown["segmap jobs " + " ".join(args)] = done.stdout + done.stderr
        assert "container log" in shown[f"segmap jobs show {job.key[:12]}"]
    finally:
        svc.stop()
    shown["service log"] = svc.log()
    shown["store dump"] = dump(svc, store_url)
    assert "cannot segment" in shown["store dump"] and "run failed" in shown["service log"]

    leaks = {(where, secret) for where, text in shown.items() for secret in LEAKED if secret in text}
    assert not leaks, sorted(leaks)
