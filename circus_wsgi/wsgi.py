"""WSGI on mongrel2 messages, sans-IO: the environ, start_response and response framing.

Strategy: :class:`Site` holds what is constant for one mounted application (its
SCRIPT_NAME, the server's defaults, the ``wsgi.*`` keys) and copies that into
each request's environ, so a request only adds what it brings. :class:`Exchange`
runs the application for one request and frames what it returns as HTTP/1.1:
validated status and headers, Date and Server, Content-Length when it is known
and chunked transfer-encoding when it is not, no body for HEAD, 1xx, 204 and
304, keep-alive or close. The bytes go to an :class:`Outbox` (the worker's, or a
list in the tests), which cuts them into mongrel2 messages: :class:`Pacer`
decides how, by the client's flow-control window when mongrel2 grants one.

Speed matters on the common path, a small response in a list: its header bytes
come from caches (status lines, validated header names, the Date line per
second) and it leaves as one ``finish()`` call, which is one mongrel2 message.
No sockets here: every path is unit-tested without a server.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from email.utils import formatdate
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol
from urllib.parse import unquote_to_bytes

from mypy_extensions import mypyc_attr

from . import httpmsg
from .forwarded import Proxies
from .protocol import WINDOW, Buffer
from .protocol import Message

__all__ = ["Site", "Router", "Exchange", "Outbox", "ClientGone", "FileWrapper", "Pacer",
           "wants_keep_alive", "ResponseError"]

log = logging.getLogger("circus_wsgi.wsgi")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

#: Size of the pieces a streamed body is cut into under flow control.
PIECE = 100 * 1024
#: Without flow control: messages sent at once before coalescing starts ...
BURST = 4
#: ... then at most one message per this many seconds, ...
INTERVAL = 0.025
#: ... holding at most this many bytes before the writer waits.
HOLD_MAX = 8 * 1024 * 1024

_CACHE_MAX = 512


class ResponseError(ValueError):
    """The application's status or headers cannot be sent (the client gets 500)."""


class ClientGone(Exception):
    """The client went away while its response was being sent."""


class Outbox(Protocol):
    """Where an :class:`Exchange` sends its response's bytes, and tells its status."""

    status: int

    def write(self, data: bytes) -> None:
        """Send ``data`` (may wait for the client); raise :class:`ClientGone` if it left."""

    def finish(self, data: bytes, close: bool, body: bytes = b"") -> None:
        """Send the last ``data``, then ``body`` (a head and a body need not be joined);
        then close the connection if ``close``."""


# --------------------------------------------------------------------------
# The environ


def _environ_key(name: bytes) -> Optional[str]:
    """The environ key of a header name from mongrel2, or None to leave it out.

    Upper-case names are mongrel2's own (METHOD, PATH, ...); its upload headers
    are not the client's; a name with ``_`` is dropped, as gunicorn does, so
    that ``X_Forwarded_For`` cannot pose as ``X-Forwarded-For``.
    """
    if name != name.lower() or b"_" in name or name.startswith(b"x-mongrel2-"):
        return None
    if name == b"content-type":
        return "CONTENT_TYPE"
    if name == b"content-length":
        return "CONTENT_LENGTH"
    return "HTTP_" + name.decode("latin-1").upper().replace("-", "_")


def _memo(cache: dict, key: Any, compute: Callable[[Any], Any]) -> Any:
    """``compute(key)``, remembered in ``cache`` while it has room (keys come from clients)."""
    try:
        return cache[key]
    except (KeyError, TypeError):
        pass
    value = compute(key)
    if len(cache) < _CACHE_MAX:
        cache[key] = value
    return value


_KEYS: dict[bytes, Optional[str]] = {}


def _add_headers(environ: dict, headers: dict) -> None:
    """Put each client header in ``environ`` under its environ key."""
    keys = _KEYS
    for name, value in headers.items():
        key = keys.get(name, False)
        if key is False:
            key = _memo(keys, name, _environ_key)
        if key is None:
            continue
        if type(value) is list:
            # RFC 9113 8.2.3: cookies are joined with "; ", other headers with ", ".
            value = (b"; " if key == "HTTP_COOKIE" else b", ").join(value)
        environ[key] = value.decode("latin-1")


def _split_host(host: str, scheme: str) -> tuple[str, str]:
    """(SERVER_NAME, SERVER_PORT) from a Host header value."""
    name, colon, port = host.rpartition(":")
    if not colon or "]" in port or not port.isdigit():
        name, port = host, ("443" if scheme == "https" else "80")
    return name.strip("[]").lower() or "localhost", port


class FileWrapper:
    """``wsgi.file_wrapper``: iterates a file-like object in blocks and closes it."""

    def __init__(self, filelike: Any, blksize: int = PIECE) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        read, size = self.filelike.read, self.blksize
        block = read(size)
        while block:
            yield block
            block = read(size)


class Site:
    """One mounted WSGI application and what its environs share.

    ``prefix`` is its URL prefix ("/" for the root), which becomes SCRIPT_NAME
    (without a trailing slash). ``bind`` gives SERVER_NAME and SERVER_PORT when
    a request has no Host header. ``proxies`` says whose forwarding headers set
    REMOTE_ADDR and wsgi.url_scheme (None: nobody's).
    """

    def __init__(self, app: WSGIApp, prefix: str = "/", *, bind: str = "127.0.0.1:8000",
                 multithread: bool = False, multiprocess: bool = True,
                 errors: Any = None, proxies: Optional[Proxies] = None) -> None:
        self.app = app
        self.proxies = proxies
        self.prefix = prefix.encode("latin-1")
        script_name = prefix.rstrip("/")
        self._cut = len(script_name)
        host, _, port = bind.rpartition(":")
        self.base: dict[str, Any] = {
            "SCRIPT_NAME": script_name,
            "SERVER_NAME": host.strip("[]"),
            "SERVER_PORT": port,
            "wsgi.version": (1, 0),
            "wsgi.errors": errors if errors is not None else sys.stderr,
            "wsgi.multithread": multithread,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
        }
        self._hosts: dict[tuple[str, str], tuple[str, str]] = {}

    def environ(self, message: Message, body: Any = None, length: Optional[int] = None) -> dict:
        """The PEP 3333 environ of ``message``.

        ``body`` is its wsgi.input when the body is not inline (an upload's
        file, of ``length`` bytes: the CONTENT_LENGTH of a chunked request).
        """
        headers = message.headers
        environ = self.base.copy()
        _add_headers(environ, headers)
        scheme = headers.get(b"URL_SCHEME", b"http").decode("latin-1")
        path = headers.get(b"PATH", message.path)[self._cut:]
        environ["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode(
            "latin-1")
        environ["REQUEST_METHOD"] = headers[b"METHOD"].decode("latin-1")
        environ["QUERY_STRING"] = headers.get(b"QUERY", b"").decode("latin-1")
        environ["RAW_URI"] = headers.get(b"URI", message.path).decode("latin-1")
        environ["SERVER_PROTOCOL"] = headers.get(b"VERSION", b"HTTP/1.1").decode("latin-1")
        environ["REMOTE_ADDR"] = headers.get(b"REMOTE_ADDR", b"").decode("latin-1")
        environ["wsgi.url_scheme"] = scheme
        if self.proxies is not None and ("HTTP_X_FORWARDED_FOR" in environ or
                                         "HTTP_X_FORWARDED_PROTO" in environ or
                                         "HTTP_FORWARDED" in environ):
            scheme = self.proxies.apply(environ)
        host = environ.get("HTTP_HOST")
        if host:
            server = self._hosts.get((host, scheme))
            if server is None:
                server = _memo(self._hosts, (host, scheme), lambda key: _split_host(*key))
            environ["SERVER_NAME"], environ["SERVER_PORT"] = server
        if body is None:
            body = io.BytesIO(message.body)
            length = len(message.body) if message.body else None
        if length is not None and "CONTENT_LENGTH" not in environ:
            environ["CONTENT_LENGTH"] = str(length)
        environ["wsgi.input"] = body
        return environ


class Router:
    """Finds the :class:`Site` of a request from mongrel2's PATTERN header.

    mongrel2 routes by plain prefix, so ``/api`` also matches ``/apix``; such a
    request goes to the root application, as the URL's path segments say.
    """

    def __init__(self, root: Site, mounts: Iterable[Site] = ()) -> None:
        self.root = root
        self._by_prefix = {site.prefix: site for site in mounts}

    def site(self, message: Message) -> Site:
        """The site that serves ``message``."""
        if not self._by_prefix:
            return self.root
        site = self._by_prefix.get(message.headers.get(b"PATTERN", b"/").rstrip(b"/"))
        if site is None:
            return self.root
        path = message.headers.get(b"PATH", message.path)
        rest = path[len(site.prefix.rstrip(b"/")):]
        return site if not rest or rest[:1] == b"/" else self.root


# --------------------------------------------------------------------------
# Response framing

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_STATUS = re.compile(r"([1-9][0-9][0-9]) [^\r\n]*\Z")

# What a response header name means to the framing.
_PLAIN, _LENGTH, _HOP, _CONNECTION, _DATE, _SERVER = range(6)
_HOP_BY_HOP = {"keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "trailers", "transfer-encoding", "upgrade"}
_NAMES: dict[Any, int] = {}
_STATUSES: dict[Any, tuple[int, bytes]] = {}


def _name_kind(name: Any) -> int:
    """What a response header name means to the framing (checked once per name)."""
    if type(name) is not str or not _TOKEN.match(name):
        raise ResponseError(f"invalid header name {name!r}")
    lower = name.lower()
    return {"content-length": _LENGTH, "connection": _CONNECTION, "date": _DATE,
            "server": _SERVER}.get(lower, _HOP if lower in _HOP_BY_HOP else _PLAIN)


def _status_line(status: Any) -> tuple[int, bytes]:
    """(code, status line) of a status string (checked once per string)."""
    if type(status) is not str or not _STATUS.match(status):
        raise ResponseError(f"invalid status {status!r}")
    try:
        return int(status[:3]), b"HTTP/1.1 " + status.encode("latin-1") + b"\r\n"
    except UnicodeEncodeError:
        raise ResponseError(f"status {status!r} is not latin-1") from None


_stamp: tuple[int, bytes] = (0, b"")


def _date_and_server(date: bool, server: bool) -> bytes:
    """The Date and Server lines, the Date formatted once a second."""
    global _stamp
    if not (date and server):
        return ((b"Date: " + httpmsg.http_date() + b"\r\n") if date else b"") + (
            (b"Server: " + httpmsg.SERVER + b"\r\n") if server else b"")
    now = int(time.time())
    if _stamp[0] != now:
        _stamp = (now, b"Date: " + formatdate(now, usegmt=True).encode("ascii")
                  + b"\r\nServer: " + httpmsg.SERVER + b"\r\n")
    return _stamp[1]


def wants_keep_alive(message: Message) -> bool:
    """Whether the client asked to keep its connection open after this request."""
    headers = message.headers
    connection = headers.get(b"connection")
    if connection is not None:
        if type(connection) is list:
            connection = b",".join(connection)
        connection = connection.lower()
        if b"close" in connection:
            return False
    if headers.get(b"VERSION") == b"HTTP/1.0":
        return connection is not None and b"keep-alive" in connection
    return True


_CHUNK_END = b"0\r\n\r\n"


@mypyc_attr(allow_interpreted_subclasses=True)  # hooks.py's HookedExchange
class Exchange:
    """One request's response: ``start_response``, ``write`` and the HTTP framing.

    ``run(app, environ)`` calls the application and sends its response to
    ``out``; it never raises for the application's faults and always calls the
    iterable's ``close()``. Afterwards ``status`` and ``sent`` (body bytes)
    are there for the access log.
    """

    __slots__ = ("out", "head_only", "keep_alive", "http10", "status", "sent",
                 "_line", "_headers", "_length", "_computed", "_extra", "_started", "_close",
                 "_chunked")

    def __init__(self, out: Outbox, method: bytes, keep_alive: bool, http10: bool) -> None:
        self.out = out
        self.head_only = method == b"HEAD"
        self.keep_alive = keep_alive
        self.http10 = http10
        self.status = 0
        self.sent = 0
        self._line = b""
        self._headers = b""
        self._length: Optional[int] = None  # the body's length, when known
        self._computed = False  # the length is ours, not a header of the app
        self._extra = b""  # Date and Server lines, those the app did not set
        self._started = False  # headers handed to out
        self._close = not keep_alive
        self._chunked = False

    # -- the WSGI callables

    def start_response(self, status: str, headers: list, exc_info: Any = None) -> Callable:
        """PEP 3333's start_response: checks status and headers, sends nothing yet."""
        if exc_info is not None:
            if self._started:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self.status:
            raise ResponseError("start_response called twice without exc_info")
        code, line = _STATUSES[status] if status in _STATUSES else _memo(
            _STATUSES, status, _status_line)
        text, length, date, server, close = self._check_headers(headers)
        self.status, self._line, self._headers, self._length = code, line, text, length
        self.out.status = code
        self._computed = False
        self._extra = _date_and_server(date, server)
        self._close = close or not self.keep_alive
        return self.write

    def _check_headers(self, headers: list) -> tuple[bytes, Optional[int], bool, bool, bool]:
        if type(headers) is not list:
            raise ResponseError("headers must be a list of (name, value) tuples")
        parts = []
        length, date, server, close = None, True, True, False
        names = _NAMES
        for name, value in headers:
            kind = names[name] if name in names else _memo(names, name, _name_kind)
            if type(value) is not str:
                raise ResponseError(f"header {name!r} has a value that is not a str")
            if kind:
                if kind == _LENGTH:
                    length = _content_length(value)
                elif kind == _HOP or kind == _CONNECTION:
                    close = close or (kind == _CONNECTION and "close" in value.lower())
                    continue
                elif kind == _DATE:
                    date = False
                else:
                    server = False
            parts.append(f"{name}: {value}\r\n")
        text = "".join(parts)
        if text.count("\n") != len(parts) or text.count("\r") != len(parts):
            raise ResponseError("a header value contains CR or LF")
        try:
            return text.encode("latin-1"), length, date, server, close
        except UnicodeEncodeError:
            raise ResponseError("a header value is not latin-1") from None

    def write(self, data: bytes) -> None:
        """PEP 3333's write(): send a block of the body now."""
        if not self.status:
            raise ResponseError("write() before start_response")
        if type(data) is not bytes:
            raise ResponseError(f"body blocks must be bytes, not {type(data).__name__}")
        if data:
            self.out.write(self._frame(data))

    # -- running the application

    def run(self, app: WSGIApp, environ: dict) -> None:
        """Call ``app`` and send its response; faults become 500 or a closed connection."""
        result = None
        try:
            result = app(environ, self.start_response)
            if type(result) is list or type(result) is tuple:
                self._finish_sequence(result)
            else:
                for block in result:
                    self.write(block)
                self._finish()
        except ClientGone:
            self.out.finish(b"", False)
        except Exception:
            log.exception("error in the application (%s %s)", environ.get("REQUEST_METHOD"),
                          environ.get("RAW_URI"))
            self._fail()
        finally:
            if result is not None and hasattr(result, "close"):
                _close_result(result)

    def _finish_sequence(self, blocks: list | tuple) -> None:
        """The common case: the whole body is known, so it leaves with its headers."""
        if not self.status:
            raise ResponseError("the application returned without calling start_response")
        if len(blocks) == 1 and type(blocks[0]) is bytes:
            body = blocks[0]
        else:
            for block in blocks:
                if type(block) is not bytes:
                    raise ResponseError(f"body blocks must be bytes, not {type(block).__name__}")
            body = b"".join(blocks)
        if self._started:
            if body:
                self.out.write(self._frame(body))
            return self._finish()
        if self._length is None:
            self._length, self._computed = len(body), True
        elif len(body) < self._length and not self._no_body():
            self._close = True  # the client would wait for bytes that never come
        self._started = True
        head = self._head()
        self.out.finish(head, self._close, self._frame(body))

    def _finish(self) -> None:
        if not self.status:
            raise ResponseError("the application returned without calling start_response")
        if not self._started:
            if self._length is None:
                self._length, self._computed = 0, True
            self._started = True
            self.out.finish(self._head(), self._close)
            return
        if self._length is not None and self.sent < self._length and not self._no_body():
            self._close = True  # the client would wait for bytes that never come
        self.out.finish(_CHUNK_END if self._chunked else b"", self._close)

    def _fail(self) -> None:
        """After an exception: 500 if nothing was sent yet, else close the connection."""
        if self._started:
            self.out.finish(b"", True)
            return
        self.status = self.out.status = 500
        self.sent, self._started = 0, True
        self.out.finish(httpmsg.error_response(500, close=self._close), self._close)

    # -- framing

    def _no_body(self) -> bool:
        return self.head_only or self.status < 200 or self.status == 204 or self.status == 304

    def _head(self) -> bytes:
        """Status line and headers, with the framing headers this response needs."""
        framing = b""
        if self._length is None:
            if self._no_body():
                pass
            elif self.http10:
                self._close = True
            else:
                self._chunked = True
                framing = b"Transfer-Encoding: chunked\r\n"
        elif self._computed and self.status >= 200 and self.status not in (204, 304) and (
                self._length or not self.head_only):
            framing = b"Content-Length: %d\r\n" % self._length
        if self._close:
            framing += b"Connection: close\r\n"
        elif self.http10:
            framing += b"Connection: keep-alive\r\n"
        return self._line + self._extra + self._headers + framing + b"\r\n"

    def _frame(self, data: bytes) -> bytes:
        """A body block as it goes on the wire, the headers first if not sent yet."""
        head = b""
        if not self._started:
            self._started = True
            head = self._head()
        if self._no_body():
            return head
        if self._length is not None and len(data) > self._length - self.sent:
            data = data[:self._length - self.sent]  # never more than the app declared
        self.sent += len(data)
        if self._chunked and data:
            return b"%s%x\r\n%s\r\n" % (head, len(data), data)
        return head + data


def _content_length(value: str) -> int:
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        raise ResponseError(f"invalid Content-Length {value!r}")
    return int(value)


def _close_result(result: Any) -> None:
    try:
        result.close()
    except Exception:
        log.exception("error in the close() of the application's response")


# --------------------------------------------------------------------------
# Cutting a response into mongrel2 messages


class Pacer:
    """How one response's bytes are cut into mongrel2 messages.

    With flow control, mongrel2 drops a client when the bytes queued for it
    would pass its window (:data:`protocol.WINDOW`, 100 KiB) and credits back
    each message's bytes once written; the dispatcher holds back what does not
    fit yet (:mod:`circus_wsgi.flowcontrol`). So the bytes sent and not yet
    credited never exceed ``credit`` (the budget the dispatcher gave the
    response, plus the credits since; at most ``window``): a response that
    fits goes as one message (if it fits mongrel2's window too), a larger one
    in pieces of at most :data:`PIECE`, each sent when the credit allows, and
    the writer waits (``blocked``) while a piece is held. A response is
    ``settled`` once nothing is held.

    Without flow control (``window`` None) mongrel2 drops a client with more
    than 16 messages queued: after :data:`BURST` messages sent at once, blocks
    are coalesced and sent at most once per :data:`INTERVAL`; the writer waits
    when :data:`HOLD_MAX` bytes are held.
    """

    __slots__ = ("window", "credit", "_held", "_size", "_tokens", "_last")

    def __init__(self, window: Optional[int], credit: Optional[int] = None) -> None:
        self.window = window
        self.credit: int = (window or 0) if credit is None else min(credit, window or 0)
        self._held: list[Buffer] = []
        self._size = 0
        self._tokens = float(BURST)
        self._last = 0.0

    @property
    def held(self) -> int:
        """Bytes waiting to be sent."""
        return self._size

    def fits(self, size: int) -> bool:
        """Whether one message of ``size`` bytes may go now (none passes mongrel2's window)."""
        return self.window is None or (not self._size and size <= min(self.credit, WINDOW))

    def add(self, data: bytes) -> None:
        """Queue ``data`` to be sent."""
        if data:
            self._held.append(data)
            self._size += len(data)

    def granted(self, credits: int) -> None:
        """mongrel2 wrote ``credits`` bytes to the client."""
        if self.window is not None:
            self.credit = min(self.credit + credits, self.window)

    def take(self, now: float) -> list[list[Buffer]]:
        """The message bodies that may be sent now, in order, each as its parts."""
        if not self._size:
            return []
        if self.window is None:
            return self._take_timed(now)
        return self._take_credited()

    def blocked(self) -> bool:
        """True when the writer must wait before adding more."""
        if self.window is None:
            return self._size >= HOLD_MAX
        return self._size >= min(PIECE, self.window)

    def settled(self) -> bool:
        """True when nothing is held."""
        return not self._size

    def wait_time(self, now: float) -> Optional[float]:
        """Seconds until ``take`` can send without new credits (None: it needs credits)."""
        if self.window is not None:
            return None
        return max(0.0, (1.0 - self._tokens) * INTERVAL - (now - self._last))

    def _take_all(self) -> list[Buffer]:
        parts, self._held, self._size = self._held, [], 0
        return parts

    def _take_timed(self, now: float) -> list[list[Buffer]]:
        self._tokens = min(float(BURST), self._tokens + (now - self._last) / INTERVAL)
        self._last = now
        if self._tokens < 1.0:
            return []
        self._tokens -= 1.0
        return [self._take_all()]

    def _take_credited(self) -> list[list[Buffer]]:
        piece = min(PIECE, self.window or PIECE)  # (with flow control: there is a window)
        out = []
        while self._size:
            size = min(self._size, piece, self.credit)
            if size < min(self._size, piece // 4):
                break  # wait for credit rather than send slivers
            out.append(self._cut(size) if size < self._size else self._take_all())
            self.credit -= size
        return out

    def _cut(self, size: int) -> list[Buffer]:
        """The first ``size`` bytes held, as parts: sliced, never copied."""
        held, taken = self._held, 0
        parts: list[Buffer] = []
        self._size -= size
        while size:
            first = held[taken]
            if len(first) > size:
                view = memoryview(first)
                parts.append(view[:size])
                held[taken] = view[size:]
                break
            parts.append(first)
            size -= len(first)
            taken += 1
        del held[:taken]
        return parts
