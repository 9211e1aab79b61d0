"""Test helpers of the job service: seeding a job store the way the service does (:func:`seed_job`,
:func:`new_job`), and a real ``segmap serve`` process for end-to-end tests and the service benchmark (config,
start, kill -9, restart).

The test reads the same SQLite job store the service writes (WAL allows a reader beside the writer).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pacs import free_port, wait_for
from segmap.service.keys import job_key, run_name, seg_uids
from segmap.service.store import Arrival, Job, JobStore, NewJob, SeriesVersion
from segmap.service.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "tasks" / "spleen.yaml"


# ------------------------------------------------------------------------------------------------ seeding a store


def new_job(store: JobStore, version: SeriesVersion, *, map_name: str = "spleen", image: str = "img:1",
            digest: str = "sha256:aa", destinations: tuple[str, ...] = ("orthanc",), max_attempts: int = 2,
            workspace: Workspace = Workspace(Path("/"))) -> NewJob:
    """The job the service would queue for ``version`` (its key from the version's instances and ``digest``), with
    its output and log paths in ``workspace``."""
    key = job_key(version.series_uid, [i.sop_uid for i in store.instances(version.id)], digest, map_name=map_name,
                  destinations=destinations)
    name = run_name(key)
    return NewJob(key, map_name, image, digest, name, seg_uids(key)[0], tuple(destinations), max_attempts,
                  str(workspace.output_dir(name)), str(workspace.log_path(name)))


def seed_job(store: JobStore, series_uid: str, *, at: float, study_uid: str = "1.2", sops: int = 1,
             log: str | None = None, source: str = "listener", **job) -> Job:
    """A queued job as the service makes one: ``sops`` instances of ``series_uid`` arrive at ``at``, the series
    closes 10 s later with one job (``job``: the keywords of :func:`new_job`). ``log`` is written as the job's
    container log."""
    for k in range(1, sops + 1):
        store.record_instance(Arrival(source, study_uid, series_uid, f"{series_uid}.{k}", "CT",
                                      path=f"/spool/{series_uid}.{k}.dcm"), now=at)
    [version] = [v for v in store.due_series(0, now=at + 10) if v.series_uid == series_uid]
    queued = new_job(store, version, **job)
    created, _ = store.close_series(version.id, [queued], f"{queued.map_name}: job", instance_count=sops,
                                    now=at + 10)
    assert created == [queued.key]
    if log is not None:
        Path(queued.log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(queued.log_path).write_text(log)
    return store.get_job(queued.key)


# ------------------------------------------------------------------------------------------------ a real process


@dataclass
class ServiceProcess:
    folder: Path
    image: str
    listener: bool = True
    orthanc_url: str | None = None
    destinations: dict = field(default_factory=dict)
    quiet_period_s: float = 1.0
    max_concurrent: int = 1
    allowed_calling_ae_titles: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.config_path = self.folder / "service.yaml"
        doc = {
            "service": {"workdir": str(self.folder / "work"), "quiet_period_s": self.quiet_period_s,
                        "max_attempts": 3, "retry_backoff_s": 1, "export_backoff_max_s": 2, "lease_s": 10,
                        "poll_s": 0.2, "worker": "test-worker",
                        "http": {"host": "127.0.0.1", "port": self.http_port}},
            "runner": {"kind": "docker", "max_concurrent": self.max_concurrent, "cpus": 1, "memory": "4g",
                       "timeout_s": 300},
            "maps": [{"name": "spleen", "image": self.image, "task": str(TASK),
                      "destinations": list(self.destinations)}],
            "destinations": self.destinations,
        }
        if self.listener:
            doc["listener"] = {"ae_title": "SEGMAP", "host": "127.0.0.1", "port": self.port,
                               "allowed_calling_ae_titles": list(self.allowed_calling_ae_titles)}
        if self.orthanc_url:
            doc["orthanc"] = {"url": self.orthanc_url, "poll_interval_s": 0.3}
        for section, values in self.extra.items():
            doc.setdefault(section, {}).update(values)
        self.database = doc["service"].get("database")
        self.config_path.write_text(yaml.safe_dump(doc))

    @property
    def log_path(self) -> Path:
        return self.folder / "serve.log"

    @property
    def store_path(self) -> Path:
        return self.folder / "work" / "store.sqlite"

    def start(self) -> "ServiceProcess":
        log = open(self.log_path, "ab")
        log.write(f"\n=== start {self.starts + 1} ===\n".encode())
        log.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "segmap.cli", "--log-level", "INFO", "serve", "-c",
                                      str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        wait_for(self._ready, 60, f"segmap serve to answer /healthz (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        import requests
        if self.proc.poll() is not None:
            raise AssertionError(f"segmap serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def restart_after_kill9(self) -> None:
        self.kill9()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def store(self):
        return JobStore(self.database or self.store_path)

    def jobs(self, state: str | None = None):
        if not self.database and not self.store_path.exists():
            return []
        return self.store().list_jobs([state] if state else None, limit=1000)

    def wait_jobs(self, state: str, count: int, timeout: float = 180):
        def reached():
            jobs = self.jobs(state)
            failed = self.jobs("failed")
            if failed and state != "failed":
                raise AssertionError(f"job failed: {failed[0].error}\n{self.log()[-3000:]}")
            return jobs if len(jobs) >= count else None
        return wait_for(reached, timeout, f"{count} job(s) {state} (log: {self.log_path})", interval=0.2)

    def containers(self) -> list:
        """Every container this service's runner created (named segmap-<key>), running or not."""
        import docker
        client = docker.from_env()
        return client.containers.list(all=True, filters={"label": "segmap.map=spleen"})


def elapsed(t0: float) -> float:
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------------ an in-process service


class NoRuns:
    """The runner of a service whose jobs never reach a container in the test (leases, exports, retention): it
    names a digest for any image and fails the test on any run."""

    runs_digest = False
    local = True

    def image_digest(self, image: str) -> str:
        return "sha256:" + "0" * 64

    def _unexpected(self, *args, **kwargs):
        raise AssertionError("this test runs no MAP container")

    start = status = adopt = logs = cancel = remove = _unexpected


def in_process_service(folder: Path, *, database: str | None = None, destinations: dict | None = None,
                       runner=None, dest_objects: dict | None = None, listener: bool = True,
                       image: str = "segmap-test/none:never", maps: list[dict] | None = None, **service):
    """A :class:`segmap.service.service.Service` in this process (ticked by the test, or run in a thread) with the
    configuration :class:`ServiceProcess` writes (its listener is configured, and started only by ``start()``);
    ``service`` are extra keys of its ``service:`` section; ``maps`` replaces its one MAP (``spleen``, ``image``)."""
    from segmap.service.config import load_config
    from segmap.service.service import Service

    destinations = destinations or {"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}}
    extra = {"service": {**({"database": database} if database else {}), **service}}
    proc = ServiceProcess(folder, image, listener=listener, destinations=destinations, extra=extra)
    if maps is not None:
        doc = yaml.safe_load(proc.config_path.read_text())
        doc["maps"] = [{"task": str(TASK), **m} for m in maps]
        proc.config_path.write_text(yaml.safe_dump(doc))
    config = load_config(proc.config_path)
    return Service(config, runner=runner if runner is not None else NoRuns(), destinations=dest_objects)


def write_seg(folder: Path, name: str = "seg.dcm") -> Path:
    """A small DICOM file whose Modality is SEG (what :func:`segmap.service.service.seg_files` collects)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "SEG"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def arrive(service, path: Path) -> Path:
    """One instance as the listener records it (spool file, then the store), straight into a service in this
    process; the spool path."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    stored = service.spool.write(Path(path).read_bytes(), *uids)
    service.store.record_instance(Arrival("listener", *uids, str(ds.get("Modality", "")), path=str(stored)))
    return stored
