"""DICOM TLS on the service's listener and on C-STORE export, against DCMTK (``storescu +tls`` / ``storescp +tls``)
with certificates made here: the listener is the service's own (``DicomListener.from_config`` from a ``listener``
section with ``tls``), the destination the service's ``dicom`` destination with ``tls``."""

from __future__ import annotations

import logging
import socket
import subprocess

import pytest

from certs import make_certs
from dicom_factory import write_series
from pacs import STORESCP, STORESCU, free_port, need, wait_for
from segmap.errors import DestinationUnavailable, ServiceConfigError
from segmap.service.config import ListenerConfig
from segmap.service.export import make_destination
from segmap.service.intake.listener import DicomListener
from segmap.service.schema import read_section
from segmap.service.spool import Spool
from segmap.service.store import JobStore

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def _listener(tmp_path, certs, require_client_cert=True, **extra):
    section = {"ae_title": "SEGMAP", "host": "127.0.0.1", "port": free_port(),
               "tls": {"cert": certs.server_cert.name, "key": certs.server_key.name, "ca": certs.ca.name,
                       "require_client_cert": require_client_cert}, **extra}
    lc = read_section(ListenerConfig, section, "listener", None)
    store = JobStore(tmp_path / "store.sqlite")
    listener = DicomListener.from_config(lc, spool=Spool(tmp_path / "spool"), on_arrival=store.record_instance,
                                         base=certs.ca.parent)
    listener.start()
    return listener, store


def _storescu(port, files, *tls):
    cmd = [need(STORESCU, "dcmtk"), *tls, "-aet", "MODALITY", "-aec", "SEGMAP", "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _stored(tmp_path):
    return sorted((tmp_path / "spool").rglob("*.dcm"))


def test_listener_over_tls_takes_storescu_tls_and_refuses_plain_foreign_and_anonymous_senders(tmp_path, certs,
                                                                                              caplog):
    caplog.set_level(logging.INFO, logger="segmap")
    listener, store = _listener(tmp_path, certs)
    try:
        files = write_series(tmp_path / "s", n=3)
        ok = _storescu(listener.port, files, "+tls", str(certs.client_key), str(certs.client_cert),
                       "+cf", str(certs.ca))
        assert ok.returncode == 0, ok.stderr
        assert len(_stored(tmp_path)) == 3
        assert listener.counters()["instances_received"] == 3

        plain = _storescu(listener.port, files[:1])
        rogue = _storescu(listener.port, files[:1], "+tls", str(certs.rogue_key), str(certs.rogue_cert),
                          "+cf", str(certs.ca))
        anonymous = _storescu(listener.port, files[:1], "+tla", "+cf", str(certs.ca))
        assert plain.returncode != 0 and rogue.returncode != 0 and anonymous.returncode != 0
        assert listener.counters()["associations_refused"] == 3
        assert "refused: TLS handshake failed" in caplog.text
        assert len(_stored(tmp_path)) == 3, "a refused sender's instance was stored"
        # The refused handshakes held nothing: a good sender still gets through.
        again = _storescu(listener.port, files[:1], "+tls", str(certs.client_key), str(certs.client_cert),
                          "+cf", str(certs.ca))
        assert again.returncode == 0, again.stderr
    finally:
        listener.stop()
        store.close()


def test_listener_over_tls_without_client_certificates_takes_an_anonymous_tls_sender(tmp_path, certs):
    listener, store = _listener(tmp_path, certs, require_client_cert=False)
    try:
        files = write_series(tmp_path / "s", n=1)
        anonymous = _storescu(listener.port, files, "+tla", "+cf", str(certs.ca))
        assert anonymous.returncode == 0, anonymous.stderr
        assert _storescu(listener.port, files).returncode != 0, "a plain association was taken on a TLS port"
    finally:
        listener.stop()
        store.close()


def test_a_sender_that_stalls_in_the_tls_handshake_holds_no_one_up(tmp_path, certs):
    listener, store = _listener(tmp_path, certs, acse_timeout_s=1.0)
    stalled = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(20)]
    try:
        for s in stalled:
            s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and then nothing
        files = write_series(tmp_path / "s", n=1)
        ok = _storescu(listener.port, files, "+tls", str(certs.client_key), str(certs.client_cert),
                       "+cf", str(certs.ca))
        assert ok.returncode == 0, ok.stderr
        wait_for(lambda: listener.open_associations == 0, 10, "the stalled handshakes to be closed")
    finally:
        for s in stalled:
            s.close()
        listener.stop()
        store.close()


def test_bad_listener_tls_files_are_one_line_naming_the_setting(tmp_path, certs):
    from segmap.service.config import parse_config

    task = tmp_path / "task.yaml"
    doc = {"service": {"workdir": str(tmp_path / "w")},
           "listener": {"tls": {"cert": str(tmp_path / "none.crt"), "key": str(certs.server_key)}},
           "maps": [{"name": "m", "image": "i", "task": str(task)}]}
    with pytest.raises(ServiceConfigError, match=r"listener\.tls\.cert: no such file"):
        parse_config(doc, tmp_path / "service.yaml")


@pytest.fixture
def storescp_tls(certs, tmp_path):
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([need(STORESCP, "dcmtk"), "+tls", str(certs.server_key), str(certs.server_cert),
                             "+cf", str(certs.ca), "-aet", "PACS", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _open(port), 20, "storescp +tls listening")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def _open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_export_over_tls_to_storescp_and_a_server_the_ca_did_not_sign_is_not_trusted(certs, tmp_path,
                                                                                      storescp_tls):
    port, out = storescp_tls
    files = write_series(tmp_path / "seg", n=2)
    good = make_destination("pacs", {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "PACS",
                                     "timeout_s": 10, "tls": {"cert": str(certs.client_cert),
                                                              "key": str(certs.client_key), "ca": str(certs.ca)}})
    good.send(files)
    assert good.confirm(files)
    assert len(list(out.iterdir())) == 2

    plain = make_destination("plain", {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "PACS",
                                       "timeout_s": 5})
    with pytest.raises(DestinationUnavailable):
        plain.send(files)
    wrong_ca = make_destination("wrong", {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "PACS",
                                          "timeout_s": 5, "tls": {"cert": str(certs.client_cert),
                                                                  "key": str(certs.client_key),
                                                                  "ca": str(certs.rogue_cert)}})
    with pytest.raises(DestinationUnavailable):
        wrong_ca.send(files)
    assert len(list(out.iterdir())) == 2


@pytest.mark.unit
def test_a_destination_tls_file_that_is_missing_is_found_with_the_configuration(tmp_path):
    with pytest.raises(ServiceConfigError, match=r"destinations\.pacs\.tls\.ca: no such file"):
        make_destination("pacs", {"kind": "dicom", "host": "h", "port": 104, "ae_title": "PACS",
                                  "tls": {"ca": str(tmp_path / "none.pem")}})
