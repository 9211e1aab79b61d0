"""Docker build contexts for MAPs (MONAI Application Packages).

A context is a plain folder that ``docker build`` turns into one MAP image::

    Dockerfile                  rendered from templates/Dockerfile.in (base image, uid/gid, timeout)
    app/                        the application (run as ``python3 /opt/holoscan/app``)
    models/<name>/fold_K/model.ts   the model; several folds are an ensemble
    task/<task file>            the Segmentation Task file
    app.yaml                    -> /var/holoscan/app.yaml: variant, task and run-time defaults baked in
    app.json, pkg.json          -> /etc/holoscan/: the MAP manifests
    run_as.py                   -> /etc/holoscan/run_as.py: the entry point's root step (whom the application runs as)
    tools                       -> /var/holoscan/tools: the entry point
    requirements.txt, requirements-nodeps.txt, wheelhouse/deps/*.whl, wheelhouse/segmap/segmap-*.whl

The same inputs give a byte-identical folder: file lists are sorted, nothing holds a time stamp or a random name,
and the segmap wheel is built with a fixed ``SOURCE_DATE_EPOCH``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .. import settings as segmap_settings
from ..convert import convert_results_folder
from ..errors import ContextError, SegmapError
from ..model import FOLD_DIR, find_fold_files, is_results_folder, model_digest, parse_folds
from ..outputs.formats import Variant, variants
from ..tasks import load_task
from .baseimage import CPU_BASE_IMAGE, KNOWN_PYTHON, probe_python
from .wheelhouse import build_segmap_wheel, copy_wheels, download_wheels, requirement_sets, sdk_version

#: Image variants by name (``dicom``, ``nifti``, ``dicom-nifti``, ...), derived from the output-format registry.
VARIANTS: dict[str, Variant] = variants()
#: What ``segmap package`` builds unless ``--variants`` says otherwise.
DEFAULT_VARIANTS = ("dicom", "nifti")
API_VERSION = "1.0.0"
#: The user the application runs as. 65532 (the "nonroot" id of distroless images) sits above the range hosts give
#: to people (1000-60000) and below the 65534 "nobody", so files it writes do not appear owned by a real host
#: account; ``--uid/--gid`` at package time or ``docker run --user`` choose another.
DEFAULT_UID = DEFAULT_GID = 65532
SDK = "monai-deploy"

APP_ROOT = "/opt/holoscan/app"
MODEL_ROOT = "/opt/holoscan/models"
TASK_ROOT = "/opt/holoscan/task"
WORKDIR = "/var/holoscan"
CONFIG_PATH = "/var/holoscan/app.yaml"
APP_MANIFEST = "/etc/holoscan/app.json"
PKG_MANIFEST = "/etc/holoscan/pkg.json"

#: The image's environment; app.json lists it too.
ENVIRONMENT = {
    "HOLOSCAN_APPLICATION": APP_ROOT,
    "HOLOSCAN_INPUT_PATH": f"{WORKDIR}/input",
    "HOLOSCAN_OUTPUT_PATH": f"{WORKDIR}/output",
    "HOLOSCAN_MODEL_PATH": MODEL_ROOT,
    "HOLOSCAN_WORKDIR": WORKDIR,
    "HOLOSCAN_CONFIG_PATH": CONFIG_PATH,
    "HOLOSCAN_APP_MANIFEST_PATH": APP_MANIFEST,
    "HOLOSCAN_PKG_MANIFEST_PATH": PKG_MANIFEST,
    "HOLOSCAN_LOGS_PATH": f"{WORKDIR}/logs",
}

#: The resources a MAP asks for (pkg.json and app.yaml), for GPU and CPU-only images.
RESOURCES = {
    "gpu": {"cpu": 2, "gpu": 1, "memory": "16Gi", "gpuMemory": "8Gi", "sharedMemory": "1Gi"},
    "cpu": {"cpu": 4, "gpu": 0, "memory": "16Gi", "gpuMemory": "0Gi", "sharedMemory": "1Gi"},
}

_NAME_OK = re.compile(r"[^a-z0-9._-]+")
_JUNK = ("__pycache__", ".pytest_cache", ".mypy_cache", ".git", ".DS_Store")



@dataclass(frozen=True)
class ImageName:
    """``NAME:VERSION`` as the user typed it; the NIfTI variant's tag gets a ``-nifti`` suffix."""

    repository: str
    version: str

    @classmethod
    def parse(cls, tag: str) -> "ImageName":
        repo, sep, version = tag.rpartition(":")
        if not sep or "/" in version or not repo or not version:
            raise ContextError(f"--tag {tag!r}: expected NAME:VERSION, e.g. segmap/spleen:1.0")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", version):
            raise ContextError(f"--tag {tag!r}: version {version!r} is not a valid Docker tag")
        if repo != repo.lower():
            raise ContextError(f"--tag {tag!r}: Docker image names must be lower case")
        return cls(repo, version)

    def for_variant(self, variant: str) -> str:
        suffix = "" if variant == "dicom" else f"-{variant}"
        return f"{self.repository}:{self.version}{suffix}"

    @property
    def short_name(self) -> str:
        """The last path component, usable as a folder name (the model's name inside the image)."""
        return _NAME_OK.sub("-", self.repository.rsplit("/", 1)[-1].lower()).strip("-.") or "model"


def _template(name: str) -> str:
    return importlib_resources.files("segmap.packager").joinpath("templates", name).read_text(encoding="utf-8")


def render_dockerfile(*, base_image: str, uid: int = DEFAULT_UID, gid: int = DEFAULT_GID, timeout: int = 0) -> str:
    """The Dockerfile template with its build-argument defaults filled in."""
    text = _template("Dockerfile.in")
    for key, value in (("BASE_IMAGE", base_image), ("MAP_UID", uid), ("MAP_GID", gid), ("TIMEOUT", timeout)):
        text = text.replace(f"@{key}@", str(value))
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:  # pragma: no cover - a template bug
        raise RuntimeError(f"Dockerfile template placeholders left: {leftover}")
    return text


def app_manifest(*, variant: str, version: str, sdk_version: str, timeout: int = 0) -> dict[str, Any]:
    """``/etc/holoscan/app.json``."""
    inputs, outputs = VARIANTS[variant].media_types
    return {
        "apiVersion": API_VERSION,
        "command": json.dumps(["python3", APP_ROOT]),
        "environment": dict(ENVIRONMENT, HOLOSCAN_TIMEOUT=str(timeout)),
        "input": {"path": "input/", "formats": inputs},
        "liveness": None,
        "output": {"path": "output/", "formats": outputs},
        "readiness": None,
        "sdk": SDK,
        "sdkVersion": sdk_version,
        "timeout": timeout,
        "version": version,
        "workingDirectory": WORKDIR,
    }


def pkg_manifest(*, model_name: str, version: str, cpu: bool,
                 resources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``/etc/holoscan/pkg.json``."""
    return {
        "apiVersion": API_VERSION,
        "applicationRoot": APP_ROOT,
        "modelRoot": MODEL_ROOT,
        "models": {model_name: f"{MODEL_ROOT}/{model_name}"},
        "resources": dict(resources or RESOURCES["cpu" if cpu else "gpu"]),
        "version": version,
        "platformConfig": "cpu" if cpu else "dgpu",
    }


def app_config(*, variant: Variant | None, task_file: str, task_name: str | None, model_name: str | None,
               version: str, cpu: bool, resources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``app.yaml``: holoscan-cli's ``application``/``resources`` keys plus segmap's own section.

    ``variant`` None gives the repository's own ``app/app.yaml`` (any input kind, the format chosen by it).
    """
    if variant is None:
        title, inputs = "segmap nnU-Net segmentation", sorted({v.media_types[0][0] for v in VARIANTS.values()})
        outputs = sorted({m for v in VARIANTS.values() for m in v.media_types[1]})
        fixed: dict[str, Any] = {}
    else:
        title, (inputs, outputs) = f"segmap {task_name} ({variant.title})", variant.media_types
        fixed = variant.settings()
    section = {d.name: (fixed[d.name] if d.name in fixed else d.default)
               for d in segmap_settings.declared() if d.yaml}
    section.update(task_file=task_file, task_name=task_name, model=model_name)
    return {
        "application": {"title": title, "version": version, "input-formats": inputs, "output-formats": outputs},
        "resources": dict(resources or RESOURCES["cpu" if cpu else "gpu"]),
        "segmap": {k: (str(v) if isinstance(v, Path) else v) for k, v in section.items()},
    }


def render_app_yaml(config: Mapping[str, Any], header: str) -> str:
    return header + yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


_CONFIG_HEADER = f"""\
# Configuration of a segmap MAP, written by `segmap package`.
# segmap.model is a folder name under HOLOSCAN_MODEL_PATH. The other settings are defaults that the
# environment overrides ({", ".join(d.env for d in segmap_settings.declared() if d.packaged)}),
# e.g. docker run -e SEGMAP_DEVICE=cpu ...; `docker run IMAGE env` prints the settings in effect.
"""

REPO_CONFIG_HEADER = """\
# segmap application configuration (also valid input to `monai-deploy package`), generated from segmap.settings
# and segmap.packager.context by `make generate`; tests/test_settings.py fails when it drifts.
# `segmap:` holds every setting with its default (SEGMAP_* environment variables override them; task_file is
# relative to this file). `application:` and `resources:` are what holoscan-cli's `monai-deploy package` reads.
"""


def repo_app_yaml(version: str) -> str:
    """The text of the repository's ``app/app.yaml``."""
    return render_app_yaml(app_config(variant=None, task_file="task.yaml", task_name=None, model_name=None,
                                      version=version, cpu=False), REPO_CONFIG_HEADER)


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", newline="\n")
    else:
        path.write_bytes(text)
    path.chmod(mode)


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy a source folder without caches; files 0644 (0755 if executable), folders 0755."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in _JUNK for part in rel.parts) or path.suffix in (".pyc", ".pyo"):
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o755)
        elif path.is_file():
            _write(target, path.read_bytes(), 0o755 if path.stat().st_mode & 0o111 else 0o644)
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)


def model_files(model: Path, folds: str | None = None) -> list[tuple[str, Path]]:
    """``(relative path inside models/<name>/, source file)`` for a model.ts or a folder of fold_K/model.ts."""
    return [(f"{f.parent.name}/{f.name}" if FOLD_DIR.match(f.parent.name) else f.name, f)
            for f in find_fold_files(Path(model), parse_folds(folds))]


def write_model(dest: Path, model: Path, *, folds: str | None, checkpoint: str | None) -> None:
    """The model inside the image: MONet files as they are, an nnU-Net results folder converted to them (each fold
    checked against its checkpoint, as ``segmap convert`` does)."""
    if is_results_folder(model):
        convert_results_folder(model, dest, folds=parse_folds(folds), checkpoint=checkpoint)
        for f in dest.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
    else:
        for rel, src in model_files(model, folds):
            _write(dest / rel, src.read_bytes())
    for d in sorted({p.parent for p in dest.rglob("*")} | {dest, dest.parent}):
        d.chmod(0o755)


def resolve_python(base_image: str, python_version: str | None) -> str:
    """The Python (major.minor) the wheels must fit: given, known for segmap's base images, or asked of the image."""
    if python_version:
        if not re.fullmatch(r"3\.\d+", python_version):
            raise ContextError(f"--python-version {python_version!r}: expected 3.N, e.g. 3.11")
        return python_version
    if base_image in KNOWN_PYTHON:
        return KNOWN_PYTHON[base_image]
    try:
        found = probe_python(base_image)
    except SegmapError:
        found = None
    if not found:
        raise ContextError(f"cannot tell which Python base image {base_image} has: pass --python-version 3.N "
                           "(or --wheelhouse with wheels for it)")
    return found


def prepare_wheelhouse(dest: Path, *, package_source: Path, python_version: str) -> Path:
    """Download the image's third-party wheels into ``dest`` (one wheelhouse shared by several variants)."""
    with tempfile.TemporaryDirectory(prefix="segmap-wheel-") as tmp:
        wheel = build_segmap_wheel(package_source, Path(tmp))
        with_deps, no_deps = requirement_sets(wheel)
    download_wheels(dest, with_deps, no_deps, python_version=python_version)
    return dest


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ContextError(f"{out_dir}: exists and is not a folder")
        entries = list(out_dir.iterdir())
        if entries and not ((out_dir / "Dockerfile").is_file() and (out_dir / "pkg.json").is_file()):
            raise ContextError(f"{out_dir}: folder is not empty and is not a segmap build context; choose another")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    out_dir.chmod(0o755)


def write_context(out_dir: str | Path, *, model: str | Path, task: str | Path, task_name: str | None, variant: str,
                  base_image: str = CPU_BASE_IMAGE, uid: int = DEFAULT_UID, gid: int = DEFAULT_GID,
                  wheelhouse: str | Path | None = None, app_dir: str | Path, package_source: str | Path,
                  version: str | None = None, tag: str, cpu: bool | None = None, python_version: str | None = None,
                  model_name: str | None = None, resources: Mapping[str, Any] | None = None, timeout: int = 0,
                  requirements: tuple[Sequence[str], Sequence[str]] | None = None, folds: str | None = None,
                  checkpoint: str | None = None) -> Path:
    """Write the build context of one MAP variant into ``out_dir`` (replacing an earlier context there).

    ``wheelhouse`` is a folder of wheels for the image's Python (``pip download`` fills one when it is None);
    ``requirements`` overrides the ``(with_deps, no_deps)`` requirement lines (tests use it for small images).
    ``cpu`` defaults to whether ``base_image`` is segmap's CPU base. Returns ``out_dir``.
    """
    if variant not in VARIANTS:
        raise ContextError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    for what, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or value < 0:
            raise ContextError(f"--{what} {value!r}: expected a non-negative integer")
    name = ImageName.parse(tag)
    version = version or name.version
    cpu = (base_image == CPU_BASE_IMAGE) if cpu is None else cpu
    model_name = model_name or name.short_name
    if _NAME_OK.sub("", model_name) != model_name:
        raise ContextError(f"model name {model_name!r}: use lower-case letters, digits, '.', '_' or '-'")
    task, app_dir, package_source = Path(task), Path(app_dir), Path(package_source)
    if not task.is_file():
        raise ContextError(f"{task}: task file not found")
    if not app_dir.is_dir() or not any(app_dir.glob("*.py")):
        raise ContextError(f"{app_dir}: application folder not found or holds no .py file (expected __main__.py)")
    task_name = load_task(task, task_name).name
    if not is_results_folder(Path(model)):
        model_files(Path(model), folds)  # a missing or malformed model fails before anything is written

    out = Path(out_dir)
    _prepare_out_dir(out)
    _write(out / "Dockerfile", render_dockerfile(base_image=base_image, uid=uid, gid=gid, timeout=timeout))
    _write(out / "tools", _template("tools"), 0o755)
    _write(out / "run_as.py", _template("run_as.py"))

    _copy_tree(app_dir, out / "app")
    operators = app_dir.parent / "operators"
    if operators.is_dir() and not (app_dir / "operators").exists() and any(operators.glob("*.py")):
        # The repository keeps operators beside app/; inside the image they must be importable from the app folder.
        _copy_tree(operators, out / "app" / "operators")
    write_model(out / "models" / model_name, Path(model), folds=folds, checkpoint=checkpoint)
    _write(out / "task" / task.name, task.read_bytes())
    (out / "task").chmod(0o755)

    segmap_dir = out / "wheelhouse" / "segmap"
    wheel = build_segmap_wheel(package_source, segmap_dir)
    pinned = requirement_sets(wheel)
    with_deps, no_deps = requirements if requirements is not None else pinned

    config = app_config(variant=VARIANTS[variant], task_file=f"{TASK_ROOT}/{task.name}", task_name=task_name,
                        model_name=model_name, version=version, cpu=cpu, resources=resources)
    _write(out / "app.yaml", render_app_yaml(config, _CONFIG_HEADER))
    _write(out / "app.json", _json(app_manifest(variant=variant, version=version, sdk_version=sdk_version(pinned[1]),
                                                timeout=timeout)))
    _write(out / "pkg.json", _json(pkg_manifest(model_name=model_name, version=version, cpu=cpu, resources=resources)))
    _write(out / "requirements.txt", _requirements_text(with_deps, "installed with their dependencies"))
    _write(out / "requirements-nodeps.txt", _requirements_text(no_deps, "installed without their dependencies"))
    deps_dir = out / "wheelhouse" / "deps"
    if wheelhouse is not None:
        copy_wheels(Path(wheelhouse), deps_dir)
    elif with_deps or no_deps:
        download_wheels(deps_dir, with_deps, no_deps, python_version=resolve_python(base_image, python_version))
    deps_dir.mkdir(parents=True, exist_ok=True)
    for d in (out / "wheelhouse", segmap_dir, deps_dir):
        d.chmod(0o755)
    for f in deps_dir.iterdir():
        if f.stat().st_mode & 0o777 != 0o644 and f.stat().st_nlink == 1:
            f.chmod(0o644)
    return out


def _requirements_text(lines: Iterable[str], how: str) -> str:
    return f"# Python packages of the image, {how}, from wheelhouse/deps.\n" + "".join(f"{ln}\n" for ln in lines)


def context_model_digest(context: str | Path) -> str:
    """The digest (:func:`segmap.model.model_digest`) of the model a written context holds (``models/<name>``):
    the model files a run in the image loads and reports, so the image's label and the run report agree (also for a
    converted results folder, or a choice of folds)."""
    folders = sorted(d for d in (Path(context) / "models").iterdir() if d.is_dir())
    if len(folders) != 1:
        raise ContextError(f"{context}: expected one model folder under models/, found {len(folders)}")
    return model_digest(find_fold_files(folders[0]))


def context_files(root: str | Path) -> list[str]:
    """Every file of a context, relative and sorted (for comparisons and listings)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
