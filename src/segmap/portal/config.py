"""The portal's configuration file (``segmap portal -c portal.yaml``), read and checked before anything starts.

Every mistake is one :class:`PortalConfigError` line naming the key and what was expected. The bearer token is
never in this file: ``auth.token_file`` names a file holding it, or ``auth.token_env`` an environment variable.
Relative paths are taken relative to the configuration file's folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import SegmapError

#: A model name as it appears in URLs (``/infer/<name>``) and in 3D Slicer's model list.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: The environment variable read for the token when the file names none.
DEFAULT_TOKEN_ENV = "SEGMAP_PORTAL_TOKEN"

EXAMPLE = """\
# segmap portal -c portal.yaml: MONAI Label's API in front of warm segmap models.
portal:
  host: 127.0.0.1            # a non-loopback address requires a token (auth.token_file or auth.token_env)
  port: 8000
  max_upload_mb: 1024        # larger request bodies get 413
  queue_length: 4            # per device slot: requests running or waiting; more get 503 with Retry-After
  auth:
    token_file: null         # a file holding the bearer token (e.g. /run/secrets/portal-token)
    token_env: SEGMAP_PORTAL_TOKEN
    required: auto           # auto: required unless host is loopback; true; false (loopback only)
  datastore:
    kind: local              # local (uploads in a bounded cache) or dicomweb
    cache_dir: /var/cache/segmap-portal
    cache_max_images: 50
    cache_max_mb: 20000
    cache_max_age_h: 24
    # dicomweb_url: http://orthanc:8042/dicom-web    # kind dicomweb: image ID = Series or Study Instance UID
    # store_seg: true                                # STOW-RS the DICOM SEG next to the study
models:
  spleen:                    # the name clients see (/info/, /infer/spleen); MONet's client needs MONetBundle
    model: models/demo-spleen/model.ts
    task: tasks/spleen.yaml
    description: Demo spleen segmentation (not for clinical use)
    settings:                # any `segmap run` setting (settings.py), e.g. mirroring, precision, folds
      device: cpu
      overlay: false         # nobody receives overlay.png from the portal: do not spend time drawing it
"""


class PortalConfigError(SegmapError):
    """The portal's configuration file cannot be used; the message names the key."""


@dataclass(frozen=True)
class AuthConfig:
    token_file: Path | None = None
    token_env: str = DEFAULT_TOKEN_ENV
    #: "auto", "true" or "false".
    required: str = "auto"


@dataclass(frozen=True)
class DatastoreConfig:
    kind: str = "local"
    cache_dir: Path = Path("portal-cache")
    cache_max_images: int = 50
    cache_max_mb: float = 20000.0
    cache_max_age_h: float = 24.0
    dicomweb_url: str | None = None
    store_seg: bool = False
    #: HTTP basic credentials for the DICOMweb server: user name, and a file holding the password.
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model: Path
    task: Path
    task_name: str | None = None
    description: str = ""
    #: ``segmap run`` settings by name (segmap.settings): device, mirroring, precision, folds, overlay, ...
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PortalConfig:
    models: tuple[ModelConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 1024.0
    queue_length: int = 4
    #: Warm each model up with one small inference at start-up, so that the first request pays no model load.
    warm_up: bool = True
    auth: AuthConfig = AuthConfig()
    datastore: DatastoreConfig = DatastoreConfig()
    source: Path | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


class _Section:
    """One mapping of the file, read key by key so that each error names its full key."""

    def __init__(self, data: Any, where: str, source: Path) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PortalConfigError(f"{source}: {where} must be a mapping, not {type(data).__name__}")
        self.data, self.where, self.source, self.used = dict(data), where, source, set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type, default: Any) -> Any:
        self.used.add(name)
        value = self.data.get(name)
        if value is None:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is Path and isinstance(value, str):
            path = Path(os.path.expanduser(value))
            return path if path.is_absolute() else self.source.parent / path
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise PortalConfigError(f"{self.source}: {self.key(name)} must be {kind.__name__}, got {value!r}")
        return value

    def positive(self, name: str, kind: type, default: Any) -> Any:
        value = self.get(name, kind, default)
        if value <= 0:
            raise PortalConfigError(f"{self.source}: {self.key(name)} must be greater than 0, got {value!r}")
        return value

    def section(self, name: str) -> "_Section":
        self.used.add(name)
        return _Section(self.data.get(name), self.key(name), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise PortalConfigError(f"{self.source}: unknown key(s) {', '.join(self.key(k) for k in unknown)} "
                                    f"(`segmap portal --example` prints every key)")


def load_config(path: str | Path) -> PortalConfig:
    """Read and check ``portal.yaml``."""
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PortalConfigError(f"{path}: cannot read the portal configuration ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise PortalConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return parse_config(document, path)


def parse_config(document: Any, source: Path) -> PortalConfig:
    top = _Section(document, "", source)
    portal = top.section("portal")
    host = portal.get("host", str, "127.0.0.1")
    port = portal.get("port", int, 8000)
    if not 0 <= port <= 65535:
        raise PortalConfigError(f"{source}: portal.port must be 0..65535, got {port}")
    max_upload_mb = portal.positive("max_upload_mb", float, 1024.0)
    queue_length = portal.positive("queue_length", int, 4)
    warm_up = portal.get("warm_up", bool, True)
    auth = _auth(portal.section("auth"))
    datastore = _datastore(portal.section("datastore"))
    portal.done()
    models_section = top.section("models")
    if not models_section.data:
        raise PortalConfigError(f"{source}: models is empty; name at least one model (model: ..., task: ...)")
    models = tuple(_model(name, models_section.section(str(name))) for name in models_section.data)
    top.done()
    return PortalConfig(models=models, host=host, port=port, max_upload_mb=max_upload_mb, queue_length=queue_length,
                        warm_up=warm_up, auth=auth, datastore=datastore, source=source)


def _auth(s: _Section) -> AuthConfig:
    if "token" in s.data:
        raise PortalConfigError(f"{s.source}: {s.key('token')}: the token is never written in the configuration; "
                                f"put it in a file (auth.token_file) or an environment variable (auth.token_env)")
    s.used.add("required")
    required = str(s.data.get("required", "auto")).lower()
    if required not in ("auto", "true", "false"):
        raise PortalConfigError(f"{s.source}: {s.key('required')} must be auto, true or false, got {required!r}")
    cfg = AuthConfig(token_file=s.get("token_file", Path, None), token_env=s.get("token_env", str, DEFAULT_TOKEN_ENV),
                     required=required)
    s.done()
    return cfg


def _datastore(s: _Section) -> DatastoreConfig:
    kind = s.get("kind", str, "local")
    if kind not in ("local", "dicomweb"):
        raise PortalConfigError(f"{s.source}: {s.key('kind')} must be local or dicomweb, got {kind!r}")
    cfg = DatastoreConfig(
        kind=kind, cache_dir=s.get("cache_dir", Path, s.source.parent / "portal-cache"),
        cache_max_images=s.positive("cache_max_images", int, 50), cache_max_mb=s.positive("cache_max_mb", float,
                                                                                           20000.0),
        cache_max_age_h=s.positive("cache_max_age_h", float, 24.0), dicomweb_url=s.get("dicomweb_url", str, None),
        store_seg=s.get("store_seg", bool, False), username=s.get("username", str, None),
        password_file=s.get("password_file", Path, None))
    if "password" in s.data:
        raise PortalConfigError(f"{s.source}: {s.key('password')}: put the DICOMweb password in a file "
                                f"({s.key('password_file')}), never in the configuration")
    s.done()
    if kind == "dicomweb" and not cfg.dicomweb_url:
        raise PortalConfigError(f"{s.source}: {s.key('dicomweb_url')} is required for kind dicomweb "
                                f"(e.g. http://orthanc:8042/dicom-web)")
    if cfg.store_seg and kind != "dicomweb":
        raise PortalConfigError(f"{s.source}: {s.key('store_seg')} needs kind dicomweb (a server to store the SEG in)")
    return cfg


def _model(name: Any, s: _Section) -> ModelConfig:
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise PortalConfigError(f"{s.source}: model name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    model, task = s.get("model", Path, None), s.get("task", Path, None)
    for key, value in (("model", model), ("task", task)):
        if value is None:
            raise PortalConfigError(f"{s.source}: {s.key(key)} is required")
    settings = s.get("settings", dict, {})
    for key in ("input", "output", "models", "model", "task_file", "task_name", "uid_seed", "output_format",
                "input_kind"):
        if key in settings:
            raise PortalConfigError(f"{s.source}: {s.key('settings')}.{key} is set by the portal per request or "
                                    f"by {s.key('model')}/{s.key('task')}; remove it")
    cfg = ModelConfig(name=name, model=model, task=task, task_name=s.get("task_name", str, None),
                      description=s.get("description", str, ""), settings=dict(settings))
    s.done()
    return cfg
