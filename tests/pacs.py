"""Real PACS peers for the service tests: an Orthanc (Debian's package) and DCMTK's storescp/storescu on loopback.

Each is started in the test's own folder on free ports and stopped afterwards (fixtures ``orthanc`` and ``storescp``
in conftest.py). Outside CI a missing program skips
the test with the reason; in CI (``CI`` set) it fails, because .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC = "Orthanc"
#: DCMTK's tools by full path: pynetdicom installs console scripts of the same names that would shadow them.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
CHROMIUM = "/usr/bin/chromium"
ECHOSCU = "/usr/bin/echoscu"
#: Debian's orthanc-dicomweb plugin (DICOMweb: STOW-RS, QIDO-RS, WADO-RS under /dicom-web/).
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def need(program: str, package: str) -> str:
    found = shutil.which(program) if not os.path.isabs(program) else (program if os.access(program, os.X_OK) else None)
    if not found:
        reason = f"{program} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _need_file(path: str, package: str) -> str:
    if not os.path.isfile(path):
        reason = f"{path} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Orthanc:
    """One Orthanc server process with its own storage folder; ``restart()`` keeps the storage."""

    folder: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    stable_age: int = 2
    modalities: dict | None = None
    #: Load the DICOMweb plugin (``dicomweb_url``); a missing plugin skips (fails in CI) like a missing program.
    dicomweb: bool = False
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    def config(self) -> dict:
        cfg = {"Name": "segmap-test", "StorageDirectory": str(self.folder / "storage"),
               "IndexDirectory": str(self.folder / "storage"), "HttpPort": self.http_port,
               "DicomPort": self.dicom_port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
               "HttpBindAddress": "127.0.0.1", "AuthenticationEnabled": False, "StableAge": self.stable_age,
               "DicomModalities": self.modalities or {}, "Plugins": [],
               # Accept any calling AE title, like a PACS that is open to the department's modalities.
               "DicomCheckCalledAet": False, "UnknownSopClassAccepted": True}
        if self.dicomweb:
            cfg["Plugins"] = [_need_file(DICOMWEB_PLUGIN, "orthanc-dicomweb")]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return cfg

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([need(ORTHANC, "orthanc"), str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._up, 30, f"Orthanc on port {self.http_port} (log: {self.folder / 'orthanc.log'})")
        return self

    def _up(self) -> bool:
        import requests
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"Orthanc exited with {self.proc.returncode}: see {self.folder / 'orthanc.log'}")
        try:
            return requests.get(self.url + "/system", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a slow shutdown must not fail the test that used the server
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str):
        import requests
        r = requests.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def upload(self, data: bytes | Path) -> dict:
        """POST one DICOM file to ``/instances`` (as a service exporting its SEG over REST would)."""
        import requests
        body = data.read_bytes() if isinstance(data, Path) else data
        r = requests.post(self.url + "/instances", data=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def series_instance_count(self, series_uid: str) -> int:
        """How many instances Orthanc holds of the series with this Series Instance UID (0 when none)."""
        import requests
        r = requests.post(self.url + "/tools/find", json={"Level": "Instance",
                                                          "Query": {"SeriesInstanceUID": series_uid}}, timeout=10)
        r.raise_for_status()
        return len(r.json())

    def series_of_modality(self, modality: str) -> list[dict]:
        """Every series Orthanc holds with that Modality (``/series?expand``)."""
        return [s for s in self.get("/series?expand") if s["MainDicomTags"].get("Modality") == modality]


@dataclass
class StoreSCP:
    """DCMTK's storescp writing every received instance into ``folder`` (a DICOM destination)."""

    folder: Path
    port: int
    aet: str = "STORESCP"
    proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder.parent / f"storescp-{self.port}.log", "ab")
        # -uf: file names from SOP Instance UIDs, so an instance sent twice is one file.
        self.proc = subprocess.Popen([need(STORESCP, "dcmtk"), "-v", "-aet", self.aet, "-od", str(self.folder), "-uf",
                                      str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: _port_open(self.port), 15, f"storescp on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def storescu(files, port: int, called_aet: str, calling_aet: str = "STORESCU", check: bool = True,
             timeout: float = 120, options=()) -> subprocess.CompletedProcess:
    """Send ``files`` with DCMTK's storescu (one association), as a modality or a PACS would.

    ``options`` go before the address (e.g. ``("-xv",)`` to propose JPEG 2000 lossless for compressed files).
    """
    cmd = [need(STORESCU, "dcmtk"), *options, "-aet", calling_aet, "-aec", called_aet, "127.0.0.1", str(port),
           *[str(f) for f in files]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"storescu failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done


def chromium(*args: str, profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Debian's Chromium, headless, with no network of its own (no updates, sync or QUIC), in a throw-away profile.

    ``chromium("--dump-dom", url, profile=tmp_path / "p")`` gives the page's DOM after it loaded on stdout;
    ``chromium("--screenshot=X.png", "--window-size=1280,800", url, profile=...)`` writes a PNG.
    """
    cmd = [need(CHROMIUM, "chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, called_aet: str, calling_aet: str = "ECHOSCU", timeout: float = 30) -> int:
    """DCMTK's echoscu (C-ECHO) against ``127.0.0.1:port``; returns its exit code (0: the peer answered)."""
    cmd = [need(ECHOSCU, "dcmtk"), "-aet", calling_aet, "-aec", called_aet, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).returncode
