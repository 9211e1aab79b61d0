"""``monai-deploy package`` (holoscan-cli 4.2.0) accepts our application folder: its offline part, run for real.

holoscan-cli 4.2.0 is the last release with ``monai-deploy package``; the project's venv holds 5.0.0, so a separate
venv is made once and cached under the pytest cache (``holoscan-cli-4.2.0``). In it a small driver calls
holoscan-cli's own ``main()`` with the commands of ``docs/monai-deploy-package.md``: argument parsing, reading our
``app.yaml``, ``app.json``/``pkg.json`` generation, model scan, build-context assembly and Dockerfile rendering all
run unchanged. Only the last step, the Docker buildx build, is replaced by a snapshot of the build context. HTTP
(``requests``) and Docker are disabled in that process, so the test also shows that this part needs neither.
Two inputs stand in for what would come from the network or a big wheel:

- ``--source``: a local artifact manifest, in the format of holoscan-cli's ``releases/4.2.0/artifacts.json``;
- a stub ``holoscan-cu13`` 4.2.0 distribution (metadata only): the packager reads just its version number.

The staging steps and the package command are taken from the doc itself, so the doc and this test can't drift apart.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DOC = ROOT / "docs" / "monai-deploy-package.md"
CLI_REQUIREMENT = "holoscan-cli==4.2.0"
HOLOSCAN_VERSION = "4.2.0"  # the only Holoscan version holoscan-cli 4.2.0's manifest lists
BASE_IMAGE = "nvcr.io/nvidia/cuda:13.0.0-runtime-ubuntu24.04"  # its dgpu base image
MONAI_DEPLOY_VERSION = "4.0.0"
EXPECTED_TAG = "segmap-spleen-x64-workstation-dgpu-linux-amd64:0.1.0"

# Runs inside the holoscan-cli 4.2.0 venv: argv[1] is a JSON spec {"prog": ..., "scenarios": [{"argv", "out"}]}.
DRIVER = r'''
import json
import shutil
import sys
from pathlib import Path

spec = json.loads(Path(sys.argv[1]).read_text())
attempts = []


def _blocked(what):
    def refuse(*args, **kwargs):
        attempts.append(f"{what} {args[:2]!r}")
        raise RuntimeError(f"offline test: {what} attempted")
    return refuse


# No HTTP: the artifact manifest must come from --source.
import requests
requests.get = _blocked("requests.get")
requests.post = _blocked("requests.post")
requests.Session.request = _blocked("requests.Session.request")

# No Docker: python_on_whales' client is replaced in the module that uses it.
from holoscan_cli.common import dockerutils


class _NoDocker:
    def __getattr__(self, name):
        return _blocked(f"docker.{name}")()


dockerutils.docker = _NoDocker()

from holoscan_cli import __main__ as cli
from holoscan_cli.packager import container_builder
from holoscan_cli.packager.parameters import PlatformBuildResults

current = {}


def _snapshot_instead_of_build(self, dockerfile, platform_parameters):
    """BuilderBase._build_internal: everything before it ran for real; save the context instead of building."""
    out = Path(current["out"])
    shutil.copytree(self._temp_dir, out / "context", symlinks=True)
    params = self._build_parameters
    (out / "platform.json").write_text(json.dumps({
        "tag": platform_parameters.tag,
        "base_image": platform_parameters.base_image,
        "docker_arch": platform_parameters.docker_arch,
        "platform_config": platform_parameters.platform_config.value,
        "dockerfile": Path(dockerfile).name,
        "build_args": {"UID": str(params.uid), "GID": str(params.gid), "UNAME": params.username},
        "sdk": params.sdk.value,
        "holoscan_sdk_version": params.holoscan_sdk_version,
        "monai_deploy_app_sdk_version": params.monai_deploy_app_sdk_version,
        "requirements_file": str(params.requirements_file_path),
    }, indent=1))
    result = PlatformBuildResults(platform_parameters)
    result.docker_tag = platform_parameters.tag
    result.succeeded = True
    return result


container_builder.BuilderBase._build_internal = _snapshot_instead_of_build

for scenario in spec["scenarios"]:
    current["out"] = scenario["out"]
    Path(scenario["out"]).mkdir(parents=True, exist_ok=True)
    argv = [spec["prog"], *scenario["argv"]]
    sys.argv = argv  # the packager picks the SDK from the command's name (sys.argv[0])
    attempts.clear()
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    (Path(scenario["out"]) / "exit.json").write_text(json.dumps({"code": code, "blocked": list(attempts)}))
    print(f"scenario {scenario['name']}: exit {code}", flush=True)
'''


def _unavailable(reason: str):
    """Skip where holoscan-cli 4.2.0 cannot be installed; in CI that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs {CLI_REQUIREMENT} from PyPI: {reason}")
    pytest.skip(reason)


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:].strip()


@pytest.fixture(scope="module")
def cli_python(request) -> Path:
    """The python of a venv holding holoscan-cli 4.2.0 (made once, kept in the pytest cache)."""
    root = Path(request.config.cache.mkdir("holoscan-cli-4.2.0"))
    venv = root / "venv"
    python = venv / "bin" / "python"
    stamp = root / "installed.txt"
    check = [str(python), "-c", "import importlib.metadata as m, holoscan_cli.packager.packager; "
             "print(m.version('holoscan-cli'))"]
    if stamp.is_file() and python.exists():
        done = subprocess.run(check, capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip() == "4.2.0":
            return python
    shutil.rmtree(venv, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        _unavailable(f"python -m venv failed: {_tail(made.stderr)}")
    try:
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              CLI_REQUIREMENT], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        _unavailable(f"pip install {CLI_REQUIREMENT} timed out")
    if pip.returncode != 0:
        _unavailable(f"pip cannot install {CLI_REQUIREMENT}: {_tail(pip.stderr + pip.stdout)}")
    done = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "4.2.0", done.stderr + done.stdout
    stamp.write_text(CLI_REQUIREMENT + "\n")
    return python


def _doc_block(name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\s*```sh\n(.*?)```\s*<!-- {name}:end -->", DOC.read_text(), re.S)
    assert match, f"{DOC.name}: no ```sh block between <!-- {name}:begin --> and <!-- {name}:end -->"
    return match.group(1)


def _documented_package_argv() -> list[str]:
    argv = shlex.split(_doc_block("package").replace("\\\n", " "))
    assert Path(argv[0]).name == "monai-deploy" and argv[1] == "package", argv
    return argv[1:]


def _artifact_manifest(path: Path) -> Path:
    """A local stand-in for holoscan-cli's releases/4.2.0/artifacts.json (same structure, same base image)."""
    build_image = "nvcr.io/nvidia/clara-holoscan/holoscan:v4.2.0-cuda13"
    path.write_text(json.dumps({HOLOSCAN_VERSION: {
        "holoscan": {
            "debian-version": "4.2.0.1-1",
            "wheel-version": HOLOSCAN_VERSION,
            "base-images": {"dgpu": BASE_IMAGE},
            "build-images": {"dgpu": {"x64-workstation": build_image, "sbsa": build_image}, "igpu": {},
                             "cpu": {"x64-workstation": build_image}},
        },
        "health-probes": {"linux/amd64": "https://example.invalid/grpc_health_probe-linux-amd64",
                          "linux/arm64": "https://example.invalid/grpc_health_probe-linux-arm64"},
    }}, indent=1))
    return path


def _stub_holoscan_sdk(site: Path) -> Path:
    """Metadata of an installed holoscan-cu13 4.2.0: the packager only reads its version number."""
    dist = site / f"holoscan_cu13-{HOLOSCAN_VERSION}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: holoscan-cu13\nVersion: {HOLOSCAN_VERSION}\n")
    return site


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A snapshot of what the doc's steps read (others may edit the working tree while the tests run)."""
    root = tmp_path_factory.mktemp("mdp") / "repo"
    junk = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in ("app", "operators", "src/segmap", "models/demo-spleen"):
        shutil.copytree(ROOT / rel, root / rel, ignore=junk)
    staged = subprocess.run(["bash", "-euo", "pipefail", "-c", _doc_block("staging")], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert staged.returncode == 0, f"the doc's staging steps failed:\n{staged.stderr}"
    return root


@pytest.fixture(scope="module")
def packaged(cli_python, workspace) -> dict[str, Path]:
    """Run holoscan-cli 4.2.0 on our app: the documented command, plus two ``--add`` variants."""
    base = workspace.parent
    source = _artifact_manifest(base / "artifacts.json")
    site = _stub_holoscan_sdk(base / "stub-site")
    shutil.copytree(workspace / "operators", base / "add-lib" / "operators")
    offline = ["--source", str(source)]
    plain = ["package", "app", "-c", "app/app.yaml", "-t", "segmap/spleen:0.1.0", "--platform", "x86_64",
             "-m", "models/demo-spleen", "--sdk-version", MONAI_DEPLOY_VERSION]
    scenarios = {
        "documented": _documented_package_argv() + offline,
        "add-lib": plain + ["--add", str(base / "add-lib")] + offline,
        "add-operators": plain + ["--add", "operators"] + offline,
    }
    out = base / "out"
    spec = {"prog": str(cli_python.parent / "monai-deploy"),
            "scenarios": [{"name": k, "argv": v, "out": str(out / k)} for k, v in scenarios.items()]}
    (base / "spec.json").write_text(json.dumps(spec, indent=1))
    (base / "driver.py").write_text(DRIVER)
    for d in ("home", "tmp"):
        (base / d).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "HOLOSCAN"))}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", HOME=str(base / "home"), TMPDIR=str(base / "tmp"),
               NO_PROXY="*", no_proxy="*")
    done = subprocess.run([str(cli_python), str(base / "driver.py"), str(base / "spec.json")], cwd=workspace,
                          env=env, capture_output=True, text=True, timeout=300)
    log = f"--- stdout\n{_tail(done.stdout, 6000)}\n--- stderr\n{_tail(done.stderr, 6000)}"
    assert done.returncode == 0, f"driver failed:\n{log}"
    for name in scenarios:
        status = json.loads((out / name / "exit.json").read_text())
        assert status == {"code": 0, "blocked": []}, f"{name}: {status}\n{log}"
    return {name: out / name for name in scenarios}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _requirement_lines(path: Path) -> list[str]:
    return [s for s in (line.split("#", 1)[0].strip() for line in path.read_text().splitlines()) if s]


# --- the documented command ------------------------------------------------------------------------------------------

def test_app_json_carries_our_command_formats_and_sdk(packaged, workspace):
    config = yaml.safe_load((workspace / "build/monai-deploy/app/app.yaml").read_text())
    app = _json(packaged["documented"] / "context" / "map" / "app.json")
    assert json.loads(app["command"]) == ["python3", "/opt/holoscan/app"]
    assert app["sdk"] == "monai-deploy" and app["sdkVersion"] == MONAI_DEPLOY_VERSION
    assert app["input"] == {"path": "input/", "formats": config["application"]["input-formats"]}
    assert app["output"] == {"path": "output/", "formats": config["application"]["output-formats"]}
    assert app["input"]["formats"] == ["application/dicom", "application/x-nifti"]
    assert app["version"] == config["application"]["version"] == "0.1.0"
    assert app["workingDirectory"] == "/var/holoscan"
    env = app["environment"]
    assert env["HOLOSCAN_APPLICATION"] == "/opt/holoscan/app"
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert env["HOLOSCAN_CONFIG_PATH"] == "/var/holoscan/app.yaml"
    assert env["HOLOSCAN_INPUT_PATH"] == "input/" and env["HOLOSCAN_OUTPUT_PATH"] == "output/"
    assert env["HOLOSCAN_APP_MANIFEST_PATH"] == "/etc/holoscan/app.json"
    assert env["HOLOSCAN_PKG_MANIFEST_PATH"] == "/etc/holoscan/pkg.json"


def test_pkg_json_carries_our_resources_and_model(packaged):
    repo_config = yaml.safe_load((ROOT / "app" / "app.yaml").read_text())
    pkg = _json(packaged["documented"] / "context" / "map" / "pkg.json")
    assert pkg["resources"] == repo_config["resources"]
    assert pkg["resources"]["gpu"] == 1 and pkg["resources"]["gpuMemory"]
    assert pkg["models"] == {"demo-spleen": "/opt/holoscan/models/demo-spleen"}
    assert pkg["applicationRoot"] == "/opt/holoscan/app" and pkg["modelRoot"] == "/opt/holoscan/models"
    assert pkg["platformConfig"] == "dgpu" and pkg["version"] == "0.1.0"


def test_our_requirements_are_installed_by_the_image(packaged):
    ctx = packaged["documented"] / "context"
    platform = _json(packaged["documented"] / "platform.json")
    assert Path(platform["requirements_file"]).name == "requirements.txt"
    assert Path(platform["requirements_file"]).parent.name == "app"
    merged = _requirement_lines(ctx / "pip" / "requirements.txt")
    ours = _requirement_lines(ROOT / "app" / "requirements.txt")
    assert ours and merged == ours
    assert "monai-deploy-app-sdk==4.0.0" in merged
    dockerfile = (ctx / "Dockerfile").read_text()
    for line in ("COPY ./pip/requirements.txt /tmp/requirements.txt",
                 "RUN pip install --no-cache-dir --user -r /tmp/requirements.txt",
                 f"RUN pip install monai-deploy-app-sdk=={MONAI_DEPLOY_VERSION}"):
        assert line in dockerfile, line


def test_dockerfile_and_image_layout(packaged):
    ctx = packaged["documented"] / "context"
    dockerfile = (ctx / "Dockerfile").read_text()
    assert f"FROM {BASE_IMAGE} AS base" in dockerfile
    for line in ("COPY ./app /opt/holoscan/app", "COPY ./app.config /var/holoscan/app.yaml",
                 "COPY ./map/app.json /etc/holoscan/app.json", "COPY ./map/pkg.json /etc/holoscan/pkg.json",
                 "COPY ./models  /opt/holoscan/models", "COPY ./tools /var/holoscan/tools",
                 'ENTRYPOINT ["/var/holoscan/tools"]', "ENV HOLOSCAN_CONFIG_PATH=/var/holoscan/app.yaml",
                 'LABEL org.monai.deploy.app-sdk="4.0.0"'):
        assert line in dockerfile, line
    assert "{{" not in dockerfile and "{%" not in dockerfile
    # NVIDIA's servers are needed by the build itself, whatever the base image (see the doc).
    assert "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64/cuda-keyring" in dockerfile
    platform = _json(packaged["documented"] / "platform.json")
    assert platform["tag"] == EXPECTED_TAG and EXPECTED_TAG in DOC.read_text()
    assert platform["docker_arch"] == "linux/amd64" and platform["platform_config"] == "dgpu"
    assert platform["build_args"] == {"UID": "1000", "GID": "1000", "UNAME": "holoscan"}
    assert platform["sdk"] == "monai-deploy" and platform["holoscan_sdk_version"] == HOLOSCAN_VERSION
    assert (ctx / "models" / "demo-spleen" / "model.ts").read_bytes() == \
        (ROOT / "models" / "demo-spleen" / "model.ts").read_bytes()


def test_staged_app_carries_operators_segmap_and_its_task(packaged):
    ctx = packaged["documented"] / "context"
    image = {"/opt/holoscan/app": ctx / "app", "/var/holoscan/app.yaml": ctx / "app.config"}
    app = image["/opt/holoscan/app"]
    for rel in ("__main__.py", "app.py", "config.py", "task.yaml", "requirements.txt",
                "operators/__init__.py", "segmap/__init__.py", "segmap/run/orchestration.py"):
        assert (app / rel).is_file(), rel
    assert not list(app.rglob("__pycache__"))
    # The config the image reads (HOLOSCAN_CONFIG_PATH): ours, with the task file where the image has it.
    config = yaml.safe_load(image["/var/holoscan/app.yaml"].read_text())
    repo_config = yaml.safe_load((ROOT / "app" / "app.yaml").read_text())
    assert config["application"] == repo_config["application"]
    assert config["resources"] == repo_config["resources"]
    task_file = config["segmap"].pop("task_file")
    assert {k: v for k, v in repo_config["segmap"].items() if k != "task_file"} == config["segmap"]
    assert task_file == "/opt/holoscan/app/task.yaml"
    assert (app / Path(task_file).relative_to("/opt/holoscan/app")).read_text() == \
        (ROOT / "app" / "task.yaml").read_text()
    # Comments survive the staging edit (only the task_file line changes).
    staged = (ctx / "app.config").read_text().splitlines()
    original = (ROOT / "app" / "app.yaml").read_text().splitlines()
    assert len(staged) == len(original)
    assert [a for a, b in zip(staged, original) if a != b] == ["  task_file: /opt/holoscan/app/task.yaml"]


# --- --add: where holoscan-cli puts added folders ------------------------------------------------------------------

def test_plain_app_folder_is_valid_input_and_add_puts_folders_under_opt_holoscan_lib(packaged):
    ctx = packaged["add-lib"] / "context"
    app = _json(ctx / "map" / "app.json")
    repo_config = yaml.safe_load((ROOT / "app" / "app.yaml").read_text())
    assert json.loads(app["command"]) == ["python3", "/opt/holoscan/app"]
    assert app["input"]["formats"] == repo_config["application"]["input-formats"]
    assert _json(ctx / "map" / "pkg.json")["resources"] == repo_config["resources"]
    assert (ctx / "app.config").read_text() == (ROOT / "app" / "app.yaml").read_text()
    # --add DIR copies DIR's contents to /opt/holoscan/lib and puts it, and every folder below it, on PYTHONPATH.
    assert (ctx / "lib" / "operators" / "__init__.py").is_file()
    dockerfile = (ctx / "Dockerfile").read_text()
    assert "COPY ./lib /opt/holoscan/lib" in dockerfile
    pythonpath = [line for line in dockerfile.splitlines() if line.startswith("ENV PYTHONPATH=")]
    assert len(pythonpath) == 1
    entries = pythonpath[0].split("=", 1)[1].split(":")
    assert "/opt/holoscan/lib" in entries and "/opt/holoscan/lib/operators" in entries


def test_add_operators_itself_flattens_it(packaged):
    """``--add operators`` leaves no ``operators`` package in the image: why the doc stages operators/ into app/."""
    lib = packaged["add-operators"] / "context" / "lib"
    assert (lib / "__init__.py").is_file() and (lib / "base.py").is_file()
    assert not (lib / "operators").exists()


# --- the staged folder imports its own operators and segmap -----------------------------------------------------------

def test_staged_app_imports_operators_and_segmap_from_its_folder(workspace, tmp_path):
    if importlib.util.find_spec("monai") is None or importlib.util.find_spec("holoscan") is None:
        pytest.skip("monai-deploy-app-sdk is not installed in this environment")
    app = workspace / "build" / "monai-deploy" / "app"
    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = [{str(app)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(app)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print(json.dumps({'code': code, 'operators': sys.modules['operators'].__file__,\n"
        "                  'segmap': sys.modules['segmap'].__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "HOLOSCAN_", "SEGMAP_"))}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None)
    assert Path(result["operators"]).resolve() == (app / "operators" / "__init__.py").resolve()
    assert Path(result["segmap"]).resolve() == (app / "segmap" / "__init__.py").resolve()
