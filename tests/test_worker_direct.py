"""The worker in direct mode on the real mongrel2: every rule of the gateway on the wire.

One stack for the module: mongrel2 and one worker serving tests/worker_apps.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import threading
import time

import pytest

from harness import Stack, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def stack():
    with Stack(app="worker_apps:rules", mode="direct", access_log="-",
               mounts=["/api=worker_apps:make_mounted()"]) as running:
        yield running
        assert running.uploads_left() == [], "every upload file is deleted"
        assert running.worker_processes[0].alive(), running.logs()


@pytest.fixture
def client(stack):
    with stack.client() as connection:
        yield connection


def as_json(reply) -> dict:
    assert reply.status == 200, (reply.status, reply.body[:300])
    return json.loads(reply.body)


def closes(client) -> int:
    return as_json(client.request("GET", "/closes"))["count"]


def test_hello(client):
    reply = client.request("GET", "/hello")
    assert (reply.status, reply.body) == (200, b"Hello, World!")
    assert reply.header("Content-Length") == "13"
    assert reply.header("Server") == "circus-wsgi" and reply.header("Date")
    assert reply.header("Connection") is None


def test_thousand_requests_on_one_connection(client):
    started = time.monotonic()
    for number in range(1000):
        reply = client.request("GET", f"/hello?n={number}")
        assert reply.status == 200 and reply.body == b"Hello, World!"
    assert client.connects == 1
    assert time.monotonic() - started < 20


def test_query_unicode_and_percent_encoded_paths(client):
    env = as_json(client.request("GET", "/environ/caf%C3%A9/a%20b%2Fc?q=%C3%A9&x=1+2",
                                 headers=[("Cookie", "a=1"), ("X-Multi", "1"),
                                          ("X-Multi", "2")]))
    assert env["PATH_INFO"] == "/environ/caf\u00c3\u00a9/a b/c"
    assert env["PATH_INFO"].encode("latin-1").decode("utf-8") == "/environ/café/a b/c"
    assert env["QUERY_STRING"] == "q=%C3%A9&x=1+2"
    assert env["RAW_URI"] == "/environ/caf%C3%A9/a%20b%2Fc?q=%C3%A9&x=1+2"
    assert env["HTTP_X_MULTI"] == "1, 2" and env["HTTP_COOKIE"] == "a=1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["SERVER_NAME"] == "localhost" and env["SERVER_PORT"] == "80"
    assert env["wsgi.multithread"] is False


def test_mounted_application(client):
    assert as_json(client.request("GET", "/api/x/y")) == {
        "app": "mounted", "SCRIPT_NAME": "/api", "PATH_INFO": "/x/y"}
    assert as_json(client.request("GET", "/apix")).get("PATH_INFO") == "/apix"


def test_http10_closes_unless_keep_alive(stack):
    with stack.client() as client:
        reply = client.request("GET", "/hello", version="HTTP/1.0")
        assert reply.header("Connection") == "close" and reply.after_close == b""
        assert client.sock is None, "mongrel2 closed the connection"
        reply = client.request("GET", "/hello", version="HTTP/1.0",
                               headers=[("Connection", "keep-alive")])
        assert reply.header("Connection") == "keep-alive"
        client.request("GET", "/hello", version="HTTP/1.0", headers=[("Connection", "keep-alive")])
        assert client.connects == 2


def test_connection_close(stack):
    with stack.client() as client:
        reply = client.request("GET", "/hello", headers=[("Connection", "close")])
        assert reply.header("Connection") == "close" and client.sock is None
        reply = client.request("GET", "/connection-close")
        assert (reply.body, reply.header("Connection")) == (b"ok", "close")
        assert client.sock is None


def test_head_204_304_send_no_body(client):
    head = client.request("HEAD", "/hello")
    assert head.header("Content-Length") == "13" and head.body == b""
    for code in (204, 304):
        reply = client.request("GET", f"/status?code={code}")
        assert reply.status == code and reply.header("Content-Length") is None
    assert client.request("GET", "/hello").body == b"Hello, World!", "nothing was left over"
    assert client.connects == 1


def test_streamed_and_written_bodies(client):
    reply = client.request("GET", "/stream?blocks=50&size=1000")
    assert reply.header("Transfer-Encoding") == "chunked" and len(reply.body) == 50000
    assert client.request("GET", "/write").body == b"written, then returned"
    assert len(client.request("GET", "/file").body) == 100000


def test_failing_app_gives_500_and_the_worker_goes_on(stack, client):
    reply = client.request("GET", "/fail")
    assert reply.status == 500 and b"secret" not in reply.body and b"Traceback" not in reply.body
    assert client.request("GET", "/hello").status == 200
    wait_for(lambda: "do not show this" in stack.worker_processes[0].output(),
             what="the traceback in the log")


def test_exception_after_headers_closes_the_connection(stack):
    with stack.client() as client:
        before = closes(client)
        client.send_raw(b"GET /fail-after HTTP/1.1\r\nHost: x\r\n\r\n")
        data = client.read_until_close()
        assert data.startswith(b"HTTP/1.1 200 OK") and b"first block" in data
        assert not data.endswith(b"0\r\n\r\n")
        assert closes(client) == before + 1


@pytest.mark.parametrize("kind", ["crlf", "latin", "name"])
def test_invalid_headers_give_500_never_a_split_response(client, kind):
    reply = client.request("GET", f"/bad-header?kind={kind}")
    assert reply.status == 500 and reply.header("Set-Cookie") is None
    reply = client.request("GET", "/bad-status")
    assert reply.status == 500 and reply.header("X-Evil") is None
    assert client.request("GET", "/hello").status == 200


def test_close_is_called_on_success(client):
    before = closes(client)
    client.request("GET", "/stream")
    client.request("GET", "/status?code=204")
    assert closes(client) == before + 2


def test_disconnect_stops_an_endless_response(stack, client):
    before = closes(client)
    with socket.create_connection(("127.0.0.1", stack.port)) as raw:
        raw.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
    wait_for(lambda: closes(client) == before + 1, 10, 0.05, "close() after the disconnect")
    assert client.request("GET", "/hello").status == 200


def test_post_form(client):
    body = b"a=1&b=caf%C3%A9"
    reply = client.request("POST", "/body", body=body,
                           headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert as_json(reply)["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("how", ["read", "read-n", "readline", "iter"])
def test_large_upload_from_the_temp_store(stack, client, how):
    data = os.urandom(5 * 1024 * 1024)
    reply = client.request("POST", f"/body?how={how}", body=data)
    result = as_json(reply)
    assert result["size"] == len(data) and result["sha256"] == hashlib.sha256(data).hexdigest()
    assert stack.uploads_left() == []


def test_chunked_request_body(stack, client):
    chunks = [os.urandom(1000) for _ in range(300)]
    result = as_json(client.request("POST", "/body", body=iter(chunks)))
    data = b"".join(chunks)
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["content_length"] == str(len(data))
    assert stack.uploads_left() == []


def test_smuggling_attempt_is_refused_and_its_tail_never_served(stack):
    with stack.client() as client:
        before = closes(client)
        client.send_raw(b"POST /status?code=200 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                        b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = client.read_reply()
        assert reply.status == 400 and reply.header("Connection") == "close"
        assert reply.after_close == b""
    with stack.client() as client:
        assert closes(client) == before, "neither request reached the application"


def test_forged_upload_headers_touch_no_file(client):
    with tempfile.NamedTemporaryFile(prefix="cw-victim-") as victim:
        victim.write(b"secret")
        victim.flush()
        reply = client.request("POST", "/body", body=b"abc", headers=[
            ("X-Mongrel2-Upload-Start", victim.name), ("X-Mongrel2-Upload-Done", victim.name)])
        assert reply.status == 400
        assert os.path.exists(victim.name)


def test_fifty_megabytes_streamed_with_bounded_worker_memory(stack):
    worker = stack.worker_processes[0]
    with stack.client(timeout=30) as client:
        reply, size = client.download("/big?mb=50")
    assert reply.status == 200 and size == 50 << 20
    assert worker.peak_rss() < 100 << 20, worker.peak_rss()
    print(f"worker peak RSS {worker.peak_rss() >> 20} MiB, "
          f"mongrel2 peak RSS {stack.mongrel2.peak_rss() >> 20} MiB")


def test_access_log(stack, client):
    client.request("GET", "/hello?from=access-log-test", headers=[("Referer", "http://r/"),
                                                                  ("User-Agent", "tester/1")])
    line = wait_for(lambda: [text for text in stack.worker_processes[0].output().splitlines()
                             if "from=access-log-test" in text], what="the access log line")[0]
    assert line.startswith("127.0.0.1 - - [")
    assert '"GET /hello?from=access-log-test HTTP/1.1" 200 13 "http://r/" "tester/1"' in line


def test_concurrent_clients(stack):
    failures = []

    def run():
        with stack.client() as client:
            for _ in range(50):
                if client.request("GET", "/hello").status != 200:
                    failures.append(1)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# ------------------------------------------------------------------ stacks of their own


def test_wsgiref_validator_raises_nothing():
    with Stack(app="worker_apps:validated", mode="direct") as stack, stack.client() as client:
        for path in ["/hello", "/environ/caf%C3%A9?q=1", "/stream", "/write", "/file", "/empty"]:
            assert client.request("GET", path).status == 200, path
        assert client.request("HEAD", "/hello").status == 200
        reply = client.request("POST", "/body?how=read", body=b"x" * 30000)
        assert json.loads(reply.body)["size"] == 30000
        output = stack.worker_processes[0].output()
        assert "Traceback" not in output and "WSGIWarning" not in output, output


def test_max_requests_exits_cleanly():
    with Stack(app="worker_apps:rules", mode="direct", max_requests=3) as stack:
        worker = stack.worker_processes[0]
        with stack.client() as client:
            for _ in range(3):
                assert client.request("GET", "/hello").status == 200
        assert worker.popen.wait(10) == 0
        assert "stopped after 3 requests" in worker.output()


def test_sigterm_finishes_the_request_in_progress():
    with Stack(app="worker_apps:rules", mode="direct", threads=2) as stack:
        worker = stack.worker_processes[0]
        replies = []
        with stack.client() as client:
            client.request("GET", "/hello")  # mongrel2 is slow to hand over its first request
            thread = threading.Thread(
                target=lambda: replies.append(client.request("GET", "/slow?s=0.5")))
            thread.start()
            time.sleep(0.2)
            worker.send_signal(15)
            thread.join(10)
        assert replies and replies[0].status == 200
        assert worker.popen.wait(10) == 0
