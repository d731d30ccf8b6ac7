"""Small WSGI applications, one per rule of the worker, imported by worker processes.

``rules`` routes on the first path segment, so one stack serves every rule;
``validated`` is the same behind :func:`wsgiref.validate.validator`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator

TEXT = [("Content-Type", "text/plain")]
closed = {"count": 0}  # close() calls on responses, per worker process


def _query(environ: dict) -> dict:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _json(start_response, data: object, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(data, sort_keys=True).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


class Tracked:
    """An iterable response whose close() is counted."""

    def __init__(self, blocks, fail_at: int = -1) -> None:
        self.blocks, self.fail_at = blocks, fail_at

    def __iter__(self):
        for number, block in enumerate(self.blocks):
            if number == self.fail_at:
                raise RuntimeError("failing after the headers went out")
            yield block

    def close(self) -> None:
        closed["count"] += 1


def hello(environ, start_response):
    body = b"Hello, World!"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def show_environ(environ, start_response):
    keys = {k: v for k, v in environ.items() if isinstance(v, (str, bool, tuple, int))}
    keys["wsgi.input.type"] = type(environ["wsgi.input"]).__name__
    return _json(start_response, keys)


def read_body(environ, start_response):
    """Read wsgi.input the way the query says: read, read-n, readline, readlines, iter."""
    stream, how = environ["wsgi.input"], _query(environ).get("how", "read")
    if how == "read-n":
        parts = iter(lambda: stream.read(1000), b"")
    elif how == "readline":
        parts = iter(lambda: stream.readline(70000), b"")
    elif how == "readlines":
        parts = iter(stream.readlines())
    elif how == "iter":
        parts = iter(stream)
    else:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        parts = iter([stream.read(length)])
    digest, size, pieces = hashlib.sha256(), 0, 0
    for part in parts:
        digest.update(part)
        size += len(part)
        pieces += 1
    return _json(start_response, {"size": size, "sha256": digest.hexdigest(), "pieces": pieces,
                                  "content_length": environ.get("CONTENT_LENGTH")})


def stream(environ, start_response):
    """``?blocks=N&size=S``: N blocks of S bytes, no Content-Length."""
    query = _query(environ)
    blocks, size = int(query.get("blocks", 3)), int(query.get("size", 5))
    start_response("200 OK", TEXT)
    return Tracked(b"%c" % (97 + n % 26) * size for n in range(blocks))


def big(environ, start_response):
    """``?mb=N``: a generated body of N MiB in 64 KiB blocks, with Content-Length."""
    size = int(_query(environ).get("mb", 50)) << 20
    block = b"x" * 65536
    start_response("200 OK", TEXT + [("Content-Length", str(size))])
    return (block for _ in range(size // len(block)))


def forever(environ, start_response):
    start_response("200 OK", TEXT)
    block = b"y" * 65536
    return Tracked(iter(lambda: block, None))


def write_callable(environ, start_response):
    write = start_response("200 OK", TEXT)
    write(b"written, ")
    write(b"then ")
    return [b"returned"]


def status(environ, start_response):
    code = _query(environ).get("code", "200")
    start_response(f"{code} Whatever", TEXT)
    return Tracked([b"a body that must not be sent for some statuses"])


def bad_header(environ, start_response):
    kind = _query(environ).get("kind", "crlf")
    header = {"crlf": ("X-Bad", "a\r\nSet-Cookie: evil=1"), "lf": ("X-Bad", "a\nb"),
              "latin": ("X-Bad", "snow \u2603"), "name": ("X Bad", "v"),
              "colon": ("X-Bad:", "v"), "bytes": ("X-Bad", b"v")}[kind]
    start_response("200 OK", TEXT + [header])
    return [b"must not be sent"]


def bad_status(environ, start_response):
    start_response("200 OK\r\nX-Evil: 1", TEXT)
    return [b"must not be sent"]


def fail(environ, start_response):
    raise RuntimeError("the application failed (a secret: do not show this to clients)")


def fail_after(environ, start_response):
    start_response("200 OK", TEXT)
    return Tracked([b"first block", b"never"], fail_at=1)


def fail_then_error_page(environ, start_response):
    """start_response, then an exception, then start_response again with exc_info."""
    start_response("200 OK", TEXT)
    try:
        raise ValueError("oops")
    except ValueError:
        import sys
        start_response("503 Service Unavailable", TEXT, sys.exc_info())
    return [b"error page"]


def short(environ, start_response):
    start_response("200 OK", TEXT + [("Content-Length", "10")])
    return [b"12345"]


def long_body(environ, start_response):
    start_response("200 OK", TEXT + [("Content-Length", "3")])
    return [b"123456"]


def file_wrapper(environ, start_response):
    start_response("200 OK", TEXT)
    return environ["wsgi.file_wrapper"](io.BytesIO(b"0123456789" * 10000), 4096)


def closes(environ, start_response):
    return _json(start_response, {"count": closed["count"], "pid": os.getpid()})


def connection_close(environ, start_response):
    start_response("200 OK", TEXT + [("Connection", "close"), ("Content-Length", "2")])
    return [b"ok"]


def slow(environ, start_response):
    """``?s=SECONDS`` asleep, then its thread and pid (``&pad=N``: and N more bytes)."""
    query = _query(environ)
    time.sleep(float(query.get("s", 0.5)))
    return _json(start_response, {"thread": threading.current_thread().name,
                                  "pid": os.getpid(), "pad": "." * int(query.get("pad", 0))})


def pid(environ, start_response):
    return _json(start_response, {"pid": os.getpid()})


def echo(environ, start_response):
    """The request body, as the response body."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(body)))])
    return [body]


def empty(environ, start_response):
    start_response("200 OK", TEXT)
    return []


ROUTES = {
    "hello": hello, "environ": show_environ, "body": read_body, "stream": stream, "big": big,
    "forever": forever, "write": write_callable, "status": status, "bad-header": bad_header,
    "bad-status": bad_status, "fail": fail, "fail-after": fail_after,
    "exc-info": fail_then_error_page, "short": short, "long": long_body,
    "file": file_wrapper, "closes": closes, "connection-close": connection_close,
    "slow": slow, "pid": pid, "empty": empty, "echo": echo,
}


def rules(environ, start_response):
    """Route on the first path segment; everything else shows the environ."""
    name = environ.get("PATH_INFO", "/").strip("/").split("/")[0]
    return ROUTES.get(name, show_environ)(environ, start_response)


validated = validator(rules)


def mounted(environ, start_response):
    """Another application, for mounts: shows its SCRIPT_NAME and PATH_INFO."""
    return _json(start_response, {"app": "mounted", "SCRIPT_NAME": environ["SCRIPT_NAME"],
                                  "PATH_INFO": environ["PATH_INFO"]})


def make_mounted():
    """A factory, for MODULE:FACTORY()."""
    return mounted


def make_frameworks():
    """The Flask example at /, httpbin at /httpbin: one application for both servers."""
    import httpbin
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from examples.flask_app import app as flask_app

    return DispatcherMiddleware(flask_app, {"/httpbin": httpbin.app})
