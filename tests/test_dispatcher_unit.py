"""The dispatcher process on its own: scripted mongrel2 and worker peers, exact checks.

The real dispatcher runs as a subprocess; the test plays mongrel2 (a PUSH and a
SUB socket bound where mongrel2 binds them) and the workers (framing connections
speaking dispatch_protocol), so every routing rule is checked message by
message. The stack with the real mongrel2 and workers is in
test_dispatcher_stack.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from http import HTTPStatus
from pathlib import Path

import pytest
import tnetstring
import zmq

from circus_wsgi import dispatch_protocol as dp
from circus_wsgi.exits import STUCK_SIGNAL
from circus_wsgi.flowcontrol import BUDGET
from circus_wsgi.protocol import parse
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import Settings
from circus_wsgi.status import read_status
from framed_peer import FramedPeer

SENDER = b"f400bf85-4538-4f7a-8908-67e313d515c2"
WAIT_MS = 3000


def request_bytes(conn: int, path: bytes = b"/", headers: dict | None = None,
                  body: bytes = b"") -> bytes:
    fields = {b"METHOD": b"GET", b"VERSION": b"HTTP/1.1", b"PATH": path, b"URI": path,
              b"PATTERN": b"/", b"host": b"localhost"}
    fields.update(headers or {})
    return b"%s %d %s %s%d:%s," % (SENDER, conn, path, tnetstring.dumps(fields), len(body), body)


def notice_bytes(conn: int, kind: str, credits: int = 0) -> bytes:
    headers = {b"METHOD": b"JSON"}
    if credits:
        headers[b"DOWNLOAD_CREDITS"] = str(credits).encode()
    body = json.dumps({"type": kind}, separators=(",", ":")).encode()  # as mongrel2 writes it
    return b"%s %d @* %s%d:%s," % (SENDER, conn, tnetstring.dumps(headers), len(body), body)


class Mongrel2Peer:
    """Plays mongrel2's two handler sockets."""

    def __init__(self, context: zmq.Context, run: RunDir) -> None:
        self.push = context.socket(zmq.PUSH)
        self.push.bind(run.mongrel2_send)
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.bind(run.mongrel2_recv)

    def attend(self, seconds: float) -> None:
        """Poll the SUB socket for a while, as mongrel2 does all the time.

        A bound SUB sends its subscription to a newly connected PUB only when its
        owner polls it; until then the dispatcher's responses are dropped.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert not self.sub.poll(10), "a response came before any request"

    def send(self, data: bytes) -> None:
        self.push.send(data)

    def receive(self, timeout_ms: int = WAIT_MS) -> tuple[bytes, bytes]:
        """(connection ids, body) of the next response message (mongrel2 reads each part
        of a multipart message as a message of its own, and so does this)."""
        assert self.sub.poll(timeout_ms), "no response reached mongrel2"
        data = self.sub.recv()
        sender, rest = data.split(b" ", 1)
        assert sender == SENDER
        length, rest = rest.split(b":", 1)
        ids, body = rest[:int(length)], rest[int(length) + 2:]
        return ids, body

    def receive_error(self, conn: int) -> bytes:
        """The status line of a canned error for ``conn``, checking the close after it."""
        ids, body = self.receive()
        assert ids == str(conn).encode()
        ids, closing = self.receive()
        assert (ids, closing) == (str(conn).encode(), b"")
        return body.split(b"\r\n", 1)[0]

    def silent(self, timeout_ms: int = 300) -> bool:
        return not self.sub.poll(timeout_ms)


class WorkerPeer:
    """Plays one worker: a connection that announces a pid and free slots."""

    def __init__(self, run: RunDir, pid: int, free: int = 1) -> None:
        self.pid = pid
        self.inbox: list[list[bytes]] = []  # the rest of a REQUEST that carried several
        self.windows: dict[bytes, int] = {}  # conn_id -> window left, as last handed over
        self.sock = FramedPeer.connect(run.dispatcher)
        self.sock.send_multipart([dp.READY, str(pid).encode(), str(free).encode(),
                                  str(free).encode(), b"0"])

    def next(self, timeout_ms: int = WAIT_MS) -> list[bytes]:
        """The next message that is not a heartbeat; a REQUEST or NOTICE carrying several
        mongrel2 messages counts as one message each."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.inbox:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(left * 1000), f"worker {self.pid} got nothing"
            command, *frames = self.sock.recv_multipart()
            if command == dp.REQUEST:
                windows, *frames = frames
                for window, frame in zip(windows.split(), frames, strict=True):
                    self.windows[parse(frame).conn_id] = int(window)
            if command in (dp.REQUEST, dp.NOTICE):
                self.inbox += [[command, frame] for frame in frames]
            elif command != dp.HEARTBEAT:
                self.inbox.append([command, *frames])
        return self.inbox.pop(0)

    def take(self) -> bytes:
        """The connection id of the next request handed to this worker."""
        command, data = self.next()
        assert command == dp.REQUEST
        return parse(data).conn_id

    def idle(self, timeout_ms: int = 400) -> bool:
        try:
            self.next(timeout_ms)
        except AssertionError:
            return True
        return False

    def done(self, conn: bytes, body: bytes = b"HTTP/1.1 200 OK\r\n\r\n") -> None:
        m2 = b"%s %d:%s, %s" % (SENDER, len(conn), conn, body)
        self.sock.send_multipart([dp.OUTPUT, conn, b"", b"200", m2])


@pytest.fixture
def stack(run_dir: Path, request):
    """A dispatcher subprocess between a scripted mongrel2 and scripted workers.

    No prefetch unless a test asks (``indirect`` parametrization with settings).
    """
    run = RunDir(run_dir).create()
    context = zmq.Context()
    mongrel2 = Mongrel2Peer(context, run)
    settings = Settings(run_dir=str(run_dir), queue_timeout=1, timeout=1,
                        max_body_size=5000, content_length=1024,
                        **{"prefetch": 0, "max_queue": 3, **getattr(request, "param", {})})
    process = subprocess.Popen([sys.executable, "-m", "circus_wsgi", "dispatcher",
                                *settings.to_argv()])
    deadline = time.monotonic() + 10
    while not os.path.exists(run.dispatcher):
        assert time.monotonic() < deadline and process.poll() is None, "dispatcher did not start"
        time.sleep(0.02)
    mongrel2.attend(0.2)
    helpers, peers = [], []

    def worker(free: int = 1, pid: int | None = None) -> WorkerPeer:
        if pid is None:
            helper = subprocess.Popen(["sleep", "60"])
            helpers.append(helper)
            pid = helper.pid
        peer = WorkerPeer(run, pid, free)
        peers.append(peer)
        time.sleep(0.1)  # READY is taken before the next request
        return peer

    yield mongrel2, worker, process, settings, helpers
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(10) == 0
    finally:
        process.kill()
        for helper in helpers:
            helper.kill()
            helper.wait()
        for peer in peers:
            peer.sock.close()
        context.destroy(linger=0)


def test_requests_go_to_the_least_recently_freed_ready_worker(stack):
    mongrel2, worker, *_ = stack
    first, second = worker(), worker()
    for conn in (1, 2, 3):
        mongrel2.send(request_bytes(conn))
    assert first.take() == b"1"
    assert second.take() == b"2"
    assert first.idle() and second.idle()  # the third waits: nobody has a free slot
    second.done(b"2")
    assert mongrel2.receive() == (b"2", b"HTTP/1.1 200 OK\r\n\r\n")
    assert second.take() == b"3"


def test_a_worker_gets_as_many_requests_as_it_has_slots(stack):
    mongrel2, worker, *_ = stack
    threaded = worker(free=3)
    for conn in (1, 2, 3, 4):
        mongrel2.send(request_bytes(conn))
    assert [threaded.take() for _ in range(3)] == [b"1", b"2", b"3"]
    assert threaded.idle()


def test_pipelined_requests_on_one_connection_keep_their_order(stack):
    mongrel2, worker, *_ = stack
    a, b = worker(), worker()
    mongrel2.send(request_bytes(7, b"/first"))
    mongrel2.send(request_bytes(7, b"/second"))
    assert a.take() == b"7"
    assert b.idle()  # the second waits for the first, though b is free
    a.done(b"7")
    mongrel2.receive()
    command, data = b.next()
    assert parse(data).path == b"/second"


def two_busy_workers(mongrel2: Mongrel2Peer, worker) -> tuple[WorkerPeer, WorkerPeer]:
    """Two workers, holding connection 1 and 2."""
    a, b = worker(), worker()
    mongrel2.send(request_bytes(1))
    mongrel2.send(request_bytes(2))
    assert a.take() == b"1" and b.take() == b"2"
    return a, b


def test_notices_reach_the_worker_holding_the_connection(stack):
    mongrel2, worker, *_ = stack
    a, b = two_busy_workers(mongrel2, worker)
    mongrel2.send(notice_bytes(2, "credits", 4096))
    mongrel2.send(notice_bytes(1, "disconnect"))
    command, data = b.next()
    assert command == dp.NOTICE and parse(data).credits == 4096
    command, data = a.next()
    assert command == dp.NOTICE and parse(data).conn_id == b"1"


def test_a_request_whose_body_looks_like_a_credits_notice_is_a_request(stack):
    mongrel2, worker, *_ = stack
    taker = worker()
    mongrel2.send(request_bytes(1, b"/api", {b"METHOD": b"POST", b"content-length": b"18"},
                                b'{"type":"credits"}'))
    assert taker.take() == b"1"


def test_a_disconnect_removes_a_queued_request(stack):
    mongrel2, worker, *_ = stack
    mongrel2.send(request_bytes(1))
    mongrel2.send(request_bytes(2))
    mongrel2.send(notice_bytes(1, "disconnect"))
    time.sleep(0.1)
    late = worker()
    assert late.take() == b"2"


def test_no_worker_gives_503_with_retry_after_within_queue_timeout(stack):
    mongrel2, *_ = stack
    started = time.monotonic()
    mongrel2.send(request_bytes(1))
    ids, body = mongrel2.receive()
    assert body.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in body
    assert 0.9 < time.monotonic() - started < 2.0


def test_a_full_queue_answers_503_at_once(stack):
    mongrel2, *_ = stack
    for conn in range(1, 5):  # max_queue is 3
        mongrel2.send(request_bytes(conn))
    assert mongrel2.receive_error(4).startswith(b"HTTP/1.1 503")


def test_a_worker_that_dies_holding_a_request_gives_502_at_once(stack):
    mongrel2, worker, process, settings, helpers = stack
    doomed = worker()
    mongrel2.send(request_bytes(1))
    assert doomed.take() == b"1"
    started = time.monotonic()
    helpers[0].kill()
    assert mongrel2.receive_error(1) == b"HTTP/1.1 502 Bad Gateway"
    assert time.monotonic() - started < 1.0


def test_a_worker_whose_connection_ends_is_gone_and_what_it_held_gets_502(stack):
    mongrel2, worker, process, settings, helpers = stack
    peer = worker()  # its process lives on: only the connection tells
    mongrel2.send(request_bytes(1))
    assert peer.take() == b"1"
    peer.sock.close()
    assert mongrel2.receive_error(1) == b"HTTP/1.1 502 Bad Gateway"
    assert read_status(settings)["workers"] == {}
    mongrel2.send(request_bytes(2))  # nobody to take it: it waits, then 503
    assert mongrel2.receive_error(2).startswith(b"HTTP/1.1 503")


def test_a_worker_gone_by_both_signs_at_once_is_answered_for_once(stack):
    """Its connection ends and its pidfd turns readable, often in one wake-up."""
    mongrel2, worker, process, settings, helpers = stack
    for conn in range(1, 6):
        peer = worker()
        mongrel2.send(request_bytes(conn))
        assert peer.take() == b"%d" % conn
        helpers[-1].kill()
        peer.sock.close()
        assert mongrel2.receive_error(conn) == b"HTTP/1.1 502 Bad Gateway"
        assert mongrel2.silent(200) and process.poll() is None
        helpers[-1].wait()


def test_a_stuck_request_gives_504_and_the_worker_is_killed(stack):
    mongrel2, worker, process, settings, helpers = stack
    stuck = worker()
    mongrel2.send(request_bytes(1))
    assert stuck.take() == b"1"
    assert mongrel2.receive_error(1) == b"HTTP/1.1 504 Gateway Timeout"
    assert helpers[0].wait(3) == -STUCK_SIGNAL


def test_a_started_response_is_not_cut_by_timeout(stack):
    mongrel2, worker, *_ = stack
    streaming = worker()
    mongrel2.send(request_bytes(1))
    assert streaming.take() == b"1"
    part = b"%s 1:1, HTTP/1.1 200 OK\r\n\r\n" % SENDER
    streaming.sock.send_multipart([dp.OUTPUT, b"", b"1", b"", part])
    mongrel2.receive()
    assert mongrel2.silent(1500)  # timeout is 1 s; no 504 comes
    streaming.done(b"1", b"tail")
    assert mongrel2.receive() == (b"1", b"tail")


def test_smuggling_gets_400_and_what_follows_on_the_connection_is_dropped(stack):
    mongrel2, worker, *_ = stack
    mongrel2.send(request_bytes(1, headers={b"content-length": b"5",
                                            b"transfer-encoding": b"chunked"}))
    mongrel2.send(request_bytes(1, b"/smuggled"))
    assert mongrel2.receive_error(1) == b"HTTP/1.1 400 Bad Request"
    assert worker().idle()


def test_a_body_over_max_body_size_gets_413(stack):
    mongrel2, worker, *_ = stack
    mongrel2.send(request_bytes(1, headers={b"content-length": b"6000"}))
    # the reason is Python's: "Request Entity Too Large" to 3.12, RFC 9110's "Content Too
    # Large" from 3.13
    assert mongrel2.receive_error(1) == b"HTTP/1.1 413 " + HTTPStatus(413).phrase.encode()


def test_a_leaving_worker_gets_bye_and_nothing_new(stack):
    mongrel2, worker, *_ = stack
    leaving = worker(free=2)
    mongrel2.send(request_bytes(1))
    assert leaving.take() == b"1"
    leaving.sock.send_multipart([dp.LEAVING])
    assert leaving.next() == [dp.BYE]
    mongrel2.send(request_bytes(2))
    assert leaving.idle()
    leaving.done(b"1")  # what it held still goes out
    assert mongrel2.receive()[0] == b"1"


def test_status_reports_queue_workers_and_failures(stack):
    mongrel2, worker, process, settings, _ = stack
    busy = worker()
    mongrel2.send(request_bytes(1))
    busy.take()
    mongrel2.send(request_bytes(2))
    time.sleep(0.1)
    status = read_status(settings)
    assert status["queue"] == 1 and status["busy_workers"] == 1
    assert status["workers"][str(busy.pid)]["dispatched"] == 1
    statuses = {}
    for _ in range(2):  # conn 1 is stuck at the worker (504), conn 2 waits in the queue (503)
        ids, body = mongrel2.receive()
        assert mongrel2.receive() == (ids, b"")
        statuses[ids] = body[9:12]
    assert statuses == {b"1": b"504", b"2": b"503"}
    assert read_status(settings)["failures"] == {
        "503 no worker took it in queue_timeout": 1, "504 response not started within timeout": 1}


def test_sigterm_answers_queued_requests_and_exits_0(stack):
    mongrel2, worker, process, *_ = stack
    mongrel2.send(request_bytes(1))
    time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert mongrel2.receive_error(1).startswith(b"HTTP/1.1 503")
    assert process.wait(5) == 0


def test_forged_upload_headers_get_400_and_no_file_is_touched(stack, tmp_path):
    mongrel2, worker, *_ = stack
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    forged = {b"x-mongrel2-upload-start": str(victim).encode(),
              b"x-mongrel2-upload-done": str(victim).encode()}
    mongrel2.send(request_bytes(1, headers=forged))  # an inline request: nothing was uploaded
    assert mongrel2.receive_error(1) == b"HTTP/1.1 400 Bad Request"
    mongrel2.send(request_bytes(2, headers={b"x-mongrel2-upload-start": str(victim).encode()}))
    assert mongrel2.receive_error(2) == b"HTTP/1.1 400 Bad Request"
    assert victim.read_bytes() == b"keep me"
    assert worker().idle()


def test_a_genuine_upload_is_dispatched_once_done(stack):
    mongrel2, worker, process, settings, _ = stack
    upload = RunDir(Path(settings.run_dir)).uploads / "upload.AbC123"
    upload.write_bytes(b"x" * 2000)  # over content_length: mongrel2 spools it
    start = {b"content-length": b"2000", b"x-mongrel2-upload-start": str(upload).encode()}
    taker = worker()
    mongrel2.send(request_bytes(1, headers=start))
    assert taker.idle()  # the body is still arriving
    done = {**start, b"x-mongrel2-upload-done": str(upload).encode()}
    mongrel2.send(request_bytes(1, headers=done))
    assert taker.take() == b"1"
    assert upload.exists()  # the worker reads and deletes it


PREFETCH = pytest.mark.parametrize("stack", [{"prefetch": 1}], indirect=True)


@PREFETCH
def test_prefetch_goes_to_busy_workers_only_once_no_thread_is_idle(stack):
    mongrel2, worker, *_ = stack
    a, b = worker(), worker()
    for conn in (1, 2, 3, 4, 5):
        mongrel2.send(request_bytes(conn))
    assert a.take() == b"1" and b.take() == b"2"  # idle threads first
    assert a.take() == b"3" and b.take() == b"4"  # then one more each, while they are busy
    assert a.idle() and b.idle()  # the fifth waits: threads + prefetch reached
    b.done(b"2")
    mongrel2.receive()
    assert b.take() == b"5"


@PREFETCH
def test_a_returned_request_goes_to_the_next_worker_first(stack):
    mongrel2, worker, *_ = stack
    slow, other = worker(), worker()
    for conn in (1, 2, 3):
        mongrel2.send(request_bytes(conn))
    assert slow.take() == b"1" and other.take() == b"2" and slow.take() == b"3"
    slow.sock.send_multipart([dp.RETURN, b"3"])  # busy with 1 for long: gives 3 back
    other.done(b"2")
    mongrel2.receive()
    assert other.take() == b"3"
    mongrel2.send(request_bytes(4))
    assert other.take() == b"4"  # prefetch, but not to the worker that gave requests back
    assert slow.idle()
    slow.done(b"1")
    mongrel2.receive()
    mongrel2.send(request_bytes(5))
    assert slow.take() == b"5"


def test_a_malformed_worker_message_is_counted_and_changes_nothing(stack):
    mongrel2, worker, process, settings, _ = stack
    broken = WorkerPeer.__new__(WorkerPeer)
    broken.sock = FramedPeer.connect(RunDir(Path(settings.run_dir)).dispatcher)
    broken.sock.send_multipart([dp.READY, b"not-a-pid"])
    broken.sock.send_multipart([dp.OUTPUT])
    large = b"7" * (64 * 1024)  # frames this large are read as views, not bytes
    broken.sock.send_multipart([dp.OUTPUT, large, b"", b"", b"x"])
    good = worker()
    mongrel2.send(request_bytes(1))
    assert good.take() == b"1" and process.poll() is None
    assert read_status(settings)["malformed"] == 3
    broken.sock.close()


# ------------------------------------------------------------------ batching


def test_requests_waiting_together_go_to_a_worker_in_one_message(stack):
    mongrel2, worker, *_ = stack
    for conn in (1, 2, 3):
        mongrel2.send(request_bytes(conn))
    time.sleep(0.1)  # queued: no worker yet
    peer = worker(free=3)
    command, windows, *frames = peer.sock.recv_multipart()
    assert command == dp.REQUEST and len(windows.split()) == 3
    assert [parse(frame).conn_id for frame in frames] == [b"1", b"2", b"3"]


@pytest.mark.parametrize("stack", [{"max_queue": 1024}], indirect=True)
def test_a_burst_larger_than_one_drain_is_taken_whole(stack):
    """More requests wait than one wake-up takes (BATCH): the rest are taken at once,
    without waiting for mongrel2 to send another."""
    mongrel2, worker, process, *_ = stack
    peer = worker(free=400)
    process.send_signal(signal.SIGSTOP)
    try:
        for conn in range(1, 401):
            mongrel2.send(request_bytes(conn))
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGCONT)
    assert {peer.take() for _ in range(400)} == {b"%d" % conn for conn in range(1, 401)}


@pytest.mark.parametrize("stack", [{"max_queue": 4096}], indirect=True)
def test_what_a_worker_does_not_read_yet_waits_in_order(stack):
    """Requests for a worker that reads slower than they come (megabytes more than its
    socket holds) wait in the dispatcher, in order, and all reach it."""
    mongrel2, worker, process, *_ = stack
    peer = worker(free=3000)
    padding = {b"x-padding": b"p" * 2000}
    for conn in range(1, 1501):
        mongrel2.send(request_bytes(conn, headers=padding))
    time.sleep(1.0)  # the worker reads nothing meanwhile
    assert [peer.take() for _ in range(1500)] == [b"%d" % conn for conn in range(1, 1501)]
    assert process.poll() is None


def test_one_output_finishes_several_requests_and_forwards_in_order(stack):
    mongrel2, worker, *_ = stack
    peer = worker(free=2)
    mongrel2.send(request_bytes(1))
    mongrel2.send(request_bytes(2))
    assert {peer.take(), peer.take()} == {b"1", b"2"}
    messages = [b"%s 1:%d, part %d" % (SENDER, conn, conn) for conn in (2, 1)]
    peer.sock.send_multipart([dp.OUTPUT, b"2 1", b"", b"200 200", *messages])
    assert mongrel2.receive() == (b"2", b"part 2")
    # one turn's messages go to mongrel2 as the parts of one ZeroMQ message
    assert mongrel2.sub.getsockopt(zmq.RCVMORE) == 1
    assert mongrel2.receive() == (b"1", b"part 1")
    for conn in (3, 4):  # both slots are free again
        mongrel2.send(request_bytes(conn))
    assert {peer.take(), peer.take()} == {b"3", b"4"}


@PREFETCH
def test_no_prefetch_to_a_worker_that_has_finished_nothing_for_a_while(stack):
    mongrel2, worker, *_ = stack
    a, b = two_busy_workers(mongrel2, worker)
    time.sleep(0.05)  # both have been on their request longer than STALLED_WORKER
    mongrel2.send(request_bytes(3))
    assert a.idle(200) and b.idle(200)  # 3 waits rather than queue behind a slow one
    b.done(b"2")
    mongrel2.receive()
    assert b.take() == b"3"


# ------------------------------------------------------------------ flow control


def test_each_response_is_told_its_budget_and_what_passes_the_window_waits(stack):
    mongrel2, worker, *_ = stack
    peer = worker()
    mongrel2.send(request_bytes(1, headers={b"DOWNLOAD_CREDITS": b"102400"}))
    assert peer.take() == b"1" and peer.windows[b"1"] == BUDGET
    peer.done(b"1", b"x" * 60000)  # forwarded: 60000 bytes not yet credited
    assert len(mongrel2.receive()[1]) == 60000
    mongrel2.send(request_bytes(1))  # a later request on the connection: no header
    assert peer.take() == b"1" and peer.windows[b"1"] == BUDGET - 60000
    peer.done(b"1", b"y" * 50000)  # passes the window: held back for credits
    assert mongrel2.silent()
    mongrel2.send(notice_bytes(1, "credits", 60000))  # mongrel2 wrote the first response
    assert mongrel2.receive()[1] == b"y" * 50000
    mongrel2.send(request_bytes(1))
    assert peer.take() == b"1" and peer.windows[b"1"] == BUDGET - 50000
    peer.done(b"1", b"")  # a close: the connection's window is forgotten
    mongrel2.receive()
    mongrel2.send(request_bytes(1, headers={b"DOWNLOAD_CREDITS": b"102400"}))
    assert peer.take() == b"1" and peer.windows[b"1"] == BUDGET


def test_a_dispatcher_stopped_while_only_half_connected_to_mongrel2_exits_cleanly(run_dir):
    """mongrel2's PUSH is bound but its SUB is not (yet): the dispatcher holds one of
    its two connections when SIGTERM comes."""
    run = RunDir(run_dir).create()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.bind(run.mongrel2_send)
    process = subprocess.Popen([sys.executable, "-m", "circus_wsgi", "dispatcher",
                                *Settings(run_dir=str(run_dir)).to_argv()])
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(run.dispatcher):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)  # a few ticks of trying mongrel2's SUB
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        context.destroy(linger=0)
