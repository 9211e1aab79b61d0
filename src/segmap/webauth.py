"""HTTP authentication for segmap's web endpoints (the job service's pages and API, the portal).

Two schemes, either or both: a bearer token (``Authorization: Bearer TOKEN``; what Prometheus' ``authorization``
and scripts send) and HTTP basic credentials (what a person's browser prompts for). Credentials come from
:mod:`segmap.credentials` (a file or an environment variable). Comparison is constant-time. Paths listed as open
(liveness and readiness probes) need nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass, field

#: Probes a kubelet or a load balancer calls without credentials; they say nothing about jobs or patients.
OPEN_PATHS = frozenset({"/livez", "/readyz"})
REALM = 'Basic realm="segmap", charset="UTF-8"'


@dataclass(frozen=True)
class WebAuth:
    """Who may read the pages: any of ``tokens`` as a bearer token, or ``user``/``password`` as basic credentials."""

    tokens: tuple[str, ...] = ()
    user: str | None = None
    password: str | None = None
    open_paths: frozenset[str] = field(default=OPEN_PATHS)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or (self.user is not None and self.password is not None)

    def allows(self, path: str, authorization: str | None) -> bool:
        """Whether a request for ``path`` with this ``Authorization`` header value may be answered."""
        if not self.enabled or path in self.open_paths:
            return True
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.tokens:
            return any(hmac.compare_digest(value.encode(), t.encode()) for t in self.tokens)
        if scheme.lower() == "basic" and self.user is not None and self.password is not None:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            # Both compared even when the first differs, so timing tells nothing about which was wrong.
            ok_user = hmac.compare_digest(user.encode(), self.user.encode())
            ok_password = hmac.compare_digest(password.encode(), self.password.encode())
            return bool(sep) and ok_user and ok_password
        return False

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401: basic when basic credentials exist (a browser prompts), else
        bearer."""
        return REALM if self.user is not None else 'Bearer realm="segmap"'


def is_loopback(host: str) -> bool:
    """Whether a bind address only listens on this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    host = (host or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
