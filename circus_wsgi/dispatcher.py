"""The dispatcher process: the sockets and the loop around the broker.

It is the one reader of mongrel2's requests and writer of its responses, and
holds one connection per worker. Which request goes where, and when the stack
answers for the application (502, 503, 504), is the :mod:`circus_wsgi.broker`'s;
which messages become requests (400, 413, uploads), :mod:`circus_wsgi.admission`'s.
This module reads the sockets, feeds both, and carries out what they decide.

Protocol with the workers: :mod:`circus_wsgi.dispatch_protocol`, one
:mod:`circus_wsgi.framing` connection per worker; each worker's
:mod:`circus_wsgi.board` says, when it dies, which requests it had begun.
A dispatcher that finds the socket of one that was killed closes the clients
whose requests died with it (:mod:`circus_wsgi.recovery`). Workers on other
hosts connect to a ZeroMQ ROUTER of its own (:mod:`circus_wsgi.remote`), each
one more worker to the broker.
Counters for ``circus-wsgi status``: the broker's, over a REP socket. With flow
control, responses go out through :mod:`circus_wsgi.flowcontrol`. mongrel2's two
handler sockets are spoken to in ZMTP by :mod:`circus_wsgi.zmtp`, without
libzmq's I/O thread; the dispatcher connects to them again if mongrel2
restarts. Work is done per wake-up: requests are queued as they are read (all
that one read from mongrel2's socket brings), handed out once the sockets are
read, and each worker's share sent in one message; the messages for mongrel2 go
out together too, as the parts of one ZeroMQ message (mongrel2 reads each part
as a message of its own).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import select
import signal
import time
from collections import Counter, deque
from pathlib import Path
from typing import Callable, Collection, Sequence, cast

import zmq

from . import dispatch_protocol as dp
from . import framing, recovery, zmtp
from .admission import Gate, Refusal
from .board import BoardReader, board_path, live_workers, remove_stale
from .broker import Broker, Close, Discard, Fail, Kill, Request
from .exits import EXIT_OK, STUCK_SIGNAL
from .flowcontrol import Windows
from .framing import Frame
from .httpmsg import error_response
from .lifeline import die_with_parent
from .memory import tune_malloc
from .remote import RemoteWorkers
from .remote import round_trip as remote_round_trip
from .protocol import (Buffer, Kind, Message, ProtocolError, addressed, close,
                       disconnect_notice, granted, is_idempotent, parse, plain_request,
                       response)
from .rundir import RunDir
from .settings import Settings

log = logging.getLogger("circus_wsgi.dispatcher")

#: How a credits notice ends: mongrel2 sends one after each response it writes.
CREDITS_BODY = b'18:{"type":"credits"},'
#: How a disconnect notice ends: one per connection closed, with Connection: close.
DISCONNECT_BODY = b'21:{"type":"disconnect"},'
#: How often queue and request deadlines are checked, in seconds.
TICK = 0.1
#: The plugins' last decisions kept for the status and the console.
DECISIONS_KEPT = 50
#: Workers' frames this large (response messages) are forwarded as views of the bytes
#: read, not copied out of them (:class:`framing.LengthPrefixed`).
WORKER_LAYOUT = framing.LengthPrefixed(view_from=16 * 1024)


class Dispatcher:
    """The broker loop between mongrel2 and the workers. One per stack."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = run = RunDir(Path(settings.run_dir))
        self.context: zmq.Context = zmq.Context.instance()
        # mongrel2's PUSH (requests and notices) and SUB (responses), in ZMTP; None
        # until connected. (mongrel2's SUB keeps what matches its subscription, the
        # sender UUID every response begins with, so responses may go at once.)
        self.send_spec = settings.send_spec or run.mongrel2_send
        self.recv_spec = settings.recv_spec or run.mongrel2_recv
        self.requests: framing.FramedStream[bytes] | None = None
        self.responses: framing.FramedStream[bytes] | None = None
        # The socket file of a dispatcher that did not stop cleanly: it was killed, and
        # the clients of what it had not handed out wait (recovery.py). Until they are
        # closed, every connection heard of since start is noted.
        killed = os.path.exists(run.dispatcher)
        self.heard_of: set[bytes] | None = set() if killed else None
        self.recover_at: float | None = None  # when the next step of that recovery is due
        self.recover_by = 0.0  # when it stops waiting for the workers to announce themselves
        self.outstanding: list[int] = []
        self.listener = framing.listen(run.dispatcher)
        self.links: dict[bytes, framing.FramedStream[Frame]] = {}  # worker identity -> link
        self.link_identities: dict[int, bytes] = {}  # connection's fd -> worker identity
        self.link_numbers = itertools.count(1)
        self.status_socket = self._status_socket(run.dispatcher_status)
        self.broker = Broker(prefetch=settings.prefetch, max_queue=settings.max_queue,
                             queue_timeout=settings.queue_timeout, timeout=settings.timeout,
                             replayable=is_idempotent)
        self.gate = Gate(os.fsencode(run.uploads), settings.content_length,
                         settings.max_body_size)
        # With flow control, every response goes through the connections' windows.
        self.windows = Windows(self._to_mongrel2) if settings.flow_control else None
        self.outgoing: list[Buffer] = []  # for mongrel2, sent at the loop's turn
        self.malformed = 0  # messages that were not what the protocol says
        self.decisions: deque[dict] = deque(maxlen=DECISIONS_KEPT)  # plugins' notes
        self.scale_events: Counter[tuple[str, str]] = Counter()  # (direction, reason)
        # Every socket is polled by its file descriptor, the status socket's too (its
        # ZMQ_FD): a zmq_poll costs several system calls per ZeroMQ socket per call.
        # That descriptor turns readable when the socket's state may have changed; its
        # handler takes what is there, which resets it.
        self.poller = select.poll()
        self.requests_fd = self.responses_fd = -1
        self.status_fd = cast(int, self.status_socket.getsockopt(zmq.FD))
        self.poller.register(self.status_fd, select.POLLIN)
        self.accepting = False  # taking workers' connections (once mongrel2 was reached)
        self.pidfds: dict[int, bytes] = {}  # pidfd -> worker identity
        self.worker_pidfds: dict[bytes, int] = {}  # worker identity -> its pidfd
        self.boards: dict[bytes, BoardReader] = {}  # worker identity -> its board
        # Closed at the end of the loop's turn, so that no new file takes the number of
        # one whose event is still to be handled in this turn.
        self.retired: list[Callable[[], None]] = []
        self.lost_worker = False  # a worker was lost while requests were sent to it
        self.remote = RemoteWorkers(settings, self.context) if settings.remote_workers \
            else None
        self.remote_fd = -1
        if self.remote is not None:
            self.remote_fd = self.remote.fileno()
            self.poller.register(self.remote_fd, select.POLLIN)
        self.stopping = False
        remove_stale(run.path)

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
        broker = self.broker
        while True:
            now = time.monotonic()
            if self.stopping:
                deadline = deadline or self._begin_stop(now)
                if broker.idle or now >= deadline:
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
            if self.remote is not None:  # (its descriptor says "look", not "readable")
                self._on_remote()
            self._close_retired()
            now = time.monotonic()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + TICK
            self._hand_out(now)
            if broker.actions:
                self._carry_out()
            self._send_outgoing()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + dp.HEARTBEAT_INTERVAL
        self._finish()
        os.close(wake_r)
        os.close(wake_w)
        return EXIT_OK

    def _tick(self, now: float) -> None:
        """Deadlines, workers whose exit is settled, flow control's probes, and a
        connection to mongrel2 if it is not there."""
        for identity in self.broker.tick(now):
            self._settle_exited(identity)
        if self.recover_at is not None and now >= self.recover_at:
            self._recover(now)
        if self.remote is not None:
            for peer in self.remote.silent(now):
                self.remote.forget(peer)
                if _remote_id(peer) in self.broker.workers:
                    self._worker_gone(_remote_id(peer), "worker host silent")
        self.gate.expire(now)
        if self.windows is not None:
            self.windows.probe(now)
            self.windows.prune()
        if self.responses is None and not self.stopping:
            self._connect_mongrel2()

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

    def _send_on(self, stream: framing.FramedStream, frames: Sequence[Frame]) -> None:
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

    # -------------------------------------------------------------- mongrel2

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
            if self.heard_of is not None:
                self.recover_at = time.monotonic() + recovery.ASK_AFTER
                self.recover_by = self.recover_at + recovery.WAIT_FOR_WORKERS
        log.info("mongrel2 connected")

    def _mongrel2_gone(self) -> None:
        """A connection to mongrel2 ended (it stopped or restarted): its clients are
        gone, and the next mongrel2 gives its connections the same ids. Forget them
        all; connect again at the next tick."""
        log.warning("mongrel2's sockets closed: connecting again")
        for stream in (self.requests, self.responses):
            if stream is not None:
                if stream.fileno() in (self.requests_fd, self.responses_fd):
                    self.poller.unregister(stream.fileno())
                self.retired.append(stream.close)
        self.requests = self.responses = None
        self.requests_fd = self.responses_fd = -1
        for orphan in self.broker.mongrel2_restarted():  # stop what runs for nobody
            self._notify(orphan.worker, disconnect_notice(orphan.sender, orphan.conn))
        for path in self.gate.reset():
            _remove_file(path)
        if self.windows is not None:  # what it held back and counted was for those clients
            self.windows = Windows(self._to_mongrel2)
        self.outgoing = []

    def _on_requests(self) -> None:
        """mongrel2's messages: all that one read brings (one frame each)."""
        stream = self.requests
        if stream is None:
            return
        try:
            messages = stream.receive()
        except ValueError as error:
            log.error("malformed stream from mongrel2 (%s)", error)
            messages = []
        if self.heard_of is not None:
            self.heard_of.update(frames[0].split(b" ", 2)[1] for frames in messages)
        for frames in messages:
            self._on_mongrel2(frames[0])
        if stream.closed and stream is self.requests:
            self._mongrel2_gone()

    def _on_responses(self, event: int) -> None:
        """The connection to mongrel2's SUB: writable again, or closed (what it sends,
        its subscription, needs nothing from us)."""
        stream = self.responses
        if stream is None:
            return
        try:
            if event & select.POLLOUT:
                self._flush_on(stream)
            if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                stream.receive()
        except (ValueError, ConnectionError) as error:
            log.error("connection to mongrel2's SUB failed (%s)", error)
        if stream.closed:
            self._mongrel2_gone()

    def _on_mongrel2(self, raw: bytes) -> None:
        """One message from mongrel2: a request, an upload notice, a credits or
        disconnect notice."""
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
            sender, conn, window, method = plain
            if not self.gate.blocked(conn):
                if window and self.windows is not None:  # the connection's first request
                    self.windows.opened(conn, window)
                self.broker.arrive(conn, sender, raw, time.monotonic(), None, method)
            return
        try:
            message = parse(raw)
        except ProtocolError as error:
            self.malformed += 1
            log.warning("malformed message from mongrel2 (%s): %r", error, raw[:120])
            return
        kind = message.kind
        if kind is Kind.DISCONNECT:
            self._on_disconnect(message.conn_id, raw)
        elif kind is Kind.CREDITS:
            self._on_credits(message.conn_id, message.credits, raw)
        elif not self.gate.blocked(message.conn_id):
            self._on_client_message(message, raw)

    def _on_client_message(self, message: Message, raw: bytes) -> None:
        """A request, or an upload's start or end, on a connection not refused."""
        now = time.monotonic()
        upload = None
        if message.kind is Kind.UPLOAD_START:
            refusal, aborted = self.gate.upload_started(message, now)
            _remove_file(aborted)  # the answer makes mongrel2 abort that upload
            if refusal is not None:
                self._refuse(message, refusal)
            return
        if message.kind is Kind.UPLOAD_DONE:
            refusal, upload = self.gate.upload_done(message, now)
            if refusal is not None:
                _remove_file(upload)
                return self._refuse(message, refusal)
        refusal = self.gate.request(message, now)
        if refusal is not None:
            _remove_file(upload)
            return self._refuse(message, refusal)
        if self.windows is not None and message.credits:  # the connection's first request
            self.windows.opened(message.conn_id, message.credits)
        self.broker.arrive(message.conn_id, message.sender, raw, now, upload,
                           _method(message))

    def _refuse(self, message: Message, refusal: Refusal) -> None:
        self._send_error(message.sender, message.conn_id, refusal.status, refusal.reason)
        self.broker.refused(refusal.status, refusal.reason, _method(message))

    def _on_credits(self, conn: bytes, credits: int, raw: bytes) -> None:
        if self.windows is not None:
            self.windows.credited(conn, credits)
        self._notify(self.broker.holder(conn), raw)

    def _on_disconnect(self, conn: bytes, raw: bytes) -> None:
        _remove_file(self.gate.gone(conn))
        self._forget_window(conn)
        self._notify(self.broker.disconnect(conn), raw)

    def _notify(self, identity: bytes | None, raw: bytes) -> None:
        """Pass a notice to the worker holding its connection's request, if any."""
        if identity is not None:
            self._send_worker(identity, (dp.NOTICE, raw))

    def _forget_window(self, conn: bytes) -> None:
        if self.windows is not None:
            self.windows.forget(conn)

    # ------------------------------------------------------------- workers

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
            self.malformed += 1
            log.warning("malformed stream from a worker (%s): disconnecting it", error)
            self._drop_link(identity, "malformed stream", alive=True)
        except ConnectionError:
            pass  # closed: the link says so
        if link.closed and identity in self.links:
            self._drop_link(identity, "worker exited")

    def _on_remote(self) -> None:
        """The messages of workers on other hosts (:mod:`circus_wsgi.remote`)."""
        assert self.remote is not None
        for peer, frames in self.remote.receive(time.monotonic()):
            if frames:
                self._on_worker(_remote_id(peer), list(frames))

    def _drop_link(self, identity: bytes, reason: str, alive: bool = False) -> None:
        """The worker's connection is gone. Unless we end it ourselves (``alive``), so is
        the worker: every frame it sent has been read, and its board is final."""
        link = self.links.pop(identity)
        del self.link_identities[link.fileno()]
        self.poller.unregister(link.fileno())
        self.retired.append(link.close)
        if identity in self.broker.workers:
            self._worker_gone(identity, reason, alive)

    def _on_worker(self, identity: bytes, frames: list[framing.Frame]) -> None:
        """One worker message; a malformed one is logged and counted, never fatal. (A
        large frame is a memoryview: where bytes are expected, it is malformed too.)"""
        try:
            self._on_worker_command(identity, frames[0], frames)
        except (IndexError, ValueError, TypeError, AttributeError) as error:
            self.malformed += 1
            log.warning("malformed message from a worker (%s): %r", error,
                        [bytes(f[:40]) for f in frames[:4]])

    def _on_worker_command(self, identity: bytes, command: Frame, frames: list[Frame]) -> None:
        if command == dp.OUTPUT:
            self._on_output(identity, _small(frames[1]).split(), _small(frames[2]).split(),
                            _small(frames[3]).split(), frames[4:])
        elif command == dp.READY:
            self._on_ready(identity, int(frames[1]), int(frames[2]), int(frames[3]),
                           int(frames[4]))
            if self.heard_of is not None:
                self.heard_of.update(_small(frame) for frame in frames[5:])
        elif command == dp.RETURN:
            self.broker.returned(identity, [_small(frame) for frame in frames[1:]],
                                 time.monotonic())
        elif command == dp.LEAVING:
            worker = self.broker.leaving(identity)
            if worker is not None:
                log.info("worker %s leaving with %d requests", worker.key, len(worker.held))
            self._send_worker(identity, (dp.BYE,))
        elif command == dp.TAKE:
            granted = self.broker.take(identity, [int(index) for index in frames[1:]],
                                       time.monotonic())
            self._send_worker(identity, (dp.GO, *[b"%d" % index for index in granted]))
        elif command == dp.HEARTBEAT:
            round_trip = remote_round_trip([_small(frame) for frame in frames])
            if round_trip is not None:
                self.broker.round_trip(identity, round_trip)
        elif command == dp.BYE and self.remote is not None and identity.startswith(b"r"):
            self.remote.forget(_peer(identity))
            if identity in self.broker.workers:
                self._worker_gone(identity, "worker exited")
        else:
            self.malformed += 1
            log.warning("unknown command %r from a worker", command)

    def _on_output(self, identity: bytes, done: list[bytes], started: list[bytes],
                   statuses: list[bytes], messages: list[Buffer]) -> None:
        if self.heard_of is not None:
            self.heard_of.update(done + started)
        if len(statuses) != len(done):
            self.malformed += 1
            statuses = [b""] * len(done)
        discard = self.broker.output(identity, done, started, time.monotonic(), statuses)
        if discard:  # responses for clients of a mongrel2 that is gone
            messages = [m for m in messages if addressed(m)[0][0] not in discard]
        if self.windows is not None:
            self.windows.forward(messages)
        else:
            self.outgoing += messages

    def _on_ready(self, identity: bytes, pid: int, free: int, threads: int,
                  received: int) -> None:
        host = self.remote.hosts.get(_peer(identity), "remote") \
            if self.remote is not None and identity.startswith(b"r") else ""
        if identity not in self.broker.workers:
            log.info("worker %s%d ready with %d of %d threads idle", f"{host}:" if host else "",
                     pid, free, threads)
            if not host:  # one of this host's: its process and its board
                self._watch(pid, identity)
                board = BoardReader.open(board_path(self.run_dir.path, pid))
                if board is not None:
                    self.boards[identity] = board
        self.broker.worker_ready(identity, pid, free, threads, received, time.monotonic(),
                                 host)

    def _watch(self, pid: int, identity: bytes) -> None:
        """A pidfd that becomes readable when the worker exits (none if not visible here)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        self.pidfds[pidfd] = identity
        self.worker_pidfds[identity] = pidfd
        self.poller.register(pidfd, select.POLLIN)

    def _on_worker_exit(self, pidfd: int) -> None:
        """The process exited: give it nothing more; what it holds is settled once its
        connection ends (or, if a child it forked keeps that open, a moment later)."""
        identity = self.pidfds.pop(pidfd)
        del self.worker_pidfds[identity]
        self._retire_pidfd(pidfd)
        self.broker.worker_exited(identity, time.monotonic())

    def _retire_pidfd(self, pidfd: int) -> None:
        self.poller.unregister(pidfd)
        self.retired.append(functools.partial(os.close, pidfd))

    def _close_retired(self) -> None:
        retired, self.retired = self.retired, []
        for release in retired:
            release()

    def _settle_exited(self, identity: bytes) -> None:
        """The worker's process exited a while ago and its connection is still open (a
        child it forked holds it): what the connection has now is read (at most what
        its kernel buffers hold), then it is closed, so that nothing read later passes
        for the worker's."""
        link = self.links.get(identity)
        for _ in range(2 * framing.SEND_BUFFER // framing.READ_SIZE):
            if link is None or identity not in self.links or \
                    not select.select([link], [], [], 0)[0]:
                break
            self._on_link(identity, select.POLLIN)
        if identity in self.links:
            self._drop_link(identity, "worker exited")
        elif identity in self.broker.workers:
            self._worker_gone(identity, "worker exited")

    def _worker_gone(self, identity: bytes, reason: str, alive: bool = False) -> None:
        """The worker is gone: its board says which of the requests it held it had
        begun; the broker re-queues the others and answers for these. A worker still
        ``alive`` (we ended its connection) may begin any of them yet: all are answered."""
        board = self.boards.pop(identity, None)
        began: int | None = None
        running: Collection[int] = ()
        if board is not None:
            if not alive:
                began, running = board.began(), board.running()
            board.close(remove=not alive)
        elif identity in self.broker.workers and self.broker.workers[identity].host:
            remote = self.broker.workers[identity]  # it began what it was told to, in order
            began, running = remote.began, {r.index for r in remote.held.values()}
        worker = self.broker.worker_gone(identity, began, running, time.monotonic(), reason)
        pidfd = self.worker_pidfds.pop(identity, None)
        if pidfd is not None:
            del self.pidfds[pidfd]
            self._retire_pidfd(pidfd)
        if worker is not None and (worker.held or worker.failed or reason != "worker exited"):
            log.warning("%s: worker %d", reason, worker.pid)

    def _recover(self, now: float) -> None:
        """After a killed dispatcher: once the running workers have announced themselves,
        ask mongrel2 which connections may wait for a response; a moment later, close
        those nobody has heard of since."""
        announced = {worker.pid for worker in self.broker.workers.values()}
        if now < self.recover_by and live_workers(self.run_dir.path) - announced:
            return  # asked again at the next tick
        control = recovery.Control(self.context, self.run_dir.mongrel2_control)
        try:
            if self.recover_at is not None and not self.outstanding:
                self.outstanding = recovery.outstanding(control.ask(b"status", what=b"net"))
                if self.outstanding:
                    self.recover_at = now + recovery.CLOSE_AFTER
                    return
            heard_of = self.heard_of or set()
            lost = [conn for conn in self.outstanding
                    if b"%d" % conn not in heard_of and b"%d" % conn not in self.broker.fronts]
            closed = control.close_connections(lost)
            log.warning("the dispatcher before was killed: closed %d client connections "
                        "whose requests it took", closed)
        except (TimeoutError, zmq.ZMQError, ValueError) as error:
            log.error("cannot close the clients of the dispatcher before: %s", error)
        finally:
            control.close()
        self.heard_of, self.recover_at, self.outstanding = None, None, []

    def _heartbeat(self) -> None:
        for identity in list(self.broker.workers):
            self._send_worker(identity, (dp.HEARTBEAT,))

    # ---------------------------------------------------- handing out, acting

    def _hand_out(self, now: float) -> None:
        """Hand out what waits and send each worker its share in one message; what a
        worker lost on the way held goes to the others."""
        broker = self.broker
        broker.dispatch(now)
        while True:
            batches = broker.take_batches()
            if not batches:
                return
            windows = self.windows
            for identity, batch in batches.items():
                budgets = b"" if windows is None else \
                    b" ".join([b"%d" % windows.budget(r.conn) for r in batch])
                self._send_worker(identity, (dp.REQUEST, budgets, *[r.raw for r in batch]))
            if not self.lost_worker:
                return
            self.lost_worker = False
            broker.dispatch(now)

    def _send_worker(self, identity: bytes, frames: tuple[bytes, ...]) -> None:
        """Send to one worker; if it is unreachable, it is gone."""
        if self.remote is not None and identity.startswith(b"r"):
            try:
                self.remote.send(_peer(identity), frames)
            except ConnectionError:
                self.lost_worker = True
                self.remote.forget(_peer(identity))
                if identity in self.broker.workers:
                    self._worker_gone(identity, "worker host unreachable")
            return
        link = self.links.get(identity)
        try:
            if link is None:
                raise ConnectionError("not connected")
            self._send_on(link, frames)
        except ConnectionError:  # its end is closed: it has exited (or is exiting)
            self.lost_worker = True
            if link is not None:
                self._drop_link(identity, "worker unreachable")
            elif identity in self.broker.workers:
                self._worker_gone(identity, "worker unreachable")

    def _carry_out(self) -> None:
        """Do what the broker decided, in order."""
        for action in self.broker.take_actions():
            if type(action) is Fail:
                request = action.request
                _remove_file(request.upload)
                self._send_error(request.sender, request.conn, action.status, action.reason,
                                 action.retry_after)
            elif type(action) is Close:
                self._to_mongrel2(close(action.request.sender, action.request.conn))
                self._forget_window(action.request.conn)
            elif type(action) is Discard:
                _remove_file(action.request.upload)
            elif type(action) is Kill and action.host:
                log.error("worker %s:%d %s: it gets nothing more (its host's circus can "
                          "restart it)", action.host, action.pid, action.reason)
            elif type(action) is Kill:
                self._kill(action.pid, action.reason)

    def _kill(self, pid: int, reason: str) -> None:
        log.error("worker %d %s: killing it", pid, reason)
        try:
            os.kill(pid, STUCK_SIGNAL)
        except ProcessLookupError:
            pass

    def _send_error(self, sender: bytes, conn: bytes, status: int, reason: str,
                    retry_after: bool = False) -> None:
        headers = ((b"Retry-After", b"1"),) if retry_after else ()
        self._to_mongrel2(response(sender, conn, error_response(status, headers=headers)))
        self._to_mongrel2(close(sender, conn))
        self._forget_window(conn)
        log.warning("%d for connection %s: %s", status, conn.decode(), reason)

    def _answer_status(self) -> None:
        """A status question (the snapshot is the answer), or a plugin's note of a
        decision (``{"decision": {...}}``: kept for the console, scale events counted)."""
        while _readable(self.status_socket):  # one may have come in while answering
            question = self.status_socket.recv()
            if question.startswith(b"{"):
                self.status_socket.send_json({"ok": self._note(question)})
            else:
                self.status_socket.send_json(self.snapshot())

    def _note(self, question: bytes) -> bool:
        try:
            decision = json.loads(question)["decision"]
            by, action = str(decision["by"]), str(decision["action"])
            reason, detail = str(decision.get("reason", "")), str(decision.get("detail", ""))
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return False
        self.decisions.append({"at": time.time(), "by": by, "action": action,
                               "reason": reason, "detail": detail})
        if by == "autoscaler" and action in ("up", "down"):
            self.scale_events[(action, reason)] += 1
        return True

    def snapshot(self) -> dict:
        """The broker's counters and state, and what each worker runs now (its board; a
        remote worker's: what it was told to begin)."""
        now = time.monotonic()
        snapshot = self.broker.snapshot(now)
        snapshot["malformed"] = self.malformed
        snapshot["scale_events"] = [[*key, count] for key, count in self.scale_events.items()]
        snapshot["decisions"] = list(self.decisions)
        for identity, worker in self.broker.workers.items():
            board = self.boards.get(identity)
            if board is None and not worker.host:
                continue
            by_index = {request.index: request for request in worker.held.values()}
            running = []
            runs = board.running() if board is not None else self.broker.running(identity)
            for index, since in sorted(runs.items()):
                method, path = _request_line(by_index.get(index))
                running.append({"method": method, "path": path,
                                "seconds": round(max(0.0, now - since), 3)})
            snapshot["workers"][worker.key]["running"] = running
        return snapshot

    # ------------------------------------------------------------- stopping

    def _begin_stop(self, now: float) -> float:
        """Take no more requests from mongrel2 (it keeps new ones for the next dispatcher);
        serve those already taken until the deadline."""
        log.info("dispatcher stopping: %d queued, %d in flight", self.broker.waiting(),
                 len(self.broker.in_flight))
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
        self.broker.stop(time.monotonic())
        self._carry_out()
        if self.windows is not None:  # no credits come once stopping: cut, do not hang
            for message in self.windows.abandon():
                self._to_mongrel2(message)
        self._send_outgoing()
        self._close_retired()
        for pidfd in self.pidfds:
            os.close(pidfd)
        for board in self.boards.values():
            board.close()
        deadline = time.monotonic() + 1.0  # for the last messages to the workers
        for link in self.links.values():
            link.drain(timeout=deadline - time.monotonic())
            link.close()
        _remove_file(os.fsencode(self.listener.getsockname()))
        self.listener.close()
        if self.responses is not None:
            self.responses.drain(timeout=1.0)
            self.responses.close()
        self.status_socket.close(linger=1000)
        if self.remote is not None:
            self.remote.close()
        log.info("dispatcher %d stopped", os.getpid())


def _remove_file(path: bytes | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _connect(endpoint: str, socket_type: str) -> framing.FramedStream | None:
    """A ZMTP connection to one of mongrel2's sockets, or None (tried again later)."""
    try:
        return zmtp.connect(endpoint, socket_type)
    except (OSError, ValueError) as error:
        log.warning("cannot connect to mongrel2's %s: %s", endpoint, error)
        return None


def _method(message: Message) -> bytes:
    method = message.headers.get(b"METHOD")
    return method if isinstance(method, bytes) else b""


def _request_line(request: Request | None) -> tuple[str, str]:
    """The method and path of a request, for people ("" for one this dispatcher never
    handed out: it was held across a restart)."""
    if request is None:
        return "", ""
    try:
        message = parse(request.raw)
    except ProtocolError:
        return "", ""
    method = message.headers.get(b"METHOD", b"")
    return (method.decode("latin-1") if isinstance(method, bytes) else "",
            message.path.decode("latin-1"))


def _remote_id(peer: bytes) -> bytes:
    """The broker's id of a remote worker: ``r`` and its ZeroMQ routing id in hex."""
    return b"r" + peer.hex().encode()


def _peer(identity: bytes) -> bytes:
    return bytes.fromhex(identity[1:].decode())


def _small(frame: Frame) -> bytes:
    """A frame where the protocol has ids or digits: never one of the large ones read as
    a view (a peer that sends one there is malformed)."""
    if type(frame) is not bytes:
        raise ValueError("a large frame where a small one belongs")
    return frame


def _readable(sock: zmq.Socket) -> bool:
    """Whether a message waits in ``sock`` (asking also resets its ZMQ_FD)."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def run_dispatcher(settings: Settings) -> int:
    """Entry point of ``circus-wsgi dispatcher``: run until stopped; return the exit status."""
    die_with_parent()
    tune_malloc()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(message)s",
                        force=True)  # importing circus configured logging already
    return Dispatcher(settings).run()
