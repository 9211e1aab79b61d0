"""Secrets (passwords, tokens) read from a file or the environment, never from the configuration file itself.

A setting that takes a secret accepts three forms, checked in this order:

- ``NAME_file: /run/secrets/x`` -- the file's content, trailing newline stripped (Docker and Kubernetes Secrets
  mount this way);
- ``NAME_env: VARIABLE`` -- the value of that environment variable;
- ``NAME: value`` -- plaintext in the YAML: still accepted; :attr:`Secret.plaintext` lets ``--check`` and the
  start-up log say where to move it (:func:`segmap.service.security.secret_warnings`).

A :class:`Secret` never shows its value in ``repr``/``str``, so a configuration object printed in a log or an error
leaks nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from segmap.errors import ServiceConfigError

#: The largest secret file read (a token or password; anything larger is the wrong file).
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class Secret:
    """A secret value; ``source`` says where it came from (``file /run/secrets/x``, ``env VAR``, ``plaintext``)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"Secret(<hidden>, from {self.source})"

    __str__ = __repr__

    @property
    def plaintext(self) -> bool:
        return self.source == "plaintext"


def read_secret_file(path: str | Path, where: str) -> str:
    """The content of a secret file (one trailing newline stripped); one line naming ``where`` when unreadable."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_SECRET_BYTES:
            raise ServiceConfigError(f"{where}: {p} is larger than {MAX_SECRET_BYTES} bytes: not a secret file")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ServiceConfigError(f"{where}: no such file: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ServiceConfigError(f"{where}: cannot read {p}: {getattr(e, 'strerror', None) or e}") from None
    value = text[:-1] if text.endswith("\n") else text
    value = value[:-1] if value.endswith("\r") else value
    if not value:
        raise ServiceConfigError(f"{where}: {p} is empty")
    return value


def resolve_secret(section: Mapping[str, Any], name: str, where: str,
                   environ: Mapping[str, str] | None = None) -> Secret | None:
    """The secret ``name`` of a configuration ``section`` (``name_file``, ``name_env`` or plaintext ``name``);
    None when none is given. Two forms at once is an error: which one wins would be a guess."""
    environ = os.environ if environ is None else environ
    given = [k for k in (f"{name}_file", f"{name}_env", name) if section.get(k) not in (None, "")]
    if len(given) > 1:
        raise ServiceConfigError(f"{where}: give one of {', '.join(given)}, not several")
    if not given:
        return None
    key = given[0]
    raw = section[key]
    if key.endswith("_file"):
        return Secret(read_secret_file(raw, f"{where}.{key}"), f"file {raw}")
    if key.endswith("_env"):
        value = environ.get(str(raw))
        if not value:
            raise ServiceConfigError(f"{where}.{key}: the environment variable {raw} is not set")
        return Secret(value, f"env {raw}")
    if not isinstance(raw, str):
        raise ServiceConfigError(f"{where}.{key}: expected a string")
    return Secret(raw, "plaintext")
