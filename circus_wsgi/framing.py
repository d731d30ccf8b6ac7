"""Multipart messages on a stream socket, written and read by the loop's own thread:
the transport between the dispatcher and its workers, and (with
:mod:`circus_wsgi.zmtp`'s layout) between the dispatcher and mongrel2.

Both ends read and write with plain system calls: no I/O thread to hand each
message to and back from, which is what ZeroMQ's sockets cost per message
(measured: the Python side's CPU per hello request 48 us instead of 58).

The dispatcher and its workers use :class:`LengthPrefixed`: a message is a list
of byte frames, written as its size (the bytes after these four), the number of
frames, each frame's length (all 32-bit big-endian), then the frames themselves.

A :class:`FramedStream` never blocks: what the kernel does not take at once
waits in the stream, whole messages in order, until :meth:`FramedStream.flush`
(call it when the socket is writable). Messages not yet fully written survive a
lost connection, so a worker can send them to the next dispatcher.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections import deque
from typing import Generic, Protocol, Sequence, TypeVar, Union

#: Bytes taken from the kernel per :meth:`FramedStream.receive`. (Each read allocates a
#: buffer this size: cheap with :func:`memory.tune_malloc`, which keeps blocks this large
#: in the heap; glibc's default would map and unmap it each time, 10x the cost.)
READ_SIZE = 256 * 1024
#: The kernel's send buffer asked for each connection (Linux caps it at
#: net.core.wmem_max). With the default, 208 KiB, a worker's batch of 100 KB responses
#: went out in several writes, each waiting for the reader: 4 MiB made the 100 KB
#: benchmark 17 % and the 1 MB echo 19 % faster (measured on a 4 MiB wmem_max).
SEND_BUFFER = 4 * 1024 * 1024
#: sendmsg takes at most this many buffers (IOV_MAX is 1024 on Linux).
MAX_BUFFERS = 1024
_HEAD = struct.Struct("!II")  # size, frame count
_SIZE = struct.Struct("!I")
#: A received frame: bytes, or a view of the bytes read (see :class:`LengthPrefixed`).
Frame = Union[bytes, memoryview]
#: What frames a layout reads: Frame, or bytes alone (ZMTP's).
F = TypeVar("F", bytes, Frame)



def encode(frames: Sequence[Frame]) -> list[Frame]:
    """The buffers that make up one message on the wire (the frames are not copied)."""
    lengths = [len(frame) for frame in frames]
    count = len(lengths)
    size = 4 + 4 * count + sum(lengths)
    return [struct.pack("!II%dI" % count, size, count, *lengths), *frames]


def encode_message(frames: Sequence[Frame]) -> bytes:
    """One message as the bytes on the wire."""
    return b"".join(encode(frames))


def decode(data: bytes | bytearray,
           view_from: int | None = None) -> tuple[list[list[Frame]], int]:
    """The complete messages at the start of ``data``, and how many bytes they took.
    Frames are bytes, copied once (through a memoryview if ``data`` is a bytearray);
    with ``view_from``, frames of that many bytes or more are memoryviews of ``data``,
    not copies (``data`` must then never change)."""
    messages: list[list[Frame]] = []
    at, end = 0, len(data)
    piece = data if type(data) is bytes else memoryview(data)
    view = memoryview(data) if view_from is not None else None
    while end - at >= 8:
        size, count = _HEAD.unpack_from(data, at)
        stop = at + 4 + size
        if stop > end:
            break
        position = at + 8 + 4 * count
        if position > stop:
            raise ValueError(f"{count} frames do not fit in a message of {size} bytes")
        frames: list[Frame] = []
        for length in struct.unpack_from("!%dI" % count, data, at + 8):
            if view is not None and length >= view_from:
                frames.append(view[position:position + length])
            else:
                frames.append(bytes(piece[position:position + length]) if piece is not data
                              else data[position:position + length])
            position += length
        if position != stop:
            raise ValueError(f"frame lengths {position - at - 4} do not add up to {size}")
        messages.append(frames)
        at = stop
    return messages, at


class Layout(Protocol[F]):
    """How messages are laid out on the stream (an object per stream: it may keep state)."""

    def encode(self, frames: Sequence[Frame]) -> list[Frame]:
        """The buffers of one message on the wire."""

    def decode(self, data: bytes | bytearray) -> tuple[list[list[F]], int]:
        """The complete messages at the start of ``data``, and how many bytes were used."""

    def size_at(self, data: bytes | bytearray, at: int) -> int | None:
        """The size of the unit beginning at ``at`` (which :meth:`decode` left because
        it is incomplete), once its header is there; None before. Raises ValueError for
        a header no message can have."""


class LengthPrefixed:
    """The dispatcher-worker layout (see the module's docstring). With ``view_from``,
    received frames of that many bytes or more are memoryviews, not copies: for a
    reader that only forwards them (the dispatcher, its workers' responses)."""

    encode = staticmethod(encode)

    def __init__(self, view_from: int | None = None) -> None:
        self.view_from = view_from

    def decode(self, data: bytes | bytearray) -> tuple[list[list[Frame]], int]:
        return decode(data, self.view_from)

    @staticmethod
    def size_at(data: bytes | bytearray, at: int) -> int | None:
        if len(data) - at < 4:
            return None
        size = _SIZE.unpack_from(data, at)[0]
        if size < 4:
            raise ValueError(f"a message of {size} bytes has no frame count")
        return 4 + size


class FramedStream(Generic[F]):
    """One end of a connection carrying framed messages (of frames ``F``); non-blocking.

    ``closed`` turns true once the peer is gone (end of stream, or a reset or
    broken pipe): :meth:`receive` then returns nothing more and :meth:`send`
    raises :class:`ConnectionError`.
    """

    def __init__(self, sock: socket.socket, layout: Layout[F]) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.sock = sock
        self.layout: Layout[F] = layout
        self.closed = False
        self._head: bytes | bytearray = b""  # a message's first bytes, too few for its size
        # A message of known size still arriving, read in place: no joining of reads.
        self._arriving: bytearray | None = None
        self._filled = 0
        # Messages not yet completely written, each as its buffers still to write (the
        # first one's are trimmed as the kernel takes them: nothing is joined or copied),
        # and the first one's buffers as they were, once part of it is written.
        self._waiting: deque[list] = deque()
        self._begun: list | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def backlogged(self) -> bool:
        """True while messages wait for the socket to be writable."""
        return bool(self._waiting)

    # -- in

    def receive(self) -> list[list[F]]:
        """The messages that have arrived complete (one read from the kernel).

        Raises ValueError (and the stream is closed) if the bytes are not framed
        messages."""
        if self.closed:
            return []
        arriving = self._arriving
        chunk: bytes | bytearray = b""
        try:
            if arriving is not None:  # only its own bytes: the next message stays queued
                read = self.sock.recv_into(memoryview(arriving)[self._filled:])
            else:
                chunk = self.sock.recv(READ_SIZE)
                read = len(chunk)
        except BlockingIOError:
            return []
        except ConnectionError:
            read = 0
        if not read:
            self.closed = True
            return []
        if arriving is not None:
            self._filled += read
            if self._filled < len(arriving):
                return []
            chunk, self._arriving = arriving, None
        elif self._head:
            chunk, self._head = self._head + chunk, b""
        try:
            return self._take(chunk)
        except ValueError:
            self.closed = True  # the peer does not speak this protocol: nothing more from it
            raise

    def _take(self, chunk: bytes | bytearray) -> list[list[F]]:
        """Decode the whole messages of ``chunk``; keep the start of the next one."""
        messages, used = self.layout.decode(chunk)
        rest = len(chunk) - used
        if rest:
            size = self.layout.size_at(chunk, used)
            if size is None:
                self._head = bytes(chunk[used:])
            else:
                self._arriving = bytearray(size)
                self._arriving[:rest] = memoryview(chunk)[used:]
                self._filled = rest
        return messages

    # -- out

    def send(self, frames: Sequence[Frame]) -> None:
        """Write one message, or keep what the kernel does not take for :meth:`flush`."""
        if self.closed:
            raise ConnectionError("connection closed")
        buffers = self.layout.encode(frames)
        if self._waiting or len(buffers) > MAX_BUFFERS:  # behind messages already waiting
            self._waiting.append(buffers)
            self.flush()
            return
        written = self._write(buffers)
        if written < sum([len(buffer) for buffer in buffers]):
            self._waiting.append(buffers)
            self._consume(written)

    def flush(self) -> None:
        """Write what waits, as far as the kernel takes it."""
        while self._waiting:
            batch = []
            for buffers in self._waiting:
                batch += buffers
                if len(batch) >= MAX_BUFFERS:
                    del batch[MAX_BUFFERS:]
                    break
            written = self._write(batch)
            if not written:
                return
            self._consume(written)

    def _consume(self, written: int) -> None:
        """Drop the first ``written`` bytes of what waits (the kernel took them)."""
        waiting = self._waiting
        while written:
            buffers = waiting[0]
            if self._begun is None:
                self._begun = buffers.copy()
            taken = 0
            for buffer in buffers:
                if len(buffer) > written:
                    break
                written -= len(buffer)
                taken += 1
            if taken < len(buffers):
                del buffers[:taken]
                if written:
                    buffers[0] = memoryview(buffers[0])[written:]
                return
            waiting.popleft()
            self._begun = None

    def _write(self, buffers: list) -> int:
        try:
            return self.sock.sendmsg(buffers)
        except BlockingIOError:
            return 0
        except ConnectionError:
            self.closed = True
            raise

    def drain(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds to write what waits (before closing)."""
        deadline = time.monotonic() + timeout
        while self._waiting and not self.closed and time.monotonic() < deadline:
            self.flush()
            if self._waiting:
                select.select([], [self.sock], [], max(0.0, deadline - time.monotonic()))

    def unsent(self) -> list[bytes]:
        """Take the messages not yet completely written (as encoded bytes), for another
        connection: the peer acts on a message only once it has all of it."""
        if self._begun is not None:
            self._waiting[0] = self._begun
        unsent = [b"".join(buffers) for buffers in self._waiting]
        self._waiting, self._begun = deque(), None
        return unsent

    def resend(self, encoded: list[bytes]) -> None:
        """Queue messages taken from another stream's :meth:`unsent`, and write them."""
        self._waiting.extend([message] for message in encoded)
        self.flush()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def listen(path: str) -> socket.socket:
    """A non-blocking listening socket at ``path`` (a stale socket file is replaced)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(socket.SOMAXCONN)
    listener.setblocking(False)
    return listener


def accept(listener: socket.socket, layout: Layout[Frame]) -> FramedStream[Frame] | None:
    """The next waiting connection (in ``layout``), or None."""
    try:
        sock, _ = listener.accept()
    except BlockingIOError:
        return None
    return FramedStream(sock, layout)


def connect(path: str) -> FramedStream[Frame] | None:
    """A length-prefixed connection to the listener at ``path``, or None if nobody listens
    there yet."""
    sock = connect_socket(socket.AF_UNIX, path)
    return None if sock is None else FramedStream(sock, LengthPrefixed())


def connect_socket(family: int, address: str | tuple[str, int]) -> socket.socket | None:
    """A stream socket connected to ``address``, or None if nobody listens there yet."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError as error:
        sock.close()
        if error.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
            return None
        raise
    return sock
