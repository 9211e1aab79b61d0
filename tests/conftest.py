"""Shared fixtures: small nnU-Net networks with non-trivial outputs for the fidelity tests."""

from __future__ import annotations

import itertools

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: The repository's root, the bundled demo model and its task file (test modules import them from here).
ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "demo-spleen" / "model.ts"
SPLEEN_TASK = ROOT / "tasks" / "spleen.yaml"
#: The shared sample CT beside the repository (``ct.nii.gz`` and the same scan as ``ct_dicom/``); tests skip without it.
SAMPLE_CT = ROOT.parent / "shared" / "data" / "sample-ct"

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tools"))  # segmap_tools: plans, demo training


@pytest.fixture(scope="session")
def trained(request):
    """``trained(plans, fold, n_out) -> state_dict`` for the plans' PlainConvUNet (1 input channel).

    One network is trained briefly on phantoms (spleen, liver, bone) and cached; folds > 0 are perturbed copies, and
    region-based heads are derived from the class heads (class minus background logit). A few dozen CPU steps do
    not reliably teach every class, so the output layer's biases are then calibrated on a held-out phantom until
    each foreground class wins where the network's evidence for it is strongest (about 6 % of the voxels each):
    the label maps have several structured labels however the short training went.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("dynamic_network_architectures")
    from segmap_tools.plans import build_network
    from segmap_tools.train import fit_phantom_network

    cache = Path(request.config.cache.mkdir("segmap")) / "fidelity-net-v3.pt"
    base = None
    if cache.exists():
        try:
            base = torch.load(cache, weights_only=True)
        except Exception:
            base = None

    def make(plans: dict, fold: int, n_out: int = 4) -> dict:
        nonlocal base
        if base is None:
            torch.manual_seed(0)  # the initial weights too: the same network in every run
            net = build_network(plans, "3d_fullres", 1, 4)
            fit_phantom_network(net, steps=100, seed=0, extra_labels=True, patch=(24, 48, 48),
                                spacing=(3.0, 1.5, 1.5), intensity_properties=plans[
                                    "foreground_intensity_properties_per_channel"]["0"])
            _calibrate_head(net, plans)
            base = {k: v.detach().clone() for k, v in net.state_dict().items()}
            torch.save(base, cache)
        state = {k: v.clone() for k, v in base.items()}
        if n_out == 3:  # region-based: logit(class) - logit(background), positive where the class wins
            for key in [k for k in state if k.startswith("decoder.seg_layers")]:
                state[key] = state[key][1:] - state[key][:1]
        if fold:
            g = torch.Generator().manual_seed(fold)
            for k, v in state.items():
                if v.is_floating_point() and v.ndim > 1:
                    state[k] = v * (1 + 0.05 * torch.randn(v.shape, generator=g))
        return state

    return make


def _calibrate_head(net, plans: dict, share: float = 0.06) -> None:
    """Shift each foreground class's output bias so that it wins on about ``share`` of a held-out phantom."""
    import numpy as np
    import torch

    from segmap.demo.phantom import make_phantom
    from segmap_tools.train import ct_normalize

    props = plans["foreground_intensity_properties_per_channel"]["0"]
    case = make_phantom((24, 96, 96), (3.0, 1.5, 1.5), seed=4242, extra_labels=True)
    x = torch.from_numpy(ct_normalize(case.hu, props))[None, None]
    net.eval()
    biases = [m.bias for name, m in net.named_modules()
              if name.startswith("decoder.seg_layers.") and isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        for k in range(1, biases[-1].shape[0]):
            logits = net(x)[0].numpy()
            others = np.delete(logits, k, axis=0).max(0)
            delta = -float(np.quantile(logits[k] - others, 1 - share))
            for b in biases:
                b[k] += delta


def _no_engine(reason: str):
    """Skip outside CI; in CI the Docker tests must run, so a missing engine fails them."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs a Docker engine: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def engine():
    """A Docker engine holding the CPU base image; .ci/docker-setup.sh starts one here when we may (root)."""
    from segmap.packager.baseimage import CPU_BASE_IMAGE
    from segmap.packager.docker_engine import DockerEngineError, connect, image_exists

    setup = ROOT / ".ci" / "docker-setup.sh"
    try:
        api = connect()
    except DockerEngineError as e:
        if os.geteuid() != 0 or not setup.is_file():
            _no_engine(f"no Docker engine: {e}")
        done = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=900)
        try:
            api = connect()
        except DockerEngineError:
            _no_engine(f"no Docker engine could be started: {(done.stderr or done.stdout).strip()[-300:]}")
    if not image_exists(api, CPU_BASE_IMAGE):
        done = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not image_exists(api, CPU_BASE_IMAGE):
            pytest.fail(f"the Docker engine runs but {CPU_BASE_IMAGE} could not be made: {done.stderr.strip()[-300:]}")
    return api


@pytest.fixture(autouse=True)
def _signal_mask_restored():
    """A test that calls ``segmap.cli.main(["run", ...])`` in this process installs segmap.signals, which blocks
    SIGTERM/SIGINT in the main thread; every process started afterwards (Orthanc, storescp, PostgreSQL, `segmap
    serve`) would inherit the blocked mask and ignore its SIGTERM. Put the mask back after each test."""
    import signal

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# ------------------------------------------------------------------------------------------------ test tiers

#: Tier of each test file that is not a fast unit test. `make test-fast` runs `-m unit` (everything not listed);
#: `make test` runs every tier.
TIERS = {
    "e2e": ("test_app.py", "test_multimodal.py", "test_output_formats.py", "test_phantom.py", "test_install.py",
            "test_convert.py", "test_bad_input_runs.py"),
    "images": ("test_map_images.py", "test_holoscan_cli_compat.py"),
    "fidelity": ("test_fidelity.py", "test_engine_steps.py"),
    "service": ("test_service_store.py", "test_service_intake.py", "test_service_export.py", "test_service_client.py",
                "test_service_web.py", "test_service_k8s.py", "test_service_cli.py", "test_service_leases.py",
                "test_service_retention.py"),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: fast tests of plain functions (make test-fast)")
    config.addinivalue_line("markers", "e2e: the application and the segmap command end to end")
    config.addinivalue_line("markers", "images: real Docker images and holoscan-cli")
    config.addinivalue_line("markers", "fidelity: agreement with nnunetv2's own functions and predictor")
    config.addinivalue_line("markers", "service: the job service's parts against real Orthanc, DCMTK, PostgreSQL, "
                                       "Chromium (and a Kubernetes API stub)")


def pytest_collection_modifyitems(config, items):
    by_file = {name: tier for tier, names in TIERS.items() for name in names}
    for item in items:
        tier = "images" if "engine" in getattr(item, "fixturenames", ()) else by_file.get(item.path.name, "unit")
        if not any(item.get_closest_marker(t) for t in ("unit", *TIERS)):
            item.add_marker(getattr(pytest.mark, tier))


#: The demo model's MAP images, built once per test session by `segmap package` for every module that runs them.
#: SEGMAP_TEST_MAP_TAG names another tag, so that two checkouts testing at once do not build over each other.
MAP_TAG = os.environ.get("SEGMAP_TEST_MAP_TAG", "segmap-test/spleen:ci")


@pytest.fixture(scope="session")
def images(engine):
    """``(dicom image, nifti image)`` of the bundled demo model, CPU base (tests/test_map_images.py, test_image_ops.py)."""
    import shutil
    import time

    if shutil.which("docker") is None:
        pytest.fail("the docker command-line client is missing although an engine runs")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "segmap.cli", "package", "--model", str(DEMO_MODEL), "--task",
                           str(SPLEEN_TASK),
                           "--tag", MAP_TAG, "--cpu"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record_figure(f"segmap package (both variants) took {time.perf_counter() - t:.0f} s")
    return MAP_TAG, MAP_TAG + "-nifti"


@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc (Debian's package) on free loopback ports, its own storage, StableAge 2 s (tests/pacs.py)."""
    from pacs import Orthanc, free_port
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def storescp(tmp_path):
    """DCMTK's storescp as a DICOM destination writing into ``tmp_path / "storescp-in"`` (tests/pacs.py)."""
    from pacs import StoreSCP, free_port
    server = StoreSCP(tmp_path / "storescp-in", free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A throw-away PostgreSQL server (tests/postgres.py) shared by the job-store and scale-out tests."""
    from postgres import postgres_server_fixture
    yield from postgres_server_fixture(tmp_path_factory)


_databases = itertools.count()


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.service)])
def database(request):
    """A job store for an in-process service: None (SQLite in its workdir) or the URL of a fresh PostgreSQL
    database on the shared server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").fresh_database(f"db{next(_databases)}")


# ------------------------------------------------------------------------------------------------ measured figures

#: Figures tests measure (image size, stop latency, timings), printed at the end of the run so CI's log shows them.
FIGURES: list[str] = []


def record_figure(text: str) -> None:
    FIGURES.append(text.strip("\n"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if FIGURES:
        terminalreporter.section("measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
