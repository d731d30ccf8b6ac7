"""Workers behind the real dispatcher and mongrel2, with download flow control on.

What only the whole chain shows: large and endless bodies paced by the
client's credits (a single message over the window would never be
delivered), across several responses on one keep-alive connection.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import Stack, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def stack():
    with Stack(workers=2, app="worker_apps:rules", mode="dispatcher", threads=2) as running:
        yield running
        assert running.uploads_left() == []
        assert all(worker.alive() for worker in running.worker_processes), running.logs()


def test_keep_alive_and_streams_on_one_connection(stack):
    with stack.client(timeout=30) as client:
        for number in range(300):
            assert client.request("GET", f"/hello?n={number}").body == b"Hello, World!"
        for _ in range(3):  # later responses on a connection: mongrel2 gives no window header
            reply = client.request("GET", "/stream?blocks=40&size=20000")
            assert len(reply.body) == 800000
            assert len(client.request("GET", "/big?mb=1").body) == 1 << 20
        assert client.connects == 1


def test_fifty_megabytes_paced_by_credits(stack):
    with stack.client(timeout=60) as client:
        reply, size = client.download("/big?mb=50")
    assert reply.status == 200 and size == 50 << 20
    peaks = {w.pid: w.peak_rss() >> 20 for w in stack.worker_processes}
    print(f"worker peak RSS MiB {peaks}, mongrel2 {stack.mongrel2.peak_rss() >> 20} MiB")
    assert max(peaks.values()) < 100


def test_endless_body_holds_memory_flat(stack):
    worker_rss = [w.rss() for w in stack.worker_processes]
    mongrel2_rss = stack.mongrel2.rss()
    with socket.create_connection(("127.0.0.1", stack.port)) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        taken = 0
        while taken < 20 << 20:
            taken += len(raw.recv(65536))
    grown = max(w.rss() - before
                for w, before in zip(stack.worker_processes, worker_rss, strict=True))
    assert grown < 30 << 20 and stack.mongrel2.rss() - mongrel2_rss < 30 << 20


def test_upload_of_five_megabytes(stack):
    data = os.urandom(5 << 20)
    with stack.client(timeout=30) as client:
        reply = client.request("POST", "/body", body=data)
        assert json.loads(reply.body)["sha256"] == hashlib.sha256(data).hexdigest()
        chunks = [data[i:i + 65536] for i in range(0, 1 << 20, 65536)]
        reply = client.request("POST", "/body?how=iter", body=iter(chunks))
        assert json.loads(reply.body)["size"] == 1 << 20
    wait_for(lambda: stack.uploads_left() == [], what="the temp files to go")


def total_closes(stack) -> int:
    """close() calls summed over the workers (asked until each has answered)."""
    counts: dict[int, int] = {}
    with stack.client() as client:
        while len(counts) < len(stack.worker_processes):
            reply = json.loads(client.request("GET", "/closes").body)
            counts[reply["pid"]] = reply["count"]
    return sum(counts.values())


def test_disconnect_reaches_the_worker(stack):
    before = total_closes(stack)
    with socket.create_connection(("127.0.0.1", stack.port)) as raw:
        raw.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
    wait_for(lambda: total_closes(stack) == before + 1, 10, 0.1,
             "close() on the endless response")


def test_inline_workers_under_many_big_uploads_lose_nothing():
    """Threads 1 with prefetch: while a worker runs a request, its SIGALRM timer sends
    what it has finished; with responses of megabytes the handler can still be writing
    when the next tick comes, and the two must not interleave on the connection."""
    data = os.urandom(1 << 20)
    with Stack(workers=2, app="worker_apps:rules", threads=1) as inline:
        def echo(_: int) -> list[bool]:
            with inline.client(timeout=20) as client:
                return [client.request("POST", "/echo", body=data).body == data
                        for _ in range(4)]

        with ThreadPoolExecutor(max_workers=32) as pool:
            echoed = [same for batch in pool.map(echo, range(32)) for same in batch]
        assert echoed == [True] * 128, inline.logs()[-3000:]
