"""The WSGI applications every server in the benchmark runs.

One application, :func:`app`, routes by path so that each server is started
once per round and serves every scenario; the routing is one dict lookup, the
same for every server:

====================  =====================================================
``/``                 hello: 13 bytes of text
``/json``             a JSON document of about 1 KB, serialised per request
``/big``              a 100 KB response (one precomputed bytes object)
``/mb``               a 1 MB response, for the slow readers of the slow-clients load
``/echo``             a POST whose body (1 MB in the benchmark) is sent back
``/slow``             sleeps 1 s, then answers like ``/``: the slow mix sends
                      1 request in 100 here and the rest to ``/``
====================  =====================================================

Each is also importable on its own (``benchmarks.apps:hello`` and so on).
"""

from __future__ import annotations

import json as _json
import time
from typing import Callable, Iterable

Environ = dict
StartResponse = Callable[..., object]

HELLO = b"Hello, World!"
BIG = b"x" * (100 * 1024)
MB = b"x" * (1 << 20)
SLOW_SECONDS = 1.0
#: About 1 KB once serialised: the shape of a typical API answer.
DOCUMENT = {
    "id": 12345,
    "name": "circus-wsgi benchmark",
    "tags": ["wsgi", "mongrel2", "zeromq", "circus"],
    "items": [{"id": i, "title": f"item number {i}", "price": i * 1.25, "in_stock": i % 2 == 0}
              for i in range(13)],
}


def _plain(start_response: StartResponse, body: bytes,
           content_type: str = "text/plain") -> list[bytes]:
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(body)))])
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _plain(start_response, HELLO)


def json(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _plain(start_response, _json.dumps(DOCUMENT).encode(), "application/json")


def big(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _plain(start_response, BIG, "application/octet-stream")


def mb(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _plain(start_response, MB, "application/octet-stream")


def echo(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    return _plain(start_response, body, "application/octet-stream")


def slow(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    time.sleep(SLOW_SECONDS)
    return _plain(start_response, HELLO)


ROUTES: dict[str, Callable[[Environ, StartResponse], Iterable[bytes]]] = {
    "/": hello, "/json": json, "/big": big, "/mb": mb, "/echo": echo, "/slow": slow,
}


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """Route by path to one of the applications above; 404 for any other path."""
    route = ROUTES.get(environ.get("PATH_INFO") or "/")
    if route is None:
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", "9")])
        return [b"not found"]
    return route(environ, start_response)
