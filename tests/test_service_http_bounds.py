"""The Orthanc follower and the Orthanc client (and so the Orthanc destination) cannot hang or loop (issue 20, item
6), against a small misbehaving HTTP server on loopback: a deadline per request, not per read; a size cap per
answer; a back-off when ``/changes`` says ``Done: false`` without moving ``Last``."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from segmap.orthanc import OrthancClient, OrthancRequestError
from segmap.service.intake.orthanc import OrthancFollower
from segmap.service.spool import Spool
from segmap.service.store import JobStore

pytestmark = pytest.mark.service

MiB = 1 << 20


class Misbehaving(BaseHTTPRequestHandler):
    """``/trickle``: a 30-byte JSON answer, one byte a second; ``/slow-headers``: the status line a byte a second;
    ``/big``: 8 MiB of JSON; ``/changes``: always ``Done: false`` at ``Last`` 5."""

    hits: dict[str, int] = {}
    stop = threading.Event()

    def log_message(self, *args):
        pass

    def _trickle(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.stop.is_set():
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(1.0)

    def do_GET(self):
        path = self.path.split("?")[0]
        Misbehaving.hits[path] = Misbehaving.hits.get(path, 0) + 1
        try:
            if path == "/slow-headers":
                self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                return
            if path == "/trickle":
                body = json.dumps({"x": "y" * 20}).encode()
                self._head(len(body))
                self._trickle(body)
                return
            if path == "/big":
                body = json.dumps(["x" * 1000] * (8 * 1024)).encode()
                self._head(None)  # no Content-Length: the cap must hold while reading
                self.wfile.write(body)
                return
            if path == "/changes":
                body = json.dumps({"Changes": [{"ChangeType": "NewPatient", "ID": "p", "Seq": 5}], "Last": 5,
                                   "Done": False}).encode()
                self._head(len(body))
                self.wfile.write(body)
                return
            self.send_error(404)
        except OSError:
            pass

    def _head(self, length):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
        self.end_headers()


@pytest.fixture
def server():
    Misbehaving.hits = {}
    Misbehaving.stop.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Misbehaving.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path", ["/trickle", "/slow-headers"])
def test_a_server_that_trickles_its_answer_is_cut_at_the_deadline(server, path):
    client = OrthancClient(server, timeout=2.0)
    start = time.monotonic()
    with pytest.raises(OrthancRequestError, match=r"no whole answer within 2 s") as caught:
        client._get(path)
    took = time.monotonic() - start
    assert took < 3.5, f"a 2 s timeout returned after {took:.1f} s"
    assert caught.value.temporary  # no answer: worth asking again later


def test_an_answer_over_the_size_cap_is_refused_while_reading(server):
    client = OrthancClient(server, timeout=10.0, max_response_bytes=1 * MiB)
    with pytest.raises(OrthancRequestError, match=r"with more than 1048576 bytes: refused"):
        client._get("/big")
    assert OrthancClient(server, timeout=10.0)._get("/big")[0] == "x" * 1000  # under the default cap: read whole


def test_a_changes_feed_that_does_not_advance_is_asked_again_only_after_a_back_off(server, tmp_path, caplog):
    store = JobStore(tmp_path / "store.sqlite")
    follower = OrthancFollower(OrthancClient(server, timeout=2.0), store, Spool(tmp_path / "spool"), name="stuck",
                               stall_backoff_s=0.5)
    done = threading.Event()

    def loop():  # the service's follower loop, polling every 50 ms
        while not done.is_set():
            follower.poll_once()
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(3.0)
    done.set()
    thread.join(10)
    assert not thread.is_alive(), "poll_once never returned"
    # First page moves the cursor to 5; then a stuck feed asked at 0, 0.5, 1.5 s (+ the doubling back-off): a few
    # requests, not hundreds a second.
    assert 2 <= Misbehaving.hits["/changes"] <= 6, Misbehaving.hits
    assert store.cursor("orthanc:stuck") == 5
    assert caplog.text.count("without moving Last past 5") == 1
    store.close()
