"""What the job service exposes and with which secrets: web authentication, refusal of unsafe binds, secret sources.

Three questions, answered from the configuration before anything listens:

- **Who may read the pages?** :func:`web_auth` builds the :class:`~segmap.webauth.WebAuth` of ``service.http.auth``
  (a bearer token and/or basic credentials, each from a file or an environment variable -- never from the YAML).
- **Is the service exposed without protection?** :func:`exposure_problems` names, one line each, a non-loopback
  job page without authentication and a non-loopback DICOM listener with neither ``allowed_peers`` nor TLS
  (``listener.tls``). ``segmap serve`` refuses to start on them unless ``service.insecure: true`` says the site
  accepts it, which is logged as a warning at every start.
- **Where do the secrets come from?** :func:`~segmap.service.config.resolve_config_secrets` reads every password
  of the file (``orthanc.password``, ``destinations.<name>.password``, the ``service.database`` URL, the web token
  and password) from ``X_file``/``X_env`` (:func:`segmap.credentials.resolve_secret`) and remembers where each came
  from; :func:`secret_warnings` names those left in plaintext for ``serve --check`` and the start-up log.
"""

from __future__ import annotations

from segmap.webauth import WebAuth, is_loopback

from .config import WEB_PASSWORD, WEB_TOKEN, ServiceConfig

def web_auth(config: ServiceConfig) -> WebAuth:
    """Who may read the job page, ``/api/jobs``, ``/metrics`` and ``/healthz`` (nobody is asked when none is set)."""
    auth = config.http.auth
    if auth is None:
        return WebAuth()
    token, password = config.secrets.get(WEB_TOKEN), config.secrets.get(WEB_PASSWORD)
    return WebAuth(tokens=(token.value,) if token else (), user=auth.user if password else None,
                   password=password.value if password else None)


def exposure_problems(config: ServiceConfig) -> list[str]:
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


def secret_warnings(config: ServiceConfig) -> list[str]:
    """One line per secret written into the configuration file, saying where to move it. Worded without
    ``password:`` (credentials.plaintext_warnings' form), which the log redaction would take for a secret's value."""
    return [f"{where} is written in the configuration file in plaintext; move it to {where.rpartition('.')[2]}_file "
            f"(a mounted Secret) or {where.rpartition('.')[2]}_env"
            for where, secret in config.secrets.items() if secret.plaintext]
