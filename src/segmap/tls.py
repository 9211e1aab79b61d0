"""TLS contexts for DICOM associations (the listener and C-STORE export) and, where wanted, HTTPS.

DICOM TLS (PS3.15 Annex B) is TLS around the ordinary upper-layer protocol: pynetdicom takes an
:class:`ssl.SSLContext` (``AE.start_server(..., ssl_context=)`` on the accepting side, ``AE.associate(...,
tls_args=(context, hostname))`` on the requesting side); DCMTK's ``storescu +tls`` / ``storescp +tls`` speak the same.
Both contexts here require TLS 1.2 or newer (BCP 195, which DCMTK's default profile also follows).

Everything that can be wrong with a certificate or key file is reported at start, as one line naming the file and
the setting, instead of at the first association.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from segmap.errors import ServiceConfigError


@dataclass(frozen=True)
class TlsFiles:
    """Where one side's TLS material lives (PEM files). ``where`` names the setting for error messages."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    #: accepting side: refuse a peer that does not present a certificate signed by ``ca``.
    require_client_cert: bool = False
    where: str = "tls"


def _existing(path: Path | None, what: str, where: str) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ServiceConfigError(f"{where}.{what}: no such file: {p}")
    return str(p)


def _load_chain(context: ssl.SSLContext, files: TlsFiles) -> None:
    cert = _existing(files.cert, "cert", files.where)
    key = _existing(files.key, "key", files.where)
    if cert is None:
        return
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ServiceConfigError(f"{files.where}: certificate {cert} and key {key or cert} do not load together "
                                 f"({e.reason or e}); expected a PEM certificate and its unencrypted PEM key") from None


def _load_ca(context: ssl.SSLContext, files: TlsFiles) -> None:
    ca = _existing(files.ca, "ca", files.where)
    if ca is None:
        return
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise ServiceConfigError(f"{files.where}.ca: {ca} is not a PEM CA certificate ({e.reason or e})") from None


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The accepting side's context: our certificate and key; with ``require_client_cert``, peers must present a
    certificate signed by ``ca``."""
    if files.cert is None or files.key is None:
        raise ServiceConfigError(f"{files.where}: TLS needs both cert and key (PEM files)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, files)
    if files.require_client_cert:
        if files.ca is None:
            raise ServiceConfigError(f"{files.where}: require_client_cert needs ca (the CA that signs the senders' "
                                     f"certificates)")
        _load_ca(context, files)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(files: TlsFiles, check_hostname: bool = False) -> ssl.SSLContext:
    """The requesting side's context: the peer's certificate is verified against ``ca`` (the system's CAs when
    unset); our own certificate and key are presented when given. DICOM peers are usually addressed by IP and AE
    title, so the host name is not checked unless asked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if files.ca is None:
        context.load_default_certs()
    else:
        _load_ca(context, files)
    _load_chain(context, files)
    return context
