"""After a dispatcher was killed: close the clients whose requests died with it.

A dispatcher that is killed (``kill -9``, a crash) takes with it the requests it
had queued and those mongrel2 had already written into its socket; mongrel2
believes them delivered and would keep their clients waiting until its reaper
(``min_ping``). Requests the workers hold are not lost: their responses go out
through the next dispatcher. So when a dispatcher starts and finds the socket
file of one that did not stop cleanly, it asks mongrel2's control port for its
connections (``status what=net``) once every running worker (each has a board
in the run dir) has announced itself and said which requests it holds, or after
:data:`WAIT_FOR_WORKERS` at most; a moment later it closes (``kill id=N``)
each one that has read since it last wrote, or never wrote, unless the new
dispatcher has heard of a request on it since it started (from mongrel2, or
from a worker that holds one). mongrel2 keeps those times in whole seconds, so
a keep-alive connection answered within the second of its request looks the
same and is closed too: a server may close an idle keep-alive connection at
any time, and clients open a new one.

:func:`outstanding` is the choice, on the table mongrel2 returns; :class:`Control`
talks to the control port (a ZeroMQ REQ socket speaking tnetstrings).
"""

from __future__ import annotations

from typing import Any, Iterable

import tnetstring
import zmq

#: Seconds after the new dispatcher reached mongrel2 before it asks, at the soonest.
ASK_AFTER = 0.2
#: Seconds it waits at most for the running workers to announce themselves.
WAIT_FOR_WORKERS = 2.0
#: Seconds between asking and closing: requests mongrel2 read just before it answered
#: have reached the dispatcher by then.
CLOSE_AFTER = 0.2
#: How long the control port may take to answer, in seconds.
CONTROL_TIMEOUT = 1.0


def outstanding(table: dict[bytes, Any]) -> list[int]:
    """The ids of the connections in mongrel2's ``status what=net`` table that may wait
    for a response: read since their last write (in the same second counts), or read
    and never written. Times are seconds ago, 0 for never (or now)."""
    headers = [h.decode() for h in table.get(b"headers", [])]
    chosen = []
    for row in table.get(b"rows", []):
        entry = dict(zip(headers, row, strict=True))
        conn = entry.get("id", -1)
        if conn < 0 or entry.get("bytes_read", 0) <= 0:
            continue  # nothing read yet: no request to lose
        if entry.get("bytes_written", 0) == 0 or entry["last_read"] <= entry["last_write"]:
            chosen.append(conn)
    return chosen


class Control:
    """mongrel2's control port."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.socket = context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def ask(self, command: bytes, **arguments: Any) -> dict[bytes, Any]:
        """One command's answer; TimeoutError when mongrel2 does not answer in time."""
        self.socket.send(tnetstring.dumps([command, {k.encode(): v for k, v in
                                                     arguments.items()}]))
        if not self.socket.poll(CONTROL_TIMEOUT * 1000):
            raise TimeoutError("mongrel2's control port did not answer")
        return tnetstring.loads(self.socket.recv())

    def close_connections(self, conns: Iterable[int]) -> int:
        """Close each of ``conns``; how many mongrel2 closed (some may be gone)."""
        closed = 0
        for conn in conns:
            if self.ask(b"kill", id=conn).get(b"status") == b"OK":
                closed += 1
        return closed

    def close(self) -> None:
        self.socket.close()
