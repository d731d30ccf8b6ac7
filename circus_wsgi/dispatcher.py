"""The dispatcher: the one reader of mongrel2's requests and writer of its responses.

It hands a request only to a worker that announced a free slot (least
recently freed slot first), keeps waiting requests in arrival order, routes
disconnect and credits notices to the worker holding the connection, and
answers for the application when it cannot: 400 for a smuggling attempt, 413
for a body over max_body_size, 502 when the worker holding a request died, 503
when no worker takes a request within queue_timeout or the queue is full, 504
(and the worker is killed) when a response has not started within timeout.

Protocol with the workers: :mod:`circus_wsgi.dispatch_protocol`, one
:mod:`circus_wsgi.framing` connection per worker. Counters for
``circus-wsgi status``: :mod:`circus_wsgi.dispatch_state` over a REP socket.
With flow control, responses go out through :mod:`circus_wsgi.flowcontrol`.
mongrel2's two handler sockets are spoken to in ZMTP by :mod:`circus_wsgi.zmtp`,
without libzmq's I/O thread; the dispatcher connects to them again if mongrel2
restarts. Work is done per wake-up: requests are queued as they are read (all
that one read from mongrel2's socket brings), handed out once the sockets are
read, and each worker's share sent in one message; the messages for mongrel2 go
out together too, as the parts of one ZeroMQ message (mongrel2 reads each part
as a message of its own).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import select
import signal
import time
from collections import deque
from pathlib import Path
from typing import Callable

import zmq

from . import dispatch_protocol as dp
from . import framing, zmtp
from .dispatch_state import Counters, InFlight, Pending, WorkerState
from .exits import EXIT_OK, STUCK_SIGNAL
from .flowcontrol import Windows
from .httpmsg import error_response
from .lifeline import die_with_parent
from .memory import tune_malloc
from .protocol import (UPLOAD_START, Buffer, Kind, Message, ProtocolError, close, granted,
                       is_smuggling_risk, parse, plain_request, response)
from .rundir import RunDir
from .settings import Settings

log = logging.getLogger("circus_wsgi.dispatcher")

#: A worker holding requests that has finished none for this long (seconds) is busy
#: with a slow one: it gets no prefetched request until it finishes something.
STALLED_WORKER = 0.005
#: How a credits notice ends: mongrel2 sends one after each response it writes.
CREDITS_BODY = b'18:{"type":"credits"},'
#: How a disconnect notice ends: one per connection closed, with Connection: close.
DISCONNECT_BODY = b'21:{"type":"disconnect"},'
#: How often queue and request deadlines are checked, in seconds.
TICK = 0.1
#: Workers' frames this large (response messages) are forwarded as views of the bytes
#: read, not copied out of them (:class:`framing.LengthPrefixed`).
WORKER_LAYOUT = framing.LengthPrefixed(view_from=16 * 1024)
#: After a worker's process exits, how long its last frames (already sent, maybe not
#: yet read) may take to arrive before what it still holds is answered with 502.
EXIT_GRACE = 0.1


class Dispatcher:
    """The broker loop between mongrel2 and the workers. One per stack."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        run = RunDir(Path(settings.run_dir))
        self.context = zmq.Context.instance()
        # mongrel2's PUSH (requests and notices) and SUB (responses), in ZMTP; None
        # until connected. (mongrel2's SUB keeps what matches its subscription, the
        # sender UUID every response begins with, so responses may go at once.)
        self.send_spec = settings.send_spec or run.mongrel2_send
        self.recv_spec = settings.recv_spec or run.mongrel2_recv
        self.requests: framing.FramedStream | None = None
        self.responses: framing.FramedStream | None = None
        self.listener = framing.listen(run.dispatcher)
        self.links: dict[bytes, framing.FramedStream] = {}  # worker identity -> connection
        self.link_identities: dict[int, bytes] = {}  # connection's fd -> worker identity
        self.link_numbers = itertools.count(1)
        self.status_socket = self._status_socket(run.dispatcher_status)
        self.workers: dict[bytes, WorkerState] = {}
        self.slots: deque[bytes] = deque()  # one entry per free worker slot, oldest first
        self.queue: deque[Pending] = deque()
        self.behind: dict[bytes, deque[Pending]] = {}  # pipelined, behind an in-flight request
        self.in_flight: dict[bytes, InFlight] = {}
        self.batches: dict[bytes, list[Pending]] = {}  # handed over, sent at the loop's turn
        # With flow control, every response goes through the connections' windows.
        self.windows = Windows(self._to_mongrel2) if settings.flow_control else None
        self.outgoing: list[Buffer] = []  # for mongrel2, sent at the loop's turn
        self.prefetch, self.max_queue = settings.prefetch, settings.max_queue
        self.uploads: dict[bytes, bytes] = {}  # conn_id -> temp file still being uploaded
        self.refused: dict[bytes, float] = {}  # conn_id -> until when its requests are dropped
        self.counters = Counters()
        # Every socket is polled by its file descriptor, the status socket's too (its
        # ZMQ_FD): a zmq_poll costs several system calls per ZeroMQ socket per call.
        # That descriptor turns readable when the socket's state may have changed; its
        # handler takes what is there, which resets it.
        self.poller = select.poll()
        self.requests_fd = self.responses_fd = -1
        self.status_fd = self.status_socket.getsockopt(zmq.FD)
        self.poller.register(self.status_fd, select.POLLIN)
        self.accepting = False  # taking workers' connections (once mongrel2 was reached)
        self.pidfds: dict[int, bytes] = {}  # pidfd -> worker identity
        # Closed at the end of the loop's turn, so that no new file takes the number of
        # one whose event is still to be handled in this turn.
        self.retired: list[Callable[[], None]] = []
        self.upload_dir = os.fsencode(run.uploads)
        self.stopping = False

    def _status_socket(self, endpoint: str) -> zmq.Socket:
        """The REP socket ``circus-wsgi status`` asks (a stale socket file is replaced)."""
        sock = self.context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 1000)
        path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else ""
        if path and os.path.exists(path):
            os.unlink(path)  # left by a dispatcher that was killed
        sock.bind(endpoint)
        return sock

    # ----------------------------------------------------------------- loop

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then hand back what is held and exit 0."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        self.poller.register(wake_r, select.POLLIN)
        log.info("dispatcher %d ready: %s", os.getpid(), self.settings.run_dir)
        next_tick = next_beat = time.monotonic()
        deadline = None
        self._connect_mongrel2()
        while True:
            now = time.monotonic()
            if self.stopping:
                deadline = deadline or self._begin_stop(now)
                if (not self.in_flight and not self.queue) or now >= deadline:
                    break
            wait = max(0.0, min(next_tick, next_beat) - now)
            for fd, event in self.poller.poll(wait * 1000):
                if fd == self.requests_fd:
                    self._on_requests()
                elif fd in self.link_identities:
                    self._on_link(self.link_identities[fd], event)
                elif fd == self.responses_fd:
                    self._on_responses(event)
                elif fd == self.listener.fileno():
                    self._accept_workers()
                elif fd == self.status_fd:
                    self._answer_status()
                elif fd == wake_r:
                    os.read(wake_r, 512)
                elif fd in self.pidfds:
                    self._on_worker_exit(fd)
            self._close_retired()
            now = time.monotonic()
            self._dispatch(now)
            self._send_batches()
            self._send_outgoing()
            if now >= next_tick:
                self._expire(now)
                if self.responses is None and not self.stopping:
                    self._connect_mongrel2()
                next_tick = now + TICK
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + dp.HEARTBEAT_INTERVAL
        self._finish()
        os.close(wake_r)
        os.close(wake_w)
        return EXIT_OK

    def _to_mongrel2(self, message: Buffer) -> None:
        """Queue a message for mongrel2; every message goes out in this order."""
        self.outgoing.append(message)

    def _send_outgoing(self) -> None:
        """Send the messages of this turn to mongrel2 as the parts of one message: one
        system call. (While mongrel2 is not connected they are dropped: the clients
        they were for went with it.)"""
        if self.outgoing:
            outgoing, self.outgoing = self.outgoing, []
            if self.responses is not None:
                try:
                    self._send_on(self.responses, outgoing)
                except ConnectionError:
                    self._mongrel2_gone()

    def _send_on(self, stream: framing.FramedStream, frames: list[bytes] | tuple) -> None:
        """Send one message; while some of it waits, poll the stream for writing too."""
        backlogged = stream.backlogged
        stream.send(frames)
        if stream.backlogged and not backlogged:
            self.poller.modify(stream.fileno(), select.POLLIN | select.POLLOUT)

    def _flush_on(self, stream: framing.FramedStream) -> None:
        """The stream is writable: write what waits; poll it for reading only once done."""
        stream.flush()
        if not stream.backlogged:
            self.poller.modify(stream.fileno(), select.POLLIN)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stopping and signum != signal.SIGTERM:
            raise SystemExit(EXIT_OK)  # a second Ctrl-C: stop at once
        self.stopping = True

    def _connect_mongrel2(self) -> None:
        """Connect to mongrel2's handler sockets, at start and after mongrel2 restarted;
        requests are read once both connections are made."""
        if self.requests is None:
            self.requests = _connect(self.send_spec, "PULL")
        if self.requests is None or self.responses is not None:
            return
        self.responses = _connect(self.recv_spec, "PUB")
        if self.responses is None:
            return
        self.requests_fd, self.responses_fd = self.requests.fileno(), self.responses.fileno()
        self.poller.register(self.requests_fd, select.POLLIN)
        self.poller.register(self.responses_fd, select.POLLIN)
        if not self.accepting:
            self.accepting = True
            self.poller.register(self.listener.fileno(), select.POLLIN)
        log.info("mongrel2 connected")

    def _mongrel2_gone(self) -> None:
        """A connection to mongrel2 ended (it stopped or restarted): drop both, and
        connect again at the next tick."""
        log.warning("mongrel2's sockets closed: connecting again")
        for stream in (self.requests, self.responses):
            if stream is not None:
                if stream.fileno() in (self.requests_fd, self.responses_fd):
                    self.poller.unregister(stream.fileno())
                self.retired.append(stream.close)
        self.requests = self.responses = None
        self.requests_fd = self.responses_fd = -1

    def _on_requests(self) -> None:
        """mongrel2's messages: all that one read brings (one frame each)."""
        stream = self.requests
        try:
            messages = stream.receive()
        except ValueError as error:
            log.error("malformed stream from mongrel2 (%s)", error)
            messages = []
        for frames in messages:
            self._on_mongrel2(frames[0])
        if stream.closed and stream is self.requests:
            self._mongrel2_gone()

    def _on_responses(self, event: int) -> None:
        """The connection to mongrel2's SUB: writable again, or closed (what it sends,
        its subscription, needs nothing from us)."""
        stream = self.responses
        try:
            if event & select.POLLOUT:
                self._flush_on(stream)
            if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                stream.receive()
        except (ValueError, ConnectionError) as error:
            log.error("connection to mongrel2's SUB failed (%s)", error)
        if stream.closed:
            self._mongrel2_gone()

    def _accept_workers(self) -> None:
        while True:
            link = framing.accept(self.listener, WORKER_LAYOUT)
            if link is None:
                return
            identity = b"%d" % next(self.link_numbers)
            self.links[identity] = link
            self.link_identities[link.fileno()] = identity
            self.poller.register(link.fileno(), select.POLLIN)

    def _on_link(self, identity: bytes, event: int) -> None:
        """A worker's connection is readable, writable again, or closed."""
        link = self.links[identity]
        try:
            if event & select.POLLOUT:
                self._flush_on(link)
            if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                for frames in link.receive():
                    if identity not in self.links:
                        break  # dropped while handling the last message: the rest is moot
                    self._on_worker(identity, frames)
        except ValueError as error:  # not framed messages: that peer is not a worker
            self.counters.malformed += 1
            log.warning("malformed stream from a worker (%s): disconnecting it", error)
        except ConnectionError:
            pass  # closed: the link says so
        if link.closed and identity in self.links:
            self._drop_link(identity)

    def _drop_link(self, identity: bytes) -> None:
        """The worker's connection is gone, so is the worker (every frame it sent has
        been read): what it held is answered now."""
        link = self.links.pop(identity)
        del self.link_identities[link.fileno()]
        self.poller.unregister(link.fileno())
        self.retired.append(link.close)
        if identity in self.workers:
            self._worker_gone(identity, "worker exited")

    # ---------------------------------------------------- from mongrel2

    def _on_mongrel2(self, raw: bytes) -> None:
        if raw.endswith((CREDITS_BODY, DISCONNECT_BODY)):  # route them unparsed
            _, conn, path, _ = raw.split(b" ", 3)
            if path == b"@*":  # mongrel2's own: no route of a client's request matches @*
                if raw.endswith(CREDITS_BODY):
                    self._on_credits(conn, granted(raw), raw)
                else:
                    self._on_disconnect(conn, raw)
                return
        plain = plain_request(raw)
        if plain is not None:  # most requests: nothing to check
            sender, conn, window = plain
            if conn not in self.refused:
                if window and self.windows is not None:  # the connection's first request
                    self.windows.opened(conn, window)
                self._enqueue(Pending(conn, sender, raw, time.monotonic()))
            return
        try:
            message = parse(raw)
        except ProtocolError as error:
            self.counters.malformed += 1
            log.warning("malformed message from mongrel2 (%s): %r", error, raw[:120])
            return
        kind = message.kind
        if kind is Kind.REQUEST:
            self._on_request(message, raw, None)
        elif kind is Kind.UPLOAD_DONE:
            self._on_upload_done(message, raw)
        elif kind is Kind.DISCONNECT:
            self._on_disconnect(message.conn_id, raw)
        elif kind is Kind.UPLOAD_START:
            self._on_upload_start(message)
        else:  # a credits notice in another layout than mongrel2 1.12's
            self._on_credits(message.conn_id, message.credits, raw)

    def _on_credits(self, conn: bytes, credits: int, raw: bytes) -> None:
        if self.windows is not None:
            self.windows.credited(conn, credits)
        self._notify_holder(conn, raw)

    def _on_upload_start(self, message: Message) -> None:
        """The body is arriving in a temp file; the request waits for upload-done.

        Clients can send the upload headers themselves, and mongrel2 passes them
        through on requests whose body arrives inline: only a body too large to be
        inline (or chunked) is really being uploaded, into the upload directory.
        """
        path = message.headers.get(UPLOAD_START)
        if not self._spooled(message) or not self._in_uploads(path):
            self._reject(message, 400, "forged upload header")
        elif self._refuse(message):  # an empty reply makes mongrel2 abort the upload
            self._remove_file(path)
        else:
            self.uploads[message.conn_id] = path

    def _on_upload_done(self, message: Message, raw: bytes) -> None:
        expected = self.uploads.pop(message.conn_id, None)
        if message.conn_id in self.refused:
            return
        if expected is None or message.upload_path != expected:
            self._remove_file(expected)
            self._reject(message, 400, "forged upload header")
        else:
            self._on_request(message, raw, expected)

    def _spooled(self, message: Message) -> bool:
        """True when mongrel2 puts this request's body in a temp file, not inline."""
        length = message.headers.get(b"content-length")
        return b"transfer-encoding" in message.headers or (
            isinstance(length, bytes) and length.isdigit()
            and int(length) > self.settings.content_length)

    def _in_uploads(self, path: object) -> bool:
        return isinstance(path, bytes) and os.path.dirname(os.path.normpath(path)) == \
            self.upload_dir

    def _on_request(self, message: Message, raw: bytes, upload: bytes | None) -> None:
        """Queue a request (``upload``: its body's temp file, checked to be genuine)."""
        conn = message.conn_id
        if conn in self.refused or self._refuse(message):
            self._remove_file(upload)
            return
        if self.windows is not None and message.credits:  # the connection's first request
            self.windows.opened(conn, message.credits)
        self._enqueue(Pending(conn, message.sender, raw, time.monotonic(), upload))

    def _enqueue(self, pending: Pending) -> None:
        conn = pending.conn_id
        if conn in self.in_flight or conn in self.behind:
            self.behind.setdefault(conn, deque()).append(pending)  # keep pipelined order
            return
        if len(self.queue) >= self.max_queue:
            self._dispatch(pending.arrived)  # those arrived at this wake-up may have slots
            if len(self.queue) >= self.max_queue:
                self._answer(pending, 503, "queue full", retry_after=True)
                return
        self.queue.append(pending)

    def _refuse(self, message: Message) -> bool:
        """Answer 400 or 413 for a request that must not reach the app; True if refused."""
        if is_smuggling_risk(message):
            status, reason = 400, "Content-Length with Transfer-Encoding"
        elif self._too_large(message):
            status, reason = 413, "body over max_body_size"
        else:
            return False
        self._reject(message, status, reason)
        return True

    def _reject(self, message: Message, status: int, reason: str) -> None:
        """Answer with an error, close the connection and drop what follows on it."""
        self.refused[message.conn_id] = time.monotonic() + 2.0
        self._send_error(message.sender, message.conn_id, status, reason)

    def _too_large(self, message: Message) -> bool:
        limit = self.settings.max_body_size
        length = message.headers.get(b"content-length")
        return bool(limit) and isinstance(length, bytes) and length.isdigit() \
            and int(length) > limit

    def _on_disconnect(self, conn: bytes, raw: bytes) -> None:
        self._remove_file(self.uploads.pop(conn, None))
        self.refused.pop(conn, None)
        self._forget_window(conn)
        for pending in self.behind.pop(conn, ()):
            pending.cancelled = True
        for pending in self.queue:
            if pending.conn_id == conn:
                pending.cancelled = True
        self._notify_holder(conn, raw)

    def _notify_holder(self, conn: bytes, raw: bytes) -> None:
        flight = self.in_flight.get(conn)
        if flight is not None:
            self._send_worker(flight.worker, (dp.NOTICE, raw))

    # ------------------------------------------------------ dispatching

    def _dispatch(self, now: float) -> None:
        """Hand queued requests to idle threads, oldest request to least recently freed
        slot; while every thread is busy, prefetch to the worker holding the fewest."""
        queue, slots, workers = self.queue, self.slots, self.workers
        while queue:
            pending = queue.popleft()
            if pending.cancelled:
                continue
            if pending.conn_id in self.in_flight:  # pipelined behind one handed over just now
                self.behind.setdefault(pending.conn_id, deque()).append(pending)
                continue
            while slots:
                identity = slots.popleft()
                worker = workers.get(identity)
                if worker is not None and worker.takes_work:
                    worker.free -= 1
                    break
            else:
                identity = self._prefetch_target(now)
                if identity is None:
                    queue.appendleft(pending)
                    return
                worker = workers[identity]
            worker.dispatched += 1
            if not worker.held:
                worker.progress = now  # busy from now
            worker.held.add(pending.conn_id)
            self.in_flight[pending.conn_id] = InFlight(identity, pending, now)
            self.batches.setdefault(identity, []).append(pending)

    def _prefetch_target(self, now: float) -> bytes | None:
        """The worker with room beyond its threads that holds the fewest requests,
        leaving out those that have finished nothing for :data:`STALLED_WORKER`."""
        best, fewest = None, None
        stalled = now - STALLED_WORKER
        for identity, worker in self.workers.items():
            held = len(worker.held)
            if worker.returned or worker.retired or \
                    held >= worker.threads + self.prefetch or \
                    worker.progress < stalled:
                continue
            if fewest is None or held < fewest:
                best, fewest = identity, held
        return best

    def _send_batches(self) -> None:
        """Send each worker the requests handed to it at this turn, in one message."""
        batches, self.batches = self.batches, {}
        for identity, batch in batches.items():
            budgets = b"" if self.windows is None else \
                b" ".join([b"%d" % self.windows.budget(p.conn_id) for p in batch])
            self._send_worker(identity, (dp.REQUEST, budgets, *[p.raw for p in batch]), batch)

    def _take_back(self, identity: bytes, batch: list[Pending]) -> None:
        """Requests that never reached their worker go back to the head of the queue."""
        worker = self.workers.get(identity)
        for pending in reversed(batch):
            self.in_flight.pop(pending.conn_id, None)
            if worker is not None:
                worker.held.discard(pending.conn_id)
            self.queue.appendleft(pending)

    def _send_worker(self, identity: bytes, frames: tuple[bytes, ...],
                     batch: list[Pending] | None = None) -> None:
        """Send to one worker; if it is gone, ``batch`` (the requests being sent) goes
        back to the queue and what it held gets 502."""
        link = self.links.get(identity)
        try:
            if link is None:
                raise ConnectionError("not connected")
            self._send_on(link, frames)
        except ConnectionError as error:
            if batch:
                self._take_back(identity, batch)
            if identity in self.workers:
                log.warning("worker %s unreachable (%s)", self.workers[identity].pid, error)
                self._worker_gone(identity, "worker unreachable")
            if link is not None:
                self._drop_link(identity)

    # ------------------------------------------------------ from workers

    def _on_worker(self, identity: bytes, frames: list[framing.Frame]) -> None:
        """One worker message; a malformed one is logged and counted, never fatal. (A
        large frame is a memoryview: where bytes are expected, it is malformed too.)"""
        try:
            self._on_worker_command(identity, frames[0], frames)
        except (IndexError, ValueError, TypeError, AttributeError) as error:
            self.counters.malformed += 1
            log.warning("malformed message from a worker (%s): %r", error,
                        [bytes(f[:40]) for f in frames[:4]])

    def _on_worker_command(self, identity: bytes, command: framing.Frame,
                           frames: list[framing.Frame]) -> None:
        if command == dp.OUTPUT:
            self._on_output(identity, frames[1].split(), frames[2].split(), frames[3:])
        elif command == dp.READY:
            self._on_ready(identity, int(frames[1]), int(frames[2]), int(frames[3]))
        elif command == dp.RETURN:
            self._on_return(identity, frames[1:])
        elif command == dp.LEAVING:
            worker = self.workers.get(identity)
            if worker is not None:
                worker.leaving = True
                log.info("worker %d leaving with %d requests", worker.pid, len(worker.held))
            self._send_worker(identity, (dp.BYE,))
        else:
            self.counters.malformed += 1
            log.warning("unknown command %r from a worker", command)

    def _on_output(self, identity: bytes, done: list[bytes], started: list[bytes],
                   messages: list[Buffer]) -> None:
        if self.windows is not None:
            self.windows.forward(messages)
        else:
            self.outgoing += messages
        for conn in started:
            flight = self.in_flight.get(conn)
            if flight is not None:
                flight.started = True
        worker = self.workers.get(identity)
        if worker is None:
            return
        if done:
            worker.progress = time.monotonic()
        for conn in done:
            self._on_done(identity, worker, conn)

    def _forget_window(self, conn: bytes) -> None:
        if self.windows is not None:
            self.windows.forget(conn)

    def _on_ready(self, identity: bytes, pid: int, free: int, threads: int) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            worker = WorkerState(pid=pid, pidfd=self._watch(pid, identity))
            self.workers[identity] = worker
            log.info("worker %d ready with %d of %d threads idle", pid, free, threads)
        worker.leaving = False
        worker.threads = threads
        worker.free = free
        worker.progress = time.monotonic()
        self._rebuild_slots()

    def _watch(self, pid: int, identity: bytes) -> int | None:
        """A pidfd that becomes readable when the worker exits (None if not visible here)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        self.pidfds[pidfd] = identity
        self.poller.register(pidfd, select.POLLIN)
        return pidfd

    def _on_done(self, identity: bytes, worker: WorkerState, conn: bytes) -> None:
        flight = self.in_flight.get(conn)
        if flight is not None and flight.worker == identity:
            del self.in_flight[conn]
            self.counters.completed += 1
            worker.held.discard(conn)
            worker.completed += 1
            self._release_behind(conn)
        worker.returned = False
        if not worker.retired and worker.free < worker.threads - len(worker.held):
            worker.free += 1
            self.slots.append(identity)

    def _on_return(self, identity: bytes, conns: list[bytes]) -> None:
        """Requests the worker held unstarted go back to the head of the queue, in order."""
        worker = self.workers.get(identity)
        if worker is None:
            return
        for conn in reversed(conns):
            flight = self.in_flight.get(conn)
            if flight is None or flight.worker != identity:
                continue
            del self.in_flight[conn]
            worker.held.discard(conn)
            worker.returned = True
            self.queue.appendleft(flight.pending)

    def _release_behind(self, conn: bytes) -> None:
        """The next pipelined request of a connection goes to the head of the queue."""
        waiting = self.behind.get(conn)
        while waiting:
            pending = waiting.popleft()
            if not pending.cancelled:
                self.queue.appendleft(pending)
                break
        if not waiting:
            self.behind.pop(conn, None)

    # ------------------------------------------------- failures and time

    def _on_worker_exit(self, pidfd: int) -> None:
        """The process exited: give it nothing more; :meth:`_expire` settles it."""
        identity = self.pidfds.pop(pidfd)
        self._retire_pidfd(pidfd)
        worker = self.workers.get(identity)
        if worker is not None:
            worker.pidfd = None
            worker.exited = time.monotonic()

    def _retire_pidfd(self, pidfd: int) -> None:
        self.poller.unregister(pidfd)
        self.retired.append(functools.partial(os.close, pidfd))

    def _close_retired(self) -> None:
        retired, self.retired = self.retired, []
        for release in retired:
            release()

    def _worker_gone(self, identity: bytes, reason: str) -> None:
        """Answer 502 for every request the worker held; forget it."""
        worker = self.workers.pop(identity)
        if worker.pidfd is not None:
            del self.pidfds[worker.pidfd]
            self._retire_pidfd(worker.pidfd)
        held = len(worker.held)
        for conn in worker.held:
            flight = self.in_flight.pop(conn, None)
            if flight is None:
                continue
            worker.failed += 1
            if flight.started:  # headers went out: all we can do is close
                self._to_mongrel2(close(flight.pending.sender, conn))
                self._forget_window(conn)
                self.counters.count_failure("closed: " + reason)
            else:
                self._answer(flight.pending, 502, reason)
            for pending in self.behind.pop(conn, ()):
                pending.cancelled = True
        if held or reason != "worker exited":
            log.warning("%s: worker %d, %d requests answered", reason, worker.pid, held)
        self._rebuild_slots()

    def _rebuild_slots(self) -> None:
        """One slot entry per free slot of each worker that takes work, keeping LRU order."""
        seen: dict[bytes, int] = {}
        kept: deque[bytes] = deque()
        for identity in self.slots:
            worker = self.workers.get(identity)
            if worker is not None and worker.takes_work and seen.get(identity, 0) < worker.free:
                seen[identity] = seen.get(identity, 0) + 1
                kept.append(identity)
        for identity, worker in self.workers.items():
            if worker.takes_work:
                kept.extend([identity] * (worker.free - seen.get(identity, 0)))
        self.slots = kept

    def _expire(self, now: float) -> None:
        queue_limit = now - self.settings.queue_timeout
        while self.queue and (self.queue[0].cancelled or self.queue[0].arrived < queue_limit):
            pending = self.queue.popleft()
            if not pending.cancelled:
                self._answer(pending, 503, "no worker took it in queue_timeout",
                             retry_after=True)
        exit_limit = now - EXIT_GRACE
        for identity in [i for i, w in self.workers.items() if w.exited and w.exited < exit_limit]:
            self._worker_gone(identity, "worker exited")
        stuck_limit = now - self.settings.timeout
        for conn, flight in list(self.in_flight.items()):
            if not flight.started and flight.dispatched < stuck_limit:
                self._on_stuck(conn, flight)
        for conn in [c for c, until in self.refused.items() if until < now]:
            del self.refused[conn]
        if self.windows is not None:
            self.windows.probe(now)
            self.windows.prune()

    def _on_stuck(self, conn: bytes, flight: InFlight) -> None:
        worker = self.workers.get(flight.worker)
        del self.in_flight[conn]
        self._answer(flight.pending, 504, "response not started within timeout")
        if worker is None:
            return
        worker.held.discard(conn)
        worker.failed += 1
        if not worker.doomed:
            worker.doomed = True
            log.error("worker %d stuck for %.0fs on a request: killing it", worker.pid,
                      self.settings.timeout)
            try:
                os.kill(worker.pid, STUCK_SIGNAL)
            except ProcessLookupError:
                pass
            self._rebuild_slots()

    def _heartbeat(self) -> None:
        for identity in list(self.workers):
            self._send_worker(identity, (dp.HEARTBEAT,))

    # ------------------------------------------------------ answering

    def _answer(self, pending: Pending, status: int, reason: str, *,
                retry_after: bool = False) -> None:
        self._remove_file(pending.upload_path)
        self._send_error(pending.sender, pending.conn_id, status, reason, retry_after)
        for later in self.behind.pop(pending.conn_id, ()):
            later.cancelled = True

    def _send_error(self, sender: bytes, conn: bytes, status: int, reason: str,
                    retry_after: bool = False) -> None:
        headers = ((b"Retry-After", b"1"),) if retry_after else ()
        self._to_mongrel2(response(sender, conn, error_response(status, headers=headers)))
        self._to_mongrel2(close(sender, conn))
        self._forget_window(conn)
        self.counters.count_failure(f"{status} {reason}")
        log.warning("%d for connection %s: %s", status, conn.decode(), reason)

    @staticmethod
    def _remove_file(path: bytes | None) -> None:
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _answer_status(self) -> None:
        while _readable(self.status_socket):  # one may have come in while answering
            self.status_socket.recv()
            self.status_socket.send_json(self.counters.snapshot(self.queue, self.workers,
                                                                self.in_flight))

    # ------------------------------------------------------ stopping

    def _begin_stop(self, now: float) -> float:
        """Take no more requests from mongrel2 (it keeps new ones for the next dispatcher);
        serve those already taken until the deadline."""
        log.info("dispatcher stopping: %d queued, %d in flight", len(self.queue),
                 len(self.in_flight))
        requests, self.requests = self.requests, None
        if requests is not None:
            if self.requests_fd >= 0:  # registered (once both connections were made)
                self.poller.unregister(self.requests_fd)
                self.requests_fd = -1
            while messages := requests.receive():  # closing drops what is unread
                for frames in messages:
                    self._on_mongrel2(frames[0])
            requests.close()
        return now + min(self.settings.graceful_timeout, 10.0)

    def _finish(self) -> None:
        """Answer what could not be served before the deadline; close the sockets."""
        while self.queue:
            pending = self.queue.popleft()
            if not pending.cancelled:
                self._answer(pending, 503, "dispatcher stopping", retry_after=True)
        for conn, flight in self.in_flight.items():
            self._to_mongrel2(close(flight.pending.sender, conn))
        if self.windows is not None:  # no credits come once stopping: cut, do not hang
            for message in self.windows.abandon():
                self._to_mongrel2(message)
        self._send_outgoing()
        self._close_retired()
        for pidfd in self.pidfds:
            os.close(pidfd)
        deadline = time.monotonic() + 1.0  # for the last messages to the workers
        for link in self.links.values():
            link.drain(timeout=deadline - time.monotonic())
            link.close()
        self._remove_file(os.fsencode(self.listener.getsockname()))
        self.listener.close()
        if self.responses is not None:
            self.responses.drain(timeout=1.0)
            self.responses.close()
        self.status_socket.close(linger=1000)
        log.info("dispatcher %d stopped", os.getpid())


def _connect(endpoint: str, socket_type: str) -> framing.FramedStream | None:
    """A ZMTP connection to one of mongrel2's sockets, or None (tried again later)."""
    try:
        return zmtp.connect(endpoint, socket_type)
    except (OSError, ValueError) as error:
        log.warning("cannot connect to mongrel2's %s: %s", endpoint, error)
        return None


def _readable(sock: zmq.Socket) -> bool:
    """Whether a message waits in ``sock`` (asking also resets its ZMQ_FD)."""
    return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)


def run_dispatcher(settings: Settings) -> int:
    """Entry point of ``circus-wsgi dispatcher``: run until stopped; return the exit status."""
    die_with_parent()
    tune_malloc()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(message)s")
    return Dispatcher(settings).run()
