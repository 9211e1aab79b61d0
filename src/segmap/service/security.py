"""What the job service exposes and with which secrets: web authentication, refusal of unsafe binds, secret sources.

Three questions, answered from the configuration before anything listens:

- **Who may read the pages?** :func:`web_auth` builds the :class:`~segmap.webauth.WebAuth` of ``service.http.auth``
  (a bearer token and/or basic credentials, each from a file or an environment variable -- never from the YAML).
- **Is the service exposed without protection?** :func:`exposure_problems` names, one line each, a non-loopback
  job page without authentication and a non-loopback DICOM listener with neither ``allowed_peers`` nor TLS
  (``listener.tls``). ``segmap serve`` refuses to start on them unless ``service.insecure: true`` says the site
  accepts it, which is logged as a warning at every start.
- **Where do the secrets come from?** :func:`resolve_config_secrets` reads every password of the file
  (``orthanc.password``, ``destinations.<name>.password``, the ``service.database`` URL, the web token and password)
  from ``X_file``/``X_env`` (:func:`segmap.credentials.resolve_secret`) and remembers where each came from, so that
  ``serve --check`` can name those left in plaintext.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import parse_qs, urlsplit

from segmap.credentials import Secret, resolve_secret
from segmap.privacy import SECRET_KEYS
from segmap.webauth import WebAuth, is_loopback

if TYPE_CHECKING:
    from .config import ServiceConfig

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

    for key in ("orthanc",):
        if isinstance(doc.get(key), Mapping):
            doc[key] = dict(doc[key])
            resolve(doc[key], "password", key)
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


def web_auth(config: "ServiceConfig") -> WebAuth:
    """Who may read the job page, ``/api/jobs``, ``/metrics`` and ``/healthz`` (nobody is asked when none is set)."""
    auth = config.http.auth
    if auth is None:
        return WebAuth()
    token, password = config.secrets.get(WEB_TOKEN), config.secrets.get(WEB_PASSWORD)
    return WebAuth(tokens=(token.value,) if token else (), user=auth.user if password else None,
                   password=password.value if password else None)


def exposure_problems(config: "ServiceConfig") -> list[str]:
    """One line per way this configuration exposes the service without protection, naming the setting to add."""
    problems = []
    http = config.http
    if http.port and not is_loopback(http.host) and not web_auth(config).enabled:
        problems.append(f"service.http.auth: the job page binds {http.host}:{http.port} (not loopback) without "
                        f"authentication; add service.http.auth.token_file (or token_env, or user with "
                        f"password_file) or bind 127.0.0.1")
    listener = config.listener
    # listener.tls is the listener's TLS section (DICOM TLS); a configuration without it has no such attribute.
    if (listener is not None and config.does_intake and not is_loopback(listener.host)
            and not listener.allowed_peers and getattr(listener, "tls", None) is None):
        problems.append(f"listener.allowed_peers: the DICOM listener binds {listener.host}:{listener.port} (not "
                        f"loopback) and accepts any peer without TLS; add listener.allowed_peers (the senders' IP "
                        f"addresses) or listener.tls")
    return problems


def secret_warnings(config: "ServiceConfig") -> list[str]:
    """One line per secret written into the configuration file, saying where to move it. Worded without
    ``password:`` (credentials.plaintext_warnings' form), which the log redaction would take for a secret's value."""
    return [f"{where} is written in the configuration file in plaintext; move it to {where.rpartition('.')[2]}_file "
            f"(a mounted Secret) or {where.rpartition('.')[2]}_env"
            for where, secret in config.secrets.items() if secret.plaintext]
