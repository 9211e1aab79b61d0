"""The job service's one configuration file (YAML), read into frozen values and validated.

Each section is a dataclass whose fields declare their key, type, default and help text once
(:func:`~segmap.service.schema.setting`); :func:`~segmap.service.schema.read_section` is the one reader, for these
sections, for each destination kind (:data:`~segmap.service.export.DESTINATIONS`) and for ``runner.kubernetes``
(:mod:`~segmap.service.runners.options`), and :func:`reference_table` lists every key. Reading a file imports no
runner's client library.

Every problem is a :class:`~segmap.errors.ServiceConfigError` naming the file and the key (``maps[0].task``,
``destinations.pacs.port``) and what was expected, before anything starts. Paths in the file are relative to the
file's folder. :data:`EXAMPLE` is the worked example the README documents and ``segmap serve --example`` prints; it
passes its own ``--check``.

Secrets (passwords, the database URL, the web token) may come from a file or the environment: ``password_file:``,
``password_env:`` and so on, read by :func:`resolve_config_secrets`; :attr:`ServiceConfig.secrets` says where each
came from (:mod:`.security` warns about those written in plaintext).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

import yaml
from pydicom.datadict import tag_for_keyword

from segmap.credentials import Secret, resolve_secret
from segmap.privacy import SECRET_KEYS
from segmap.errors import SegmapError, ServiceConfigError
from segmap.tasks import load_task

from . import schema
from .export import DESTINATIONS, make_destination
from .runners import RUNNERS
from .runners.docker import DockerOptions
from .runners.options import KubernetesOptions
from .schema import fail, read_section, setting
from .workspace import Workspace

RUNNER_KINDS = tuple(RUNNERS)
ROLES = ("all", "intake", "worker")
DESTINATION_KINDS = tuple(DESTINATIONS)


@dataclass(frozen=True)
class WebAuthConfig:
    """Who may read the job page, /api/jobs, /metrics and /healthz; secrets from a file or the environment only."""

    token_file: str | None = setting(None, "a file holding the bearer token (a mounted Secret)")
    token_env: str | None = setting(None, "an environment variable holding the bearer token")
    user: str | None = setting(None, "HTTP basic user (with password_file or password_env)")
    password_file: str | None = setting(None, "a file holding the basic-auth password")
    password_env: str | None = setting(None, "an environment variable holding the basic-auth password")


def _check_viewer_url(value: Any) -> str | None:
    """None when ``value`` is a usable viewer URL template, else what is wrong with it."""
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) or "{study_uid}" not in value:
        return "must be an http(s) URL with {study_uid} in it"
    try:
        value.format(study_uid="1.2", series_uid="1.2", seg_series_uid="1.2")
    except (KeyError, IndexError, ValueError) as e:
        return f"has a placeholder other than {{study_uid}}, {{series_uid}}, {{seg_series_uid}} ({e})"
    return None


@dataclass(frozen=True)
class HttpConfig:
    host: str = setting("127.0.0.1", "address of the job page, /metrics and /healthz")
    port: int = setting(8642, "its port (0: no web server)", check=lambda v: None if v == 0 else schema.port(v))
    auth: WebAuthConfig | None = setting(None, "web authentication: bearer token and/or basic credentials")
    viewer_url: str | None = setting(None, "the viewer's address of a study, linked from each done job: a URL with "
                                     "{study_uid} (and optionally {series_uid}, the SEG's {seg_series_uid}), e.g. "
                                     "OHIF behind Orthanc: http://pacs:8042/viewer?StudyInstanceUIDs={study_uid}",
                                     check=_check_viewer_url)


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = setting("SEGMAP", "our AE title", check=schema.ae_title)
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(11112, "DICOM port", check=schema.port)
    allowed_calling_ae_titles: tuple[str, ...] = setting((), "calling AE titles accepted (empty: any)",
                                                         check=schema.ae_titles)
    allowed_peers: tuple[str, ...] = setting((), "peer IP addresses accepted (empty: any)", check=schema.peers)
    # -- DICOM TLS and resource bounds (svc-edge) --
    tls: schema.TlsConfig | None = setting(None, "DICOM TLS: cert, key, ca, require_client_cert (none: plain)")
    max_instance_bytes: int = setting(2 << 30, "largest data set accepted per instance, in bytes (a deflated one "
                                      "by its inflated size); larger ones get C-STORE status 0xA700",
                                      check=schema.positive)
    max_associations: int = setting(16, "associations served at once (more are rejected)", check=schema.positive)
    first_pdu_timeout_s: float = setting(5.0, "seconds a new connection may stay silent before it is closed",
                                         check=schema.positive)
    acse_timeout_s: float = setting(10.0, "seconds to complete association set-up (and a TLS handshake)",
                                    check=schema.positive)
    network_timeout_s: float = setting(60.0, "seconds an association may wait for the peer's next message",
                                       check=schema.positive)


@dataclass(frozen=True)
class OrthancConfig:
    url: str = setting(help="the Orthanc whose /changes are followed", check=schema.url,
                       convert=lambda v: v.rstrip("/"))
    name: str = setting("main", "names this intake source (orthanc:NAME)", check=schema.name)
    username: str | None = setting(None, "HTTP basic-auth user")
    password: str | None = setting(None, "HTTP basic-auth password")
    poll_interval_s: float = setting(1.0, "seconds between reads of /changes", check=schema.positive)

    @property
    def source(self) -> str:
        return f"orthanc:{self.name}"


@dataclass(frozen=True)
class RunnerConfig:
    kind: str = setting("docker", "docker or kubernetes", check=schema.one_of(RUNNER_KINDS))
    max_concurrent: int = setting(1, "runs at once (one per GPU)", check=schema.positive)
    cpus: float | None = setting(2.0, "CPUs per run", check=schema.positive)
    memory: str | None = setting("8g", "memory per run", check=schema.memory)
    timeout_s: float = setting(1800.0, "seconds a run may take", check=schema.positive)
    gpus: tuple[str, ...] = setting((), "GPU device ids, e.g. [\"0\"] (NVIDIA container toolkit)")
    #: Kubernetes runner only: namespace, the PersistentVolumeClaim holding the workdir, where it is mounted here.
    options: KubernetesOptions | None = setting(None, "the Kubernetes runner's options", key="kubernetes")
    #: Docker runner only: pids limit, read-only root with a tmpfs, output cap (svc-edge).
    docker: DockerOptions | None = setting(None, "the Docker runner's bounds on each MAP container")


@dataclass(frozen=True)
class Trigger:
    """An extra condition on top of the task's rules: DICOM attribute ``tag`` contains ``contains`` (any case)."""

    tag: str = setting(help="a DICOM keyword",
                       check=lambda v: None if tag_for_keyword(v) is not None else f"is not a DICOM keyword: {v!r}")
    contains: str = setting(help="text the attribute must contain (any case)")


@dataclass(frozen=True)
class MapConfig:
    name: str = setting(help="names the MAP in jobs and logs", check=schema.name)
    image: str = setting(help="the MAP's container image (built with segmap package)")
    task: Path = setting(help="the MAP's Segmentation Task file, whose rules route series")
    task_name: str | None = setting(None, "which task of the file, when it holds several")
    trigger: Trigger | None = setting(None, "an extra condition on a DICOM attribute")
    destinations: tuple[str, ...] = setting((), "where results go (names under destinations)")


@dataclass(frozen=True)
class ServiceConfig:
    """The whole file. The keys of the ``service:`` section are this class's fields that carry help text; the
    other sections are the nested values (read by :func:`parse_config`)."""

    path: Path
    workdir: Path = setting(help="the folder for the job store, spool and job files")
    maps: tuple[MapConfig, ...] = ()
    destinations: Mapping[str, Mapping[str, Any]] = None  # type: ignore[assignment]  # set by parse_config
    runner: RunnerConfig = RunnerConfig()
    http: HttpConfig = setting(HttpConfig(), "the job page")
    listener: ListenerConfig | None = None
    orthanc: OrthancConfig | None = None
    quiet_period_s: float = setting(10.0, "a series is complete after this long without a new instance",
                                    check=schema.not_negative)
    max_attempts: int = setting(3, "runs per job before it is failed", check=schema.positive)
    retry_backoff_s: float = setting(30.0, "seconds before the first retry (doubling after)",
                                     check=schema.not_negative)
    export_backoff_max_s: float = setting(300.0, "longest wait between export tries", check=schema.positive)
    export_give_up_s: float = setting(86400.0, "seconds of failed export tries before the job fails",
                                      check=schema.positive)
    lease_s: float = setting(60.0, "seconds a worker holds a job without renewing", check=schema.positive)
    poll_s: float = setting(0.5, "seconds between ticks of the service loop", check=schema.positive)
    worker: str = setting(help="this worker's name (default: the host name)", check=schema.name,
                          factory=socket.gethostname)
    database: str | None = setting(None, "a postgresql:// URL (leave it out for SQLite in the workdir)",
                                   check=lambda v: None if v.startswith(("postgresql://", "postgres://")) else
                                   f"must be a postgresql:// URL (leave it out for SQLite in the workdir), got {v!r}")
    #: What this process does: ``all`` (one machine), ``intake`` (listener/follower and closing series) or
    #: ``worker`` (claim, run, export) -- several workers share one PostgreSQL store and one shared workdir.
    role: str = setting("all", "all, intake (listener/follower) or worker (claim, run, export)",
                        check=schema.one_of(ROLES))
    #: Start although exposed without protection (security.exposure_problems); logged as a warning at each start.
    insecure: bool = setting(False, "start even when the job page or the listener is exposed without protection")
    #: Where each secret of the file came from (security.resolve_config_secrets); values hidden in repr.
    secrets: Mapping[str, Secret] = dataclasses.field(default_factory=dict, repr=False)

    # Study-level jobs (multi-modality MAPs, :mod:`.studies`).
    study_give_up_s: float = setting(86400.0, "seconds a study of a multi-modality MAP may wait for a missing "
                                              "modality before it is failed", check=schema.positive)

    # -- a bounded workdir, and series that cannot be closed yet (issue 20) --
    free_space_floor_mb: float = setting(1024.0, "below this much free space (MiB) where the workdir lies, the "
                                         "listener answers C-STORE with 0xA700 and the Orthanc follower pauses "
                                         "(0: no floor)", check=schema.not_negative)
    retain_done_days: float = setting(7.0, "days after which a done job's images and outputs are deleted (its "
                                      "record and history stay; 0: kept for ever)", check=schema.not_negative)
    retain_failed_days: float = setting(30.0, "the same for failed and cancelled jobs (0: kept for ever)",
                                        check=schema.not_negative)
    close_retry_max_s: float = setting(300.0, "longest wait between tries to close a series that could not be "
                                       "closed (Orthanc or the engine down, the image missing)",
                                       check=schema.positive)

    @property
    def does_intake(self) -> bool:
        return self.role in ("all", "intake")

    @property
    def does_work(self) -> bool:
        return self.role in ("all", "worker")

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.workdir)

    @property
    def store_location(self) -> str | Path:
        """The job store: ``SEGMAP_DATABASE_URL``, else ``service.database``, else a SQLite file in the workdir."""
        return os.environ.get("SEGMAP_DATABASE_URL") or self.database or self.workspace.store_path

    def map(self, name: str) -> MapConfig:
        for m in self.maps:
            if m.name == name:
                return m
        raise KeyError(name)


#: The top-level sections of the file.
SECTIONS = ("service", "listener", "orthanc", "runner", "maps", "destinations")


def reference_table() -> list[dict]:
    """Every key of the file: name, type, default, whether required, help -- from the declarations above (and each
    destination kind's class), for the documentation."""
    rows = schema.reference(ServiceConfig, "service")
    for key, cls in (("listener", ListenerConfig), ("orthanc", OrthancConfig), ("runner", RunnerConfig),
                     ("maps[]", MapConfig)):
        rows += schema.reference(cls, key)
    for kind, cls in DESTINATIONS.items():
        rows += schema.reference(cls, f"destinations.<{kind}>")
    # Each secret's file and environment forms (resolve_config_secrets), read instead of the plaintext key.
    plain = {r["name"] for r in rows}
    for row in [r for r in rows if r["name"].rpartition(".")[2] in SECRET_SETTINGS]:
        for form, kind, words in (("file", "a path", "a file holding"),
                                  ("env", "text", "an environment variable holding")):
            name = f"{row['name']}_{form}"
            if name not in plain:
                rows.append({"name": name, "type": kind, "default": None, "required": False,
                             "help": f"{words} {row['name']} (instead of writing it in this file)"})
    return rows


def load_config(path: str | Path) -> ServiceConfig:
    """Read and validate the service configuration file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ServiceConfigError(f"{path}: cannot read the service configuration: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ServiceConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_config(doc, path)


def _under(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else base / p


def parse_config(doc: Any, path: Path) -> ServiceConfig:
    base = path.parent
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        fail(path, "", f"must be a mapping, got {type(doc).__name__}")
    doc, secrets = resolve_config_secrets(doc, path)
    unknown = sorted(set(map(str, doc)) - set(SECTIONS))
    if unknown:
        fail(path, unknown[0], f"unknown key (known: {', '.join(sorted(SECTIONS))})")
    sections = {name: read_section(cls, doc[key], key, path) if doc.get(key) is not None else None
                for name, key, cls in (("listener", "listener", ListenerConfig),
                                       ("orthanc", "orthanc", OrthancConfig), ("runner", "runner", RunnerConfig))}
    if sections["runner"] is None:
        sections["runner"] = RunnerConfig()
    _check_tls(sections["listener"], base, path)
    if sections["runner"].kind == "kubernetes" and sections["runner"].options is None:
        fail(path, "runner.kubernetes.pvc_name", "is required (the PersistentVolumeClaim that holds the service's "
                                                 "workdir and is mounted into every MAP pod)")

    destinations: dict[str, Mapping[str, Any]] = {}
    dest_doc = doc.get("destinations") or {}
    if not isinstance(dest_doc, Mapping):
        fail(path, "destinations", f"must be a mapping, got {dest_doc!r}")
    for name, cfg in dest_doc.items():
        if schema.name(str(name)):
            fail(path, f"destinations.{name}", schema.name(str(name)))
        if isinstance(cfg, Mapping):
            cfg = _tls_under(dict(cfg), base)
        try:
            make_destination(str(name), cfg)  # checks every key without contacting the destination
        except ServiceConfigError as e:
            raise ServiceConfigError(f"{path}: {e}") from None
        destinations[str(name)] = dict(cfg)

    maps_doc = doc.get("maps")
    if maps_doc is None:
        fail(path, "maps", "is required (a list of MAPs with name, image and task)")
    if not isinstance(maps_doc, list):
        fail(path, "maps", f"must be a list, got {maps_doc!r}")
    if not maps_doc:
        fail(path, "maps", "must list at least one MAP")
    maps = []
    for i, m in enumerate(maps_doc):
        mc = read_section(MapConfig, m, f"maps[{i}]", path)
        mc = MapConfig(**{**mc.__dict__, "task": _under(base, Path(mc.task))})
        if not mc.task.is_file():
            fail(path, f"maps[{i}].task", f"no such file: {mc.task}")
        for d in mc.destinations:
            if d not in destinations:
                fail(path, f"maps[{i}].destinations", f"names {d!r}, which is not under 'destinations' "
                                                      f"(known: {', '.join(destinations) or 'none'})")
        maps.append(mc)
    names = [m.name for m in maps]
    if len(set(names)) != len(names):
        fail(path, "maps", f"MAP names must be unique, got {names}")

    svc_doc = doc.get("service")
    config = read_section(ServiceConfig, svc_doc, "service", path, path=path, maps=tuple(maps),
                          destinations=destinations, **{k: v for k, v in sections.items() if v is not None})
    config = ServiceConfig(**{**config.__dict__, "workdir": _under(base, Path(config.workdir))})
    config = dataclasses.replace(config, secrets=secrets)
    auth = config.http.auth
    if auth is not None and (auth.user is None) != (secrets.get(WEB_PASSWORD) is None):
        fail(path, "service.http.auth", "give user together with password_file (or password_env)")
    if auth is not None and not (secrets.get(WEB_TOKEN) or secrets.get(WEB_PASSWORD)):
        fail(path, "service.http.auth", "give token_file or token_env, or user with password_file or password_env")
    if config.listener is None and config.orthanc is None and config.role != "worker":
        fail(path, "listener", "no intake configured: give a 'listener' section, an 'orthanc' section, or both")

    # The task files must load and carry rules for DICOM series: found now, not when the first series arrives.
    for i, m in enumerate(maps):
        try:
            task = load_task(m.task, m.task_name)
        except SegmapError as e:
            fail(path, f"maps[{i}].task", str(e))
        if not all(mod.rules for mod in task.modalities):
            fail(path, f"maps[{i}].task", f"task '{task.name}' in {m.task} has no Rules_Text, so no series can be "
                                          f"routed to it")
    return config


# -- DICOM TLS (svc-edge) ---------------------------------------------------------------------------------------


def _check_tls(listener: ListenerConfig | None, base: Path, path: Path) -> None:
    """The listener's certificate, key and CA load (found at --check, not at the first association)."""
    if listener is None or listener.tls is None:
        return
    from segmap.tls import server_context

    try:
        server_context(listener.tls.files("listener.tls", base))
    except ServiceConfigError as e:
        raise ServiceConfigError(f"{path}: {e}") from None


def _tls_under(cfg: dict, base: Path) -> dict:
    """A destination's ``tls`` paths made absolute (relative ones are under the configuration file's folder)."""
    tls = cfg.get("tls")
    if isinstance(tls, Mapping):
        cfg["tls"] = {k: str(_under(base, Path(v))) if k in ("cert", "key", "ca") and isinstance(v, str) else v
                      for k, v in tls.items()}
    return cfg


#: The spleen task shipped inside the package (segmap.demo.run.DEMO_TASK, the file tasks/spleen.yaml points to), named
#: by its absolute path in the example so that the printed file passes ``--check`` wherever it is saved.
EXAMPLE_TASK = Path(__file__).resolve().parents[1] / "demo" / "model" / "spleen.yaml"

# ------------------------------------------------------------------------------------------------ secrets
#: The keys whose value is a secret, read by resolve_config_secrets from ``KEY_file``/``KEY_env`` too.
SECRET_SETTINGS = ("password", "database")
#: The web credentials' names in :attr:`ServiceConfig.secrets`.
WEB_TOKEN, WEB_PASSWORD = "service.http.auth.token", "service.http.auth.password"


def resolve_config_secrets(doc: Any, path=None, environ: Mapping[str, str] | None = None
                           ) -> tuple[Any, dict[str, Secret]]:
    """``doc`` (the parsed YAML) with every ``password_file``/``password_env`` (and ``database_file``/``database_env``)
    replaced by the secret's value under the plain key, and ``{where: Secret}`` of every secret found. The web
    credentials stay where they are (their section declares only the file and environment forms)."""
    if not isinstance(doc, Mapping):
        return doc, {}
    doc = copy.deepcopy(dict(doc))
    secrets: dict[str, Secret | None] = {}

    def resolve(section: Any, name: str, where: str, replace: bool = True) -> None:
        if not isinstance(section, dict):
            return
        secret = resolve_secret(section, name, where if path is None else f"{path}: {where}", environ)
        if secret is None:
            return
        secrets[f"{where}.{name}"] = secret
        if replace:
            for key in (f"{name}_file", f"{name}_env"):
                section.pop(key, None)
            section[name] = secret.value

    if isinstance(doc.get("orthanc"), Mapping):
        doc["orthanc"] = dict(doc["orthanc"])
        resolve(doc["orthanc"], "password", "orthanc")
    if isinstance(doc.get("destinations"), Mapping):
        doc["destinations"] = {name: dict(cfg) if isinstance(cfg, Mapping) else cfg
                               for name, cfg in doc["destinations"].items()}
        for name, cfg in doc["destinations"].items():
            resolve(cfg, "password", f"destinations.{name}")
    service = doc.get("service")
    if isinstance(service, Mapping):
        doc["service"] = service = dict(service)
        resolve(service, "database", "service")
        database = secrets.get("service.database")
        if database is not None and database.plaintext and not url_has_password(database.value):
            del secrets["service.database"]  # a URL without a password is not a secret
        http = service.get("http")
        auth = http.get("auth") if isinstance(http, Mapping) else None
        if isinstance(auth, Mapping):
            for name in ("token", "password"):
                given = {k: v for k, v in auth.items() if k in (f"{name}_file", f"{name}_env")}
                resolve(dict(given), name, "service.http.auth", replace=False)
    return doc, {k: v for k, v in secrets.items() if v is not None}


def url_has_password(url: str) -> bool:
    """Whether a URL carries a password: in its user-info or as a ``password=``-style query value."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    query = {k.lower() for k in parse_qs(parts.query)}
    return parts.password is not None or bool(query & set(SECRET_KEYS))


EXAMPLE = """\
# segmap serve: a series reaches Orthanc, the spleen MAP runs, the SEG goes back into Orthanc.
service:
  workdir: /var/lib/segmap          # job store (SQLite), spool, per-job input/output/logs
  quiet_period_s: 10                # a series is complete after this long without a new instance
  max_attempts: 3                   # runs per job before it is failed
  http: {host: 127.0.0.1, port: 8642}   # job page, /metrics, /healthz (localhost only by default)
listener:                           # DICOM C-STORE intake (optional)
  ae_title: SEGMAP
  host: 127.0.0.1
  port: 11112
  allowed_calling_ae_titles: [ORTHANC, CT_SCANNER]
orthanc:                            # follow Orthanc's /changes feed (optional)
  url: http://127.0.0.1:8042
runner:
  kind: docker
  max_concurrent: 1                 # containers at once (one per GPU)
  cpus: 2
  memory: 8g
  timeout_s: 1800
  gpus: []                          # e.g. ["0"] with the NVIDIA container toolkit
maps:
  - name: spleen
    image: segmap/spleen:0.1        # built with `segmap package ... --tag segmap/spleen:0.1` (README, docs/service.md)
    # The task file the image was packaged with (here segmap's own copy of tasks/spleen.yaml): its Rules_Text
    # decides which series run. A relative path is taken from this file's folder.
    task: @EXAMPLE_TASK@
    destinations: [orthanc]
destinations:
  orthanc: {kind: orthanc, url: http://127.0.0.1:8042}
""".replace("@EXAMPLE_TASK@", str(EXAMPLE_TASK))
