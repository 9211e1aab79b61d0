"""The job service's result destinations against real peers on loopback: DCMTK's storescp (C-STORE), Orthanc's REST
API, and Orthanc's DICOMweb plugin (STOW-RS, QIDO-RS). A real DICOM SEG of a phantom CT is sent; the tests read
back what the peer stored (files on storescp's disk, Orthanc's index) rather than trusting our own confirmation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from pacs import Orthanc, StoreSCP, free_port
from segmap.errors import DestinationUnavailable, ExportError, SegmapError, ServiceConfigError
from segmap.service.export import make_destination
from segmap.service.keys import seg_uids

ROOT = Path(__file__).resolve().parents[1]
KEY = "5e" * 32


@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> Path:
    """A real BINARY SEG (highdicom) of a phantom's spleen, with the UIDs a job of key KEY gives it."""
    from segmap.demo.phantom import write_phantom_study
    from segmap.outputs.seg import write_seg
    from segmap.tasks import load_task

    root = tmp_path_factory.mktemp("seg")
    study = write_phantom_study(root / "study", shape_zyx=(8, 48, 48), patient_name="DOE^JANE")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in study["dicom_files"]]
    task = load_task(ROOT / "tasks" / "spleen.yaml")
    labels = (study["phantom"].labels == 1).astype(np.uint8)
    assert labels.any()
    series_uid, sop_uid = seg_uids(KEY)
    return write_seg(labels, sources, task.segments, root / "segmentation.dcm", series_instance_uid=series_uid,
                     sop_instance_uid=sop_uid)


def dicom_cfg(port: int, **extra) -> dict:
    return {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "STORESCP", "timeout_s": 5, **extra}


def orthanc_instances(server: Orthanc) -> list[str]:
    return server.get("/instances")


# ------------------------------------------------------------------------------------------------ C-STORE


def test_cstore_delivers_the_seg_once_and_confirms_it(seg, storescp):  # noqa: F811
    dest = make_destination("pacs", dicom_cfg(storescp.port))
    assert not dest.confirm([seg])  # nothing sent yet
    dest.send([seg])
    assert dest.confirm([seg])
    dest.send([seg])  # a re-send after a crash: same UIDs, so the same file at the receiver
    stored = storescp.files()
    assert len(stored) == 1
    got = pydicom.dcmread(stored[0])
    assert (got.SOPInstanceUID, got.SeriesInstanceUID) == (seg_uids(KEY)[1], seg_uids(KEY)[0])
    assert got.SOPClassUID == pydicom.dcmread(seg, stop_before_pixels=True).SOPClassUID


def test_cstore_destination_down_then_back(seg, tmp_path):
    port = free_port()
    dest = make_destination("pacs", dicom_cfg(port, timeout_s=3))
    with pytest.raises(DestinationUnavailable, match=rf"destination pacs: STORESCP@127.0.0.1:{port} cannot be reached"):
        dest.send([seg])
    assert not dest.confirm([seg])
    server = StoreSCP(tmp_path / "in", port).start()  # the PACS comes back on the same port
    try:
        dest.send([seg])
        assert dest.confirm([seg]) and len(server.files()) == 1
    finally:
        server.stop()


@pytest.fixture
def scp():
    """A pynetdicom storage SCP whose behaviour a test sets: ``scp(status=..., calling=..., seg=...)`` -> port."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, SegmentationStorage

    servers = []

    def start(status: int = 0x0000, calling: list[str] | None = None, seg: bool = True) -> int:
        ae = AE("PICKY")
        ae.add_supported_context(SegmentationStorage if seg else CTImageStorage)
        ae.require_calling_aet = calling or []
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]))
        return port

    yield start
    for server in servers:
        server.shutdown()


def test_cstore_rejected_association_is_retryable_and_says_why(seg, scp):
    port = scp(calling=["MODALITY"])
    dest = make_destination("pacs", dicom_cfg(port, ae_title="PICKY"))
    with pytest.raises(DestinationUnavailable, match=r"PICKY@127.0.0.1:\d+ rejected the association "
                                                     r"\(Rejected Permanent: Calling AE title not recognised\)"):
        dest.send([seg])


@pytest.mark.parametrize("status, error, words", [
    (0xA900, ExportError, "status 0xA900"),  # data set does not match the SOP class: permanent
    (0xC000, ExportError, "status 0xC000"),  # cannot understand: permanent
    (0xA700, DestinationUnavailable, "out of resources; will retry"),
    (0xB000, None, ""),  # coercion warning: stored
])
def test_cstore_status_decides_success_retry_or_failure(seg, scp, status, error, words):
    dest = make_destination("pacs", dicom_cfg(scp(status=status), ae_title="PICKY"))
    if error is None:
        dest.send([seg])
        assert dest.confirm([seg])
        return
    with pytest.raises(error, match=words):
        dest.send([seg])
    assert not dest.confirm([seg])


def test_cstore_to_a_peer_without_seg_storage_is_permanent(seg, scp):
    dest = make_destination("pacs", dicom_cfg(scp(seg=False), ae_title="PICKY"))
    with pytest.raises(ExportError, match=r"does not accept SOP Class 1.2.840.10008.5.1.4.1.1.66.4"):
        dest.send([seg])


def test_cstore_to_orthanc_confirms_what_orthanc_stored(seg, orthanc):  # noqa: F811
    dest = make_destination("pacs", dicom_cfg(orthanc.dicom_port, ae_title="ORTHANC"))
    dest.send([seg])
    dest.send([seg])
    assert dest.confirm([seg])
    assert len(orthanc_instances(orthanc)) == 1


def test_cfind_confirmation_asks_the_archive_also_after_a_restart(seg, tmp_path):
    server = Orthanc(tmp_path / "pacs", free_port(), free_port(),
                     modalities={"segmap": ["SEGMAP", "127.0.0.1", free_port()]}).start()
    try:
        cfg = dicom_cfg(server.dicom_port, ae_title="ORTHANC", confirm="c-find")
        dest = make_destination("pacs", cfg)
        assert not dest.confirm([seg])
        dest.send([seg])
        assert make_destination("pacs", cfg).confirm([seg])  # as a restarted service would ask
        [instance] = server.get("/instances")
        requests.delete(f"{server.url}/instances/{instance}", timeout=10).raise_for_status()
        assert not make_destination("pacs", cfg).confirm([seg])  # the archive is asked, not our memory
    finally:
        server.stop()


def test_cfind_confirmation_at_a_peer_without_queries_is_permanent(seg, storescp):  # noqa: F811
    dest = make_destination("pacs", dicom_cfg(storescp.port, confirm="c-find"))
    dest.send([seg])
    with pytest.raises(ExportError, match=r"does not accept SOP Class 1.2.840.10008.5.1.4.1.2.2.1"):
        dest.confirm([seg])


def test_store_status_confirmation_is_what_this_destination_was_answered(seg, storescp):  # noqa: F811
    """No record of delivery beside the job store: a new destination object has been answered nothing yet (the
    service sends and confirms with one object and records the delivery in the store)."""
    sent = make_destination("pacs", dicom_cfg(storescp.port))
    sent.send([seg])
    assert sent.confirm([seg])
    assert not make_destination("pacs", dicom_cfg(storescp.port)).confirm([seg])


def test_cstore_of_a_file_that_is_not_dicom_names_it(tmp_path, storescp):  # noqa: F811
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    with pytest.raises(ExportError, match="notes.txt: not a DICOM instance"):
        make_destination("pacs", dicom_cfg(storescp.port)).send([junk])


# ------------------------------------------------------------------------------------------------ Orthanc REST


def test_orthanc_rest_stores_once_and_confirms_by_lookup(seg, orthanc):  # noqa: F811
    dest = make_destination("orthanc", {"kind": "orthanc", "url": orthanc.url})
    assert not dest.confirm([seg])
    dest.send([seg])
    dest.send([seg])  # AlreadyStored is fine
    assert dest.confirm([seg])
    instances = orthanc_instances(orthanc)
    assert len(instances) == 1
    tags = orthanc.get(f"/instances/{instances[0]}/simplified-tags")
    assert tags["SOPInstanceUID"] == seg_uids(KEY)[1] and tags["Modality"] == "SEG"


def test_orthanc_down_then_back_after_a_restart(seg, orthanc):  # noqa: F811
    dest = make_destination("orthanc", {"kind": "orthanc", "url": orthanc.url, "timeout_s": 5})
    orthanc.stop()
    with pytest.raises(DestinationUnavailable, match="destination orthanc: POST http://127.0.0.1:.*/instances"):
        dest.send([seg])
    with pytest.raises(DestinationUnavailable):
        dest.confirm([seg])
    orthanc.start()
    dest.send([seg])
    assert dest.confirm([seg]) and len(orthanc_instances(orthanc)) == 1


def test_orthanc_4xx_is_permanent(seg, orthanc):  # noqa: F811
    """A URL that reaches Orthanc but not its /instances endpoint (a wrong path prefix) gets 404: not retried."""
    dest = make_destination("orthanc", {"kind": "orthanc", "url": orthanc.url + "/no-such-prefix"})
    with pytest.raises(ExportError, match="answered HTTP 404"):
        dest.send([seg])


class PasswordOrthanc(Orthanc):
    def config(self) -> dict:
        return {**super().config(), "AuthenticationEnabled": True, "RegisteredUsers": {"segmap": "right"}}

    def _up(self) -> bool:
        try:
            return requests.get(self.url + "/system", auth=("segmap", "right"), timeout=1).ok
        except requests.RequestException:
            return False


def test_orthanc_with_wrong_password_is_permanent(seg, tmp_path):
    server = PasswordOrthanc(tmp_path / "auth", free_port(), free_port()).start()
    try:
        bad = make_destination("o", {"kind": "orthanc", "url": server.url, "username": "segmap", "password": "x"})
        with pytest.raises(ExportError, match="answered HTTP 401"):
            bad.send([seg])
        good = make_destination("o", {"kind": "orthanc", "url": server.url, "username": "segmap",
                                      "password": "right"})
        good.send([seg])
        assert good.confirm([seg])
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ STOW-RS


@pytest.fixture
def dicomweb_orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc-dw", free_port(), free_port(), dicomweb=True).start()
    yield server
    server.stop()


def test_stow_rs_stores_once_and_confirms_by_qido(seg, dicomweb_orthanc):
    dest = make_destination("web", {"kind": "stow", "url": dicomweb_orthanc.dicomweb_url})
    assert not dest.confirm([seg])
    dest.send([seg])
    dest.send([seg])
    assert dest.confirm([seg])
    instances = orthanc_instances(dicomweb_orthanc)
    assert len(instances) == 1
    assert dicomweb_orthanc.get(f"/instances/{instances[0]}/simplified-tags")["SOPInstanceUID"] == seg_uids(KEY)[1]


def test_stow_rs_down_then_back(seg, dicomweb_orthanc):
    dest = make_destination("web", {"kind": "stow", "url": dicomweb_orthanc.dicomweb_url, "timeout_s": 5})
    dicomweb_orthanc.stop()
    with pytest.raises(DestinationUnavailable, match="destination web: STOW-RS to http://127.0.0.1"):
        dest.send([seg])
    dicomweb_orthanc.start()
    dest.send([seg])
    assert dest.confirm([seg])


def test_stow_rs_to_a_wrong_path_is_permanent(seg, dicomweb_orthanc):
    dest = make_destination("web", {"kind": "stow", "url": dicomweb_orthanc.url + "/not-dicom-web"})
    with pytest.raises(ExportError, match=r"destination web: STOW-RS .* answered HTTP 404"):
        dest.send([seg])


# ------------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("cfg, message", [
    ({"kind": "ftp"}, r"destinations\.d\.kind: must be one of dicom, orthanc, stow, got 'ftp'"),
    ({"kind": "dicom", "port": 104, "ae_title": "PACS"}, r"destinations\.d\.host: is required"),
    ({"kind": "dicom", "host": "pacs", "port": 70000, "ae_title": "PACS"},
     r"destinations\.d\.port: must be a TCP port"),
    ({"kind": "dicom", "host": "pacs", "port": "104", "ae_title": "PACS"},
     r"destinations\.d\.port: must be a whole number, got '104'"),
    ({"kind": "dicom", "host": "pacs", "port": 104, "ae_title": "A-TITLE-LONGER-THAN-16"},
     r"destinations\.d\.ae_title: must be a DICOM AE title"),
    ({"kind": "dicom", "host": "pacs", "port": 104, "ae_title": "PACS", "aet": "X"},
     r"destinations\.d\.aet: unknown key \(known: .*ae_title"),
    ({"kind": "orthanc", "url": "127.0.0.1:8042"}, r"destinations\.d\.url: must be an http\(s\):// URL"),
    ({"kind": "orthanc", "url": "http://o", "timeout_s": 0}, r"destinations\.d\.timeout_s: must be greater than 0"),
    ({"kind": "stow"}, r"destinations\.d\.url: is required"),
    ("http://o", r"destinations\.d: must be a mapping with a 'kind'"),
    ({"kind": "dicom", "host": "pacs", "port": 104, "ae_title": "PACS", "confirm": "echo"},
     r"destinations\.d\.confirm: must be one of store-status, c-find, got 'echo'"),
])
def test_configuration_errors_name_the_key(cfg, message):
    with pytest.raises(ServiceConfigError, match=message) as info:
        make_destination("d", cfg)
    assert isinstance(info.value, SegmapError) and "\n" not in str(info.value)


def test_no_patient_identity_in_export_errors(seg, tmp_path):
    """Error lines name the destination and UIDs only: the phantom's patient name never appears."""
    port = free_port()
    for cfg in (dicom_cfg(port, timeout_s=2), {"kind": "orthanc", "url": f"http://127.0.0.1:{port}"}):
        with pytest.raises(DestinationUnavailable) as info:
            make_destination("d", cfg).send([seg])
        assert "DOE" not in str(info.value) and "JANE" not in str(info.value)
