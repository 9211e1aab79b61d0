"""The service configuration: the documented example loads; every mistake names its key; routing decisions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segmap.errors import ServiceConfigError
from segmap.service.config import EXAMPLE, EXAMPLE_TASK, load_config, reference_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def example(tmp_path) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(EXAMPLE)
    return path


def test_the_documented_example_loads(example):
    cfg = load_config(example)
    assert cfg.listener.ae_title == "SEGMAP" and cfg.listener.allowed_calling_ae_titles == ("ORTHANC", "CT_SCANNER")
    assert cfg.orthanc.source == "orthanc:main"
    assert cfg.maps[0].task == EXAMPLE_TASK
    assert cfg.http.host == "127.0.0.1", "bound to localhost by default"
    assert cfg.destinations["orthanc"]["kind"] == "orthanc"


def _with(example: Path, edit) -> Path:
    doc = yaml.safe_load(example.read_text())
    edit(doc)
    example.write_text(yaml.safe_dump(doc))
    return example


@pytest.mark.parametrize("edit, key, words", [
    (lambda d: d["service"].pop("workdir"), "service.workdir", "is required"),
    (lambda d: d["service"].update(quiet_period_s="soon"), "service.quiet_period_s", "must be a number"),
    (lambda d: d["listener"].update(port=70000), "listener.port", "TCP port"),
    (lambda d: d["listener"].update(ae_title="A" * 17), "listener.ae_title", "AE title"),
    (lambda d: d["listener"].update(allowed_peers=["not-an-ip"]), "listener.allowed_peers", "IP addresses"),
    (lambda d: d["orthanc"].update(url="ftp://x"), "orthanc.url", "http(s)://"),
    (lambda d: d["runner"].update(kind="slurm"), "runner.kind", "docker, kubernetes"),
    (lambda d: d["runner"].update(memory="lots"), "runner.memory", "size like 8g"),
    (lambda d: d["maps"][0].update(task="missing.yaml"), "maps[0].task", "no such file"),
    (lambda d: d["maps"][0].update(destinations=["nowhere"]), "maps[0].destinations", "'nowhere'"),
    (lambda d: d["maps"][0].update(trigger={"tag": "NoSuchTag", "contains": "x"}), "maps[0].trigger.tag",
     "not a DICOM keyword"),
    (lambda d: d["maps"].append(dict(d["maps"][0])), "maps", "unique"),
    (lambda d: d["destinations"].update(pacs={"kind": "ftp"}), "destinations.pacs.kind", "dicom, orthanc, stow"),
    (lambda d: d.update(colour="blue"), "colour", "unknown key"),
    (lambda d: d["destinations"].update(pacs={"kind": "dicom", "host": "pacs", "port": 0, "ae_title": "PACS"}),
     "destinations.pacs.port", "port"),
    (lambda d: (d.pop("listener"), d.pop("orthanc")), "listener", "no intake"),
    (lambda d: d["service"]["http"].update(viewer_url="http://ohif/viewer"), "service.http.viewer_url",
     "{study_uid}"),
    (lambda d: d["service"]["http"].update(viewer_url="http://ohif/?s={study_uid}&p={patient}"),
     "service.http.viewer_url", "placeholder other than"),
])
def test_a_mistake_names_its_key(example, edit, key, words):
    with pytest.raises(ServiceConfigError) as e:
        load_config(_with(example, edit))
    message = str(e.value)
    assert f": {key}: " in message and words in message and "\n" not in message, message


@pytest.mark.service  # `segmap` in a subprocess: seconds, not in make test-fast
def test_serve_check_and_example_from_the_command_line(example, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "segmap.cli", "serve", "-c", str(example), "--check"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("OK:"), ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("service: [\n")
    done = subprocess.run([sys.executable, "-m", "segmap.cli", "serve", "-c", str(bad), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("segmap: error: ") and "not valid YAML" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    printed = subprocess.run([sys.executable, "-m", "segmap.cli", "serve", "--example"], capture_output=True,
                             text=True, timeout=120)
    assert printed.stdout == EXAMPLE


@pytest.mark.service  # `segmap` in a subprocess: seconds, not in make test-fast
def test_the_printed_example_passes_its_own_check_and_names_the_documented_image(tmp_path):
    from segmap.demo.run import DEMO_TASK

    saved = tmp_path / "x.yaml"  # a folder with nothing else in it: `segmap serve --example > x.yaml`
    with saved.open("w") as f:
        printed = subprocess.run([sys.executable, "-m", "segmap.cli", "serve", "--example"], stdout=f, text=True,
                                 timeout=120)
    assert printed.returncode == 0
    done = subprocess.run([sys.executable, "-m", "segmap.cli", "serve", "-c", str(saved), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("OK:"), done.stderr
    assert EXAMPLE_TASK == DEMO_TASK and EXAMPLE_TASK.is_file()
    image = load_config(saved).maps[0].image
    package = f"segmap package --model models/demo-spleen/model.ts --task tasks/spleen.yaml --tag {image} --cpu"
    for doc in ("README.md", "docs/service.md"):
        assert package in (ROOT / doc).read_text(), doc


def test_every_key_is_declared_once_with_its_type_default_and_help():
    rows = {r["name"]: r for r in reference_table()}
    assert all(r["help"] for r in rows.values()), [n for n, r in rows.items() if not r["help"]]
    assert rows["service.quiet_period_s"]["default"] == 10.0 and rows["service.workdir"]["required"]
    assert rows["service.http.port"]["default"] == 8642 and rows["runner.kubernetes.pvc_name"]["required"]
    assert rows["destinations.<dicom>.confirm"]["default"] == "store-status"
    assert rows["destinations.<stow>.timeout_s"]["default"] == 60.0
    assert rows["maps[].trigger.tag"]["type"] == "text"


def test_a_file_that_leaves_a_key_out_gets_the_declared_default(example):
    cfg = load_config(_with(example, lambda d: d["service"].pop("quiet_period_s")))
    rows = {r["name"]: r for r in reference_table()}
    assert cfg.quiet_period_s == rows["service.quiet_period_s"]["default"]
    assert cfg.lease_s == rows["service.lease_s"]["default"] and cfg.runner.timeout_s == 1800.0


def test_reading_a_config_imports_no_runner_or_network_client(example):
    """`segmap serve --check` and `segmap jobs` work where the kubernetes client is not installed."""
    _with(example, lambda d: d["runner"].update(kind="kubernetes", kubernetes={"pvc_name": "work"}))
    code = (f"import sys; from segmap.service.config import load_config; c = load_config({str(example)!r}); "
            f"assert c.runner.options.pvc_name == 'work'; "
            f"print(sorted(m for m in ('kubernetes', 'docker', 'pynetdicom') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr

