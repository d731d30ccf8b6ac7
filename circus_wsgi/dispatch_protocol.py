"""The protocol between the dispatcher (ZeroMQ ROUTER) and the workers (DEALER).

Every message is multipart; its first frame is one command byte. The dispatcher
never changes a mongrel2 message: requests go to a worker as mongrel2 sent them,
and a worker's frames are mongrel2 response messages the dispatcher forwards to
mongrel2 as they are. So each side parses only what it needs.

Worker -> dispatcher:

``READY pid free threads``
    I am here, process ``pid``, running ``threads`` requests at once, with
    ``free`` of them idle (its threads minus the requests it holds). Sent at start, and again whenever the worker
    has heard nothing from the dispatcher for :data:`SILENCE_LIMIT` seconds (the
    dispatcher was restarted and does not know it). Always replaces what the
    dispatcher believed.
``REPLY conn_id m2msg...``
    Part of the response to ``conn_id``: forward these mongrel2 messages. The
    response has started, so the request's ``timeout`` no longer applies.
``DONE conn_id m2msg...``
    The last part of the response (zero or more messages, the close message
    included when the connection must close). The slot is free again.
``RETURN conn_id``
    I have not started this request: give it to another worker. A worker sends
    it for the requests it holds beyond its threads (the dispatcher's
    ``prefetch``) once it has been busy with one request for
    :data:`GIVE_BACK_AFTER`, so no request waits long behind a slow one.
``LEAVING``
    Take nothing new from me: I am stopping once what I hold is done.

Dispatcher -> worker:

``REQUEST m2msg``
    A request (or a completed upload) for the worker to serve. A worker is
    given requests for its idle threads first, then up to ``prefetch`` more
    while every worker is busy, so it starts its next request without waiting
    for a round trip. It holds at most one request per connection: pipelined
    requests wait in the dispatcher until the one before them is DONE, which
    keeps their order.
``NOTICE m2msg``
    A disconnect or credits notice for a connection this worker holds.
``HEARTBEAT``
    Sent every :data:`HEARTBEAT_INTERVAL` seconds to every known worker.
``BYE``
    Answer to LEAVING: nothing more will be sent to this worker.

The dispatcher learns that a local worker died from a pidfd on its ``pid``
(readable the moment the process exits), not from missed heartbeats.
"""

from __future__ import annotations

# worker -> dispatcher
READY = b"R"
REPLY = b"P"
DONE = b"D"
LEAVING = b"L"
RETURN = b"T"

# dispatcher -> worker
REQUEST = b"Q"
NOTICE = b"N"
HEARTBEAT = b"H"
BYE = b"B"

#: Seconds between the dispatcher's heartbeats to each worker.
HEARTBEAT_INTERVAL = 0.25
#: Seconds a worker runs one request before it returns the requests it holds unstarted.
GIVE_BACK_AFTER = 0.02
#: Seconds of silence after which a worker announces itself again.
SILENCE_LIMIT = 1.0
