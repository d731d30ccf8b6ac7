"""A ZeroMQ peer without libzmq: ZMTP 3.0 with the NULL mechanism, on a plain socket.

The dispatcher's two connections to mongrel2 (to its PUSH, which sends requests
and notices, and to its SUB, which takes responses) speak this, so the dispatcher
reads and writes mongrel2's messages with its own system calls in its own loop:
no libzmq I/O thread that every message crosses, and many messages per read
(measured in the commit that brought this module; see docs/architecture.rst).

Only what those sockets need (https://rfc.zeromq.org/spec/23/): connecting
(``ipc://`` or ``tcp://``), the greeting and READY handshake, messages of one or
more frames both ways. We announce ZMTP 3.0, so a SUB sends its subscriptions as
messages (first byte 1), as libzmq does with a 3.0 peer. No heartbeats: mongrel2
asks for none. A peer that does not speak ZMTP 3 with NULL security, or sends an
ERROR command, makes :meth:`ZmtpLayout.decode` raise ValueError, which closes the
stream (:class:`circus_wsgi.framing.FramedStream`).
"""

from __future__ import annotations

import errno
import re
import socket
import struct
from typing import Sequence

from .framing import FramedStream

__all__ = ["ZmtpLayout", "connect", "greeting", "ready_command"]

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_LONG_HEAD = struct.Struct("!BQ")
_SHORT_HEAD = struct.Struct("!BB")
GREETING_SIZE = 64
#: A frame larger than this is taken for a corrupt stream.
MAX_FRAME = 1 << 31


def greeting() -> bytes:
    """Our greeting: signature, version 3.0, mechanism NULL, not a server."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") \
        + b"\x00" + bytes(31)


def ready_command(socket_type: str) -> bytes:
    """The NULL mechanism's READY command frame, announcing ``socket_type``."""
    value = socket_type.encode("ascii")
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack("!I", len(value)) + value
    return _SHORT_HEAD.pack(_COMMAND, len(body)) + body


def _check_greeting(data: bytes | bytearray) -> None:
    if data[0] != 0xFF or data[9] != 0x7F:
        raise ValueError("the peer does not speak ZMTP (bad signature)")
    if data[10] < 3:
        raise ValueError(f"the peer speaks ZMTP {data[10]}.{data[11]}, not 3")
    mechanism = bytes(data[12:32]).rstrip(b"\x00")
    if mechanism != b"NULL":
        raise ValueError(f"the peer asks for the {mechanism.decode('latin-1')!r} mechanism")


def _check_command(body: bytes) -> None:
    """Act on a command from the peer: READY is taken, ERROR raises, others are ignored."""
    name = body[1:1 + body[0]] if body else b""
    if name == b"ERROR":
        reason = body[7:7 + body[6]] if len(body) > 6 else b""
        raise ValueError(f"the peer refused the connection: {reason.decode('latin-1')!r}")


class ZmtpLayout:
    """:class:`circus_wsgi.framing.Layout` of ZMTP 3.0 traffic from the peer's greeting
    on (ours is sent by :func:`connect`). Commands are taken here, never returned."""

    def __init__(self) -> None:
        self.greeted = False  # the peer's greeting has been read
        self._parts: list[bytes] = []  # frames of a message whose last frame is to come

    def encode(self, frames: Sequence[bytes]) -> list[bytes]:
        buffers = []
        last = len(frames) - 1
        for number, frame in enumerate(frames):
            size = len(frame)
            more = _MORE if number < last else 0
            buffers.append(_SHORT_HEAD.pack(more, size) if size < 256
                           else _LONG_HEAD.pack(more | _LONG, size))
            buffers.append(frame)
        return buffers

    def decode(self, data: bytes | bytearray) -> tuple[list[list[bytes]], int]:
        at, end = 0, len(data)
        if not self.greeted:
            if end < GREETING_SIZE:
                return [], 0
            _check_greeting(data)
            self.greeted, at = True, GREETING_SIZE
        messages, parts = [], self._parts
        view = data if type(data) is bytes else memoryview(data)
        while end - at >= 2:
            flags = data[at]
            if flags & _LONG:
                if end - at < 9:
                    break
                start = at + 9
                stop = start + _LONG_HEAD.unpack_from(data, at)[1]
            else:
                start = at + 2
                stop = start + data[at + 1]
            if stop > end:
                break
            frame = view[start:stop] if view is data else bytes(view[start:stop])
            at = stop
            if flags & _COMMAND:
                _check_command(frame)
            elif flags & _MORE:
                parts.append(frame)
            elif parts:
                parts.append(frame)
                messages.append(parts)
                parts = self._parts = []
            else:
                messages.append([frame])
        return messages, at

    def size_at(self, data: bytes | bytearray, at: int) -> int | None:
        if not self.greeted or len(data) - at < 9:
            return None  # a short frame's header is whole at 2 bytes, but it is small
        flags = data[at]
        if not flags & _LONG:
            return 2 + data[at + 1]
        size = _LONG_HEAD.unpack_from(data, at)[1]
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        return 9 + size


_ENDPOINT = re.compile(r"^(?:ipc://(.+)|tcp://(.+):(\d+))$")


def connect(endpoint: str, socket_type: str) -> FramedStream | None:
    """A ZMTP connection to the ZeroMQ socket bound at ``endpoint`` (``ipc://PATH`` or
    ``tcp://HOST:PORT``), announcing ``socket_type``; None if nothing listens there yet.
    The handshake is sent at once; the peer's is read with its first messages."""
    match = _ENDPOINT.match(endpoint)
    if match is None:
        raise ValueError(f"not an ipc:// or tcp:// endpoint: {endpoint!r}")
    path, host, port = match.groups()
    if path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = path
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        address = (host.strip("[]"), int(port))
    try:
        sock.connect(address)
    except OSError as error:
        sock.close()
        if error.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
            return None
        raise
    if path is None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(greeting() + ready_command(socket_type))
    return FramedStream(sock, ZmtpLayout())
