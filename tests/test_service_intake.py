"""Intake of the job service: the durable spool, the DICOM listener (against DCMTK's storescu/echoscu) and the
Orthanc follower (against a real Orthanc)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from pacs import Orthanc, echoscu, free_port, storescu, wait_for
from segmap.demo.phantom import write_phantom_study
from segmap.errors import InputError, OrthancError, ServiceConfigError
from segmap.service.intake.listener import DicomListener
from segmap.orthanc import OrthancClient
from segmap.service.intake.orthanc import OrthancFollower
from segmap.service.spool import ConflictingInstance, Spool
from segmap.service.store import JobStore

SMALL = {"shape_zyx": (6, 32, 32)}


# -- spool --------------------------------------------------------------------------------------------------------

def _part10(tmp_path, **kwargs) -> tuple[bytes, pydicom.Dataset]:
    study = write_phantom_study(tmp_path / "src", **SMALL, **kwargs)
    path = study["dicom_files"][0]
    return path.read_bytes(), pydicom.dcmread(path)


def test_spool_writes_part10_file_under_study_series_sop_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    data, ds = _part10(tmp_path)
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    spool = Spool(tmp_path / "spool")
    path = spool.write(data, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)

    assert path == tmp_path / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert path.read_bytes() == data
    # The file's data before the rename, then the folder holding the new name: both must reach the disk.
    assert any(s.endswith(".tmp") and os.path.dirname(s) == str(path.parent) for s in synced)
    assert str(path.parent) in synced
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert spool.has(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert spool.series_files(ds.StudyInstanceUID, ds.SeriesInstanceUID) == [path]


def test_spool_writes_a_dataset_in_the_file_format(tmp_path):
    _, ds = _part10(tmp_path)
    path = Spool(tmp_path / "spool").write(ds, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    back = pydicom.dcmread(path)  # no force: preamble, DICM and file meta are there
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("bad", ["..", "../1.2", "1.2/3", "1..2", ".1.2", "1.2.", "1.2.a", "", "1." + "2" * 63])
def test_spool_refuses_a_uid_that_could_leave_the_spool_or_is_not_a_uid(tmp_path, bad):
    data, ds = _part10(tmp_path)
    with pytest.raises(InputError, match="SeriesInstanceUID"):
        Spool(tmp_path / "spool").write(data, ds.StudyInstanceUID, bad, ds.SOPInstanceUID)
    assert not list((tmp_path / "spool").rglob("*.dcm"))


def test_spool_refuses_bytes_that_are_not_a_dicom_file(tmp_path):
    with pytest.raises(InputError, match="not a DICOM Part 10 file"):
        Spool(tmp_path / "spool").write(b"<html>502 Bad Gateway</html>" * 10, "1.2", "1.2.3", "1.2.3.4")


def test_spool_keeps_an_instance_same_bytes_again_change_nothing_different_bytes_are_refused(tmp_path):
    data, ds = _part10(tmp_path)
    spool = Spool(tmp_path / "spool")
    path = spool.write(data, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    inode = path.stat().st_ino
    assert spool.write(data, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == path
    assert path.stat().st_ino == inode  # not even rewritten
    ds.SeriesDescription = "changed"
    with pytest.raises(ConflictingInstance, match="already stored with different content"):
        spool.write(ds, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    with pytest.raises(ConflictingInstance):
        spool.write_file(changed, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert path.read_bytes() == data and path.stat().st_ino == inode
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_spool_remove_partial_deletes_only_leftover_temporary_files(tmp_path):
    data, ds = _part10(tmp_path)
    spool = Spool(tmp_path / "spool")
    kept = spool.write(data, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    leftover = kept.parent / f".{ds.SOPInstanceUID}.abc123.tmp"
    leftover.write_bytes(data[:100])  # what a crash between write and rename leaves
    assert spool.remove_partial() == 1
    assert not leftover.exists() and kept.read_bytes() == data


# -- DICOM listener -----------------------------------------------------------------------------------------------

class Recorder:
    """An ``on_arrival`` that records each arrival and checks that its file is complete at that moment."""

    def __init__(self, fail: bool = False):
        self.arrivals = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, arrival):
        if self.fail:
            raise RuntimeError("database is locked")
        ds = pydicom.dcmread(arrival.path)  # on disk and parseable before the sender gets its answer
        assert ds.SOPInstanceUID == arrival.sop_uid
        with self.lock:
            self.arrivals.append(arrival)


@pytest.fixture
def listener_factory(tmp_path):
    started = []

    def make(**kwargs) -> DicomListener:
        kwargs.setdefault("spool", Spool(tmp_path / "spool"))
        kwargs.setdefault("on_arrival", Recorder())
        listener = DicomListener("SEGMAP", "127.0.0.1", free_port(), **kwargs)
        listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop()


def test_listener_stores_every_instance_durably_and_records_it_before_answering(tmp_path, listener_factory,
                                                                               caplog):
    study = write_phantom_study(tmp_path / "ct", **SMALL)
    caplog.set_level(logging.INFO, logger="segmap")
    listener = listener_factory()
    recorder = listener.on_arrival

    storescu(study["dicom_files"], listener.port, "SEGMAP", calling_aet="CT01")

    # storescu has returned: every answer was sent, so every arrival must already be recorded (no waiting).
    assert len(recorder.arrivals) == len(study["dicom_files"])
    sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in study["dicom_files"]}
    assert {a.sop_uid for a in recorder.arrivals} == set(sent)
    for arrival in recorder.arrivals:
        assert (arrival.source, arrival.calling_ae, arrival.modality) == ("listener", "CT01", "CT")
        assert (arrival.study_uid, arrival.series_uid) == (study["study_uid"], study["series_uid"])
        stored = pydicom.dcmread(arrival.path)
        original = pydicom.dcmread(sent[arrival.sop_uid])
        assert stored.PixelData == original.PixelData
        assert stored.file_meta.MediaStorageSOPInstanceUID == arrival.sop_uid
    files = listener.spool.series_files(study["study_uid"], study["series_uid"])
    assert [Path(p) for p in sorted(a.path for a in recorder.arrivals)] == files
    assert echoscu(listener.port, "SEGMAP") == 0
    # One summary line per association, for the operator.
    assert (f"(calling AE CT01) released: {len(files)} instance(s) stored, 0 refused; series {study['series_uid']}"
            in caplog.text)


def test_listener_with_the_job_store_loses_nothing_from_five_concurrent_senders(tmp_path, listener_factory):
    store = JobStore(tmp_path / "work" / "store.sqlite")
    studies = [write_phantom_study(tmp_path / f"ct{k}", seed=k, **SMALL) for k in range(5)]
    listener = listener_factory(on_arrival=store.record_instance)
    codes = {}

    def send(k, files):
        codes[k] = storescu(files, listener.port, "SEGMAP", calling_aet=f"CT{k}", check=False).returncode

    senders = [threading.Thread(target=send, args=(k, s["dicom_files"])) for k, s in enumerate(studies)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(timeout=120)
    assert codes == {k: 0 for k in range(5)}

    versions = {v.series_uid: v for v in store.series_versions()}
    for study in studies:
        version = versions[study["series_uid"]]
        assert (version.source, version.version, version.instance_count) == ("listener", 1, len(study["dicom_files"]))
        assert all(Path(i.path).is_file() for i in store.instances(version.id))
    # The same series again, unchanged: the store records nothing new.
    storescu(studies[0]["dicom_files"], listener.port, "SEGMAP")
    again = [v for v in store.series_versions() if v.series_uid == studies[0]["series_uid"]]
    assert [(v.version, v.instance_count) for v in again] == [(1, len(studies[0]["dicom_files"]))]
    assert len(store.series_versions()) == 5


def test_an_instance_sent_again_with_different_content_is_refused_and_the_stored_one_kept(tmp_path,
                                                                                        listener_factory, caplog):
    """Integrity of a series: a SOP Instance UID names one instance. The same bytes again change nothing; other
    bytes under a stored UID (while the series collects, and after its version closed) are refused with 0xC000 and
    a log line, never silently swapped under a series version or a job that already uses the file."""
    caplog.set_level(logging.INFO, logger="segmap")
    store = JobStore(tmp_path / "work" / "store.sqlite")
    study = write_phantom_study(tmp_path / "ct", **SMALL)
    files = study["dicom_files"]
    listener = listener_factory(on_arrival=store.record_instance)
    storescu(files, listener.port, "SEGMAP")
    stored = sorted((tmp_path / "spool").rglob("*.dcm"))
    before = {p: p.read_bytes() for p in stored}

    storescu(files, listener.port, "SEGMAP")  # the same bytes again
    (version,) = store.series_versions()
    assert (version.version, version.instance_count) == (1, len(files))

    tampered = pydicom.dcmread(files[0])
    tampered.PixelData = bytes(len(tampered.PixelData))  # other pixels, same UIDs
    path = tmp_path / "tampered.dcm"
    tampered.save_as(path, enforce_file_format=True)
    assert _send_with_pynetdicom(listener.port, tampered) == 0xC000
    assert f"SOP Instance {tampered.SOPInstanceUID} of series {study['series_uid']} is already stored with " \
           f"different content" in caplog.text
    store.close_series(version.id, [], "test: closed", instance_count=len(files))
    assert _send_with_pynetdicom(listener.port, tampered) == 0xC000  # after the version closed: still refused
    assert [(v.version, v.instance_count) for v in store.series_versions()] == [(1, len(files))]
    assert {p: p.read_bytes() for p in sorted((tmp_path / "spool").rglob("*.dcm"))} == before
    assert listener.counters()["instances_refused"] == 2


def test_listener_stores_a_jpeg2000_series_as_received(tmp_path, listener_factory):
    pytest.importorskip("openjpeg")
    study = write_phantom_study(tmp_path / "ct", **SMALL, transfer_syntax=JPEG2000Lossless)
    listener = listener_factory()

    storescu(study["dicom_files"], listener.port, "SEGMAP", options=("-xv",))

    arrivals = listener.on_arrival.arrivals
    assert len(arrivals) == len(study["dicom_files"])
    by_sop = {pydicom.dcmread(f).SOPInstanceUID: f for f in study["dicom_files"]}
    for arrival in arrivals:
        stored = pydicom.dcmread(arrival.path)
        assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
        # The encapsulated JPEG 2000 stream is byte for byte what the sender had: never decoded, never re-encoded.
        assert stored.PixelData == pydicom.dcmread(by_sop[arrival.sop_uid]).PixelData


def test_listener_rejects_an_unknown_calling_ae_and_keeps_answering(tmp_path, listener_factory, caplog):
    study = write_phantom_study(tmp_path / "ct", **SMALL)
    listener = listener_factory(allowed_calling_ae_titles=["CT01"])
    caplog.set_level(logging.INFO, logger="segmap")

    refused = storescu(study["dicom_files"][:2], listener.port, "SEGMAP", calling_aet="INTRUDER", check=False)

    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in (refused.stdout + refused.stderr)
    assert listener.on_arrival.arrivals == [] and not list(listener.spool.root.rglob("*.dcm"))
    assert "calling AE INTRUDER) rejected: calling AE title not recognised" in caplog.text
    assert echoscu(listener.port, "SEGMAP", calling_aet="CT01") == 0
    assert echoscu(listener.port, "SEGMAP", calling_aet="OTHER") != 0
    storescu(study["dicom_files"][:2], listener.port, "SEGMAP", calling_aet="CT01")
    assert len(listener.on_arrival.arrivals) == 2


def test_listener_rejects_a_peer_address_that_is_not_allowed(tmp_path, listener_factory, caplog):
    study = write_phantom_study(tmp_path / "ct", **SMALL)
    caplog.set_level(logging.INFO, logger="segmap")
    listener = listener_factory(allowed_peers=["10.0.0.0/8"])

    refused = storescu(study["dicom_files"][:1], listener.port, "SEGMAP", check=False)

    assert refused.returncode != 0 and listener.on_arrival.arrivals == []
    assert "connection from 127.0.0.1 refused: peer address not allowed" in caplog.text
    assert listener.counters()["associations_refused"] == 1
    allowed = listener_factory(allowed_peers=["127.0.0.1"])
    storescu(study["dicom_files"][:1], allowed.port, "SEGMAP")
    assert len(allowed.on_arrival.arrivals) == 1


def test_listener_stop_aborts_a_long_transfer_after_the_grace_period_and_keeps_what_it_answered(tmp_path,
                                                                                                 listener_factory):
    study = write_phantom_study(tmp_path / "ct", shape_zyx=(40, 16, 16))
    recorder = Recorder()

    def slow(arrival):  # a slow disk or store: the transfer is still going when the service stops
        recorder(arrival)
        time.sleep(0.1)

    listener = listener_factory(on_arrival=slow)
    done = {}
    sender = threading.Thread(target=lambda: done.update(
        run=storescu(study["dicom_files"], listener.port, "SEGMAP", check=False)))
    sender.start()
    wait_for(lambda: len(recorder.arrivals) >= 3, 30, "the first instances")
    started = time.monotonic()
    listener.stop(grace_s=0.5)
    took = time.monotonic() - started
    sender.join(timeout=60)

    assert took < 5, f"stop took {took:.1f} s"
    assert done["run"].returncode != 0  # the sender knows it must send again
    assert 3 <= len(recorder.arrivals) < 40
    assert all(pydicom.dcmread(a.path).SOPInstanceUID == a.sop_uid for a in recorder.arrivals)


def test_listener_survives_garbage_and_early_closes(listener_factory):
    listener = listener_factory(acse_timeout=2)
    rng = __import__("random").Random(7)
    payloads = [bytes(rng.randrange(256) for _ in range(4096)),  # random bytes
                b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"\x00" * 64,  # an A-ASSOCIATE-RQ header claiming 4 GiB
                b"\x01\x00\x00\x00\x00\x00\x00\x44\x00\x01",  # a request cut off mid-PDU
                b""]  # connect and close at once
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
            if payload:
                try:
                    s.sendall(payload)
                except OSError:
                    pass  # the listener may already have dropped us: that is the point
    assert echoscu(listener.port, "SEGMAP") == 0
    assert listener.on_arrival.arrivals == []
    # The connections that never associated are dropped after the ACSE timeout: they hold no thread for long.
    wait_for(lambda: listener.open_associations == 0, 10, "the garbage connections to be dropped")
    assert echoscu(listener.port, "SEGMAP") == 0


def _send_with_pynetdicom(port: int, dataset) -> int:
    """C-STORE ``dataset`` with a pynetdicom SCU (to send what storescu would refuse to); returns the status."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGMAP")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status)
    finally:
        assoc.release()


def test_listener_answers_cannot_understand_for_a_dataset_without_uids(tmp_path, listener_factory, caplog):
    _, ds = _part10(tmp_path)
    del ds.SeriesInstanceUID
    listener = listener_factory()
    caplog.set_level(logging.INFO, logger="segmap")
    assert _send_with_pynetdicom(listener.port, ds) == 0xC000
    assert listener.on_arrival.arrivals == []
    assert f"SOP {ds.SOPInstanceUID}: SeriesInstanceUID is missing: refused" in caplog.text


def test_listener_answers_out_of_resources_when_the_spool_cannot_be_written(tmp_path, listener_factory, caplog):
    _, ds = _part10(tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the spool folder should be")
    listener = listener_factory(spool=Spool(blocked))
    caplog.set_level(logging.INFO, logger="segmap")
    assert _send_with_pynetdicom(listener.port, ds) == 0xA700
    assert listener.on_arrival.arrivals == []
    assert f"SOP {ds.SOPInstanceUID}: cannot be written" in caplog.text


def test_listener_answers_out_of_resources_when_the_arrival_cannot_be_recorded(tmp_path, listener_factory, caplog):
    _, ds = _part10(tmp_path)
    listener = listener_factory(on_arrival=Recorder(fail=True))
    caplog.set_level(logging.INFO, logger="segmap")
    assert _send_with_pynetdicom(listener.port, ds) == 0xA700
    assert "not recorded (RuntimeError: database is locked)" in caplog.text


def test_listener_logs_no_patient_name_id_or_birth_date(tmp_path, listener_factory, caplog):
    study = write_phantom_study(tmp_path / "ct", **SMALL, patient_name="SECRET^NAME", patient_id="SECRET-ID")
    for f in study["dicom_files"]:  # a birth date too, so that a leak of it would show
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = "19230405"
        ds.save_as(f)
    caplog.set_level(logging.DEBUG)  # every logger, pynetdicom's too
    listener = listener_factory(allowed_calling_ae_titles=["CT01"])
    storescu(study["dicom_files"], listener.port, "SEGMAP", calling_aet="CT01")
    storescu(study["dicom_files"][:1], listener.port, "SEGMAP", calling_aet="NOPE", check=False)
    assert len(listener.on_arrival.arrivals) == len(study["dicom_files"])
    assert study["series_uid"] in caplog.text  # the log does name the series ...
    for secret in ("SECRET", "19230405"):  # ... and nothing that identifies the patient
        assert secret not in caplog.text


def test_listener_settings_are_checked_naming_the_key(tmp_path):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ServiceConfigError, match="listener.allowed_peers"):
        DicomListener("SEGMAP", "127.0.0.1", 0, spool=spool, on_arrival=print, allowed_peers=["nope"])
    with pytest.raises(ServiceConfigError, match="listener.ae_title"):
        DicomListener("A" * 17, "127.0.0.1", 0, spool=spool, on_arrival=print)
    with pytest.raises(ServiceConfigError, match="listener.allowed_calling_ae_titles"):
        DicomListener("SEGMAP", "127.0.0.1", 0, spool=spool, on_arrival=print, allowed_calling_ae_titles=[""])


# -- Orthanc follower ---------------------------------------------------------------------------------------------

@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc (StableAge 2 s) with its own storage, stopped after the test."""
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    yield server
    server.stop()


def _last_change(server) -> int:
    return server.get("/changes?last")["Last"]


def _follower(server, tmp_path, client=None, **kwargs) -> OrthancFollower:
    store = JobStore(tmp_path / "work" / "store.sqlite")
    return OrthancFollower(client or OrthancClient(server.url), store, Spool(tmp_path / "work" / "spool"), **kwargs)


def _versions(store, series_uid):
    return [v for v in store.series_versions() if v.series_uid == series_uid]


def test_follower_records_each_instance_once_with_the_cursor_sees_stable_series_and_fetches(tmp_path, orthanc):
    study = write_phantom_study(tmp_path / "ct", shape_zyx=(48, 64, 64))
    storescu(study["dicom_files"], orthanc.dicom_port, orthanc.aet)
    follower = _follower(orthanc, tmp_path, name="pacs")
    store = follower.store

    assert follower.poll_once() == 48
    assert store.cursor("orthanc:pacs") == _last_change(orthanc)
    [version] = _versions(store, study["series_uid"])
    assert (version.source, version.study_uid, version.modality, version.instance_count) == (
        "orthanc:pacs", study["study_uid"], "CT", 48)
    instances = store.instances(version.id)
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in study["dicom_files"]}
    assert {i.sop_uid for i in instances} == sent
    assert all(i.remote_id and i.path is None for i in instances)  # fetched only when the job runs

    assert follower.poll_once() == 0  # a second poll records nothing new
    assert _versions(store, study["series_uid"])[0].instance_count == 48

    # Orthanc's StableSeries (StableAge 2 s) reaches the store as the series' stable mark.
    wait_for(lambda: follower.poll_once() == 0 and _versions(store, study["series_uid"])[0].stable_at, 30,
             "StableSeries in the store")
    assert store.cursor("orthanc:pacs") == _last_change(orthanc)
    assert follower.is_stable(study["series_uid"]) is True
    assert follower.is_stable("1.2.3.4.5") is False

    pairs = [(i.sop_uid, i.remote_id) for i in instances]
    paths = follower.fetch(study["study_uid"], study["series_uid"], pairs)
    assert len(paths) == 48
    for (sop, _), path in zip(pairs, paths):
        assert pydicom.dcmread(path).SOPInstanceUID == sop
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert follower.fetch(study["study_uid"], study["series_uid"], pairs) == paths  # nothing downloaded twice
    assert [p.stat().st_mtime_ns for p in paths] == stamps

    # A remote id that holds another instance than the one listed is refused, naming both.
    swapped = [(pairs[0][0], pairs[1][1])]
    follower.spool.path(study["study_uid"], study["series_uid"], pairs[0][0]).unlink()
    with pytest.raises(OrthancError, match=f"expected SOP {pairs[0][0]}"):
        follower.fetch(study["study_uid"], study["series_uid"], swapped)


def test_follower_resumes_from_its_cursor_after_orthanc_and_the_service_restart(tmp_path, orthanc):
    study = write_phantom_study(tmp_path / "ct", shape_zyx=(30, 32, 32))
    files = study["dicom_files"]
    storescu(files[:12], orthanc.dicom_port, orthanc.aet)
    first = _follower(orthanc, tmp_path, page_size=5)
    assert first.poll_once() == 12

    orthanc.restart()  # Orthanc's change log is on disk: its sequence numbers go on
    storescu(files[12:], orthanc.dicom_port, orthanc.aet)
    first.store.close()
    second = _follower(orthanc, tmp_path, page_size=5)  # a restarted service: new store handle, new follower
    assert second.poll_once() == 18

    [version] = _versions(second.store, study["series_uid"])
    assert version.instance_count == 30
    assert {i.sop_uid for i in second.store.instances(version.id)} == {pydicom.dcmread(f).SOPInstanceUID
                                                                         for f in files}
    assert second.store.cursor("orthanc:main") == _last_change(orthanc)


def test_orthanc_going_down_mid_poll_is_one_line_and_the_next_poll_catches_up(tmp_path, orthanc):
    study = write_phantom_study(tmp_path / "ct", shape_zyx=(20, 32, 32))
    storescu(study["dicom_files"], orthanc.dicom_port, orthanc.aet)

    class StopsAfterFirstPage(OrthancClient):
        """Orthanc dies right after answering the first page of the change log."""

        pages = 0

        def changes(self, since, limit=100):
            answer = super().changes(since, limit)
            self.pages += 1
            if self.pages == 1:
                orthanc.stop(kill=True)
            return answer

    follower = _follower(orthanc, tmp_path, client=StopsAfterFirstPage(orthanc.url), page_size=8)
    with pytest.raises(OrthancError) as failure:
        follower.poll_once()
    message = str(failure.value)
    assert "\n" not in message and orthanc.url in message and "cannot be reached" in message
    assert follower.store.cursor("orthanc:main") == 0  # the page that failed half-way committed nothing

    orthanc.start()
    assert follower.poll_once() == 20
    [version] = _versions(follower.store, study["series_uid"])
    assert version.instance_count == 20
    assert follower.store.cursor("orthanc:main") == _last_change(orthanc)


def test_follower_reads_a_replaced_orthanc_database_from_the_start(tmp_path, orthanc, caplog):
    study = write_phantom_study(tmp_path / "ct", **SMALL)
    storescu(study["dicom_files"], orthanc.dicom_port, orthanc.aet)
    follower = _follower(orthanc, tmp_path)
    follower.store.record_changes("orthanc:main", 5000, [])  # the cursor of an earlier Orthanc database
    caplog.set_level(logging.WARNING, logger="segmap")

    assert follower.poll_once() == len(study["dicom_files"])
    assert "before our cursor 5000 (database replaced?)" in caplog.text
    assert follower.store.cursor("orthanc:main") == _last_change(orthanc)


def test_orthanc_errors_never_show_the_credentials(tmp_path):
    closed = f"127.0.0.1:{free_port()}"
    for client in (OrthancClient(f"http://admin:hunter2@{closed}"),
                   OrthancClient(f"http://{closed}/", username="admin", password="hunter2")):
        with pytest.raises(OrthancError) as failure:
            client.system()
        assert str(failure.value) == f"Orthanc at http://{closed} cannot be reached (GET /system: connection refused)"
        assert "hunter2" not in repr(client)
