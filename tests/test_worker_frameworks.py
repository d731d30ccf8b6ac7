"""Real applications through the real mongrel2: the Flask example and httpbin.

The same requests also go to the same application under gunicorn: status,
body and the application's headers must be the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from harness import TESTS_DIR, HTTPClient, Process, Stack, free_port, python_env, wait_for_port

pytestmark = pytest.mark.timeout(90)

APP = "worker_apps:make_frameworks()"
# Headers of the server, not of the application: they may differ between servers.
SERVER_HEADERS = {"date", "server", "connection", "transfer-encoding", "keep-alive"}


@pytest.fixture(scope="module")
def stack():
    with Stack(app=APP, mode="direct", threads=2) as running:
        yield running
        assert running.uploads_left() == []


@pytest.fixture(scope="module")
def gunicorn():
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="cw-gunicorn-", dir="/tmp"))
    process = Process([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "1",
                       "--chdir", str(TESTS_DIR), APP], directory / "gunicorn.log",
                      env=python_env())
    try:
        wait_for_port(port, timeout=20)
        yield port
    finally:
        process.stop(10)
        shutil.rmtree(directory)


@pytest.fixture
def client(stack):
    with stack.client(timeout=30) as connection:
        yield connection


def as_json(reply) -> dict:
    assert reply.status == 200, (reply.status, reply.body[:300])
    return json.loads(reply.body)


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


# ------------------------------------------------------------------ the Flask example


def test_query_strings(client):
    body = as_json(client.request("GET", "/query?x=1&x=2&y=caf%C3%A9&z=a+b"))
    assert body["args"] == {"x": ["1", "2"], "y": ["café"], "z": ["a b"]}


def test_unicode_and_percent_encoded_paths(client):
    body = as_json(client.request("GET", "/path/caf%C3%A9/%E2%98%83/a%20b"))
    assert body == {"rest": "café/☃/a b", "path": "/path/café/☃/a b", "script_root": ""}
    reply = client.request("GET", "/unicode")
    assert reply.body.decode("utf-8") == "h\u00e9llo \u2603\n"


def test_cookies_and_redirects(client):
    reply = client.request("GET", "/cookies/set?flavour=oatmeal&size=big")
    assert reply.status == 302 and reply.header("Location") == "/cookies"
    cookies = [v for k, v in reply.headers if k.lower() == "set-cookie"]
    assert len(cookies) == 2 and any(c.startswith("flavour=oatmeal") for c in cookies)
    body = as_json(client.request("GET", "/cookies",
                                  headers=[("Cookie", "flavour=oatmeal; size=big")]))
    assert body == {"flavour": "oatmeal", "size": "big"}
    location, hops = "/redirect/3", 0
    while True:
        reply = client.request("GET", location)
        if reply.status != 302:
            break
        location, hops = reply.header("Location"), hops + 1
    assert hops == 3 and reply.body == b"Hello from Flask\n"


def test_form_post(client):
    body = b"name=Jos%C3%A9&tags=a&tags=b"
    reply = client.request("POST", "/form", body=body,
                           headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert as_json(reply)["form"] == {"name": ["José"], "tags": ["a", "b"]}


def test_multipart_upload_of_five_megabytes(stack, client):
    data = os.urandom(5 << 20)
    content_type, body = multipart({"title": "holiday"}, {"photo": ("p\u00e9.jpg", data)})
    reply = client.request("POST", "/upload", body=body, headers=[("Content-Type", content_type)])
    result = as_json(reply)
    assert result["files"]["photo"] == {"filename": "p\u00e9.jpg", "size": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()}
    assert result["form"] == {"title": "holiday"}
    assert stack.uploads_left() == []


def test_chunked_request_body(client):
    chunks = [os.urandom(4096) for _ in range(64)] + [b"tail"]
    reply = client.request("POST", "/echo", body=iter(chunks),
                           headers=[("Content-Type", "application/octet-stream")])
    data = b"".join(chunks)
    assert as_json(reply) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                              "content_type": "application/octet-stream"}


def test_fifty_megabytes_from_a_generator(stack):
    with stack.client(timeout=60) as client:
        reply, size = client.download("/stream/50")
    assert reply.status == 200 and reply.header("Transfer-Encoding") == "chunked"
    assert size == 50 << 20
    assert stack.worker_processes[0].peak_rss() < 100 << 20


def test_thousand_requests_on_one_keep_alive_connection(client):
    for _ in range(1000):
        assert client.request("GET", "/").body == b"Hello from Flask\n"
    assert client.connects == 1


def test_head_204_304_and_a_failing_view(client):
    head = client.request("HEAD", "/")
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == "17"
    assert client.request("GET", "/nothing").status == 204
    first = client.request("GET", "/etag")
    assert first.status == 200 and first.header("ETag") == '"v1"'
    again = client.request("GET", "/etag", headers=[("If-None-Match", '"v1"')])
    assert again.status == 304 and again.body == b""
    failed = client.request("GET", "/fail")
    assert failed.status == 500 and b"a failing view" not in failed.body
    assert client.request("GET", "/").status == 200
    assert client.connects == 1


# ------------------------------------------------------------------ the same under gunicorn

HOST = [("Host", "example.test"), ("X-Forwarded-For", "127.0.0.1")]
_content_type, _multipart = multipart({"a": "1"}, {"f": ("f.txt", b"file body\n")})
SAME = [
    ("GET", "/", (), None),
    ("HEAD", "/", (), None),
    ("GET", "/query?x=1&x=2&y=caf%C3%A9", (), None),
    ("GET", "/path/caf%C3%A9/%E2%98%83", (), None),
    ("GET", "/cookies/set?a=b", (), None),
    ("GET", "/cookies", [("Cookie", "a=b; c=d")], None),
    ("GET", "/redirect/2", (), None),
    ("POST", "/form", [("Content-Type", "application/x-www-form-urlencoded")], b"a=1&b=%C3%A9"),
    ("POST", "/upload", [("Content-Type", _content_type)], _multipart),
    ("GET", "/nothing", (), None),
    ("GET", "/etag", [("If-None-Match", '"v1"')], None),
    ("GET", "/fail", (), None),
    ("GET", "/stream/1", (), None),
    ("GET", "/httpbin/get?a=1&b=%C3%A9", [("X-Custom", "yes")], None),
    ("HEAD", "/httpbin/get", (), None),
    ("GET", "/httpbin/headers", [("User-Agent", "same/1"), ("Accept", "*/*")], None),
    ("POST", "/httpbin/post", [("Content-Type", "application/x-www-form-urlencoded")],
     b"k=v&k=w"),
    ("POST", "/httpbin/post", [("Content-Type", _content_type)], _multipart),
    ("PUT", "/httpbin/put", [("Content-Type", "application/json")], b'{"x": [1, 2]}'),
    ("DELETE", "/httpbin/delete", (), None),
    ("GET", "/httpbin/status/418", (), None),
    ("GET", "/httpbin/status/204", (), None),
    ("GET", "/httpbin/status/304", (), None),
    ("GET", "/httpbin/redirect-to?url=%2Fhttpbin%2Fget", (), None),
    ("GET", "/httpbin/cookies/set?flavour=oat", (), None),
    ("GET", "/httpbin/cookies", [("Cookie", "flavour=oat")], None),
    ("GET", "/httpbin/html", (), None),
    ("GET", "/httpbin/encoding/utf8", (), None),
    ("GET", "/httpbin/bytes/1000?seed=7", (), None),
    ("GET", "/httpbin/stream/5", (), None),
    ("GET", "/httpbin/range/2000", [("Range", "bytes=100-199")], None),
    ("GET", "/httpbin/etag/abc", [("If-None-Match", '"abc"')], None),
    ("GET", "/httpbin/response-headers?X-Answer=42", (), None),
    ("GET", "/httpbin/base64/aGVsbG8gd29ybGQ%3D", (), None),
    ("GET", "/httpbin/anything/x%20y?q=1", (), None),
]


def application_headers(reply) -> list[tuple[str, str]]:
    return sorted((k.lower(), v) for k, v in reply.headers if k.lower() not in SERVER_HEADERS)


@pytest.mark.parametrize("method, path, headers, body", SAME,
                         ids=[f"{m} {p}"[:60] for m, p, _, _ in SAME])
def test_same_as_gunicorn(stack, gunicorn, method, path, headers, body):
    replies = []
    for port in (stack.port, gunicorn):
        with HTTPClient("127.0.0.1", port, 30) as client:
            replies.append(client.request(method, path, [*HOST, *headers], body, host=None))
    ours, theirs = replies
    assert ours.status == theirs.status
    assert ours.body == theirs.body
    assert application_headers(ours) == application_headers(theirs)
