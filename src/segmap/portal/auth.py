"""The portal's bearer token: where it comes from, when it is required, how a request is checked.

The token is read once at start-up from ``auth.token_file`` or the environment variable ``auth.token_env``, never
from the configuration file itself. It is required by default whenever the server binds a non-loopback address;
the portal refuses to start without one (one line naming what to set). MONAI Label clients send it as
``Authorization: Bearer <token>``; 3D Slicer's extension obtains it from ``POST /auth/token`` with the token as the
password (any user name), which is how a static token fits MONAI Label's OAuth-shaped login.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from ..webauth import WebAuth, is_loopback
from .config import AuthConfig, PortalConfigError


@dataclass(frozen=True)
class Auth:
    """The token requests must carry, or ``None`` when authentication is off."""

    token: str | None

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (the job service's check: constant time)."""
        return WebAuth(tokens=(self.token,) if self.token else (), open_paths=frozenset()).allows("/", authorization)

    def password_matches(self, password: str) -> bool:
        return self.token is not None and hmac.compare_digest(password.encode(), self.token.encode())


def load_auth(cfg: AuthConfig, host: str, env: dict[str, str] | None = None) -> Auth:
    """The token from its file or variable; :class:`PortalConfigError` when the rules for ``host`` are not met."""
    env = dict(os.environ) if env is None else env
    token = None
    if cfg.token_file is not None:
        try:
            token = cfg.token_file.read_text().strip()
        except OSError as e:
            raise PortalConfigError(f"auth.token_file {cfg.token_file}: cannot read the token "
                                    f"({e.strerror or e})") from None
        if not token:
            raise PortalConfigError(f"auth.token_file {cfg.token_file} is empty; write the token into it")
    elif env.get(cfg.token_env, "").strip():
        token = env[cfg.token_env].strip()
    if token is not None and len(token) < 16:
        raise PortalConfigError("the portal token is shorter than 16 characters; use a long random one "
                                "(e.g. `openssl rand -hex 32`)")
    required = cfg.required == "true" or (cfg.required == "auto" and not is_loopback(host))
    if cfg.required == "false" and not is_loopback(host):
        raise PortalConfigError(f"auth.required false is only allowed on a loopback address, not on {host}")
    if required and token is None:
        raise PortalConfigError(f"the portal binds {host} and needs a bearer token: set auth.token_file or the "
                                f"environment variable {cfg.token_env}")
    return Auth(token if cfg.required != "false" else None)
