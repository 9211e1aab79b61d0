"""How a section of the service configuration is declared and read: one dataclass per section, one reader.

A field declared with :func:`setting` is a configuration key: its name, type (from the annotation), default (the
dataclass default, declared nowhere else) and help text are all on the field, so a reference table of every
service setting can be generated from the dataclasses (:func:`reference`). :func:`read_section` is the only reader:
it checks the types, runs each field's ``check`` and refuses unknown keys, raising
:class:`~segmap.errors.ServiceConfigError` that names ``file: where.key`` and what was expected.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import ipaddress
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

from segmap.errors import ServiceConfigError

_AE = re.compile(r"^[\x21-\x5b\x5d-\x7e ]{1,16}$")  # DICOM AE: up to 16 printable ASCII characters, no backslash
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

Check = Callable[[Any], "str | None"]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None,
            key: str | None = None, convert: Callable[[Any], Any] | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A configuration key (see the module docstring). ``check`` returns a problem or None; ``key`` is the YAML key
    when it is not the field's name; ``convert`` turns the checked value into the stored one. No default: the key
    is required."""
    meta = {"help": help, "check": check, "key": key, "convert": convert}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def settings_of(cls) -> list[tuple[dataclasses.Field, str, Any]]:
    """(field, YAML key, type) of each configuration key of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata.get("key") or f.name, hints[f.name]) for f in dataclasses.fields(cls)
            if "help" in f.metadata]


def reference(cls, where: str = "") -> list[dict]:
    """One row per key of ``cls`` and its nested sections: name, type, default, help (for the documentation)."""
    rows = []
    for f, key, kind in settings_of(cls):
        name = f"{where}.{key}" if where else key
        base = _base(kind)
        if dataclasses.is_dataclass(base):
            rows += reference(base, name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append({"name": name, "type": _words(base), "default": default,
                     "required": f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                     "help": f.metadata["help"]})
    return rows


def _base(kind):
    """``X | None`` -> X; ``tuple[str, ...]`` -> tuple; ``dict[...]``/``Mapping[...]`` -> dict."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        return tuple
    if origin in (dict, collections.abc.Mapping) or kind is dict:
        return dict
    return kind


def _words(kind) -> str:
    return {str: "text", int: "a whole number", float: "a number", bool: "true or false", dict: "a mapping",
            tuple: "a list", Path: "a path"}.get(kind, getattr(kind, "__name__", str(kind)))


def fail(path: Path | None, key: str, problem: str):
    raise ServiceConfigError(f"{path}: {key}: {problem}" if path is not None else f"{key}: {problem}")


def read_section(cls, doc: Any, where: str, path: Path | None, /, *, ignore: tuple[str, ...] = (), **given) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``doc`` (``where`` names it in errors). Keys left out get the
    dataclass's default; ``given`` are values of fields that are not read from the file; ``ignore`` are keys that
    may be present and are not fields (a destination's ``kind``). A field whose type is a dataclass is a section,
    read the same way."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        fail(path, where, f"must be a mapping, got {type(doc).__name__}")
    known = settings_of(cls)
    keys = {key for _, key, _ in known} | set(ignore)
    unknown = sorted(set(map(str, doc)) - keys)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        fail(path, name, f"unknown key (known: {', '.join(sorted(keys))})")
    values = dict(given)
    for f, key, kind in known:
        name = f"{where}.{key}" if where else key
        base = _base(kind)
        if dataclasses.is_dataclass(base):
            if doc.get(key) is not None:
                values[f.name] = read_section(base, doc[key], name, path)
            continue
        if doc.get(key) is None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                fail(path, name, f"is required{' (' + f.metadata['help'] + ')' if f.metadata['help'] else ''}")
            continue
        value = _typed(doc[key], base, path, name)
        problem = f.metadata["check"](value) if f.metadata["check"] else None
        if problem:
            fail(path, name, problem)
        values[f.name] = f.metadata["convert"](value) if f.metadata["convert"] else value
    return cls(**values)


def _typed(value: Any, kind, path: Path | None, name: str) -> Any:
    if kind is Path:
        kind = str
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            fail(path, name, f"must be a list, got {value!r}")
        return tuple(str(v) for v in value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        fail(path, name, f"must be {_words(kind)}, got {value!r}")
    return dict(value) if kind is dict else value


# ------------------------------------------------------------------------------------------------ checks


def positive(v) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def not_negative(v) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v}"


def port(v) -> str | None:
    return None if 0 < v < 65536 else f"must be a TCP port (1-65535), got {v}"


def ae_title(v) -> str | None:
    if _AE.match(v) and v.strip():
        return None
    return f"must be a DICOM AE title (1-16 characters, no backslash), got {v!r}"


def ae_titles(values) -> str | None:
    return next(filter(None, map(ae_title, values)), None)


def name(v) -> str | None:
    return None if _NAME.match(v) else f"must be a name of letters, digits, '.', '_' or '-', got {v!r}"


def url(v) -> str | None:
    return None if re.match(r"^https?://[^\s/]+", v) else f"must be an http(s):// URL, got {v!r}"


def peers(values: tuple) -> str | None:
    for v in values:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            return f"must list IP addresses, got {v!r}"
    return None


def memory(v) -> str | None:
    return None if re.match(r"^\d+(\.\d+)?[kmgKMG]?$", v) else f"must be a size like 8g or 512m, got {v!r}"


def dns_label(v) -> str | None:
    return None if _DNS_LABEL.match(v) else f"must be a DNS-1123 label (lower-case letters, digits, '-'), got {v!r}"


def one_of(choices) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def text(v) -> str | None:
    return None if v.strip() else "is required (empty)"


# ------------------------------------------------------------------------------------------------ DICOM TLS
# A section shared by the listener (``listener.tls``) and a C-STORE destination (``destinations.<name>.tls``).


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS (PS3.15 Annex B): PEM files; relative paths are under the configuration file's folder."""

    cert: Path | None = setting(None, "our certificate (PEM)")
    key: Path | None = setting(None, "its private key (PEM, unencrypted)")
    ca: Path | None = setting(None, "the CA certificate(s) that sign the peers' certificates (PEM)")
    require_client_cert: bool = setting(False, "listener: refuse a sender without a certificate signed by ca")

    def files(self, where: str, base: Path | None = None):
        """The :class:`segmap.tls.TlsFiles` for these settings (``where`` names the section in errors)."""
        from segmap.tls import TlsFiles

        def under(p):
            return None if p is None else (Path(p) if base is None or Path(p).is_absolute() else base / p)

        return TlsFiles(under(self.cert), under(self.key), under(self.ca), self.require_client_cert, where)
