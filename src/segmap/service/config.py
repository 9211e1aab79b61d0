"""The job service's one configuration file (YAML), read into frozen values and validated.

Every problem is a :class:`~segmap.errors.ServiceConfigError` naming the file and the key (``maps[0].task``,
``destinations.pacs.port``) and what was expected, before anything starts. Paths in the file are relative to the
file's folder. ``example_config()`` is the worked example the README documents and ``segmap serve --example``
prints.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from segmap.errors import ServiceConfigError, SegmapError

_AE = re.compile(r"^[\x21-\x5b\x5d-\x7e ]{1,16}$")  # DICOM AE: up to 16 printable ASCII characters, no backslash
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
RUNNER_KINDS = ("docker", "kubernetes")
ROLES = ("all", "intake", "worker")
DESTINATION_KINDS = ("dicom", "orthanc", "stow")


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8642


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "SEGMAP"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class OrthancConfig:
    url: str
    name: str = "main"
    username: str | None = None
    password: str | None = None
    poll_interval_s: float = 1.0

    @property
    def source(self) -> str:
        return f"orthanc:{self.name}"


@dataclass(frozen=True)
class RunnerConfig:
    kind: str = "docker"
    max_concurrent: int = 1
    cpus: float | None = 2.0
    memory: str | None = "8g"
    timeout_s: float = 1800.0
    gpus: tuple[str, ...] = ()
    #: Kubernetes runner only: namespace, the PersistentVolumeClaim holding the workdir, where it is mounted here.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Trigger:
    """An extra condition on top of the task's rules: DICOM attribute ``tag`` contains ``contains`` (any case)."""

    tag: str
    contains: str


@dataclass(frozen=True)
class MapConfig:
    name: str
    image: str
    task: Path
    task_name: str | None = None
    trigger: Trigger | None = None
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceConfig:
    path: Path
    workdir: Path
    maps: tuple[MapConfig, ...]
    destinations: Mapping[str, Mapping[str, Any]]
    runner: RunnerConfig = RunnerConfig()
    http: HttpConfig = HttpConfig()
    listener: ListenerConfig | None = None
    orthanc: OrthancConfig | None = None
    quiet_period_s: float = 10.0
    max_attempts: int = 3
    retry_backoff_s: float = 30.0
    export_backoff_max_s: float = 300.0
    export_give_up_s: float = 86400.0
    lease_s: float = 60.0
    poll_s: float = 0.5
    worker: str = field(default_factory=socket.gethostname)
    database: str | None = None
    #: What this process does: ``all`` (one machine), ``intake`` (listener/follower and closing series) or
    #: ``worker`` (claim, run, export) -- several workers share one PostgreSQL store and one shared workdir.
    role: str = "all"

    @property
    def does_intake(self) -> bool:
        return self.role in ("all", "intake")

    @property
    def does_work(self) -> bool:
        return self.role in ("all", "worker")

    @property
    def store_path(self) -> Path:
        return self.workdir / "store.sqlite"

    @property
    def store_location(self) -> str | Path:
        """The job store: ``SEGMAP_DATABASE_URL``, else ``service.database``, else a SQLite file in the workdir."""
        import os
        return os.environ.get("SEGMAP_DATABASE_URL") or self.database or self.store_path

    @property
    def spool_dir(self) -> Path:
        return self.workdir / "spool"

    @property
    def jobs_dir(self) -> Path:
        return self.workdir / "jobs"

    def map(self, name: str) -> MapConfig:
        for m in self.maps:
            if m.name == name:
                return m
        raise KeyError(name)


class _Reader:
    """Pulls typed values out of one mapping, naming ``where.key`` in every error."""

    def __init__(self, path: Path, doc: Any, where: str):
        self.path, self.where = path, where
        if doc is None:
            doc = {}
        if not isinstance(doc, Mapping):
            self.fail(where, f"must be a mapping, got {type(doc).__name__}")
        self.doc = dict(doc)
        self.used: set[str] = set()

    def fail(self, key: str, problem: str):
        raise ServiceConfigError(f"{self.path}: {key}: {problem}")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind, default=None, *, required: bool = False, check=None, what: str = ""):
        self.used.add(name)
        if name not in self.doc or self.doc[name] is None:
            if required:
                self.fail(self.key(name), f"is required{f' ({what})' if what else ''}")
            return default
        value = self.doc[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is tuple:
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                self.fail(self.key(name), f"must be a list, got {value!r}")
            value = tuple(str(v) for v in value)
        elif not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            expected = {str: "text", int: "a whole number", float: "a number", bool: "true or false",
                        dict: "a mapping", list: "a list"}.get(kind, kind.__name__)
            self.fail(self.key(name), f"must be {expected}, got {value!r}")
        if check is not None:
            problem = check(value)
            if problem:
                self.fail(self.key(name), problem)
        return value

    def section(self, name: str) -> "_Reader | None":
        self.used.add(name)
        if name not in self.doc:
            return None
        return _Reader(self.path, self.doc[name], self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.doc) - self.used)
        if unknown:
            self.fail(self.key(unknown[0]), f"unknown key (known: {', '.join(sorted(self.used))})")


def _positive(v) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def _not_negative(v) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v}"


def _port(v) -> str | None:
    return None if 0 < v < 65536 else f"must be a TCP port (1-65535), got {v}"


def _ae(v) -> str | None:
    return None if _AE.match(v) and v.strip() else f"must be a DICOM AE title (1-16 characters, no backslash), got {v!r}"


def _name(v) -> str | None:
    return None if _NAME.match(v) else f"must be a name of letters, digits, '.', '_' or '-', got {v!r}"


def _url(v) -> str | None:
    return None if re.match(r"^https?://[^\s/]+", v) else f"must be an http(s):// URL, got {v!r}"


def _peers(values: tuple) -> str | None:
    for v in values:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            return f"must list IP addresses, got {v!r}"
    return None


def _memory(v) -> str | None:
    return None if re.match(r"^\d+(\.\d+)?[kmgKMG]?$", v) else f"must be a size like 8g or 512m, got {v!r}"


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


def parse_config(doc: Any, path: Path) -> ServiceConfig:
    base = path.parent
    top = _Reader(path, doc, "")

    svc = top.section("service") or _Reader(path, {}, "service")
    workdir = Path(svc.get("workdir", str, required=True, what="the folder for the job store, spool and job files"))
    workdir = workdir if workdir.is_absolute() else (base / workdir)
    values: dict[str, Any] = dict(
        quiet_period_s=svc.get("quiet_period_s", float, 10.0, check=_not_negative),
        max_attempts=svc.get("max_attempts", int, 3, check=_positive),
        retry_backoff_s=svc.get("retry_backoff_s", float, 30.0, check=_not_negative),
        export_backoff_max_s=svc.get("export_backoff_max_s", float, 300.0, check=_positive),
        export_give_up_s=svc.get("export_give_up_s", float, 86400.0, check=_positive),
        lease_s=svc.get("lease_s", float, 60.0, check=_positive),
        poll_s=svc.get("poll_s", float, 0.5, check=_positive),
        database=svc.get("database", str, None, check=lambda v: None if v.startswith(("postgresql://", "postgres://"))
                         else f"must be a postgresql:// URL (leave it out for SQLite in the workdir), got {v!r}"),
    )
    values["role"] = svc.get("role", str, "all", check=lambda v: None if v in ROLES else
                             f"must be one of {', '.join(ROLES)}, got {v!r}")
    worker = svc.get("worker", str, None, check=_name)
    if worker:
        values["worker"] = worker
    http = svc.section("http")
    if http is not None:
        values["http"] = HttpConfig(host=http.get("host", str, "127.0.0.1"),
                                    port=http.get("port", int, 8642, check=lambda v: None if v == 0 else _port(v)))
        http.done()
    svc.done()

    listener = top.section("listener")
    if listener is not None:
        values["listener"] = ListenerConfig(
            ae_title=listener.get("ae_title", str, "SEGMAP", check=_ae),
            host=listener.get("host", str, "127.0.0.1"),
            port=listener.get("port", int, 11112, check=_port),
            allowed_calling_ae_titles=listener.get("allowed_calling_ae_titles", tuple, (),
                                                   check=lambda vs: next(filter(None, map(_ae, vs)), None)),
            allowed_peers=listener.get("allowed_peers", tuple, (), check=_peers))
        listener.done()

    orthanc = top.section("orthanc")
    if orthanc is not None:
        values["orthanc"] = OrthancConfig(
            url=orthanc.get("url", str, required=True, check=_url).rstrip("/"),
            name=orthanc.get("name", str, "main", check=_name),
            username=orthanc.get("username", str, None), password=orthanc.get("password", str, None),
            poll_interval_s=orthanc.get("poll_interval_s", float, 1.0, check=_positive))
        orthanc.done()
    if listener is None and orthanc is None and values["role"] != "worker":
        top.fail("listener", "no intake configured: give a 'listener' section, an 'orthanc' section, or both")

    runner = top.section("runner") or _Reader(path, {}, "runner")
    kind = runner.get("kind", str, "docker",
                      check=lambda v: None if v in RUNNER_KINDS else f"must be one of {', '.join(RUNNER_KINDS)}, got {v!r}")
    values["runner"] = RunnerConfig(
        kind=kind,
        max_concurrent=runner.get("max_concurrent", int, 1, check=_positive),
        cpus=runner.get("cpus", float, 2.0, check=_positive),
        memory=runner.get("memory", str, "8g", check=_memory),
        timeout_s=runner.get("timeout_s", float, 1800.0, check=_positive),
        gpus=runner.get("gpus", tuple, ()),
        options=runner.get("kubernetes", dict, {}))
    runner.done()
    if kind == "kubernetes":
        from .runners.kubernetes import KubernetesRunner
        KubernetesRunner.check_options(values["runner"].options, f"{path}: runner.kubernetes")

    destinations: dict[str, Mapping[str, Any]] = {}
    dest_doc = top.get("destinations", dict, {})
    for name, cfg in dest_doc.items():
        key = f"destinations.{name}"
        if _name(str(name)):
            top.fail(key, _name(str(name)))
        if not isinstance(cfg, Mapping):
            top.fail(key, f"must be a mapping with a 'kind' ({', '.join(DESTINATION_KINDS)}), got {cfg!r}")
        if cfg.get("kind") not in DESTINATION_KINDS:
            top.fail(f"{key}.kind", f"must be one of {', '.join(DESTINATION_KINDS)}, got {cfg.get('kind')!r}")
        from .export import make_destination
        try:
            make_destination(str(name), cfg)  # checks every key without contacting the destination
        except ServiceConfigError as e:
            raise ServiceConfigError(f"{path}: {e}") from None
        destinations[str(name)] = dict(cfg)

    maps_doc = top.get("maps", list, required=True, what="a list of MAPs with name, image and task")
    if not maps_doc:
        top.fail("maps", "must list at least one MAP")
    maps = []
    for i, m in enumerate(maps_doc):
        r = _Reader(path, m, f"maps[{i}]")
        task = Path(r.get("task", str, required=True, what="the MAP's Segmentation Task file, whose rules route series"))
        task = task if task.is_absolute() else base / task
        if not task.is_file():
            r.fail(r.key("task"), f"no such file: {task}")
        trigger = None
        t = r.section("trigger")
        if t is not None:
            trigger = Trigger(tag=t.get("tag", str, required=True), contains=t.get("contains", str, required=True))
            from pydicom.datadict import tag_for_keyword
            if tag_for_keyword(trigger.tag) is None:
                t.fail(t.key("tag"), f"is not a DICOM keyword: {trigger.tag!r}")
            t.done()
        dests = r.get("destinations", tuple, ())
        for d in dests:
            if d not in destinations:
                r.fail(r.key("destinations"), f"names {d!r}, which is not under 'destinations' "
                                              f"(known: {', '.join(destinations) or 'none'})")
        maps.append(MapConfig(name=r.get("name", str, required=True, check=_name),
                              image=r.get("image", str, required=True),
                              task=task, task_name=r.get("task_name", str, None), trigger=trigger,
                              destinations=dests))
        r.done()
    names = [m.name for m in maps]
    if len(set(names)) != len(names):
        top.fail("maps", f"MAP names must be unique, got {names}")
    top.done()

    # The task files must load and carry rules for DICOM series: found now, not when the first series arrives.
    from segmap.tasks import load_task
    for i, m in enumerate(maps):
        try:
            task = load_task(m.task, m.task_name)
        except SegmapError as e:
            top.fail(f"maps[{i}].task", str(e))
        if not all(mod.rules for mod in task.modalities):
            top.fail(f"maps[{i}].task", f"task '{task.name}' in {m.task} has no Rules_Text, so no series can be "
                                        f"routed to it")
    return ServiceConfig(path=path, workdir=workdir, maps=tuple(maps), destinations=destinations, **values)


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
    image: segmap/spleen:latest     # built with `segmap package`
    task: spleen.yaml               # its Rules_Text decides which series run
    destinations: [orthanc]
destinations:
  orthanc: {kind: orthanc, url: http://127.0.0.1:8042}
"""
