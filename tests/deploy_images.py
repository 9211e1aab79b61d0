"""The images the deployment tests share (tests/test_service_image.py, tests/test_deploy_compose.py): the job
service's image, built once per test session by `python -m segmap.packager.service_image`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import record_figure

#: SEGMAP_TEST_SERVICE_TAG names another tag (two checkouts testing at once).
SERVICE_TAG = os.environ.get("SEGMAP_TEST_SERVICE_TAG", "segmap-test/service:ci")
_built: dict[str, str] = {}


def service_image() -> str:
    """The service image's tag, built on the first call of the session (the engine fixture has made the base)."""
    if SERVICE_TAG not in _built:
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "segmap.packager.service_image", "--tag", SERVICE_TAG],
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, (done.stderr or done.stdout)[-4000:]
        size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", SERVICE_TAG], capture_output=True,
                                  text=True, check=True).stdout)
        record_figure(f"service image {SERVICE_TAG}: {size / 1e6:.0f} MB, built in {time.perf_counter() - t:.0f} s")
        _built[SERVICE_TAG] = SERVICE_TAG
    return _built[SERVICE_TAG]


def socket_gid() -> int:
    """The group of the engine's socket, for `--group-add` (the service image runs as a non-root user)."""
    return os.stat("/var/run/docker.sock").st_gid
