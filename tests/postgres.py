"""A throw-away PostgreSQL server (Debian's ``postgresql`` package) for the job-store and multi-worker tests.

``initdb`` in the test's folder, ``postgres`` on a free loopback port with trust authentication, stopped afterwards.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user the package creates. Outside
CI a missing server skips with the reason; in CI (.ci/run installs it) it fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacs import free_port, wait_for


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Postgres:
    folder: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return cmd
        return ["runuser", "-u", "postgres", "--", *cmd]

    def start(self) -> "Postgres":
        initdb, postgres = _bin("initdb"), _bin("postgres")
        if not initdb or not postgres:
            _unavailable("PostgreSQL server is not installed (Debian package postgresql; .ci/run installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        data = self.folder / "data"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        if not data.exists():
            done = subprocess.run(self._as_owner([initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                                                  "--no-sync", "-E", "UTF8"]), capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                _unavailable(f"initdb failed: {done.stderr.strip()[-300:]}")
        log = open(self.folder / "postgres.log", "ab")
        self.proc = subprocess.Popen(self._as_owner([postgres, "-D", str(data), "-p", str(self.port), "-k",
                                                     str(self.folder), "-c", "listen_addresses=127.0.0.1",
                                                     "-c", "fsync=off", "-c", "max_connections=200"]),
                                     stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._up, 60, f"PostgreSQL on port {self.port} (log: {self.folder / 'postgres.log'})")
        return self

    def _up(self) -> bool:
        import psycopg
        if self.proc.poll() is not None:
            pytest.fail(f"postgres exited with {self.proc.returncode}: see {self.folder / 'postgres.log'}")
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def fresh_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}"')
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # smart shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def postgres_server_fixture(tmp_path_factory):
    """The body of conftest's session fixture ``postgres_server``."""
    import tempfile
    # pytest's folders are private to root; the postgres user needs a folder of its own.
    folder = Path(tempfile.mkdtemp(prefix="segmap-pg-")) if os.geteuid() == 0 else tmp_path_factory.mktemp("pg")
    server = Postgres(folder, free_port()).start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
