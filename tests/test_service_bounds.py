"""The DICOM listener's resources are bounded (issue 20, item 2), on a real listener over TCP: idle and refused
connections hold no thread and no CPU and lock no sender out; a 300 MiB instance and a deflate bomb pass through a
small buffer (the listener's peak memory measured in a process of its own), and an instance over
``max_instance_bytes`` gets a failure status with nothing recorded."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_factory import write_series
from pacs import free_port, wait_for
from segmap.service.intake.listener import DicomListener
from segmap.service.spool import Spool

pytestmark = pytest.mark.service

MiB = 1 << 20
OUT_OF_RESOURCES = 0xA700


class Arrivals(list):
    def __call__(self, arrival):
        self.append(arrival)


@pytest.fixture
def listener_factory(tmp_path):
    started = []

    def make(**kwargs) -> DicomListener:
        kwargs.setdefault("spool", Spool(tmp_path / "spool"))
        kwargs.setdefault("on_arrival", Arrivals())
        listener = DicomListener("SEGMAP", "127.0.0.1", free_port(), **kwargs)
        listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop()


def _second_loopback() -> str:
    """127.0.0.2: on Linux the whole 127/8 is loopback."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here")
    return "127.0.0.2"


def _associate_s(port: int) -> float:
    """Seconds an allowed sender takes to associate (and C-ECHO) with pynetdicom; fails the test if it cannot."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGMAP")
    took = time.monotonic() - start
    assert assoc.is_established, "an allowed sender could not associate"
    try:
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    return took


def test_fifty_idle_connections_lock_no_sender_out_and_cost_no_cpu(listener_factory):
    other = _second_loopback()
    listener = listener_factory(allowed_peers=["127.0.0.1"])
    port = listener.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(25)]
    refused = [socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(other, 0))
               for _ in range(25)]
    try:
        # The refused address's connections are closed at accept: the peer sees the end of the stream at once.
        for s in refused:
            s.settimeout(2)
            assert s.recv(1) == b"", "a connection from a peer that is not allowed was kept open"
        assert listener.counters()["associations_refused"] == 25
        # No association thread exists for any of them.
        assert listener.open_associations == 0

        took = _associate_s(port)
        assert took < 1.0, f"an allowed sender took {took:.2f} s to associate past 50 idle connections"

        cpu = time.process_time()
        time.sleep(5)
        used = time.process_time() - cpu
        assert used < 0.5, f"the listener used {used:.2f} CPU-seconds in 5 s with idle connections open"
    finally:
        for s in idle + refused:
            s.close()


def test_silent_connections_are_closed_after_the_first_pdu_timeout(listener_factory):
    listener = listener_factory(first_pdu_timeout_s=0.5)
    silent = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    try:
        start = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - start < 3
    finally:
        silent.close()
    assert _associate_s(listener.port) < 1.0


# -- big instances and deflate bombs ------------------------------------------------------------------------------

def _header(tmp_path: Path, frames: int) -> pydicom.Dataset:
    """A CT instance's attributes for ``frames`` 512x512 16-bit frames, without its pixel data."""
    (path,) = write_series(tmp_path / "template", n=1)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, frames
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _pixel_header(nbytes: int) -> bytes:
    # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length
    return b"\xe0\x7f\x10\x00OW\x00\x00" + nbytes.to_bytes(4, "little")


def _big_instance(tmp_path: Path, nbytes: int) -> tuple[Path, str]:
    """An Explicit VR Little Endian instance of ``nbytes`` of pixel data, written without holding it in memory."""
    ds = _header(tmp_path, nbytes // (512 * 512 * 2))
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    block = bytes(MiB)
    with open(path, "ab") as f:
        f.write(_pixel_header(nbytes))
        for _ in range(nbytes // MiB):
            f.write(block)
    return path, str(ds.SOPInstanceUID)


def _deflate_bomb(tmp_path: Path, inflated: int) -> tuple[Path, str]:
    """A Deflated Explicit VR Little Endian instance of ~1 MiB that inflates to ``inflated`` bytes."""
    ds = _header(tmp_path, inflated // (512 * 512 * 2))
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds_bytes = io.BytesIO()
    fp = pydicom.filebase.DicomFileLike(ds_bytes)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path = tmp_path / "bomb.dcm"
    block = bytes(MiB)
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(deflater.compress(ds_bytes.getvalue() + _pixel_header(inflated)))
        for _ in range(inflated // MiB):
            f.write(deflater.compress(block))
        f.write(deflater.flush())
    assert path.stat().st_size < 4 * MiB
    return path, str(ds.SOPInstanceUID)


def _send_file(port: int, path: Path, syntax) -> int:
    """C-STORE the file as it is (pynetdicom's chunked send: the test process does not read it whole)."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, syntax)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 120
        assoc = ae.associate("127.0.0.1", port, ae_title="SEGMAP")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


_LISTENER = """
import sys
from segmap.service.intake.listener import DicomListener
from segmap.service.spool import Spool
arrivals = []
listener = DicomListener("SEGMAP", "127.0.0.1", 0, spool=Spool(sys.argv[1]), on_arrival=arrivals.append,
                         max_instance_bytes=int(sys.argv[2]))
listener.start()
print(listener.address[1], flush=True)
for line in sys.stdin:
    print(" ".join(a.sop_uid for a in arrivals), flush=True)
listener.stop()
"""


def _data_set_bytes(path: Path) -> int:
    from pynetdicom.dsutils import split_dataset

    return path.stat().st_size - split_dataset(path)[1]


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no VmHWM in /proc (not Linux)")


def test_a_300_mib_instance_and_a_deflate_bomb_pass_through_a_small_buffer(tmp_path):
    big, big_uid = _big_instance(tmp_path, 300 * MiB)
    bomb, bomb_uid = _deflate_bomb(tmp_path, 1024 * MiB)
    (small,) = write_series(tmp_path / "small", n=1)
    spool = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", _LISTENER, str(spool), str(512 * MiB)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        def arrivals() -> list[str]:
            proc.stdin.write("\n")
            proc.stdin.flush()
            return proc.stdout.readline().split()

        assert _send_file(port, small, ExplicitVRLittleEndian) == 0  # everything imported and warm
        before = _peak_rss(proc.pid)

        assert _send_file(port, big, ExplicitVRLittleEndian) == 0
        assert _send_file(port, bomb, DeflatedExplicitVRLittleEndian) == OUT_OF_RESOURCES
        grown = _peak_rss(proc.pid) - before
        assert grown < 64 * MiB, f"the listener's peak memory grew by {grown / MiB:.0f} MiB"

        stored = {p.stem: p for p in spool.rglob("*.dcm")}
        assert big_uid in stored and _data_set_bytes(stored[big_uid]) == _data_set_bytes(big)
        assert bomb_uid not in stored, "the deflate bomb was stored"
        assert bomb_uid not in arrivals() and big_uid in arrivals()
        assert not list(spool.rglob("*.tmp")), "a partial file was left in the spool"
    finally:
        proc.stdin.close()
        proc.wait(30)


def test_an_instance_over_the_size_limit_gets_a_failure_status_and_nothing_is_recorded(tmp_path, listener_factory):
    listener = listener_factory(max_instance_bytes=1 * MiB)
    big, uid = _big_instance(tmp_path, 2 * MiB)
    assert _send_file(listener.port, big, ExplicitVRLittleEndian) == OUT_OF_RESOURCES
    assert listener.on_arrival == [] and not list((tmp_path / "spool").rglob("*"))
    (small,) = write_series(tmp_path / "small", n=1)
    assert _send_file(listener.port, small, ExplicitVRLittleEndian) == 0
    assert len(listener.on_arrival) == 1
    assert listener.counters() == {"instances_received": 1, "instances_refused": 1, "associations_refused": 0}
    wait_for(lambda: listener.open_associations == 0, 10, "the associations to end")
