"""The one client of Orthanc's REST API, for the service's intake (following ``/changes``), its Orthanc destination
(``POST /instances``, ``/tools/lookup``) and ``segmap submit`` (``/tools/find``).

Errors are :class:`OrthancError` with one line naming the URL (never the credentials); a failed request is an
:class:`OrthancRequestError` that says whether asking again later may help (:attr:`~OrthancRequestError.temporary`),
so each caller turns it into its own kind of error (a destination's retry-or-fail, a submit's one line).

Every request ends within ``timeout`` seconds, however the server trickles its answer: besides the socket's per-read
timeout a watchdog shuts the request's connection down at the deadline (a server sending a byte a second would
otherwise keep a per-read timeout from ever firing). An answer is read in blocks up to a size cap
(``max_response_bytes`` for JSON, ``max_file_bytes`` for an instance file) and refused past it. requests and urllib3
have no whole-request deadline (their ``timeout`` bounds each read), hence the watchdog.
"""

from __future__ import annotations

import re
import socket
import threading
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection

#: Largest JSON answer read (a /changes page, a series' instances): 64 MiB.
MAX_RESPONSE_BYTES = 64 << 20
#: Largest instance file read: 2 GiB (the listener's default max_instance_bytes).
MAX_FILE_BYTES = 2 << 30
_BLOCK = 1 << 16

from segmap.errors import OrthancError


def is_temporary(status: int | None) -> bool:
    """Whether an HTTP request that got ``status`` (None: no answer -- refused, timed out) may succeed later: no
    answer, a 5xx, 408 (timeout) or 429 (too many requests). Any other 4xx gets the same answer again."""
    return status is None or status >= 500 or status in (408, 429)


class OrthancRequestError(OrthancError):
    """A request Orthanc did not answer as asked: ``status`` is its HTTP status (None: no answer at all -- refused,
    timed out), ``request`` the method and path (``POST /instances``), ``detail`` a short reason."""

    def __init__(self, message: str, *, status: int | None, request: str, detail: str = ""):
        super().__init__(message)
        self.status, self.request, self.detail = status, request, detail

    @property
    def temporary(self) -> bool:
        """True when asking again later may succeed (see :func:`is_temporary`)."""
        return is_temporary(self.status)


class OrthancNotFound(OrthancRequestError):
    """Orthanc answered 404: the resource does not exist (any more)."""


class OrthancClient:
    """Orthanc's REST API at ``url``; credentials from ``username``/``password`` or the URL's ``user:pass@``."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 timeout: float = 30.0, max_response_bytes: int = MAX_RESPONSE_BYTES,
                 max_file_bytes: int = MAX_FILE_BYTES):
        parts = urlsplit(str(url).strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OrthancError(f"Orthanc URL {_redact(url)!r} is not an http(s) URL")
        if parts.username and username is None:
            username, password = parts.username, parts.password
        # The credentials leave the URL so that no error message or log line can carry them.
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + ("" if parts.port is None else f":{parts.port}")
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout = timeout
        self.max_response_bytes = int(max_response_bytes)
        self.max_file_bytes = int(max_file_bytes)
        self._session = requests.Session()
        adapter = _DeadlineAdapter()
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if username is not None:
            self._session.auth = (username, password or "")

    def __repr__(self) -> str:
        return f"OrthancClient({self.url!r})"

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, params=None, data=None, json=None, headers=None,
                 raw: bool = False):
        request = f"{method} {path}"
        cap = self.max_file_bytes if raw else self.max_response_bytes
        watchdog = _Watchdog(self.timeout)
        try:
            with watchdog:
                response = self._session.request(method, self.url + path, params=params, data=data, json=json,
                                                 headers=headers, timeout=self.timeout, stream=True)
                content = _read_capped(response, cap)
        except _TooLarge:
            raise OrthancRequestError(f"Orthanc at {self.url} answered {request} with more than {cap} bytes: "
                                      f"refused", status=None, request=request, detail="answer too large") from None
        except requests.RequestException as exc:
            reason = f"no whole answer within {self.timeout:g} s" if watchdog.fired else _reason(exc)
            raise OrthancRequestError(f"Orthanc at {self.url} cannot be reached ({request}: {reason})",
                                      status=None, request=request, detail=reason) from None
        if watchdog.fired:  # cut at the deadline where the body had no length to check against
            reason = f"no whole answer within {self.timeout:g} s"
            raise OrthancRequestError(f"Orthanc at {self.url} cannot be reached ({request}: {reason})",
                                      status=None, request=request, detail=reason)
        response._content = content
        code = response.status_code
        if code == 404:
            raise OrthancNotFound(f"Orthanc at {self.url} has no {path} (404)", status=code, request=request,
                                  detail="not found")
        if code in (401, 403):
            raise OrthancRequestError(f"Orthanc at {self.url} refused {request} ({code}): check the orthanc username "
                                      f"and password", status=code, request=request, detail=response.reason)
        if not response.ok:
            message = _orthanc_message(response)
            raise OrthancRequestError(f"Orthanc at {self.url} answered {code} to {request}{message}", status=code,
                                      request=request, detail=message.removeprefix(": ") or response.reason)
        if raw:
            return response.content
        try:
            return response.json()
        except ValueError:
            what = response.headers.get("Content-Type", "no content type")
            raise OrthancRequestError(f"Orthanc at {self.url} answered {request} with something that is not JSON "
                                      f"({what})", status=code, request=request,
                                      detail=f"not JSON ({what})") from None

    def _get(self, path: str, **params):
        return self._request("GET", path, params=params or None)

    # -- the API the service uses -----------------------------------------------------------------------------
    def system(self) -> dict:
        """``GET /system``: version, name, DICOM AE title; a cheap "is it up" check."""
        return self._get("/system")

    def changes(self, since: int, limit: int = 100) -> tuple[list[dict], int, bool]:
        """One page of the change log after sequence number ``since``: (changes, last sequence number, done)."""
        page = self._get("/changes", since=int(since), limit=int(limit))
        try:
            return list(page["Changes"]), int(page["Last"]), bool(page["Done"])
        except (KeyError, TypeError, ValueError):
            raise OrthancError(f"Orthanc at {self.url}: /changes answered without Changes/Last/Done") from None

    def instance(self, orthanc_id: str) -> dict:
        return self._get(f"/instances/{_id(orthanc_id)}")

    def series(self, orthanc_id: str) -> dict:
        """``GET /series/{id}``: ``MainDicomTags``, ``Instances``, ``IsStable``, ``ParentStudy``."""
        return self._get(f"/series/{_id(orthanc_id)}")

    def study(self, orthanc_id: str) -> dict:
        return self._get(f"/studies/{_id(orthanc_id)}")

    def series_instances(self, orthanc_id: str) -> list[dict]:
        """The series' instances with their main DICOM tags (``GET /series/{id}/instances``)."""
        return self._get(f"/series/{_id(orthanc_id)}/instances")

    def instance_file(self, orthanc_id: str) -> bytes:
        """The instance's DICOM file, as Orthanc stored it."""
        return self._request("GET", f"/instances/{_id(orthanc_id)}/file", raw=True)

    def upload(self, data: bytes) -> dict:
        """``POST /instances``: store one DICOM file; the answer has ``ID`` and ``Status`` (Success, AlreadyStored)."""
        return self._request("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"})

    def find(self, level: str, query: dict) -> list[str]:
        """Orthanc ids of the resources at ``level`` (``Instance``, ``Series``...) matching ``query`` (DICOM
        keywords -> values), by ``POST /tools/find``."""
        return [str(i) for i in self._request("POST", "/tools/find", json={"Level": level, "Query": query})]

    def lookup(self, uid: str) -> list[dict]:
        """Orthanc's resources carrying the DICOM UID ``uid`` (``POST /tools/lookup``): ``ID``, ``Type``, ``Path``."""
        return self._request("POST", "/tools/lookup", data=str(uid).encode("ascii", "replace"),
                             headers={"Content-Type": "text/plain"})


class _TooLarge(Exception):
    pass


def _read_capped(response: requests.Response, cap: int) -> bytes:
    """The whole body, read a block at a time; :class:`_TooLarge` past ``cap`` bytes (decoded)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        response.close()
        raise _TooLarge()
    parts, total = [], 0
    for block in response.iter_content(_BLOCK):
        total += len(block)
        if total > cap:
            response.close()
            raise _TooLarge()
        parts.append(block)
    return b"".join(parts)


# The connections each thread's current request uses, for its watchdog (see the module docstring).
_in_use = threading.local()


def _track(conn):
    conns = getattr(_in_use, "conns", None)
    if conns is not None:
        conns.append(conn)
    return conn


class _Connection(HTTPConnection):
    def connect(self):
        super().connect()
        # http.client forgets the socket of an answer that closes the connection (HTTP/1.0) while the answer is
        # still being read from it: kept here for the watchdog.
        self.watched_sock = self.sock


class _TlsConnection(HTTPSConnection):
    def connect(self):
        super().connect()
        self.watched_sock = self.sock


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection

    def _get_conn(self, timeout=None):
        return _track(super()._get_conn(timeout))


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection

    def _get_conn(self, timeout=None):
        return _track(super()._get_conn(timeout))


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter whose connection pools tell :class:`_Watchdog` which connections a request uses."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}


class _Watchdog:
    """Shuts down the connections the request made in this ``with`` block uses when ``seconds`` have passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.fired = False
        self._conns: list = []
        self._timer: threading.Timer | None = None

    def __enter__(self):
        _in_use.conns = self._conns
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        _in_use.conns = None
        return False

    def _fire(self) -> None:
        self.fired = True
        for conn in list(self._conns):
            sock = getattr(conn, "sock", None) or getattr(conn, "watched_sock", None)
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _id(orthanc_id: str) -> str:
    # Orthanc ids are hex groups; quoting keeps anything else from changing the request path.
    return quote(str(orthanc_id), safe="")


def _redact(url) -> str:
    return re.sub(r"//[^/@]*@", "//", str(url))


def _reason(exc: requests.RequestException) -> str:
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("Connection reset", "connection reset"),
                          ("RemoteDisconnected", "connection closed"), ("Connection aborted", "connection closed")):
        if needle in text:
            return short
    return type(exc).__name__


def _orthanc_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    message = body.get("Message") if isinstance(body, dict) else None
    return f": {' '.join(str(message).split())[:200]}" if message else ""
