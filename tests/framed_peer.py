"""Blocking ends of :mod:`circus_wsgi.framing` connections for the tests: a scripted
worker connected to the real dispatcher, or a fake dispatcher a real worker connects to."""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque
from typing import Sequence

from circus_wsgi import framing


class FramedPeer:
    """One connection, with blocking sends and waits."""

    def __init__(self, stream: framing.FramedStream) -> None:
        self.stream = stream
        self.inbox: deque[list[bytes]] = deque()

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> "FramedPeer":
        deadline = time.monotonic() + timeout
        while (stream := framing.connect(path)) is None:
            assert time.monotonic() < deadline, f"nobody listens at {path}"
            time.sleep(0.02)
        return cls(stream)

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        self.stream.send(frames)
        self.stream.drain(timeout=5.0)
        assert not self.stream.backlogged, "the peer does not read"

    def poll(self, timeout_ms: float) -> bool:
        """True once a message is there to take, False after ``timeout_ms`` or at the end
        of the stream."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.inbox and not self.stream.closed:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stream.sock], [], [], left)[0]:
                return False
            self.inbox += self.stream.receive()
        return bool(self.inbox)

    def recv_multipart(self, timeout_ms: float = 10_000) -> list[bytes]:
        assert self.poll(timeout_ms), "no message came"
        return self.inbox.popleft()

    def close(self) -> None:
        self.stream.close()


class FramedListener:
    """Listens where the workers look for the dispatcher; hands out their connections."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = framing.listen(path)

    def accept(self, timeout: float) -> FramedPeer | None:
        if not select.select([self.listener], [], [], max(0.0, timeout))[0]:
            return None
        stream = framing.accept(self.listener, framing.LengthPrefixed())
        return None if stream is None else FramedPeer(stream)

    def close(self) -> None:
        self.listener.close()
        os.unlink(self.path)


def receive_in_pieces(wire: bytes, cuts: Sequence[int],
                      layout: framing.Layout | None = None) -> list[list[bytes]]:
    """The messages a stream reads from ``wire`` when the bytes arrive in pieces of the
    sizes in ``cuts`` (in turn), each piece read before the next is written."""
    left, right = socket.socketpair()
    stream = framing.FramedStream(right, layout or framing.LengthPrefixed())
    try:
        got, at, turn = [], 0, 0
        while at < len(wire):
            size = cuts[turn % len(cuts)]
            left.sendall(wire[at:at + size])
            at, turn = at + size, turn + 1
            got += stream.receive()
        while select.select([right], [], [], 0)[0]:  # read on while there is more to read
            got += stream.receive()
        return got
    finally:
        left.close()
        stream.close()
