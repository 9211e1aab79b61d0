"""DICOM TLS contexts (segmap.tls) against DCMTK: storescu +tls into a pynetdicom acceptor, and a pynetdicom
requestor into storescp +tls; plain and wrongly-certified peers are refused."""

from __future__ import annotations

import subprocess

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from certs import make_certs
from dicom_factory import write_series
from pacs import STORESCP, STORESCU, free_port, need, wait_for
from segmap.errors import ServiceConfigError
from segmap.tls import TlsFiles, client_context, server_context

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_acceptor(certs):
    received = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="SEGMAP")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    context = server_context(TlsFiles(certs.server_cert, certs.server_key, certs.ca, require_client_cert=True))
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=context,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield port, received
    server.shutdown()


def _storescu(port, files, *tls):
    cmd = [need(STORESCU, "dcmtk"), *tls, "-aet", "MODALITY", "-aec", "SEGMAP", "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_storescu_over_tls_is_accepted_plain_and_foreign_certificates_are_refused(tls_acceptor, certs, tmp_path):
    port, received = tls_acceptor
    files = write_series(tmp_path / "s", n=2)
    ok = _storescu(port, files, "+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca))
    assert ok.returncode == 0, ok.stderr
    assert len(received) == 2
    plain = _storescu(port, files)
    assert plain.returncode != 0
    rogue = _storescu(port, files, "+tls", str(certs.rogue_key), str(certs.rogue_cert), "+cf", str(certs.ca))
    assert rogue.returncode != 0
    anonymous = _storescu(port, files, "+tla", "+cf", str(certs.ca))
    assert anonymous.returncode != 0
    assert len(received) == 2, "a refused peer's instances were stored"


def _store_with(context, port, path):
    ae = AE(ae_title="SEGMAP")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP", tls_args=(context, None))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(dcmread(path))
        return status.Status if status else None
    finally:
        assoc.release()


def test_export_over_tls_to_storescp(certs, tmp_path):
    out = tmp_path / "in"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([need(STORESCP, "dcmtk"), "+tls", str(certs.server_key), str(certs.server_cert),
                             "+cf", str(certs.ca), "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _open(port), 20, "storescp +tls listening")
        (path,) = write_series(tmp_path / "s", n=1)
        good = client_context(TlsFiles(certs.client_cert, certs.client_key, certs.ca))
        assert _store_with(good, port, path) == 0x0000
        assert len(list(out.iterdir())) == 1
        no_client_cert = client_context(TlsFiles(ca=certs.ca))
        assert _store_with(no_client_cert, port, path) is None
        wrong_ca = client_context(TlsFiles(certs.client_cert, certs.client_key, certs.rogue_cert))
        assert _store_with(wrong_ca, port, path) is None, "a server the CA did not sign was trusted"
    finally:
        proc.terminate()
        proc.wait(10)


def _open(port):
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.unit
def test_bad_tls_files_are_one_line(certs, tmp_path):
    with pytest.raises(ServiceConfigError, match="listener.tls.cert: no such file"):
        server_context(TlsFiles(tmp_path / "none.crt", certs.server_key, where="listener.tls"))
    with pytest.raises(ServiceConfigError, match="do not load together"):
        server_context(TlsFiles(certs.server_cert, certs.client_key, where="listener.tls"))
    with pytest.raises(ServiceConfigError, match="require_client_cert needs ca"):
        server_context(TlsFiles(certs.server_cert, certs.server_key, require_client_cert=True))
    with pytest.raises(ServiceConfigError, match="needs both cert and key"):
        server_context(TlsFiles(certs.server_cert))
