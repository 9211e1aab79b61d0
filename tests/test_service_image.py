"""The job service's own image: non-root, tini, `segmap serve` as its entry point, the configuration mounted
read-only, the engine's socket mounted; it answers its health endpoint over HTTP and processes a study with the
Docker runner through that socket (the demo MAP image; DCMTK's storescu in, storescp out).

Needs a Docker engine (tests/conftest.py `engine`) and DCMTK.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import record_figure
from deploy_images import service_image, socket_gid
from pacs import free_port, storescu, wait_for
from segmap.demo.phantom import write_phantom_study

ROOT = Path(__file__).resolve().parents[1]


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()[-500:]}")
    return done


def http_status(url: str) -> int | None:
    import requests

    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return None


@pytest.fixture(scope="module")
def service_tag(engine) -> str:
    return service_image()


def test_image_is_non_root_with_tini_and_segmap_serve(service_tag):
    config = json.loads(docker("image", "inspect", service_tag).stdout)[0]["Config"]
    assert config["User"] and config["User"].split(":")[0] not in ("", "0", "root")
    assert config["Entrypoint"][:2] == ["/usr/bin/tini", "--"] and config["Entrypoint"][-1] == "serve"
    assert config["Cmd"] == ["-c", "/etc/segmap/segmap.yaml"]
    # No torch (the MAP containers segment), no package manager, no pip.
    probe = ("import importlib.util as u, shutil; print([m for m in ('torch', 'pip') if u.find_spec(m)] + "
             "[t for t in ('apt-get', 'dpkg', 'pip') if shutil.which(t)])")
    done = docker("run", "--rm", "--network", "none", "--entrypoint", "/opt/segmap/venv/bin/python", service_tag,
                  "-c", probe)
    assert done.stdout.strip() == "[]"
    check = docker("run", "--rm", "--network", "none", service_tag, "--example", check=False)
    assert check.returncode == 0 and "maps:" in check.stdout


def test_service_container_processes_a_study_through_the_socket(service_tag, images, storescp, tmp_path):
    work = tmp_path / "work"  # mounted at the same path: the engine binds the per-job folders by it
    work.mkdir()
    uid, gid = (int(x) for x in json.loads(docker("image", "inspect", service_tag).stdout)[0]["Config"]["User"]
                .split(":"))
    os.chown(work, uid, gid)
    port, http_port = free_port(), free_port()
    config = tmp_path / "segmap.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"workdir": str(work), "quiet_period_s": 1, "poll_s": 0.2, "retry_backoff_s": 1,
                    "http": {"host": "127.0.0.1", "port": http_port}},
        "listener": {"ae_title": "SEGMAP", "host": "127.0.0.1", "port": port},
        "runner": {"kind": "docker", "cpus": 1, "memory": "4g", "timeout_s": 300},
        "maps": [{"name": "spleen", "image": images[0], "task": "/etc/segmap/tasks/spleen.yaml",
                  "destinations": ["pacs"]}],
        "destinations": {"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": storescp.port,
                                  "ae_title": storescp.aet}},
    }))
    config.chmod(0o644)
    name = f"segmap-test-service-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "--network", "host", "--group-add", str(socket_gid()),
           "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "-v", f"{config}:/etc/segmap/segmap.yaml:ro", "-v", f"{ROOT / 'tasks'}:/etc/segmap/tasks:ro",
           "-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", f"{work}:{work}", service_tag)
    try:
        base = f"http://127.0.0.1:{http_port}"

        def up() -> bool:
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            if not state["Running"]:
                pytest.fail(f"the service container exited ({state['ExitCode']}): "
                            f"{docker('logs', name, check=False).stderr[-3000:]}")
            return http_status(base + "/readyz") == 200

        wait_for(up, 90, f"the service container to answer {base}/readyz", interval=0.5)
        assert http_status(base + "/livez") == 200
        pid = json.loads(docker("inspect", name).stdout)[0]["State"]["Pid"]
        uids = [line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:")][0]
        assert "0" not in uids, f"the service runs as uid {uids}"

        study = write_phantom_study(tmp_path / "study", seed=7, shape_zyx=(16, 80, 80))
        t0 = time.monotonic()
        storescu(study["dicom_files"], port, "SEGMAP")
        segs = wait_for(lambda: [p for p in storescp.folder.iterdir() if p.name.startswith("SEG")] or
                        [p for p in storescp.folder.iterdir() if _is_seg(p)], 180,
                        f"the SEG at storescp (service log: docker logs {name})", interval=1)
        record_figure(f"service image: study in to SEG out via the mounted socket in {time.monotonic() - t0:.0f} s")
        import pydicom
        seg = pydicom.dcmread(segs[0])
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == study["study_uid"]
    finally:
        logs = docker("logs", name, check=False)
        (tmp_path / "service.log").write_text(logs.stdout + logs.stderr)
        docker("rm", "-f", name, check=False)


def _is_seg(path: Path) -> bool:
    import pydicom
    try:
        return pydicom.dcmread(path, stop_before_pixels=True).Modality == "SEG"
    except Exception:
        return False
