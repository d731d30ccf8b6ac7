"""The Mongrel2 handler wire format, sans-IO: bytes in, messages out, and back.

Strategy: a request is ``SENDER SP CONN_ID SP PATH SP HEADERS BODY`` where
HEADERS is a tnetstring dict (or a JSON netstring for ``protocol='json'``) and
BODY a netstring. :func:`parse` slices the message once, decodes the headers
with tnetstring3 (a C extension) and classifies it; anything malformed raises
:class:`ProtocolError`, never anything else. Responses are built by
:func:`response`. No sockets here, so every path is unit-tested and fuzzed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Union

import tnetstring

__all__ = ["Kind", "Message", "ProtocolError", "parse", "plain_request", "granted",
           "addressed", "sender_of", "response", "close", "keep_alive", "is_smuggling_risk",
           "upload_file", "MAX_TARGETS", "WINDOW"]

#: mongrel2 1.12's download window per connection (MAX_CREDITS; not a setting).
WINDOW = 100 * 1024

#: mongrel2's limits.handler_targets: ids one response message may address.
MAX_TARGETS = 128

HeaderValue = Union[bytes, list]
#: Bytes of a response message that hold its sender and connection ids (as a rule).
_HEAD_MAX = 4096
#: A part of a response body: a slice of a larger one is a memoryview, not a copy.
Buffer = Union[bytes, memoryview]

UPLOAD_START = b"x-mongrel2-upload-start"
UPLOAD_DONE = b"x-mongrel2-upload-done"


class ProtocolError(ValueError):
    """A message that does not follow the Mongrel2 handler protocol."""


class Kind(Enum):
    REQUEST = "request"
    UPLOAD_START = "upload-start"  # headers only; the body is still arriving in a temp file
    UPLOAD_DONE = "upload-done"  # the body is complete in the temp file
    DISCONNECT = "disconnect"
    CREDITS = "credits"


@dataclass(slots=True)
class Message:
    """One message from mongrel2. Header names and values are bytes, as sent."""

    sender: bytes
    conn_id: bytes
    path: bytes
    headers: dict
    body: bytes
    kind: Kind

    def header(self, name: bytes) -> bytes | None:
        """One header's value; a repeated header's values joined with ``, ``."""
        value = self.headers.get(name)
        if isinstance(value, list):
            return b", ".join(value)
        return value

    @property
    def upload_path(self) -> bytes | None:
        """The temp file of an upload, once start and done agree (else None).

        Clients can forge the upload headers: check that the path is in
        mongrel2's upload directory before touching the file.
        """
        start = self.headers.get(UPLOAD_START)
        return start if start is not None and start == self.headers.get(UPLOAD_DONE) else None

    @property
    def credits(self) -> int:
        """Bytes the client has taken: a credits notice's grant, or a request's window."""
        value = self.headers.get(b"DOWNLOAD_CREDITS")
        return int(value) if isinstance(value, bytes) and value.isdigit() else 0


_NETSTRING_ENDS = frozenset(b",}")


def _split_netstring(data: bytes, start: int) -> tuple[int, int]:
    """(start, end) of a netstring's payload beginning at ``start``; end is at its ','."""
    colon = data.find(b":", start, start + 12)
    if colon <= start or not data[start:colon].isdigit():
        raise ProtocolError("bad netstring length")
    end = colon + 1 + int(data[start:colon])
    if end >= len(data) or data[end] not in _NETSTRING_ENDS:
        raise ProtocolError("truncated netstring")
    return colon + 1, end


def parse(data: bytes, protocol: str = "auto") -> Message:
    """Parse one request or control notice from mongrel2.

    ``protocol`` is the handler's: ``tnetstring``, ``json``, or ``auto`` to tell
    them apart by the headers' first byte (a JSON object's ``{``; a tnetstring
    dict begins with its first key's length).
    """
    try:
        sender, conn_id, path, rest = data.split(b" ", 3)
    except ValueError:
        raise ProtocolError("fewer than four space-separated fields") from None
    if not conn_id.isdigit():
        raise ProtocolError("connection id is not a number")
    offset = len(data) - len(rest)
    header_start, header_end = _split_netstring(data, offset)
    headers = _decode_headers(data, offset, header_start, header_end, protocol)
    body_start, body_end = _split_netstring(data, header_end + 1)
    if body_end != len(data) - 1 or data[body_end] != 0x2C:
        raise ProtocolError("trailing bytes after the body")
    body = data[body_start:body_end] if body_end > body_start else b""
    return Message(sender, conn_id, path, headers, body, _classify(headers, body))


#: In a request's bytes, what makes it more than a plain request: a body length (it
#: must be checked), an upload, a notice.
_NOT_PLAIN = (b"content-length", b"transfer-encoding", b"x-mongrel2-upload",
              b"6:METHOD,4:JSON,")


def plain_request(data: bytes) -> tuple[bytes, bytes, int, bytes] | None:
    """(sender, conn_id, window, method) of a request that needs no look at its headers:
    tnetstring headers with a METHOD, an empty body, none of the headers above;
    ``window`` is its DOWNLOAD_CREDITS (a connection's first request), else 0. None for
    anything else, which :func:`parse` then reads in full. (The dispatcher's fast path.)"""
    parts = data.split(b" ", 3)
    if len(parts) != 4 or not parts[1].isdigit() or not data.endswith(b"}0:,"):
        return None
    for marker in _NOT_PLAIN:
        if marker in data:
            return None
    try:
        headers = tnetstring.loads(parts[3][:-3])
    except ValueError:
        return None
    method = headers.get(b"METHOD") if type(headers) is dict else None
    if type(method) is not bytes:
        return None
    window = headers.get(b"DOWNLOAD_CREDITS", b"")
    return (parts[0], parts[1], int(window) if type(window) is bytes and window.isdigit()
            else 0, method)


#: Methods whose request may be run twice with the effect of once (RFC 9110, 9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def is_idempotent(data: bytes) -> bool:
    """Whether the request in ``data`` has an idempotent method (False if unreadable)."""
    try:
        return parse(data).headers.get(b"METHOD") in IDEMPOTENT
    except ProtocolError:
        return False


def granted(data: bytes) -> int:
    """The bytes a credits notice grants (0 if it is not one)."""
    at = data.find(b"16:DOWNLOAD_CREDITS,")
    if at >= 0:
        value_start = data.find(b":", at + 20) + 1
        value_end = data.find(b",", value_start)
        value = data[value_start:value_end]
        return int(value) if value.isdigit() else 0
    try:
        return parse(data).credits
    except ProtocolError:
        return 0


def addressed(message: Buffer) -> tuple[list[bytes], int]:
    """The connection ids a response message is for and the bytes it writes to each:
    0 for a close, -1 for a control message (its ids begin with ``X``). (Searches
    and slices only the head: the body, maybe megabytes, is never copied.)"""
    head = message if type(message) is bytes else bytes(message[:_HEAD_MAX])
    space = head.find(b" ")
    colon = head.find(b":", space + 1, space + 12) if space >= 0 else -1
    length = head[space + 1:colon]
    if colon < 0 or not length.isdigit():
        return [], -1
    start = colon + 1
    end = start + int(length)
    ids = head[start:end] if end <= len(head) else bytes(message[start:end])
    if ids.startswith(b"X "):
        return ids[2:].split(), -1
    return ids.split(), max(0, len(message) - end - 2)


def sender_of(message: Buffer) -> bytes:
    """The sender a response message begins with."""
    return bytes(message[:_HEAD_MAX]).partition(b" ")[0]


def _decode_headers(data: bytes, offset: int, start: int, end: int, protocol: str) -> dict:
    try:
        if protocol == "json" or (protocol == "auto" and data[start] == 0x7B):  # "{"
            # mongrel2 writes header bytes into the JSON unescaped: decoding as
            # latin-1 maps each byte to one character and back, so it is byte-safe.
            loaded = json.loads(data[start:end].decode("latin-1"))
            headers = {_latin1(k): _json_value(v) for k, v in loaded.items()}
        else:
            headers = tnetstring.loads(data[offset:end + 1])
    except (ValueError, TypeError, AttributeError, UnicodeError, RecursionError) as error:
        raise ProtocolError(f"bad headers: {error}") from None
    if type(headers) is not dict or type(headers.get(b"METHOD")) is not bytes:
        raise ProtocolError("headers are not a dict with a METHOD")
    if not _BYTES.issuperset(map(type, headers.values())):  # lists are rare: check them
        for value in headers.values():
            if type(value) is not bytes and not (
                    type(value) is list and all(type(v) is bytes for v in value)):
                raise ProtocolError("a header value is neither bytes nor a list of bytes")
    return headers


_BYTES = frozenset((bytes,))


def _latin1(text: str) -> bytes:
    return text.encode("utf-8") if any(ord(c) > 255 for c in text) else text.encode("latin-1")


def _json_value(value):
    if isinstance(value, list):
        return [_latin1(str(v)) for v in value]
    return _latin1(str(value))


def _classify(headers: dict, body: bytes) -> Kind:
    if headers[b"METHOD"] == b"JSON":
        try:
            kind = json.loads(body).get("type")
        except (ValueError, AttributeError, UnicodeError):
            kind = None
        if kind == "disconnect":
            return Kind.DISCONNECT
        if kind == "credits":
            return Kind.CREDITS
        return Kind.REQUEST  # a client's own METHOD=JSON request goes to the app
    start = headers.get(UPLOAD_START)
    if start is not None:
        # A client can send these headers itself; mongrel2 overwrites them on a
        # real upload, but a forged done beside a real start differs from it.
        return Kind.UPLOAD_DONE if start == headers.get(UPLOAD_DONE) else Kind.UPLOAD_START
    return Kind.REQUEST


def upload_file(message: Message, directory: str | bytes) -> bytes | None:
    """The temp file of a completed upload, only if it lies in ``directory``.

    The upload headers can be forged by a client (mongrel2 passes its headers
    through), so a path outside mongrel2's upload directory is never to be
    opened or deleted; None then, as for an upload that is not complete.
    """
    path = message.upload_path
    if path is None:
        return None
    folder = os.path.normpath(os.fsencode(directory))
    return path if os.path.dirname(os.path.normpath(path)) == folder else None


def response(sender: bytes, conn_ids: Union[bytes, Iterable[bytes]], *body: Buffer) -> bytes:
    """A response message: the ``body`` parts, joined, written verbatim to each connection.

    ``conn_ids`` is one id or up to :data:`MAX_TARGETS` of them. No body (or an
    empty one) closes the connections. (The parts are copied once, into the message.)
    """
    ids = conn_ids if isinstance(conn_ids, bytes) else b" ".join(conn_ids)
    if not ids or ids.count(b" ") >= MAX_TARGETS:
        raise ProtocolError(f"a response addresses 1 to {MAX_TARGETS} connections")
    if len(body) == 2:  # a head and its body: every response that fits one message
        return b"%s %d:%s, %s%s" % (sender, len(ids), ids, *body)
    return b"".join((b"%s %d:%s, " % (sender, len(ids), ids), *body))


def close(sender: bytes, conn_ids: Union[bytes, Iterable[bytes]]) -> bytes:
    """The message that makes mongrel2 close the connections."""
    return response(sender, conn_ids)


#: An extended message's body: ``["ctl", {"keep-alive": true}]`` as a tnetstring.
KEEP_ALIVE = b"31:3:ctl,21:10:keep-alive,4:true!}]"


def keep_alive(sender: bytes, conn_id: bytes) -> bytes:
    """A control message that writes nothing: for a live connection mongrel2 only resets
    its idle timer; for one that is gone it answers with a disconnect notice. (mongrel2
    closes a connection it cannot write to without telling the handler, so this is how
    a handler waiting for credits finds out.)"""
    ids = b"X " + conn_id
    return b"%s %d:%s, %s" % (sender, len(ids), ids, KEEP_ALIVE)


#: The headers and body of mongrel2's disconnect notice.
_DISCONNECT = b'16:6:METHOD,4:JSON,}21:{"type":"disconnect"},'


def disconnect_notice(sender: bytes, conn_id: bytes) -> bytes:
    """A disconnect notice for ``conn_id`` as mongrel2 sends one: how the dispatcher tells
    a worker that a client went with a mongrel2 that restarted."""
    return b"%s %s @* %s" % (sender, conn_id, _DISCONNECT)


def is_smuggling_risk(message: Message) -> bool:
    """True for a request whose body mongrel2 may frame differently from the client.

    mongrel2 1.12 reads the first Content-Length with ``strtol`` and honours it
    even beside Transfer-Encoding, and treats any Transfer-Encoding other than
    exactly ``chunked`` as no body; the rest of the bytes are then parsed as a
    new request on the same connection. So a request is refused (400, then its
    connection closed) when it carries both headers, a repeated one, a
    Content-Length that is not all digits, or a Transfer-Encoding that is not
    ``chunked``.
    """
    headers = message.headers
    length = headers.get(b"content-length")
    coding = headers.get(b"transfer-encoding")
    if length is not None and coding is not None:
        return True
    if isinstance(length, list) or isinstance(coding, list):
        return True
    if length is not None and not length.isdigit():
        return True
    return coding is not None and coding != b"chunked"
