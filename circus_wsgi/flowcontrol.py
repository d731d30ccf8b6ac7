"""mongrel2's download flow control, kept by the dispatcher for every connection.

With ``download.flow_control``, mongrel2 closes a client (without telling the
handler) when a response message would take the bytes queued for it past its
window (:data:`protocol.WINDOW`, 100 KiB), and sends a credits notice for each
message once written. It announces the window in a connection's first request
only, so only the dispatcher, which forwards every response and sees every
notice, can count a connection's window across requests.

:class:`Windows` forwards what fits a connection's window and holds the rest
back, in order, until credits come. So a worker may send up to
:data:`BUDGET` bytes of a response at once and be done with it, instead of
waiting on credit round trips: a 1 MB body costs the worker no wait. Each
request is told its *budget*: :data:`BUDGET` less what its connection still
has unwritten (held back here or queued in mongrel2); a worker that streams
more waits for the credits notices, which reach it too. Held-back bytes are
bounded per connection by :data:`BUDGET` and in all by :data:`HELD_MAX`: past
that, a request's budget is only what mongrel2 itself can take. mongrel2 drops
a client it cannot write to without a notice, so a connection that has had
bytes held back and no credits for :data:`PROBE_AFTER` is asked about with a
``ctl`` keep-alive (:func:`protocol.keep_alive`), which mongrel2 answers with a
disconnect notice if it is gone.

A connection whose window was never announced here (its first request came
before this dispatcher was restarted, or it was forgotten, :data:`MAX_TRACKED`)
is taken to have all of it: a client that waits for a response has read the
ones before it. (Assuming less would hold a response back for credits that
never come: nothing of it is queued in mongrel2. If a pipelining client has not
read them yet, mongrel2 closes it: it is told, not left waiting.)
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from .dispatch_protocol import BUDGET
from .protocol import WINDOW, Buffer, addressed, close, keep_alive, sender_of

#: Bytes held back for all connections together before budgets shrink to the window.
HELD_MAX = 64 * 1024 * 1024
#: Seconds without credits after which a connection with bytes held back is probed.
PROBE_AFTER = 1.0
#: Connections tracked; past this, those tracked longest are forgotten (mongrel2 may
#: drop a connection without a notice, and it is never heard of again).
MAX_TRACKED = 65536


class Windows:
    """Each connection's window left and the messages held back for it."""

    def __init__(self, send: Callable[[Buffer], None]) -> None:
        self.send = send
        self.left: dict[bytes, int] = {}  # conn_id -> bytes mongrel2 will still take
        self.held: dict[bytes, deque[tuple[Buffer, int]]] = {}  # conn_id -> (message, size)
        self.held_bytes: dict[bytes, int] = {}
        self.held_total = 0
        self.quiet_since: dict[bytes, float] = {}  # conn_id -> last credits (or first hold)

    def opened(self, conn: bytes, window: int) -> None:
        """A connection's first request announced its window."""
        self.left[conn] = window

    def budget(self, conn: bytes) -> int:
        """Bytes a response on ``conn`` may send now."""
        spare = BUDGET - WINDOW if self.held_total < HELD_MAX else 0
        return max(0, self.left.get(conn, WINDOW) + spare - self.held_bytes.get(conn, 0))

    def forward(self, messages: list[Buffer]) -> None:
        """Send response messages in order, holding back those that would pass a window."""
        for message in messages:
            conns, size = addressed(message)
            if len(conns) != 1:  # not a worker's (each addresses one connection)
                self.send(message)
                continue
            conn = conns[0]
            if conn in self.held or 0 < size and size > self.left.get(conn, WINDOW) \
                    and size <= WINDOW:
                self._hold(conn, message, size)
            else:
                self._send(conn, message, size)

    def credited(self, conn: bytes, credits: int) -> None:
        """mongrel2 wrote ``credits`` bytes to the client: send what now fits."""
        if conn not in self.left:
            return
        self.left[conn] = min(WINDOW, self.left[conn] + credits)
        if conn in self.quiet_since:
            self.quiet_since[conn] = time.monotonic()
        queue = self.held.get(conn)
        while queue and queue[0][1] <= self.left.get(conn, 0):
            message, size = queue.popleft()
            self._release(conn, size)
            self._send(conn, message, size)
        if conn in self.held and not self.held[conn]:
            self._drop_held(conn)

    def forget(self, conn: bytes) -> None:
        """The connection is gone (or closed by a response): drop what is held for it."""
        self.left.pop(conn, None)
        if conn in self.held:
            self.held_total -= self.held_bytes[conn]
            self._drop_held(conn)

    def abandon(self) -> list[bytes]:
        """Drop everything held back; the close messages for those connections."""
        closes = [close(sender_of(queue[0][0]), conn) for conn, queue in self.held.items()]
        for conn in list(self.held):
            self.forget(conn)
        return closes

    def probe(self, now: float) -> None:
        """Ask mongrel2 about the connections held back without credits for a while."""
        for conn, since in list(self.quiet_since.items()):
            if now - since >= PROBE_AFTER:
                self.quiet_since[conn] = now
                sender = sender_of(self.held[conn][0][0])
                self.send(keep_alive(sender, conn))

    def prune(self) -> None:
        """Forget the oldest half of the connections once too many are tracked."""
        if len(self.left) > MAX_TRACKED:
            for conn in list(self.left)[:MAX_TRACKED // 2]:
                if conn not in self.held:
                    del self.left[conn]

    def _send(self, conn: bytes, message: Buffer, size: int) -> None:
        self.send(message)
        if size > 0:
            self.left[conn] = self.left.get(conn, WINDOW) - size
        elif size == 0:  # a close: the connection is done
            self.forget(conn)

    def _hold(self, conn: bytes, message: Buffer, size: int) -> None:
        if type(message) is memoryview:  # a view keeps all it was read with: copy it
            message = bytes(message)
        if conn not in self.held:
            self.held[conn] = deque()
            self.quiet_since[conn] = time.monotonic()
        self.held[conn].append((message, size))
        self.held_bytes[conn] = self.held_bytes.get(conn, 0) + max(size, 0)
        self.held_total += max(size, 0)

    def _release(self, conn: bytes, size: int) -> None:
        self.held_bytes[conn] -= max(size, 0)
        self.held_total -= max(size, 0)

    def _drop_held(self, conn: bytes) -> None:
        del self.held[conn]
        del self.held_bytes[conn]
        del self.quiet_since[conn]
