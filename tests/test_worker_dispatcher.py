"""The worker's side of dispatch_protocol, against a fake dispatcher (a listener in the test).

The fake is a test double of our own dispatcher: it checks that a real worker
process speaks the protocol exactly (READY, OUTPUT, RETURN, LEAVING) and keeps to
mongrel2's flow-control window.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import tnetstring

from circus_wsgi import dispatch_protocol as dp
from circus_wsgi import protocol
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import Settings
from framed_peer import FramedListener, FramedPeer
from harness import TESTS_DIR, circus_wsgi

pytestmark = pytest.mark.timeout(60)

SENDER = b"f400bf85-4538-4f7a-8908-67e313d515c2"
WINDOW = 102400


def m2_request(conn_id: bytes, path: bytes, *, credits: int | None = WINDOW, body: bytes = b"",
               method: bytes = b"GET", version: bytes = b"HTTP/1.1", **extra: bytes) -> bytes:
    raw_path, _, query = path.partition(b"?")
    headers = {b"METHOD": method, b"VERSION": version, b"PATH": raw_path, b"URI": path,
               b"PATTERN": b"/", b"URL_SCHEME": b"http", b"REMOTE_ADDR": b"127.0.0.1",
               b"host": b"localhost"}
    if query:
        headers[b"QUERY"] = query
    if credits is not None:
        headers[b"DOWNLOAD_CREDITS"] = b"%d" % credits
    if body:
        headers[b"content-length"] = b"%d" % len(body)
    headers.update({k.replace("_", "-").encode(): v for k, v in extra.items()})
    return b"%s %s %s %s%d:%s," % (SENDER, conn_id, raw_path, tnetstring.dumps(headers),
                                    len(body), body)


def m2_notice(conn_id: bytes, kind: str, credits: int = 0) -> bytes:
    headers = {b"METHOD": b"JSON"}
    if kind == "credits":
        headers[b"DOWNLOAD_CREDITS"] = b"%d" % credits
    body = json.dumps({"type": kind}).encode()
    return b"%s %s @* %s%d:%s," % (SENDER, conn_id, tnetstring.dumps(headers), len(body), body)


def payload(message: bytes) -> bytes:
    """What mongrel2 would write to the client for a response message."""
    _, _, rest = message.partition(b" ")
    length, _, rest = rest.partition(b":")
    return rest[int(length) + 2:]


#: What the fake dispatcher makes of an OUTPUT, one event per connection: a part of
#: the response (REPLY) or its end (DONE), each with that connection's messages.
REPLY, DONE = b"reply", b"done"


def output_events(frames: list[bytes]) -> list[list[bytes]]:
    """An OUTPUT message as [REPLY or DONE, conn_id, message...] per connection, in order."""
    _, done, started, statuses, *messages = frames
    assert len(statuses.split()) == len(done.split())
    by_conn: dict[bytes, list[bytes]] = {}
    for message in messages:
        ids = message.split(b" ", 1)[1].split(b":", 1)[1].split(b",", 1)[0]
        by_conn.setdefault(ids.removeprefix(b"X "), []).append(message)  # X: control
    return [[DONE if conn in done.split() else REPLY, conn, *by_conn.get(conn, [])]
            for conn in dict.fromkeys(started.split() + done.split())]


class FakeDispatcher:
    """Listens where the worker looks for the dispatcher; talks to the last worker that
    connected."""

    def __init__(self, run_dir: Path) -> None:
        self.listener = FramedListener(RunDir(run_dir).dispatcher)
        self.worker: FramedPeer | None = None
        self.events: list[list[bytes]] = []  # the rest of an OUTPUT already received

    def poll(self, timeout: float) -> bool:
        """True once the worker's next message is there (accepting its connection first)."""
        deadline = time.monotonic() + timeout
        while self.worker is None or self.worker.stream.closed:
            self.worker = self.listener.accept(deadline - time.monotonic())
            if self.worker is None:
                return False
        return self.worker.poll(max(0.0, deadline - time.monotonic()) * 1000)

    def raw(self, timeout: float = 10.0) -> list[bytes]:
        """The worker's next message as it came."""
        if not self.poll(timeout):
            raise AssertionError(f"nothing from the worker in {timeout}s")
        return self.worker.recv_multipart()

    def recv(self, timeout: float = 10.0) -> list[bytes]:
        """The next message, an OUTPUT taken apart into :func:`output_events`."""
        if self.events:
            return self.events.pop(0)
        frames = self.raw(timeout)
        if frames[0] == dp.OUTPUT:
            self.events = output_events(frames)
            return self.events.pop(0)
        return frames

    def expect(self, command: bytes, timeout: float = 10.0, skip=(dp.READY,)) -> list[bytes]:
        while True:
            frames = self.recv(timeout)
            if frames[0] == command:
                return frames
            assert frames[0] in skip, f"expected {command!r}, got {frames[:3]!r}"

    def quiet(self, seconds: float) -> bool:
        return not self.events and not self.poll(seconds)

    def send(self, *frames: bytes) -> None:
        self.worker.send_multipart(frames)

    def request(self, *args, window: int = WINDOW, **kwargs) -> None:
        """Hand over one request, telling the worker its connection's ``window`` left."""
        self.send(dp.REQUEST, b"%d" % window, m2_request(*args, **kwargs))

    def serve(self, conn_id: bytes, path: bytes, **kwargs) -> list[bytes]:
        """Send a request; return the messages of its REPLY and DONE frames."""
        self.request(conn_id, path, **kwargs)
        messages = []
        while True:
            command, conn, *frames = self.reply_or_done()
            assert conn == conn_id
            messages += frames
            if command == DONE:
                return messages

    def reply_or_done(self) -> list[bytes]:
        """The next REPLY or DONE frames (READY frames are passed over)."""
        while True:
            frames = self.recv()
            if frames[0] in (REPLY, DONE):
                return frames
            assert frames[0] == dp.READY

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        self.listener.close()

    def restart(self) -> None:
        """Go away and listen again, as a dispatcher that circus restarted."""
        self.close()
        self.events = []
        self.listener = FramedListener(self.listener.path)


@pytest.fixture
def fake(run_dir):
    RunDir(run_dir).create()
    dispatcher = FakeDispatcher(run_dir)
    yield dispatcher
    dispatcher.close()


@pytest.fixture
def start_worker(run_dir, fake):
    started = []

    def start(**options):
        settings = Settings(app="worker_apps:rules", chdir=str(TESTS_DIR), run_dir=str(run_dir),
                            access_log="", **options)
        worker = circus_wsgi("worker", settings, run_dir / f"worker-{len(started)}.log")
        started.append(worker)
        ready = fake.expect(dp.READY, skip=())
        threads = b"%d" % settings.threads
        # pid, idle threads, threads, requests received before
        assert ready[1:] == [b"%d" % worker.pid, threads, threads, b"0"]
        return worker

    yield start
    for worker in started:
        if worker.alive():
            worker.send_signal(signal.SIGTERM)
            try:
                fake.expect(dp.LEAVING, timeout=5, skip=(dp.READY, REPLY, DONE))
                fake.send(dp.BYE)
            except AssertionError:
                pass
        worker.stop(10)


def test_ready_request_done_in_one_message(fake, start_worker):
    start_worker()
    fake.request(b"7", b"/hello")
    command, conn, *messages = fake.expect(DONE)
    assert (command, conn) == (DONE, b"7")
    assert len(messages) == 1, "a small response is one mongrel2 message"
    assert messages[0].startswith(SENDER + b" 1:7, HTTP/1.1 200 OK\r\n")
    assert payload(messages[0]).endswith(b"\r\n\r\nHello, World!")


def test_close_message_goes_in_the_done_frame(fake, start_worker):
    start_worker()
    messages = fake.serve(b"8", b"/hello", version=b"HTTP/1.0")
    assert len(messages) == 2 and messages[1] == protocol.close(SENDER, b"8")


def _stream_with_credits(fake: FakeDispatcher, conn: bytes, path: bytes,
                         window: int) -> tuple[bytes, int]:
    """Serve ``path``, granting credits as a client would read; check the window holds."""
    fake.request(conn, path, window=window)
    received, outstanding, most = [], 0, 0
    while True:
        frames = fake.reply_or_done()
        for message in frames[2:]:
            data = payload(message)
            received.append(data)
            outstanding += len(data)
            most = max(most, outstanding)
            assert outstanding <= window, "more bytes in flight than mongrel2's window"
        if frames[0] == DONE:
            return b"".join(received), most
        if fake.quiet(0.05):  # the worker waits for credits: the client reads it all
            fake.send(dp.NOTICE, m2_notice(conn, "credits", outstanding))
            outstanding = 0


def test_flow_control_keeps_to_the_window(fake, start_worker):
    start_worker()
    data, most = _stream_with_credits(fake, b"9", b"/big?mb=2", WINDOW)
    assert data.endswith(b"x" * 1000) and len(data.partition(b"\r\n\r\n")[2]) == 2 << 20
    assert most > WINDOW / 2, "the window is used, not just a sliver of it"


def test_a_response_keeps_to_the_window_left_on_its_connection(fake, start_worker):
    start_worker()
    data, most = _stream_with_credits(fake, b"10", b"/stream?blocks=20&size=10000",
                                      WINDOW // 3)
    assert data.endswith(b"0\r\n\r\n") and most > WINDOW // 6


def test_a_response_that_fits_the_window_is_done_without_waiting_for_credits(fake, start_worker):
    start_worker()
    fake.request(b"12", b"/stream?blocks=1&size=90000", credits=None, window=WINDOW)
    command, conn, *messages = fake.expect(DONE, timeout=2, skip=(dp.READY,))
    assert b"".join(payload(m) for m in messages).endswith(b"a" * 90000 + b"\r\n0\r\n\r\n")


def test_a_response_over_the_window_left_waits_for_credits(fake, start_worker):
    start_worker()
    fake.request(b"13", b"/stream?blocks=1&size=90000", credits=None, window=50000)
    fake.expect(REPLY, timeout=2)
    assert fake.quiet(0.5), "nothing more before credits"
    fake.send(dp.NOTICE, m2_notice(b"13", "credits", WINDOW))
    assert fake.expect(DONE, skip=(REPLY,))[1] == b"13"


def test_disconnect_stops_the_response_and_closes_the_iterable(fake, start_worker):
    start_worker()
    before = json.loads(payload(fake.serve(b"1", b"/closes")[0]).partition(b"\r\n\r\n")[2])
    fake.request(b"11", b"/forever")
    assert fake.expect(REPLY)[1] == b"11"
    fake.send(dp.NOTICE, m2_notice(b"11", "disconnect"))
    command, conn, *messages = fake.expect(DONE, skip=(dp.READY, REPLY))
    assert conn == b"11"
    after = json.loads(payload(fake.serve(b"1", b"/closes")[0]).partition(b"\r\n\r\n")[2])
    assert after["count"] == before["count"] + 1


def test_silence_makes_the_worker_announce_itself_again(fake, start_worker):
    worker = start_worker(threads=2)
    frames = fake.expect(dp.READY, timeout=dp.SILENCE_LIMIT + 2, skip=())
    assert frames[1:] == [b"%d" % worker.pid, b"2", b"2", b"0"]
    deadline = time.monotonic() + dp.SILENCE_LIMIT + 0.5
    while time.monotonic() < deadline:
        fake.send(dp.HEARTBEAT)
        assert fake.quiet(dp.HEARTBEAT_INTERVAL), "no READY while the dispatcher is heard"


def test_a_restarted_dispatcher_gets_the_worker_and_the_responses_it_held(fake, start_worker):
    worker = start_worker(threads=2)
    fake.request(b"13", b"/slow?s=0.5")
    time.sleep(0.1)
    fake.restart()  # while the worker runs the request
    frames = fake.expect(dp.READY, timeout=2, skip=())  # at once, not after SILENCE_LIMIT
    # pid, one thread idle, two threads, one request received, the one it holds
    assert frames[1:] == [b"%d" % worker.pid, b"1", b"2", b"1", b"13"]
    assert fake.expect(DONE, timeout=2)[1] == b"13"
    fake.request(b"14", b"/hello")  # and it serves the new dispatcher
    assert fake.expect(DONE)[1] == b"14"


def test_sigterm_leaves_finishes_and_exits(fake, start_worker):
    worker = start_worker()
    fake.request(b"12", b"/slow?s=0.5")
    time.sleep(0.1)
    worker.send_signal(signal.SIGTERM)
    fake.expect(dp.LEAVING, skip=())
    fake.send(dp.BYE)
    command, conn, *messages = fake.expect(DONE, skip=())
    assert conn == b"12" and b" 200 OK" in messages[0]
    assert worker.popen.wait(10) == 0


def test_sigterm_when_idle_exits_at_once_after_bye(fake, start_worker):
    worker = start_worker()
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    fake.expect(dp.LEAVING, skip=())
    fake.send(dp.BYE)
    assert worker.popen.wait(10) == 0
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("signum, options, within", [
    (signal.SIGINT, {}, 1.0),  # at once
    (signal.SIGQUIT, {}, 1.0),
    (signal.SIGTERM, {"graceful_timeout": 0.5}, 2.0),  # the drain is bounded
])
def test_stopping_while_a_request_runs(fake, start_worker, signum, options, within):
    worker = start_worker(**options)
    fake.request(b"13", b"/slow?s=30")
    time.sleep(0.2)
    started = time.monotonic()
    worker.send_signal(signum)
    assert worker.popen.wait(10) == 0
    assert time.monotonic() - started < within


def test_max_requests_leaves_after_n(fake, start_worker):
    worker = start_worker(max_requests=2)
    fake.serve(b"1", b"/hello")
    fake.serve(b"2", b"/hello")
    fake.expect(dp.LEAVING, skip=())
    fake.send(dp.BYE)
    assert worker.popen.wait(10) == 0


def test_threads_serve_at_once(fake, start_worker):
    start_worker(threads=3)
    started = time.monotonic()
    for conn in (b"21", b"22", b"23"):
        fake.request(conn, b"/slow?s=0.6")
    done = {}
    while len(done) < 3:
        command, conn, *messages = fake.expect(DONE)
        done[conn] = json.loads(payload(messages[0]).partition(b"\r\n\r\n")[2])
    assert time.monotonic() - started < 1.5, "the three ran at once"
    assert len({reply["thread"] for reply in done.values()}) == 3
    assert len({reply["pid"] for reply in done.values()}) == 1


def test_threads_stream_with_credits(fake, start_worker):
    start_worker(threads=2)
    data, _ = _stream_with_credits(fake, b"24", b"/big?mb=1", WINDOW)
    assert len(data.partition(b"\r\n\r\n")[2]) == 1 << 20


def test_malformed_messages_are_counted_and_survived(fake, start_worker, run_dir):
    worker = start_worker()
    fake.send(dp.REQUEST, b"", b"this is not a mongrel2 message")
    fake.send(dp.NOTICE, SENDER + b" 1 @* 99:truncated")
    fake.send(b"?", b"an unknown command")
    assert b"Hello" in fake.serve(b"30", b"/hello")[0]
    output = worker.output()
    assert "malformed message #2" in output and "unknown frames" in output


def test_smuggling_is_refused_here_too(fake, start_worker):
    start_worker()
    messages = fake.serve(b"31", b"/hello", method=b"POST", body=b"0\r\n\r\n",
                          transfer_encoding=b"chunked")
    assert b" 400 Bad Request" in messages[0] and messages[1] == protocol.close(SENDER, b"31")


def test_refused_upload_is_deleted(fake, start_worker, run_dir):
    start_worker()
    path = RunDir(run_dir).uploads / "upload.Smug01"
    path.write_bytes(b"0\r\n\r\n")
    name = str(path).encode()
    messages = fake.serve(b"34", b"/body", method=b"POST", credits=None,
                          content_length=b"5", transfer_encoding=b"chunked",
                          x_mongrel2_upload_start=name, x_mongrel2_upload_done=name)
    assert b" 400 " in messages[0] and not path.exists()


def test_upload_is_served_from_its_file_and_deleted(fake, start_worker, run_dir):
    start_worker()
    data = os.urandom(300000)
    path = RunDir(run_dir).uploads / "upload.AbC123"
    path.write_bytes(data)
    name = str(path).encode()
    messages = fake.serve(b"32", b"/body", method=b"POST", credits=None,
                          transfer_encoding=b"chunked", x_mongrel2_upload_start=name,
                          x_mongrel2_upload_done=name)
    result = json.loads(payload(messages[0]).partition(b"\r\n\r\n")[2])
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["content_length"] == str(len(data))
    assert not path.exists()


def test_upload_over_max_body_size_gets_413(fake, start_worker, run_dir):
    start_worker(max_body_size=1000)
    path = RunDir(run_dir).uploads / "upload.XyZ789"
    path.write_bytes(b"z" * 5000)
    name = str(path).encode()
    messages = fake.serve(b"33", b"/body", method=b"POST", credits=None,
                          transfer_encoding=b"chunked", x_mongrel2_upload_start=name,
                          x_mongrel2_upload_done=name)
    assert b" 413 " in messages[0] and not path.exists()


def test_import_failure_is_one_line_and_exit_2(run_dir):
    settings = Settings(app="no_such_module:app", run_dir=str(run_dir))
    worker = circus_wsgi("worker", settings, run_dir / "bad.log")
    assert worker.popen.wait(20) == 2
    lines = worker.output().strip().splitlines()
    assert len(lines) == 1 and "no_such_module" in lines[0], lines


# ------------------------------------------------------------- prefetch: giving requests back


def test_inline_worker_gives_back_what_waits_behind_a_slow_request(fake, start_worker):
    start_worker(prefetch=1)
    fake.request(b"40", b"/slow?s=0.6")
    time.sleep(0.1)
    started = time.monotonic()
    fake.request(b"41", b"/hello")
    assert fake.expect(dp.RETURN, timeout=2, skip=(dp.READY,))[1:] == [b"41"]
    assert time.monotonic() - started < 0.3, "given back while the slow one still runs"
    assert fake.expect(DONE, skip=(dp.READY,))[1] == b"40"


def test_inline_worker_serves_quick_prefetched_requests(fake, start_worker):
    start_worker(prefetch=1)
    for conn in (b"42", b"43", b"44"):
        fake.request(conn, b"/hello")
    assert [fake.expect(DONE, skip=(dp.READY,))[1] for _ in range(3)] == [b"42", b"43", b"44"]


def test_streaming_inline_worker_gives_back_too(fake, start_worker):
    start_worker(prefetch=1)
    fake.request(b"45", b"/big?mb=1")  # waits for credits that the test does not grant
    assert fake.expect(REPLY)[1] == b"45"
    fake.request(b"46", b"/hello")
    assert fake.expect(dp.RETURN, timeout=2, skip=(dp.READY, REPLY))[1:] == [b"46"]
    fake.send(dp.NOTICE, m2_notice(b"45", "disconnect"))
    assert fake.expect(DONE, skip=(dp.READY, REPLY))[1] == b"45"


def test_threaded_worker_gives_back_when_every_thread_is_busy(fake, start_worker):
    start_worker(threads=2, prefetch=1)
    fake.request(b"47", b"/slow?s=0.6")
    fake.request(b"48", b"/slow?s=0.6")
    time.sleep(0.1)
    fake.request(b"49", b"/hello")
    assert fake.expect(dp.RETURN, timeout=2, skip=(dp.READY,))[1:] == [b"49"]
    assert {fake.expect(DONE)[1] for _ in range(2)} == {b"47", b"48"}


# ------------------------------------------------------------------ batching


def test_requests_in_one_message_are_answered_in_one_output(fake, start_worker):
    start_worker(prefetch=3)
    conns = [b"60", b"61", b"62", b"63"]
    fake.send(dp.REQUEST, b"", *[m2_request(conn, b"/hello") for conn in conns])
    frames = fake.raw()
    while frames[0] == dp.READY:
        frames = fake.raw()
    assert frames[0] == dp.OUTPUT
    assert frames[1].split() == conns and frames[2] == b""
    assert frames[3].split() == [b"200"] * 4  # their statuses
    assert [payload(m).split(b"\r\n\r\n", 1)[1] for m in frames[4:]] == [b"Hello, World!"] * 4


def test_responses_finished_before_a_slow_request_do_not_wait_for_it(fake, start_worker):
    start_worker(prefetch=1)
    started = time.monotonic()
    fake.send(dp.REQUEST, b"", m2_request(b"64", b"/hello"), m2_request(b"65", b"/slow?s=0.6"))
    assert fake.expect(DONE)[1] == b"64"
    assert time.monotonic() - started < 0.3, "the hello response waited for the slow one"
    assert fake.expect(DONE, timeout=3)[1] == b"65"


def test_a_response_waiting_for_credits_probes_its_connection(fake, start_worker):
    """mongrel2 drops a connection it cannot write to without a notice; a keep-alive
    probe makes it send one, so the application stops waiting (worker.PROBE_AFTER)."""
    start_worker()
    fake.request(b"66", b"/big?mb=1", credits=WINDOW)  # no credits are granted here
    started = time.monotonic()
    probe = protocol.keep_alive(SENDER, b"66")
    while probe not in fake.expect(REPLY, timeout=5)[2:]:
        assert time.monotonic() - started < 3, "no probe"
    assert time.monotonic() - started > 0.5
    fake.send(dp.NOTICE, m2_notice(b"66", "disconnect"))  # what mongrel2 answers when gone
    assert fake.expect(DONE, skip=(REPLY,))[1] == b"66"
