"""MAP build contexts, the image entry point, and real image builds with a stand-in application.

The context tests need neither Docker nor the network. The image tests build and run a small image (the local CPU
base image, the segmap wheel, a stand-in app) and are skipped only when no Docker engine can be reached or started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import MAP_TAG, ROOT

from segmap.errors import SegmapError
from segmap.packager.baseimage import CPU_BASE_IMAGE, debian_mirror
from segmap.packager.context import (ContextError, ImageName, context_files, context_model_digest, render_dockerfile,
                                     write_context)
from segmap.packager.docker_engine import DockerEngineError, connect, follow
from segmap.packager.wheelhouse import build_segmap_wheel, platform_tags, requirement_sets, wheel_requirements


TASK_YAML = """\
tasks:
  Spleen:
    Modalities:
      image:
        File_Pattern: ".nii.gz"
        Rules_Text: '{"selections": [{"name": "CT", "conditions": {"Modality": "(?i)CT"}}]}'
    Segments:
      - segment_label: Spleen
        segmented_property_category: {code: "123037004", scheme: SCT, meaning: Anatomical Structure}
        segmented_property_type: {code: "78961009", scheme: SCT, meaning: Spleen}
        algorithm_name: test-spleen
"""

STANDIN_APP = '''\
"""Stand-in MAP application: lists its input and writes what it saw to its output."""
import json, os, sys
from pathlib import Path

import segmap

inp = Path(os.environ["HOLOSCAN_INPUT_PATH"])
out = Path(os.environ["HOLOSCAN_OUTPUT_PATH"])
out.mkdir(parents=True, exist_ok=True)
seen = {
    "input": sorted(str(p.relative_to(inp)) for p in inp.rglob("*") if p.is_file()),
    "uid": os.getuid(),
    "argv": sys.argv[1:],
    "segmap": segmap.__version__,
    "config": Path(os.environ["HOLOSCAN_CONFIG_PATH"]).read_text(),
    "models": sorted(str(p.relative_to(os.environ["HOLOSCAN_MODEL_PATH"]))
                     for p in Path(os.environ["HOLOSCAN_MODEL_PATH"]).rglob("*") if p.is_file()),
    "env": {k: v for k, v in os.environ.items() if k.startswith(("HOLOSCAN_", "SEGMAP_"))},
}
(out / "seen.json").write_text(json.dumps(seen))
print("stand-in app: %d input file(s)" % len(seen["input"]))
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A fake two-fold model, a task file, a stand-in app folder and a wheelhouse of stub wheels."""
    root = tmp_path_factory.mktemp("inputs")
    for k in (0, 1):
        (root / "model" / f"fold_{k}").mkdir(parents=True)
        (root / "model" / f"fold_{k}" / "model.ts").write_bytes(b"PK\x03\x04 not a real model, fold %d" % k)
    (root / "spleen.yaml").write_text(TASK_YAML)
    (root / "app").mkdir()
    (root / "app" / "__main__.py").write_text(STANDIN_APP)
    (root / "app" / "__pycache__").mkdir()
    (root / "app" / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    (root / "wheels").mkdir()
    for name in ("numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl", "pyyaml-6.0-py3-none-any.whl"):
        (root / "wheels" / name).write_bytes(b"stub wheel " + name.encode())
    # A snapshot of the segmap source: others may edit the working tree while these tests run.
    (root / "source").mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, root / "source" / name)
    shutil.copytree(ROOT / "src", root / "source" / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copytree(root / "app", root / "source" / "app", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _write(inputs: Path, out: Path, variant: str = "dicom", **kw) -> Path:
    args = dict(model=inputs / "model", task=inputs / "spleen.yaml", task_name=None, variant=variant,
                base_image=CPU_BASE_IMAGE, wheelhouse=inputs / "wheels", app_dir=inputs / "app",
                package_source=inputs / "source", tag="segmap-test/spleen:1.2")
    args.update(kw)
    return write_context(out, **args)


@pytest.fixture(scope="module")
def dicom_context(inputs, tmp_path_factory):
    return _write(inputs, tmp_path_factory.mktemp("ctx") / "dicom")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {rel: ((root / rel).read_bytes(), stat.S_IMODE((root / rel).stat().st_mode)) for rel in context_files(root)}


# --- the context ---------------------------------------------------------------------------------------------------

def test_same_inputs_give_byte_identical_contexts(inputs, dicom_context, tmp_path):
    again = _write(inputs, tmp_path / "again")
    first, second = _snapshot(dicom_context), _snapshot(again)
    assert sorted(first) == sorted(second)
    for rel in first:
        assert first[rel] == second[rel], f"{rel} differs between two writes"


def test_segmap_wheel_is_reproducible(inputs, tmp_path):
    from segmap.packager import wheelhouse

    a = build_segmap_wheel(inputs / "source", tmp_path / "a")
    wheelhouse._built.clear()  # build again rather than reuse this process's wheel
    b = build_segmap_wheel(inputs / "source", tmp_path / "b")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        names = zf.namelist()
        assert "segmap/__init__.py" in names and not any("__pycache__" in n for n in names)
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_context_holds_everything_the_image_needs(dicom_context):
    files = set(context_files(dicom_context))
    for rel in ("Dockerfile", "tools", "run_as.py", "app.yaml", "app.json", "pkg.json", "requirements.txt",
                "requirements-nodeps.txt", "app/__main__.py", "task/spleen.yaml",
                "models/spleen/fold_0/model.ts", "models/spleen/fold_1/model.ts",
                "wheelhouse/deps/numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl",
                "wheelhouse/deps/pyyaml-6.0-py3-none-any.whl"):
        assert rel in files, rel
    segmap_wheels = [f for f in files if f.startswith("wheelhouse/segmap/")]
    assert segmap_wheels == ["wheelhouse/segmap/segmap-0.1.0-py3-none-any.whl"]
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert os.access(dicom_context / "tools", os.X_OK)
    assert (dicom_context / "models/spleen/fold_1/model.ts").read_bytes().endswith(b"fold 1")
    assert (dicom_context / "task/spleen.yaml").read_text() == TASK_YAML


def test_app_yaml_bakes_in_variant_task_and_model(dicom_context):
    config = yaml.safe_load((dicom_context / "app.yaml").read_text())
    assert config["segmap"] == {"input_kind": "dicom", "output_format": "dicom-seg",
                                "task_file": "/opt/holoscan/task/spleen.yaml", "task_name": "Spleen",
                                "model": "spleen", "folds": None, "checkpoint": None, "device": "auto",
                                "mirroring": False, "omit_empty_frames": False, "overlay": True,
                                "log_level": "INFO", "threads": "auto", "umask": "027", "precision": "exact",
                                "tile_step_size": "0.5", "openvino": False, "segmentation_type": "binary"}
    # The keys holoscan-cli's `monai-deploy package` requires of an app.yaml.
    assert config["application"]["title"] and config["application"]["version"] == "1.2"
    assert {"cpu", "gpu", "memory", "gpuMemory"} <= set(config["resources"])


def test_app_manifest(dicom_context):
    app = json.loads((dicom_context / "app.json").read_text())
    assert {"apiVersion", "command", "environment", "input", "output", "sdk", "sdkVersion", "timeout", "version",
            "workingDirectory"} <= set(app)
    assert json.loads(app["command"]) == ["python3", "/opt/holoscan/app"]
    assert app["sdk"] == "monai-deploy" and app["sdkVersion"] == "4.0.0" and app["version"] == "1.2"
    assert app["workingDirectory"] == "/var/holoscan"
    assert app["input"] == {"path": "input/", "formats": ["application/dicom"]}
    assert "application/dicom" in app["output"]["formats"]
    env = app["environment"]
    for key in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH", "HOLOSCAN_WORKDIR",
                "HOLOSCAN_CONFIG_PATH", "HOLOSCAN_APP_MANIFEST_PATH", "HOLOSCAN_PKG_MANIFEST_PATH", "HOLOSCAN_TIMEOUT"):
        assert key in env, key
        if key != "HOLOSCAN_TIMEOUT":  # the Dockerfile sets the same values
            assert f"{key}={env[key]}" in (dicom_context / "Dockerfile").read_text()


def test_package_manifest(dicom_context, inputs, tmp_path):
    pkg = json.loads((dicom_context / "pkg.json").read_text())
    assert {"apiVersion", "applicationRoot", "modelRoot", "models", "resources", "version",
            "platformConfig"} <= set(pkg)
    assert pkg["applicationRoot"] == "/opt/holoscan/app" and pkg["modelRoot"] == "/opt/holoscan/models"
    assert pkg["models"] == {"spleen": "/opt/holoscan/models/spleen"}
    assert {"cpu", "gpu", "memory", "gpuMemory"} <= set(pkg["resources"])
    assert pkg["platformConfig"] == "cpu" and pkg["resources"]["gpu"] == 0  # the CPU base image means a CPU MAP
    gpu = json.loads((_write(inputs, tmp_path / "gpu", base_image="nvidia/cuda:13.0.0-runtime-ubuntu24.04",
                             python_version="3.12") / "pkg.json").read_text())
    assert gpu["platformConfig"] == "dgpu" and gpu["resources"]["gpu"] == 1


def test_nifti_variant_and_image_names(inputs, tmp_path):
    ctx = _write(inputs, tmp_path / "nifti", variant="nifti")
    assert yaml.safe_load((ctx / "app.yaml").read_text())["segmap"]["input_kind"] == "nifti"
    assert json.loads((ctx / "app.json").read_text())["input"]["formats"] == ["application/x-nifti"]
    name = ImageName.parse("registry.local:5000/team/spleen:1.2")
    assert name.for_variant("dicom") == "registry.local:5000/team/spleen:1.2"
    assert name.for_variant("nifti") == "registry.local:5000/team/spleen:1.2-nifti"
    assert name.short_name == "spleen"


def test_dockerfile_layout_and_user(dicom_context):
    text = (dicom_context / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={CPU_BASE_IMAGE}" in text and "ARG MAP_UID=65532" in text and "ARG MAP_GID=65532" in text
    for line in ("COPY app/ /opt/holoscan/app/", "COPY models/ /opt/holoscan/models/",
                 "COPY app.json pkg.json run_as.py /etc/holoscan/", "COPY app.yaml tools /var/holoscan/",
                 "WORKDIR /var/holoscan", "USER 0:0",
                 'echo "${MAP_UID}:${MAP_GID}" > /etc/holoscan/run-as', 'ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/var/holoscan/tools"]', "STOPSIGNAL SIGTERM"):
        assert line in text, line
    assert "--no-index" in text and "@" not in text
    custom = render_dockerfile(base_image="my/base:1", uid=1234, gid=2345)
    assert "ARG BASE_IMAGE=my/base:1" in custom and "ARG MAP_UID=1234" in custom and "ARG MAP_GID=2345" in custom


def test_top_level_dockerfile_is_the_rendered_template():
    assert (ROOT / "Dockerfile").read_text() == render_dockerfile(base_image=CPU_BASE_IMAGE), (
        "regenerate it: python -c \"from segmap.packager.context import render_dockerfile as r; "
        "open('Dockerfile', 'w').write(r(base_image='segmap/base-cpu:bookworm-tini'))\"")


def test_requirements_follow_segmap_metadata(dicom_context):
    wheel = next((dicom_context / "wheelhouse" / "segmap").glob("*.whl"))
    with_deps, no_deps = requirement_sets(wheel)
    assert with_deps[0] == "torch==2.13.0"
    assert {r for r in wheel_requirements(wheel) if not r.startswith("torch")} <= set(with_deps)
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in with_deps + no_deps}
    assert not names & {"nnunetv2", "simpleitk", "scikit-image", "dynamic-network-architectures", "holoscan-cli",
                        "cupy-cuda13x"}
    assert no_deps == ["monai-deploy-app-sdk==4.0.0", "holoscan-cu13==4.6.0"]
    lines = (dicom_context / "requirements.txt").read_text().splitlines()
    assert [ln for ln in lines if not ln.startswith("#")] == with_deps
    assert "manylinux_2_28_x86_64" in platform_tags() and "manylinux2014_x86_64" in platform_tags()


def test_single_model_file_and_custom_ids(inputs, tmp_path):
    ctx = _write(inputs, tmp_path / "one", model=inputs / "model" / "fold_1" / "model.ts", uid=1234, gid=2345,
                 model_name="my-model")
    assert "models/my-model/fold_1/model.ts" in context_files(ctx)
    assert "ARG MAP_UID=1234" in (ctx / "Dockerfile").read_text()
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(inputs / "model" / "fold_0" / "model.ts", plain / "model.ts")
    assert "models/spleen/model.ts" in context_files(_write(inputs, tmp_path / "two", model=plain / "model.ts"))


@pytest.mark.parametrize("folds", [None, "1"], ids=["ensemble", "one-fold"])
def test_image_label_and_run_report_name_the_model_alike(inputs, tmp_path, folds):
    """The image's ``io.segmap.model.sha256`` label is the digest a run of the same model and folds reports (from
    the report's file list), here and inside the image: one ``model_digest`` for both."""
    import hashlib

    from segmap.model import find_fold_files, model_digest, parse_folds
    from segmap.outputs.report import RunReport

    label = context_model_digest(_write(inputs, tmp_path / "ctx", folds=folds))
    report = RunReport(task_name="Spleen")
    report.set_model(find_fold_files(inputs / "model", parse_folds(folds)))
    files = report.model["files"]
    assert label == model_digest([f["path"] for f in files], [f["sha256"] for f in files])
    assert label == model_digest(find_fold_files(tmp_path / "ctx" / "models" / "spleen"))  # the run in the image
    sums = {k: hashlib.sha256((inputs / "model" / f"fold_{k}" / "model.ts").read_bytes()).hexdigest() for k in (0, 1)}
    if folds == "1":  # one file: its own sha256, as sha256sum prints it
        assert label == sums[1]
    else:
        lines = "".join(f"fold_{k}/model.ts\0{sums[k]}\n" for k in (0, 1))
        assert label == hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("change, message", [
    ({"tag": "spleen"}, "expected NAME:VERSION"),
    ({"tag": "Spleen:1.0"}, "lower case"),
    ({"variant": "png"}, "expected one of dicom, dicom-nifti, nifti"),
    ({"task_name": "Liver"}, "no task named 'Liver'"),
    ({"uid": -1}, "--uid -1"),
    ({"task": Path("/nonexistent/task.yaml")}, "task file not found"),
    ({"model": Path("/nonexistent/model")}, "model not found"),
    ({"wheelhouse": Path("/nonexistent/wheels")}, "wheelhouse folder not found"),
])
def test_bad_inputs_give_one_line_errors(inputs, tmp_path, change, message):
    with pytest.raises(SegmapError) as e:
        _write(inputs, tmp_path / "ctx", **change)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_task_file_with_several_tasks_needs_a_name(inputs, tmp_path):
    two = tmp_path / "two.yaml"
    two.write_text(TASK_YAML + TASK_YAML.replace("tasks:\n", "").replace("Spleen:", "Other:", 1))
    with pytest.raises(SegmapError, match=r"choose one with a task name \(--task-name\)"):
        _write(inputs, tmp_path / "ctx", task=two)
    ctx = _write(inputs, tmp_path / "ctx", task=two, task_name="Other")
    assert yaml.safe_load((ctx / "app.yaml").read_text())["segmap"]["task_name"] == "Other"


def test_refuses_to_overwrite_a_folder_that_is_not_a_context(inputs, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ContextError, match="not a segmap build context"):
        _write(inputs, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").exists()


def test_operators_beside_app_travel_inside_the_app_folder(inputs, tmp_path):
    shutil.copytree(inputs / "app", tmp_path / "repo" / "app")
    (tmp_path / "repo" / "operators").mkdir()
    (tmp_path / "repo" / "operators" / "__init__.py").write_text("")
    (tmp_path / "repo" / "operators" / "seg.py").write_text("X = 1\n")
    ctx = _write(inputs, tmp_path / "ctx", app_dir=tmp_path / "repo" / "app")
    assert {"app/operators/__init__.py", "app/operators/seg.py"} <= set(context_files(ctx))


def test_debian_mirror_is_read_from_apt_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n")
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    assert debian_mirror(tmp_path / "nothing") == "http://deb.debian.org/debian"


# --- the command ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """A tiny real MONet model.ts (one CT input named "image", labels background + spleen)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("dynamic_network_architectures", reason="dynamic-network-architectures builds the network")
    import warnings

    from segmap_tools.plans import build_network, make_dataset_json, make_plans
    from segmap.model import export_monet

    plans = make_plans(patch_size=(16, 16, 16), spacing=(3.0, 1.5, 1.5), normalization_schemes=["CTNormalization"],
                       features=(4, 8))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("real") / "fold_0" / "model.ts"
    path.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_monet(path, build_network(plans, "3d_fullres", 1, 2), plans,
                            make_dataset_json({"background": 0, "spleen": 1}), "3d_fullres")


def _package(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from segmap.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["package", *argv])
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_package_dry_run_writes_both_variants(inputs, real_model, tmp_path):
    code, out, err = _package("--model", str(real_model.parent), "--task", str(inputs / "spleen.yaml"),
                              "--tag", "segmap-test/spleen:2.0", "--cpu", "--wheelhouse", str(inputs / "wheels"),
                              "--source", str(inputs / "source"), "--dry-run", str(tmp_path / "ctx"))
    assert code == 0, err
    assert f"docker build -t segmap-test/spleen:2.0 {tmp_path / 'ctx' / 'dicom'}" in out
    assert f"docker build -t segmap-test/spleen:2.0-nifti {tmp_path / 'ctx' / 'nifti'}" in out
    for variant in ("dicom", "nifti"):
        config = yaml.safe_load((tmp_path / "ctx" / variant / "app.yaml").read_text())
        assert config["segmap"]["input_kind"] == variant and config["segmap"]["model"] == "spleen"
        assert (tmp_path / "ctx" / variant / "models/spleen/fold_0/model.ts").read_bytes() == real_model.read_bytes()


def test_package_checks_task_against_model_first(inputs, real_model, tmp_path):
    two = tmp_path / "two-segments.yaml"
    segment = TASK_YAML.split("    Segments:\n", 1)[1]
    two.write_text(TASK_YAML + segment.replace("Spleen", "Liver"))
    code, out, err = _package("-m", str(real_model), "-t", str(two), "--tag", "x/y:1", "--cpu",
                              "--wheelhouse", str(inputs / "wheels"), "--source", str(inputs / "source"),
                              "--dry-run", str(tmp_path / "ctx"))
    assert code == 2 and err.startswith("segmap: error: ") and err.count("\n") == 1
    assert not (tmp_path / "ctx").exists()


def test_package_without_an_engine_suggests_dry_run(inputs, real_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    code, _, err = _package("-m", str(real_model), "-t", str(inputs / "spleen.yaml"), "--tag", "x/y:1", "--cpu",
                            "--wheelhouse", str(inputs / "wheels"), "--source", str(inputs / "source"))
    assert code == 2
    assert err == ("segmap: error: cannot reach the Docker engine at unix:///nonexistent/docker.sock: start dockerd "
                   "or use --dry-run\n")


@pytest.mark.parametrize("argv, message", [
    (["--variants", "dicom,png"], "--variants 'dicom,png'"),
    (["--tag", "noversion"], "expected NAME:VERSION"),
])
def test_package_argument_errors(inputs, real_model, tmp_path, argv, message):
    base = ["-m", str(real_model), "-t", str(inputs / "spleen.yaml"), "--tag", "x/y:1", "--cpu",
            "--source", str(inputs / "source"), "--dry-run", str(tmp_path / "ctx")]
    code, _, err = _package(*base, *argv)
    assert code == 2 and message in err


def test_package_help_teaches_by_example():
    code, out, _ = _package("--help")
    assert code == 0
    assert "examples:" in out and "--dry-run" in out and "docker run" in out and "SEGMAP_DEVICE" in out


# --- the entry point, run here with bash -----------------------------------------------------------------------------

@pytest.fixture
def tools_env(dicom_context, tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    env = dict(os.environ, HOLOSCAN_APPLICATION=str(dicom_context / "app"), HOLOSCAN_INPUT_PATH=str(dicom_context),
               HOLOSCAN_OUTPUT_PATH=str(out), HOLOSCAN_MODEL_PATH=str(dicom_context / "models"),
               HOLOSCAN_CONFIG_PATH=str(dicom_context / "app.yaml"),
               HOLOSCAN_APP_MANIFEST_PATH=str(dicom_context / "app.json"),
               HOLOSCAN_PKG_MANIFEST_PATH=str(dicom_context / "pkg.json"), SEGMAP_DEVICE="cpu",
               PYTHONPATH=str(ROOT / "src"))
    return env, out


def _tools(context: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(context / "tools"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_tools_show_and_env(dicom_context, tools_env):
    env, _ = tools_env
    shown = _tools(dicom_context, env, "show")
    assert shown.returncode == 0 and '"sdk": "monai-deploy"' in shown.stdout and '"platformConfig"' in shown.stdout
    env = dict(env, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    listed = _tools(dicom_context, env, "env")
    assert listed.returncode == 0, listed.stderr
    assert "SEGMAP_DEVICE=cpu" in listed.stdout.splitlines()  # the environment wins over app.yaml
    assert "SEGMAP_MODEL=spleen" in listed.stdout.splitlines()  # baked into app.yaml by the packager
    assert "SEGMAP_INPUT_KIND=dicom" in listed.stdout.splitlines()
    assert f"HOLOSCAN_OUTPUT_PATH={env['HOLOSCAN_OUTPUT_PATH']}" in listed.stdout
    bad = _tools(dicom_context, dict(env, SEGMAP_MIRRORING="perhaps"), "env")
    assert bad.returncode == 2 and "SEGMAP_MIRRORING: mirroring must be true or false" in bad.stderr


def test_tools_runs_the_app_with_its_arguments(dicom_context, tools_env):
    env, out = tools_env
    env = dict(env, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    done = _tools(dicom_context, env, "--some-flag", "x")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "seen.json").read_text())["argv"] == ["--some-flag", "x"]


def test_tools_extract_needs_a_mounted_target_and_can_run_twice(dicom_context, tools_env, tmp_path):
    env, _ = tools_env
    dest = tmp_path / "extracted"
    # The script copies from fixed image paths for the task and reads the container's mount table; point both at
    # test files through a copy of the script.
    mountinfo = tmp_path / "mountinfo"
    script = (dicom_context / "tools").read_text().replace('task_dir="/opt/holoscan/task"',
                                                          f'task_dir="{dicom_context / "task"}"')
    assert "/proc/self/mountinfo" in script
    (tmp_path / "tools").write_text(script.replace("/proc/self/mountinfo", str(mountinfo)))

    def extract() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(tmp_path / "tools"), "extract", str(dest)], env=env, capture_output=True,
                              text=True, timeout=60)

    mountinfo.write_text("22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n")  # nothing mounted but the root
    refused = extract()
    assert refused.returncode == 2 and not dest.exists()
    assert refused.stderr.strip() == (f"segmap: error: {dest} is not on a mounted volume, so nothing would reach the "
                                      f"host: run with -v HOST_DIR:{dest}")
    mountinfo.write_text(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n90 22 8:1 /x {tmp_path} rw - ext4 /dev/sda1 rw\n")
    for _ in range(2):  # the second extraction replaces the first instead of nesting app/app
        done = extract()
        assert done.returncode == 0, done.stderr
    for rel in ("app/__main__.py", "models/spleen/fold_0/model.ts", "task/spleen.yaml", "config/app.json",
                "config/pkg.json", "config/app.yaml"):
        assert (dest / rel).is_file(), rel
    assert not (dest / "app" / "app").exists() and not (dest / "models" / "models").exists()


# --- Docker ------------------------------------------------------------------------------------------------------

def test_unreachable_engine_says_what_to_do(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerEngineError) as e:
        connect()
    assert str(e.value).startswith("cannot reach the Docker engine at unix:///nonexistent/docker.sock: "
                                   "start dockerd or use --dry-run")


def test_build_errors_name_the_step_and_its_last_output():
    stream = [{"stream": "Step 7/9 : RUN pip install x\n"}, {"stream": " ---> Running in abc\n"},
              {"stream": "ERROR: No matching distribution found for x\n"},
              {"error": "The command '/bin/sh -c pip install x' returned a non-zero code: 1"}]
    with pytest.raises(DockerEngineError, match="failed at Step 7/9: ERROR: No matching distribution found for x"):
        follow(stream, "docker build of t:1")


def _docker_run(image: str, *args: str, mounts: dict[Path, tuple[str, str]] = {}, user: str | None = None,
                env: dict[str, str] = {}) -> subprocess.CompletedProcess:
    cmd = ["docker", "run", "--rm"]
    for src, (dst, mode) in mounts.items():
        cmd += ["-v", f"{src}:{dst}:{mode}"]
    for k, v in env.items():
        cmd += ["-e", f"{k}={v}"]
    if user:
        cmd += ["--user", user]
    return subprocess.run(cmd + [image, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def standin_image(engine, inputs, tmp_path_factory):
    from segmap.packager.build import build_image

    if shutil.which("docker") is None:
        pytest.skip("the docker command-line client is not installed")
    ctx = _write(inputs, tmp_path_factory.mktemp("img") / "ctx", wheelhouse=None, requirements=((), ()))
    # Beside the MAP images of this session (SEGMAP_TEST_MAP_TAG), so that checkouts testing at once keep apart.
    built = build_image(ctx, MAP_TAG.rsplit("/", 1)[0] + "/standin:pytest", api=engine)
    return built.tag


def test_image_runs_the_app_as_uid_65532_with_a_read_only_input(standin_image, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "series").mkdir(parents=True)
    (inp / "series" / "1.dcm").write_bytes(b"x")
    (inp / "ct.nii.gz").write_bytes(b"y")
    out.mkdir()
    os.chown(out, 65532, 65532) if os.geteuid() == 0 else out.chmod(0o777)
    done = _docker_run(standin_image, "--flag", mounts={inp: ("/var/holoscan/input", "ro"),
                                                        out: ("/var/holoscan/output", "rw")},
                       env={"SEGMAP_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr
    seen = json.loads((out / "seen.json").read_text())
    assert seen["input"] == ["ct.nii.gz", "series/1.dcm"] and seen["uid"] == 65532 and seen["argv"] == ["--flag"]
    assert seen["segmap"] == "0.1.0"
    assert seen["models"] == ["spleen/fold_0/model.ts", "spleen/fold_1/model.ts"]
    assert yaml.safe_load(seen["config"])["segmap"]["input_kind"] == "dicom"
    assert seen["env"]["SEGMAP_DEVICE"] == "cpu" and seen["env"]["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"


def test_image_never_runs_the_application_as_root(standin_image, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a folder that uid 65532 cannot write")
    out = tmp_path / "root-only"
    out.mkdir(mode=0o755)
    # A root-owned folder uid 65532 cannot write: the application runs as 65532 in a private folder inside it, and the
    # entry point moves its outputs in afterwards, owned by the folder's owner (tests/test_plain_run.py).
    done = _docker_run(standin_image, mounts={out: ("/var/holoscan/output", "rw")})
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "seen.json").read_text())["uid"] == 65532 and (out / "seen.json").stat().st_uid == 0
    assert sorted(p.name for p in out.iterdir()) == ["seen.json"]
    # `--user 0:0` does not make the application root: the entry point still switches to the non-root default.
    (out / "seen.json").unlink()
    as_root = _docker_run(standin_image, mounts={out: ("/var/holoscan/output", "rw")}, user="0:0")
    assert as_root.returncode == 0 and json.loads((out / "seen.json").read_text())["uid"] == 65532, as_root.stderr
    # A folder its owner made (uid 1000, mode 755): the run takes that owner, so the outputs are theirs.
    (out / "seen.json").unlink()
    os.chown(out, 1000, 1000)
    ok = _docker_run(standin_image, mounts={out: ("/var/holoscan/output", "rw")})
    assert ok.returncode == 0, ok.stderr
    assert json.loads((out / "seen.json").read_text())["uid"] == 1000 and (out / "seen.json").stat().st_uid == 1000
    # A folder its owner made read-only (mode 555): refused with the one-line error, not written by root.
    ro = tmp_path / "read-only"
    ro.mkdir(mode=0o555)
    os.chown(ro, 1000, 1000)
    refused = _docker_run(standin_image, mounts={ro: ("/var/holoscan/output", "rw")})
    assert refused.returncode == 2 and refused.stderr.startswith("segmap: error: ")
    assert "not writable by uid 1000" in refused.stderr and "--user" in refused.stderr


def test_image_show_env_and_extract(standin_image, tmp_path):
    shown = _docker_run(standin_image, "show")
    assert shown.returncode == 0
    assert "/etc/holoscan/app.json:" in shown.stdout and "/etc/holoscan/pkg.json:" in shown.stdout
    # `env` runs segmap.settings, which needs the image's Python packages: tests/test_map_images.py checks it.
    out = tmp_path / "x"
    out.mkdir()
    os.chown(out, 65532, 65532) if os.geteuid() == 0 else out.chmod(0o777)
    done = _docker_run(standin_image, "extract", mounts={out: ("/var/holoscan/output", "rw")})
    assert done.returncode == 0, done.stderr
    assert (out / "models/spleen/fold_0/model.ts").is_file() and (out / "config/pkg.json").is_file()
