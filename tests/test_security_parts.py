"""Secrets from files or the environment, HTTP authentication, bind checks: the parts the services build on."""

from __future__ import annotations

import base64

import pytest

from segmap.credentials import resolve_secret
from segmap.errors import ServiceConfigError
from segmap.webauth import WebAuth, is_loopback

pytestmark = pytest.mark.unit


def test_a_secret_from_a_file_strips_one_newline(tmp_path):
    f = tmp_path / "pw"
    f.write_text("S3cret\n")
    secret = resolve_secret({"password_file": str(f)}, "password", "stores.orthanc")
    assert secret.value == "S3cret" and not secret.plaintext
    assert "S3cret" not in repr(secret) and "S3cret" not in str({"password": secret})


def test_a_secret_from_the_environment():
    secret = resolve_secret({"token_env": "SEGMAP_T"}, "token", "web", environ={"SEGMAP_T": "abc"})
    assert secret.value == "abc" and secret.source == "env SEGMAP_T"


@pytest.mark.parametrize("section, message", [
    ({"password_file": "/nonexistent/pw"}, "no such file: /nonexistent/pw"),
    ({"password_env": "SEGMAP_UNSET_VAR"}, "SEGMAP_UNSET_VAR is not set"),
    ({"password": "a", "password_file": "/x"}, "not several"),
])
def test_bad_secret_settings_are_one_line_naming_the_key(section, message):
    with pytest.raises(ServiceConfigError, match=message) as info:
        resolve_secret(section, "password", "destinations[0]", environ={})
    assert "\n" not in str(info.value) and "destinations[0]" in str(info.value)


def test_an_empty_secret_file_is_refused(tmp_path):
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ServiceConfigError, match="is empty"):
        resolve_secret({"password_file": str(tmp_path / "pw")}, "password", "x")


def test_plaintext_is_accepted_and_marked_as_such():
    secret = resolve_secret({"password": "S3cret"}, "password", "destinations[1]")
    assert secret.plaintext and secret.value == "S3cret" and "S3cret" not in repr(secret)


def _basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_web_auth_bearer_and_basic():
    auth = WebAuth(tokens=("tok",), user="ops", password="pw")
    assert auth.allows("/api/jobs", "Bearer tok")
    assert auth.allows("/", _basic("ops", "pw"))
    for header in (None, "", "Bearer nope", "Bearer", _basic("ops", "nope"), _basic("x", "pw"), "Basic !!!", "tok"):
        assert not auth.allows("/api/jobs", header), header
    assert auth.allows("/livez", None) and auth.allows("/readyz", None)
    assert not auth.allows("/healthz", None) and not auth.allows("/metrics", None)
    assert auth.challenge().startswith("Basic")


def test_web_auth_off_allows_everything_and_bearer_only_challenges_bearer():
    assert WebAuth().allows("/api/jobs", None) and not WebAuth().enabled
    assert WebAuth(tokens=("t",)).challenge().startswith("Bearer")


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                             ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                             ("::", False), ("10.1.2.3", False), ("pacs.example", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
