"""`segmap jobs` for operators: list, show, retry, cancel, series -- against a real job store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segmap.service.config import EXAMPLE
from segmap.service.store import JobStore
from segmap.service.workspace import Workspace
from service_harness import seed_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path):
    shutil.copy(ROOT / "tasks" / "spleen.yaml", tmp_path / "spleen.yaml")
    config = tmp_path / "service.yaml"
    config.write_text(EXAMPLE.replace("/var/lib/segmap", str(tmp_path / "work")))
    store = JobStore(tmp_path / "work" / "store.sqlite")
    keys = [seed_job(store, f"1.2.826.0.1.{n}", at=100 + n, study_uid="1.2.826.0.1", image="img",
                     digest="sha256:ab", max_attempts=1, workspace=Workspace(tmp_path / "work")).key
            for n in range(3)]
    job = store.claim("w1", 60, 1, now=130)
    store.run_failed(job, "w1", "exited with code 2: segmap: error: no series matches", 2, 10, now=140)
    return config, store, keys


def jobs(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segmap.cli", "jobs", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def test_list_show_and_json(setup):
    config, store, keys = setup
    listed = jobs(config)
    assert listed.returncode == 0, listed.stderr
    assert "failed: 1" in listed.stdout and "queued: 2" in listed.stdout
    for key in keys:
        assert key[:12] in listed.stdout
    assert "segmap: error: no series matches" in listed.stdout and "w1" in listed.stdout
    shown = jobs(config, "show", keys[0][:8])
    assert shown.returncode == 0 and f"key: {keys[0]}" in shown.stdout and "attempt 1 failed" in shown.stdout
    data = json.loads(jobs(config, "--state", "queued", "--json").stdout)
    assert sorted(d["key"] for d in data) == sorted(keys[1:])
    series = jobs(config, "series")
    assert series.stdout.count("spleen: job") == 3


def test_retry_and_cancel(setup):
    config, store, keys = setup
    assert jobs(config, "retry", keys[0][:8]).returncode == 0
    assert store.get_job(keys[0]).state == "queued" and store.get_job(keys[0]).attempts == 0
    again = jobs(config, "retry", keys[0][:8])
    assert again.returncode == 2 and again.stderr.startswith("segmap: error: ") and "only failed or cancelled" in \
        again.stderr
    cancelled = jobs(config, "cancel", keys[1][:8])
    assert store.get_job(keys[1]).state == "cancelled", cancelled.stderr
    assert jobs(config, "cancel", keys[1][:8]).returncode == 2


def test_unknown_job_and_missing_store_are_one_line(setup, tmp_path):
    config, _, _ = setup
    unknown = jobs(config, "show", "ffffffff")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace(str(tmp_path / "work"), str(tmp_path / "nowhere")))
    missing = jobs(other)
    assert missing.returncode == 2 and "no job store" in missing.stderr
