"""The protocol between the dispatcher and the workers.

Each worker has one connection to the dispatcher's Unix stream socket in the
run directory, carrying :mod:`circus_wsgi.framing` messages: lists of frames,
the first frame one command byte. The dispatcher
never changes a mongrel2 message: requests go to a worker as mongrel2 sent them,
and a worker's frames are mongrel2 response messages the dispatcher forwards to
mongrel2 as they are. So each side parses only what it needs.

Worker -> dispatcher:

``READY pid free threads received conn_id...``
    I am here, process ``pid``, running ``threads`` requests at once, with
    ``free`` of them idle (its threads minus the requests it holds). Sent first
    on every connection (a worker connects again when the dispatcher restarts),
    and again whenever the worker has heard nothing from the dispatcher for
    :data:`SILENCE_LIMIT` seconds. Always replaces what the dispatcher believed.
    ``received`` is how many requests the worker has received before: it numbers
    each request it receives, one more than the last, and so does the
    dispatcher for those it hands out on this connection, starting from
    ``received`` the first time. The worker records the number of each request
    it begins (:mod:`circus_wsgi.board`), and begins them in that order. The
    ``conn_id`` values are the connections of the requests it holds now (those of a
    previous dispatcher, after a restart).
``OUTPUT done started statuses m2msg...``
    Forward these mongrel2 response messages, in order (the close message
    included where a connection must close). ``done`` is the space-separated
    ids of the connections whose response is complete: those requests are
    finished and their slots free; ``statuses`` their HTTP statuses, in the
    same order. ``started`` is the ids of those whose response has begun but
    not ended: their ``timeout`` no longer applies. Any may be empty. A worker
    sends one OUTPUT for all it has to say when it runs out of work or before it
    waits, so under load one message carries many responses.
``RETURN conn_id...``
    I have not started these requests: give them to other workers. A worker
    sends it for the requests it holds beyond its threads (the dispatcher's
    ``prefetch``) once it has been busy with one request for
    :data:`GIVE_BACK_AFTER`, so no request waits long behind a slow one.
``LEAVING``
    Take nothing new from me: I am stopping once what I hold is done.
``TAKE index...``
    (A remote worker, :mod:`circus_wsgi.remote`.) I would begin the requests
    with these numbers: answered by GO. A worker on this host needs no leave: its
    board says what it began (:mod:`circus_wsgi.board`).
``HEARTBEAT stamp``
    (A remote worker.) I am here; ``stamp`` is that of the dispatcher's last
    heartbeat, so the dispatcher knows the round trip. Sent every
    :data:`HEARTBEAT_INTERVAL` seconds.
``BYE``
    (A remote worker.) My last message: I have stopped, everything I held is
    answered. (A worker on this host says so by closing its connection.)

Dispatcher -> worker:

``REQUEST budgets m2msg...``
    Requests (or completed uploads) for the worker to serve, as many as the
    dispatcher hands it at one wake-up. ``budgets``: with flow control, the
    space-separated bytes each response may send before it waits for credits
    (:mod:`circus_wsgi.flowcontrol`); empty without flow control. A worker is
    given requests for its idle threads first, then up to ``prefetch`` more
    while every worker is busy, so it starts its next request without waiting
    for a round trip. It holds at most one request per connection: pipelined
    requests wait in the dispatcher until the one before them is done, which
    keeps their order.
``NOTICE m2msg``
    A disconnect or credits notice for a connection this worker holds.
``HEARTBEAT [stamp]``
    Sent every :data:`HEARTBEAT_INTERVAL` seconds to every known worker; to a
    remote one, with a stamp for it to send back.
``GO index...``
    Answer to TAKE: begin these; any other asked for has ended meanwhile (504,
    or its client went with a restarted mongrel2): drop it.
``BYE``
    Answer to LEAVING: nothing more will be sent to this worker.

The dispatcher learns that a worker died from the end of its connection
(every message it sent has been read by then), or from a pidfd on its ``pid``
if a child process it forked keeps the connection open.
"""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from .protocol import WINDOW

# worker -> dispatcher
READY = b"R"
OUTPUT = b"O"
LEAVING = b"L"
RETURN = b"T"
TAKE = b"K"
# BYE, both ways

# dispatcher -> worker
REQUEST = b"Q"
NOTICE = b"N"
HEARTBEAT = b"H"  # both ways
BYE = b"B"
GO = b"G"

#: Seconds between the dispatcher's heartbeats to each worker.
HEARTBEAT_INTERVAL = 0.25
#: Seconds a worker runs one request before it returns the requests it holds unstarted.
GIVE_BACK_AFTER = 0.02
#: Seconds of silence after which a worker announces itself again.
SILENCE_LIMIT = 1.0

_STATUS_TEXT = {code: b"%d" % code for code in range(100, 600)}


@mypyc_attr(allow_interpreted_subclasses=True)  # remote.RemoteLink
class WorkerMessages:
    """What a worker says to the dispatcher, over whatever link ``_send`` writes to:
    the responses :meth:`send` keeps go out as one OUTPUT (:meth:`output`)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.done: list[bytes] = []
        self.statuses: list[bytes] = []  # of the done ones, in order
        self.started: list[bytes] = []

    def _send(self, frames: tuple[bytes, ...]) -> None:
        raise NotImplementedError

    def ready(self, frames: tuple[bytes, ...]) -> None:
        self._send(frames)

    def leave(self) -> list[list[bytes]]:
        self._send((LEAVING,))
        return []

    def give_back(self, conn_ids: list[bytes]) -> None:
        if conn_ids:
            self._send((RETURN, *conn_ids))

    def send(self, conn_id: bytes, messages: list[bytes], done: bool, status: int) -> None:
        """Keep these mongrel2 messages of ``conn_id``'s response (``done``: its last)."""
        self.messages += messages
        if done:
            self.done.append(conn_id)
            self.statuses.append(_STATUS_TEXT.get(status) or b"%d" % status)
        else:
            self.started.append(conn_id)

    def output(self) -> bool:
        """Send what :meth:`send` kept as one OUTPUT; False if there was nothing."""
        if not (self.done or self.started):
            return False
        frames = (OUTPUT, b" ".join(self.done), b" ".join(self.started),
                  b" ".join(self.statuses), *self.messages)
        self.drop_output()
        self._send(frames)
        return True

    def drop_output(self) -> None:
        self.messages, self.done, self.statuses, self.started = [], [], [], []


#: With flow control, the bytes of a response a worker may send before it waits for
#: credits, less what its connection still has unwritten (the REQUEST's budgets).
BUDGET = 2 * 1024 * 1024
#: The window a worker assumes for a request that came without a budget (from a
#: dispatcher that keeps no windows) and does not announce one itself.
UNKNOWN = WINDOW // 2
