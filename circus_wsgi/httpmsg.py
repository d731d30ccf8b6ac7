"""Complete HTTP responses the stack writes itself (400, 413, 500, 502, 503, 504).

Used by the dispatcher and the worker when the application cannot answer.
"""

from __future__ import annotations

from email.utils import formatdate
from http import HTTPStatus

SERVER = b"circus-wsgi"


def http_date() -> bytes:
    """The current time as an HTTP Date value."""
    return formatdate(usegmt=True).encode("ascii")


def error_response(status: int, *, close: bool = True,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A short plain-text response for ``status``: status line, headers and body."""
    reason = HTTPStatus(status).phrase.encode("ascii")
    body = b"%d %s\n" % (status, reason)
    lines = [b"HTTP/1.1 %d %s" % (status, reason),
             b"Date: " + http_date(),
             b"Server: " + SERVER,
             b"Content-Type: text/plain; charset=utf-8",
             b"Content-Length: %d" % len(body)]
    lines += [name + b": " + value for name, value in headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
