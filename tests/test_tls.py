"""DICOM TLS contexts (segmap.tls) against DCMTK: storescu +tls into a pynetdicom acceptor; plain, anonymous and
wrongly-certified peers are refused. (Export over TLS to storescp +tls: tests/test_service_tls.py.)"""

from __future__ import annotations

import subprocess

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from certs import make_certs
from dicom_factory import write_series
from pacs import STORESCU, free_port, need
from segmap.errors import ServiceConfigError
from segmap.tls import TlsFiles, server_context

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
