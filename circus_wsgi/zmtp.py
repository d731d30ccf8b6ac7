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
asks for none.

The handshake is done before the connection is used, blocking for at most a
second: libzmq takes a message that arrives before it has sent its own READY for
a second handshake command and drops the connection (seen under load), so
nothing may be sent before the peer's READY is read. A peer that does not speak
ZMTP 3 with NULL security, or answers with an ERROR command, is refused
(ValueError); an ERROR later, or a corrupt frame, makes
:meth:`ZmtpLayout.decode` raise ValueError, which closes the stream
(:class:`circus_wsgi.framing.FramedStream`).
"""

from __future__ import annotations

import re
import socket
import struct
from typing import Sequence

from .framing import Frame, FramedStream, connect_socket

__all__ = ["ZmtpLayout", "connect", "handshake", "greeting", "ready_command"]

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_LONG_HEAD = struct.Struct("!BQ")
_SHORT_HEAD = struct.Struct("!BB")
GREETING_SIZE = 64
#: A frame larger than this is taken for a corrupt stream.
MAX_FRAME = 1 << 31
#: Seconds the peer has to answer our greeting and READY with its own.
HANDSHAKE_TIMEOUT = 1.0


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


def _command_name(body: bytes) -> bytes:
    """The name of a command from the peer; ERROR raises with its reason."""
    name = body[1:1 + body[0]] if body else b""
    if name == b"ERROR":
        reason = body[7:7 + body[6]] if len(body) > 6 else b""
        raise ValueError(f"the peer refused the connection: {reason.decode('latin-1')!r}")
    return name


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ValueError("the peer closed the connection during the handshake")
        data += chunk
    return data


def handshake(sock: socket.socket, socket_type: str, timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Send our greeting and READY announcing ``socket_type``, and read the peer's
    (blocking, ``timeout`` seconds at most: TimeoutError). ValueError if the peer does
    not speak ZMTP 3 with NULL security, or refuses us."""
    sock.settimeout(timeout)
    sock.sendall(greeting() + ready_command(socket_type))
    _check_greeting(_receive_exactly(sock, GREETING_SIZE))
    flags, size = _receive_exactly(sock, 2)
    if flags & _LONG:
        size = int.from_bytes(bytes([size]) + _receive_exactly(sock, 7), "big")
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
    body = _receive_exactly(sock, size)
    if not flags & _COMMAND or _command_name(body) != b"READY":
        raise ValueError("the peer did not answer with READY")


class ZmtpLayout:
    """:class:`circus_wsgi.framing.Layout` of ZMTP 3.0 traffic after the handshake.
    Commands are taken here (ERROR raises), never returned."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # frames of a message whose last frame is to come

    def encode(self, frames: Sequence[Frame]) -> list[Frame]:
        buffers: list[Frame] = []
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
                _command_name(frame)
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
        if len(data) - at < 9:
            return None  # a short frame's header is whole at 2 bytes, but it is small
        flags = data[at]
        if not flags & _LONG:
            return 2 + data[at + 1]
        size = _LONG_HEAD.unpack_from(data, at)[1]
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        return 9 + size


_ENDPOINT = re.compile(r"^(?:ipc://(.+)|tcp://(.+):(\d+))$")


def connect(endpoint: str, socket_type: str) -> FramedStream[bytes] | None:
    """A ZMTP connection to the ZeroMQ socket bound at ``endpoint`` (``ipc://PATH`` or
    ``tcp://HOST:PORT``), announcing ``socket_type``, handshake done; None if nothing
    listens there yet. ValueError or TimeoutError if the handshake fails."""
    match = _ENDPOINT.match(endpoint)
    if match is None:
        raise ValueError(f"not an ipc:// or tcp:// endpoint: {endpoint!r}")
    path, host, port = match.groups()
    if path is not None:
        sock = connect_socket(socket.AF_UNIX, path)
    else:
        sock = connect_socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                              (host.strip("[]"), int(port)))
    if sock is None:
        return None
    if path is None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        handshake(sock, socket_type)
    except (OSError, ValueError):
        sock.close()
        raise
    return FramedStream[bytes](sock, ZmtpLayout())
