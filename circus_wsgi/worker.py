"""The worker process: takes requests, runs the WSGI application, sends the responses.

Owns one worker's sockets, signals, threads and draining; the HTTP is
:mod:`circus_wsgi.wsgi`'s, the wire format :mod:`circus_wsgi.protocol`'s.

Requests come one of two ways (setting ``mode``):

- ``dispatcher``: one :mod:`circus_wsgi.framing` connection to the dispatcher,
  speaking :mod:`circus_wsgi.dispatch_protocol` (READY, OUTPUT, RETURN,
  LEAVING). If the dispatcher restarts, the worker connects again, announces
  itself and sends what it had not delivered.
- ``direct``: PULL from mongrel2's send_spec, XPUB to its recv_spec. The
  worker takes requests only once mongrel2 has subscribed to its responses
  (an XPUB sees the subscription), so no early reply is lost. mongrel2 deals
  requests and notices round-robin, so there is no flow control, a slow
  request delays those dealt behind it, and requests queued in a stopping
  worker are lost (docs/direct-mode.rst).

With ``threads == 1`` the application runs in the loop's own thread: a request
costs no hand-off. With more, a pool of threads runs the application; every
ZeroMQ socket stays in the loop's thread (they are not thread-safe). The
application threads hand their messages over through a queue and a wake-up
pipe, and get their credit and disconnect notices through their request's
own queue.

In dispatcher mode, responses are kept and sent in one OUTPUT message when
the worker runs out of work or is about to wait (:class:`DispatcherLink`).
With the dispatcher's ``prefetch``, a worker may hold requests beyond its
threads; those not started when every thread has been on its request for
``GIVE_BACK_AFTER`` go back (RETURN). Threaded, the loop sees to both. Inline,
the loop is inside the application, so while the worker has work a SIGALRM
timer ticks every :data:`FLUSH_AFTER`: its handler (Python code between the
application's bytecodes, never inside the loop's own socket calls) sends the
responses kept, so none waits behind a slow request, and after
``GIVE_BACK_AFTER`` returns the requests waiting. Like any signal, it
interrupts a blocking system call of the application, which Python retries
(PEP 475).

Signals: SIGTERM: take nothing new, finish what is held, exit 0 within
graceful_timeout. SIGINT and SIGQUIT: exit at once. :data:`exits.STUCK_SIGNAL`
keeps its default action (terminate), so the dispatcher can kill a stuck worker.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional, cast

import psutil
import zmq


from . import dispatch_protocol as dp
from . import exits, framing, hooks, httpmsg, protocol
from .accesslog import AccessLog, Entry
from .appload import AppLoadError, load_app, load_mounts, prepare_path
from .board import Board, board_path
from .compiled import compiled_modules
from .forwarded import Proxies
from .lifeline import die_with_parent
from .memory import tune_malloc
from .protocol import Kind, Message, ProtocolError
from .remote import RemoteLink
from .rundir import RunDir
from .settings import Settings
from .wsgi import ClientGone, Exchange, Pacer, Router, Site, wants_keep_alive

__all__ = ["run_worker", "Worker", "build_router"]

log = logging.getLogger("circus_wsgi.worker")

#: A client that takes no byte of its response for this long is given up.
STALLED = 60.0
#: Waiting this long for credits, a response asks mongrel2 whether its connection still
#: exists (:func:`protocol.keep_alive`), and again as often while it waits.
PROBE_AFTER = 1.0
#: The loop wakes up at least this often (seconds) to look at its timers.
TICK = 0.25
#: Direct mode: messages taken from mongrel2 per wake-up before the timers are looked at.
BATCH = 64
#: Seconds between attempts to connect to the dispatcher while it is not listening.
RECONNECT_EVERY = 0.1
#: Inline, responses kept for one OUTPUT go out at once when a request has run this
#: long (seconds), so a slow request does not hold back those finished before it.
FLUSH_AFTER = 0.001
#: After a refusal for request smuggling, what follows on that connection is dropped this long.
REFUSED_FOR = 2.0
#: Seconds between two looks at the worker's resident memory (max_worker_memory).
MEMORY_CHECK_EVERY = 1.0
#: Statuses as the digits OUTPUT carries, for the common ones.
# Poll flags as plain ints (``|`` on pyzmq's enum flags runs Python code: 0.6 us per turn).
_READ, _READ_WRITE = int(zmq.POLLIN), int(zmq.POLLIN | zmq.POLLOUT)


class Refused(Exception):
    """A request that must not reach the application: it gets ``status`` and a close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# --------------------------------------------------------------------------
# One response on its way out


class Outbox:
    """Sends one response as mongrel2 messages, paced by its :class:`Pacer`.

    ``deliver(outbox, messages, done)`` takes the messages to the loop thread
    (a call there, a hand-over from an application thread); ``wait(outbox,
    seconds)`` returns when a notice may have arrived. Notices reach the
    outbox by :meth:`notice`, in the loop thread.
    """

    __slots__ = ("sender", "conn_id", "index", "pacer", "status", "gone", "answered", "started",
                 "notices", "_deliver", "_wait", "_waiting", "_probe")

    def __init__(self, message: Message, index: int, pacer: Pacer, deliver: Callable,
                 wait: Callable, threaded: bool) -> None:
        self.sender, self.conn_id, self.pacer = message.sender, message.conn_id, pacer
        self.index = index  # its number among the requests received (circus_wsgi.board)
        self.status = 0  # the response's HTTP status, once known (set by the Exchange)
        self.gone = False  # the client left (or stalled): send nothing more
        self.answered = False  # the front answered it already: send nothing at all
        self.started = False  # some of the response went out before finish()
        self.notices: Optional[queue.SimpleQueue] = queue.SimpleQueue() if threaded else None
        self._deliver, self._wait = deliver, wait
        self._waiting = self._probe = 0.0  # since when it waits for credits (0: it does not)

    def notice(self, message: Message) -> None:
        """A disconnect or credits notice for this connection (loop thread)."""
        if self.notices is None:
            self._apply(message)
        else:
            self.notices.put(message)

    def absorb(self, timeout: float = 0.0) -> None:
        """Apply the notices handed to this application thread, waiting up to ``timeout``."""
        if self.notices is None:
            return
        try:
            message = self.notices.get(timeout=timeout) if timeout > 0 else \
                self.notices.get_nowait()
            while True:
                self._apply(message)
                message = self.notices.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, message: Message) -> None:
        if message.kind is Kind.DISCONNECT:
            self.gone = True
        else:
            self.pacer.granted(message.credits)
            self._waiting = 0.0

    def write(self, data: bytes) -> None:
        """Send ``data`` as the pacing allows; wait while too much is held."""
        if self.gone:
            raise ClientGone
        self.started = True
        self.pacer.add(data)
        self._send(self._messages(), False)
        while self.pacer.blocked():
            self._await()
            self._send(self._messages(), False)

    def finish(self, data: bytes, close: bool, body: bytes = b"") -> None:
        """Send the last ``data``, then ``body`` (a head and a body need not be joined),
        and the close message if ``close``; the request is done."""
        if not self.gone and not self.started and self.pacer.fits(len(data) + len(body)):
            messages = [protocol.response(self.sender, self.conn_id, data, body)] \
                if data or body else []
        else:
            self.started = True
            self.pacer.add(data)
            self.pacer.add(body)
            try:
                messages = self._drain()
            except ClientGone:
                return self._deliver(self, [], True)
        if close:
            messages.append(protocol.close(self.sender, self.conn_id))
        self._deliver(self, messages, True)

    def _drain(self) -> list[bytes]:
        """Send what is held until the response is settled; return the last messages."""
        while True:
            if self.gone:
                raise ClientGone
            messages = self._messages()
            if self.pacer.settled():
                return messages
            self._send(messages, False)
            self._await()

    def _messages(self) -> list[bytes]:
        return [protocol.response(self.sender, self.conn_id, *parts)
                for parts in self.pacer.take(time.monotonic())]

    def _send(self, messages: list[bytes], done: bool) -> None:
        if messages:
            self._deliver(self, messages, done)

    def _await(self) -> None:
        """Wait for credits or for the pacing interval; ClientGone if the client left."""
        now = time.monotonic()
        pause = self.pacer.wait_time(now)
        if pause is None:
            if not self._waiting:
                self._waiting, self._probe = now, now + PROBE_AFTER
            if now - self._waiting >= STALLED:
                log.warning("connection %s took no bytes for %.0fs: closing it",
                            self.conn_id.decode(), STALLED)
                self.gone = True
                self._deliver(self, [protocol.close(self.sender, self.conn_id)], False)
            elif now >= self._probe:  # gone without a word? mongrel2 answers a disconnect
                self._probe = now + PROBE_AFTER
                self._deliver(self, [protocol.keep_alive(self.sender, self.conn_id)], False)
            pause = min(self._waiting + STALLED, self._probe) - now
        self._wait(self, pause)
        self.absorb()
        if self.gone:
            raise ClientGone


# --------------------------------------------------------------------------
# The two ways to mongrel2


class DispatcherLink(dp.WorkerMessages):
    """The connection to the dispatcher (:mod:`framing`), speaking :mod:`dispatch_protocol`.

    Responses are kept until :meth:`flush`, which sends them in one OUTPUT
    message: the worker flushes when it runs out of work, before it waits, and
    after (or :data:`FLUSH_AFTER` into) a request that takes long. When the
    connection is lost (the dispatcher restarted), the messages not delivered
    wait for :meth:`reconnect`.
    """

    direct = False

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.stream: Optional[framing.FramedStream] = None
        self.undelivered: list[bytes] = []  # encoded messages kept while disconnected
        self.retry_at = 0.0

    @property
    def pollable(self) -> Optional[int]:
        return None if self.stream is None else self.stream.fileno()

    @property
    def backlogged(self) -> bool:
        return self.stream is not None and self.stream.backlogged

    @property
    def connected(self) -> bool:
        """False between a dispatcher's end and the connection to the next one: nothing
        may be given back then (the next dispatcher does not know those requests)."""
        return self.stream is not None

    def start(self, stopped: Callable[[], bool]) -> bool:
        """Connect, waiting for the dispatcher to listen; False if stopped before."""
        while self.stream is None:
            self.stream = framing.connect(self.path)
            if self.stream is None:
                if stopped():
                    return False
                time.sleep(RECONNECT_EVERY)
        return True

    def reconnect(self, ready: Optional[tuple[bytes, ...]]) -> None:
        """If disconnected, connect again: announce this worker with the READY frames
        ``ready`` (None: it is stopping, and the new dispatcher need not know it), then
        send what the last dispatcher did not get (responses to requests held across its
        restart)."""
        if self.stream is not None:  # the usual case, on every turn of the loop
            return
        now = time.monotonic()
        if now < self.retry_at:
            return
        self.retry_at = now + RECONNECT_EVERY
        self.stream = framing.connect(self.path)
        if self.stream is None:
            return
        log.info("worker %d connected to the dispatcher again", os.getpid())
        messages, self.undelivered = self.undelivered, []
        if ready is not None:
            messages.insert(0, framing.encode_message(ready))
        try:
            self.stream.resend(messages)
        except ConnectionError:
            self._lost()

    def receive(self) -> list[list[bytes]]:
        if self.stream is None:
            return []
        try:  # (no frame is a view: the link reads without them)
            messages = cast(list[list[bytes]], self.stream.receive())
        except ValueError as error:
            log.error("malformed stream from the dispatcher (%s)", error)
            messages = []
        if self.stream.closed:
            self._lost()
        return messages

    def flush(self) -> None:
        """Send what :meth:`send` kept, as one OUTPUT message, and what waits for the
        socket to be writable."""
        if self.output():
            return
        if self.stream is not None and self.stream.backlogged:
            try:
                self.stream.flush()
            except ConnectionError:
                self._lost()

    def _send(self, frames: tuple[bytes, ...]) -> None:
        if self.stream is not None:
            try:
                self.stream.send(frames)
                return
            except ConnectionError:
                self._lost()
        self.undelivered.append(framing.encode_message(frames))

    def _lost(self) -> None:
        log.warning("worker %d lost its dispatcher connection", os.getpid())
        if self.stream is not None:
            self.undelivered += self.stream.unsent()
            self.stream.close()
            self.stream = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.drain(timeout=1.0)
            self.stream.close()


class DirectLink:
    """Straight on mongrel2's sockets: PULL from send_spec, XPUB to recv_spec."""

    direct = True

    def __init__(self, context: zmq.Context, send_spec: str, recv_spec: str) -> None:
        self.out = context.socket(zmq.XPUB)
        self.out.setsockopt(zmq.SNDHWM, 0)  # a PUB drops what passes its HWM
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.connect(recv_spec)
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.send_spec = send_spec
        self.backlogged = False  # every message goes out in send()

    @property
    def pollable(self) -> Optional[zmq.Socket]:
        return None if self.socket.closed else self.socket

    def start(self, stopped: Callable[[], bool]) -> bool:
        """Take requests once mongrel2 has subscribed; False if stopped before."""
        while not self.out.poll(TICK * 1000):
            if stopped():
                return False
        self.out.recv()
        self.socket.connect(self.send_spec)
        return True

    def ready(self, frames: tuple[bytes, ...]) -> None:
        pass

    def receive(self) -> list[list[bytes]]:
        """Up to :data:`BATCH` messages that have arrived."""
        taken = []
        for _ in range(BATCH):
            try:
                taken.append(self.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        return taken

    def leave(self) -> list[list[bytes]]:
        """Stop taking requests; return those already received."""
        taken = []
        while batch := self.receive():
            taken += batch
        self.socket.close()
        return taken

    def send(self, conn_id: bytes, messages: list[bytes], done: bool, status: int) -> None:
        for message in messages:
            self.out.send(message)

    def flush(self) -> None:
        pass  # every message went out in send()

    def close(self) -> None:
        if not self.socket.closed:
            self.socket.close()
        self.out.close()


# --------------------------------------------------------------------------
# The worker


class Worker:
    """One worker process's loop. ``run()`` serves until stopped and returns the exit status."""

    #: What each request runs in: :mod:`hooks` gives a subclass that calls
    #: pre_request and post_request, when they are set.
    exchange_type = Exchange

    def __init__(self, settings: Settings, router: Router, access: AccessLog,
                 context: Optional[zmq.Context] = None) -> None:
        self.settings, self.router, self.access = settings, router, access
        self.logging = access.enabled  # an access log is open (for the worker's life)
        self.threads = settings.threads
        self.inline = settings.threads == 1
        self.flow = settings.flow_control and settings.mode == "dispatcher"
        run = RunDir(Path(settings.run_dir)) if settings.run_dir else None
        self.uploads = str(run.uploads) if run else None
        self.limit = settings.max_requests and (
            settings.max_requests + random.randint(0, settings.max_requests_jitter))
        self.memory_limit = settings.max_worker_memory * 1024 * 1024
        self.memory_check_at = 0.0
        self.context = context or zmq.Context()
        self.link = self._link(settings, run)
        # The board records the number of each request begun, per thread, for this host's
        # dispatcher (nobody reads it in direct mode or from another host: the cells are
        # then a plain array).
        self.board = Board(board_path(run.path, os.getpid()), self.threads) \
            if run is not None and isinstance(self.link, DispatcherLink) else None
        self.cells = self.board.cells if self.board is not None else \
            memoryview(bytearray(8 * (1 + 2 * self.threads))).cast("d")
        self.received = 0  # requests received from the dispatcher: the last one's number
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poller = zmq.Poller()
        self.poller.register(self.wake_r, zmq.POLLIN)
        self.watched: tuple[Any, int] = (None, 0)  # the link's pollable and its flags
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.active: dict[bytes, Outbox] = {}
        # Requests held but not started: inline, those that came while the application
        # ran; threaded, those waiting for a thread (under ``ready``).
        self.pending: deque[tuple[Message, Outbox]] = deque()
        self.ready = threading.Condition()
        self.running: dict[Outbox, float] = {}  # threaded: when each started (under ``ready``)
        self.deferred: deque = deque()  # frames read while giving requests back
        self.give_back = settings.mode == "dispatcher" and settings.prefetch > 0
        # Inline, in dispatcher mode, a timer ticks while the application runs: it sends
        # the responses kept, connects again to a restarted dispatcher, and gives back.
        self.ticking = self.inline and settings.mode == "dispatcher"
        self.refused: dict[bytes, float] = {}
        self.held = self.served = self.malformed = self.returned = 0
        self.busy = False  # inline: the application is running in this thread
        self.started = 0.0  # inline: when the running request started
        self.in_io = False  # inline: in the loop's own socket calls, which SIGALRM must not enter
        self.timer_on = False  # inline: SIGALRM ticks every FLUSH_AFTER until the worker idles
        self.signalled = ""  # the reason to stop, set by a signal or max_requests
        self.stopping = False
        self.bye = self.link.direct  # the dispatcher said BYE (direct mode: nothing to wait for)
        # A remote worker begins a request only once the dispatcher has said GO for it
        # (circus_wsgi.remote): the numbers asked for, batch by batch, and those granted.
        self.granting = getattr(self.link, "grants", False)
        self.asking: deque[list[int]] = deque()
        self.asked: set[int] = set()
        self.granted: set[int] = set()
        if self.granting:
            self.link.renewed = self._link_renewed
        self.heard = self.stopped_at = time.monotonic()
        # How each request's Outbox sends and waits: in this thread, or handed over to it.
        self.outbox_io = (self._deliver, self._pump, False) if self.inline else (
            self._hand_over, Outbox.absorb, True)

    def _link(self, settings: Settings, run: Optional[RunDir]) -> Any:
        if settings.mode == "direct":
            send_spec = settings.send_spec or (run.mongrel2_send if run else "")
            recv_spec = settings.recv_spec or (run.mongrel2_recv if run else "")
            if not (send_spec and recv_spec):
                raise ValueError("setting 'run_dir' (or both 'send_spec' and 'recv_spec') is "
                                 "needed to find mongrel2's sockets")
            return DirectLink(self.context, send_spec, recv_spec)
        if run is None:
            raise ValueError("setting 'run_dir' is needed to find the dispatcher's socket")
        if settings.connect:
            return RemoteLink(settings, self.context)
        return DispatcherLink(run.dispatcher)

    # -- the loop

    def run(self) -> int:
        """Serve until stopped; the exit status."""
        self._install_signals()
        if not self.link.start(lambda: bool(self.signalled)):
            return exits.EXIT_OK
        log.info("worker %d serving (%s mode, %d thread%s, %s)", os.getpid(),
                 self.settings.mode, self.threads, "" if self.inline else "s",
                 "compiled" if compiled_modules() else "pure Python")
        self.link.ready(self._announcement())
        if self.ticking:
            signal.signal(signal.SIGALRM, self._on_timer)
        if not self.inline:
            for number in range(self.threads):
                threading.Thread(target=self._app_thread, args=(number,), name=f"app-{number}",
                                 daemon=True).start()
        while not self._finished():
            self._poll(dp.GIVE_BACK_AFTER if self.give_back and self.pending else TICK)
            self._tick()
        if self.timer_on:
            signal.setitimer(signal.ITIMER_REAL, 0)  # its default action would kill us
        log.info("worker %d stopped after %d requests (%d given back, %d malformed messages)",
                 os.getpid(), self.served, self.returned, self.malformed)
        return exits.EXIT_OK

    def _finished(self) -> bool:
        if not self.stopping:
            return False
        if self.held:
            return False
        return self.bye or time.monotonic() - self.stopped_at > dp.SILENCE_LIMIT

    def _poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` for frames or hand-overs, and handle them; send what
        that produced (and what came before) in one message."""
        self.link.flush()
        if self.deferred:
            self._take_frames()
            timeout = 0.0
        self._watch_link()
        events = self.poller.poll(0)
        if not events and timeout:
            if self.timer_on and not self.busy:  # idle from here: no ticks while asleep
                signal.setitimer(signal.ITIMER_REAL, 0)
                self.timer_on = False
            events = self.poller.poll(int(timeout * 1000))
        for item, _ in events:
            if item == self.wake_r:
                self._take_results()
            else:
                self._take_frames()
        if self.inline:
            while self.pending and not self.busy:
                if self.granting and not self._may_begin():
                    break
                self._serve(*self.pending.popleft())
        elif self.granting and self.pending:
            self._ask()
        self.link.flush()
        self.access.flush()  # the lines of what was answered, after the answers

    def _watch_link(self) -> None:
        """Poll the link's socket (a new one after a reconnection), for writing too while
        messages wait for it."""
        watched = (self.link.pollable, _READ_WRITE if self.link.backlogged else _READ)
        if watched != self.watched:
            if self.watched[0] is not None:
                self.poller.unregister(self.watched[0])
            if watched[0] is not None:
                self.poller.register(*watched)
            self.watched = watched

    def _take_frames(self) -> None:
        """Handle the frames kept while giving back, then those that arrived, in order."""
        handle = self._on_link_direct if self.link.direct else self._on_link_dispatcher
        deferred, self.deferred = self.deferred, deque()
        for frames in [*deferred, *self.link.receive()]:
            handle(frames)

    def _take_results(self) -> None:
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        while not self.results.empty():
            self._deliver(*self.results.get())

    def _tick(self) -> None:
        now = time.monotonic()
        if self.signalled and not self.stopping:
            self._begin_stop(now)
        if not self.link.direct:
            self.link.reconnect(None if self.stopping else self._announcement())
        if self.granting:
            self.link.beat()
        if not self.stopping and not self.link.direct and now - self.heard > dp.SILENCE_LIMIT:
            self.link.ready(self._announcement())  # the dispatcher may not know us
            self.heard = now
        if self.memory_limit and now >= self.memory_check_at:
            self.memory_check_at = now + MEMORY_CHECK_EVERY
            self._check_memory()
        if self.give_back and not self.inline and self.pending:
            self._give_back_waiting(now)
        if self.refused:
            for conn_id in [c for c, until in self.refused.items() if until < now]:
                del self.refused[conn_id]

    def _announcement(self) -> tuple[bytes, ...]:
        """The READY frames: pid, idle threads, threads, requests received, held conns."""
        return (dp.READY, b"%d" % os.getpid(), b"%d" % max(0, self.threads - self.held),
                b"%d" % self.threads, b"%d" % self.received, *self.active)

    def _check_memory(self) -> None:
        """Past max_worker_memory, leave as after max_requests: finish what is held."""
        resident = psutil.Process().memory_info().rss
        if resident > self.memory_limit and not self.signalled:
            log.warning("worker %d resident memory %d MiB is over max_worker_memory %d MiB",
                        os.getpid(), resident >> 20, self.memory_limit >> 20)
            self._request_stop(f"max_worker_memory {self.memory_limit >> 20} MiB")

    # -- stopping

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_quit)
        signal.signal(signal.SIGQUIT, self._on_quit)

    def _on_term(self, signum: int, frame: Any) -> None:
        self._request_stop("SIGTERM")

    def _request_stop(self, reason: str) -> None:
        """Stop at the loop's next turn, and in any case by graceful_timeout from now."""
        if self.signalled:
            return
        self.signalled = reason
        watchdog = threading.Timer(self.settings.graceful_timeout, self._on_deadline)
        watchdog.daemon = True
        watchdog.start()

    @staticmethod
    def _on_quit(signum: int, frame: Any) -> None:
        _exit_now(b"worker %d: exiting at once on signal %d\n" % (os.getpid(), signum))

    def _on_deadline(self) -> None:
        _exit_now(b"worker %d: graceful_timeout passed with %d requests unfinished\n"
                  % (os.getpid(), self.held))

    def _begin_stop(self, now: float) -> None:
        log.info("worker %d stopping (%s), holding %d requests", os.getpid(), self.signalled,
                 self.held)
        self.stopping, self.stopped_at = True, now
        for frames in self.link.leave():  # direct mode: requests already received
            self._on_link_direct(frames)
        if self.give_back:
            self._return_pending()

    def close(self) -> None:
        """Close the sockets (their linger lets the last responses out) and the board."""
        self.link.close()
        if self.board is not None:
            self.board.close()
        self.context.term()
        os.close(self.wake_r)
        os.close(self.wake_w)

    # -- frames in

    def _on_link_dispatcher(self, frames: list[bytes]) -> None:
        self.heard = time.monotonic()
        command = frames[0]
        if command == dp.REQUEST and len(frames) > 2:
            budgets = frames[1].split()  # with flow control, each response's budget
            for number, raw in enumerate(frames[2:]):
                self.received += 1
                self._on_message(raw, int(budgets[number]) if number < len(budgets) else None,
                                 self.received)
        elif command == dp.NOTICE and len(frames) > 1:
            for raw in frames[1:]:
                self._on_message(raw)
        elif command == dp.BYE:
            self.bye = True
        elif command == dp.GO:
            self._on_go([int(index) for index in frames[1:]])
        elif command != dp.HEARTBEAT:
            self.malformed += 1
            log.warning("unknown frames from the dispatcher: %r", frames[:2])

    def _on_link_direct(self, frames: list[bytes]) -> None:
        self._on_message(frames[0])

    def _on_message(self, raw: bytes, budget: Optional[int] = None, index: int = 0) -> None:
        try:
            message = protocol.parse(raw)
        except ProtocolError as error:
            self.malformed += 1
            log.warning("malformed message #%d (%s): %r", self.malformed, error, raw[:120])
            return
        kind = message.kind
        if kind is Kind.REQUEST or kind is Kind.UPLOAD_DONE:
            self._accept(message, budget, index)
        elif kind is Kind.UPLOAD_START:
            self._upload_started(message)
        else:
            outbox = self.active.get(message.conn_id)
            if outbox is not None:
                outbox.notice(message)

    def _upload_started(self, message: Message) -> None:
        """Direct mode: refuse at once an upload whose declared length is too large.

        (The dispatcher keeps upload-start messages to itself.) The close makes
        mongrel2 abort the upload and delete its file.
        """
        length = message.headers.get(b"content-length")
        limit = self.settings.max_body_size
        if self.link.direct and limit and isinstance(length, bytes) and length.isdigit() \
                and int(length) > limit:
            self._send_refusal(message, 413)

    # -- requests

    def _accept(self, message: Message, budget: Optional[int], index: int) -> None:
        if message.conn_id in self.refused:  # after a smuggling attempt on that connection
            self._discard_upload(message)
            return
        self.held += 1
        outbox = Outbox(message, index, self._pacer(message, budget), *self.outbox_io)
        self.active[message.conn_id] = outbox
        if protocol.is_smuggling_risk(message):
            self.refused[message.conn_id] = time.monotonic() + REFUSED_FOR
            self._discard_upload(message)
            self._refuse(message, outbox, Refused(400, "ambiguous body length (smuggling)"))
        elif not self.inline:
            with self.ready:
                self.pending.append((message, outbox))
                self.ready.notify()
        else:  # served once every frame at hand is taken, so the timer can give back the rest
            self.pending.append((message, outbox))

    def _discard_upload(self, message: Message) -> None:
        """Delete the temp file of an upload that will not be served (if it is one of ours)."""
        path = protocol.upload_file(message, self.uploads) if self.uploads else None
        if path is not None:
            _unlink(path)

    def _pacer(self, message: Message, budget: Optional[int]) -> Pacer:
        """With flow control, the dispatcher gives each response its budget: the bytes
        it may send before it waits for credits (:mod:`circus_wsgi.flowcontrol`)."""
        if not self.flow:
            return Pacer(None)
        if budget is None:
            budget = message.credits or dp.UNKNOWN
        return Pacer(dp.BUDGET, budget)

    def _upload(self, message: Message) -> tuple[Any, int]:
        """An upload's body as a file for wsgi.input, and its length."""
        path = protocol.upload_file(message, self.uploads) if self.uploads else None
        if path is None:
            raise Refused(400, f"upload file {message.upload_path!r} is not in "
                               f"{self.uploads or 'a known directory (set run_dir)'}")
        try:
            body = open(path, "rb")
        except OSError as error:
            raise Refused(400, f"upload file unreadable: {error}") from None
        _unlink(path)  # gone from the disk in every path; the open file still reads
        length = os.fstat(body.fileno()).st_size
        if self.settings.max_body_size and length > self.settings.max_body_size:
            body.close()
            raise Refused(413, f"body of {length} bytes over max_body_size")
        return body, length

    def _refuse(self, message: Message, outbox: Outbox, refusal: Refused) -> None:
        log.warning("refused %s %s: %s", message.headers[b"METHOD"].decode("latin-1"),
                    message.path.decode("latin-1"), refusal)
        started, clock = time.time(), time.perf_counter()
        outbox.status = refusal.status
        outbox.finish(httpmsg.error_response(refusal.status), True)
        if self.logging:
            self._log(self.router.site(message).environ(message), refusal.status, 0, started,
                      clock)

    def _send_refusal(self, message: Message, status: int) -> None:
        """Answer ``status`` and close, for a message that is not a held request."""
        self.link.send(message.conn_id, [
            protocol.response(message.sender, message.conn_id, httpmsg.error_response(status)),
            protocol.close(message.sender, message.conn_id)], True, status)

    def _serve(self, message: Message, outbox: Outbox) -> None:
        """Run the application for one request (in the loop or an application thread).
        (The hot path of every request: the checks that rarely apply are inline.)"""
        inline = self.inline
        if inline:  # on the board before anything of the request is touched (its upload)
            self.busy, self.started = True, time.monotonic()
            cells = self.cells
            cells[1], cells[2] = outbox.index, self.started
        logged = self.logging
        if logged:
            started, clock = time.time(), time.perf_counter()
        body = None
        try:
            length = None
            if message.kind is Kind.UPLOAD_DONE:
                try:
                    body, length = self._upload(message)
                except Refused as refusal:
                    return self._refuse(message, outbox, refusal)
            site = self.router.site(message)
            environ = site.environ(message, body, length)
            headers = message.headers
            exchange = self.exchange_type(outbox, headers[b"METHOD"], wants_keep_alive(message),
                                          headers.get(b"VERSION") == b"HTTP/1.0")
            if inline:
                if self.ticking and not self.timer_on:
                    signal.setitimer(signal.ITIMER_REAL, FLUSH_AFTER, FLUSH_AFTER)
                    self.timer_on = True
            else:
                outbox.absorb()
            if outbox.gone:
                outbox.finish(b"", False)
            else:
                exchange.run(site.app, environ)
        finally:
            if inline:
                self.busy = False
                cells[2] = 0.0
                if time.monotonic() - self.started >= FLUSH_AFTER:
                    self.link.flush()
            if body is not None:
                body.close()
        if logged:
            self._log(environ, exchange.status, exchange.sent, started, clock)

    def _log(self, environ: dict, status: int, sent: int, started: float, clock: float) -> None:
        self.access.log(Entry(environ, status, sent, started, time.perf_counter() - clock))

    def _app_thread(self, number: int) -> None:
        """Application thread ``number``: take the oldest request waiting, run it."""
        cells, index_cell, since_cell = self.cells, 1 + 2 * number, 2 + 2 * number
        while True:
            with self.ready:
                while not self.pending or self.granting and \
                        self.pending[0][1].index not in self.granted:
                    self.ready.wait()
                message, outbox = self.pending.popleft()
                self.granted.discard(outbox.index)
                now = self.running[outbox] = time.monotonic()
                cells[index_cell], cells[since_cell] = outbox.index, now  # in taking order
            try:
                self._serve(message, outbox)
            finally:
                cells[since_cell] = 0.0
                with self.ready:
                    del self.running[outbox]

    # -- a remote worker's leave to begin (circus_wsgi.remote)

    def _may_begin(self) -> bool:
        """Inline: whether the next request waiting has its GO (asking for it if need be)."""
        index = self.pending[0][1].index
        if index in self.granted:
            self.granted.discard(index)
            return True
        if index not in self.asked:
            self._ask()
        return False

    def _ask(self) -> None:
        """Ask to begin the next requests waiting, as many as threads are idle."""
        with self.ready:
            idle = self.threads - (1 if self.busy else len(self.running))
            waiting = [outbox.index for _, outbox in list(self.pending)[:max(idle, 0)]]
        wanted = [i for i in waiting if i not in self.asked and i not in self.granted]
        if wanted:
            self.asked.update(wanted)
            self.asking.append(wanted)
            self.link.take(wanted)

    def _on_go(self, granted: list[int]) -> None:
        """The answer to the oldest TAKE: begin these; drop the others it asked for."""
        asked = self.asking.popleft() if self.asking else []
        self.asked.difference_update(asked)
        refused = set(asked) - set(granted)
        with self.ready:
            self.granted.update(granted)
            if refused:
                self._drop_pending(lambda outbox: outbox.index in refused)
            self.ready.notify_all()

    def _link_renewed(self) -> None:
        """A new link to the front, which has given to others what the old one had not
        begun and answered (502) what it had: those still running send nothing more."""
        self.asking.clear()
        self.asked.clear()
        with self.ready:
            self.granted.clear()
            self._drop_pending(lambda outbox: True)
            for outbox in self.active.values():
                outbox.answered = outbox.gone = True

    def _drop_pending(self, which: Callable[[Outbox], bool]) -> None:
        """Forget the requests waiting that ``which`` names (under ``ready``)."""
        kept = deque(item for item in self.pending if not which(item[1]))
        for _, outbox in self.pending:
            if which(outbox) and self.active.get(outbox.conn_id) is outbox:
                del self.active[outbox.conn_id]
                self.held -= 1
        self.pending = kept

    # -- the inline timer; giving back requests not started (dispatcher's prefetch)

    def _on_timer(self, signum: int, frame: Any) -> None:
        """SIGALRM every FLUSH_AFTER while the application runs inline: send the
        responses kept, connect again if the dispatcher restarted (the next one waits to
        hear which requests are held), and once the request has run for GIVE_BACK_AFTER,
        return the requests not started. (Python runs a handler again if its signal
        comes back before it is done: ``in_io`` keeps a second one out of the socket
        calls of the first.)"""
        if self.busy and not self.in_io:
            self.in_io = True
            try:
                self.link.flush()
                self.access.flush()  # (never busy while the loop thread flushes it)
                self.link.reconnect(None if self.stopping else self._announcement())
                if self.granting:
                    self.link.beat()
                if self.give_back and time.monotonic() - self.started >= dp.GIVE_BACK_AFTER:
                    self._take_back_frames()
                    self._return_pending()
            finally:
                self.in_io = False

    def _take_back_frames(self) -> None:
        """Return the requests waiting in the socket; keep its other frames for the loop."""
        if not self.link.connected:
            return
        conn_ids = []
        while messages := self.link.receive():
            for frames in messages:
                if frames[0] != dp.REQUEST:
                    self.deferred.append(frames)
                    continue
                for raw in frames[2:]:
                    self.received += 1  # numbered as if taken, so both sides count alike
                    fields = raw.split(b" ", 2)
                    if len(fields) == 3 and fields[1].isdigit():
                        conn_ids.append(fields[1])
        self.link.give_back(conn_ids)
        self.returned += len(conn_ids)

    def _return_pending(self) -> None:
        """Return the requests held and not started (none while disconnected)."""
        if not self.link.connected:
            return
        if self.inline:
            waiting = list(self.pending)
            self.pending.clear()
        else:
            with self.ready:
                waiting = list(self.pending)
                self.pending.clear()
        for _, outbox in waiting:
            if self.active.get(outbox.conn_id) is outbox:
                del self.active[outbox.conn_id]
        self.link.give_back([outbox.conn_id for _, outbox in waiting])
        self.held -= len(waiting)
        self.returned += len(waiting)

    def _give_back_waiting(self, now: float) -> None:
        """Threaded: return the waiting requests once every thread has been busy a while."""
        with self.ready:
            running = list(self.running.values())
        if len(running) >= self.threads and now - max(running) >= dp.GIVE_BACK_AFTER:
            self._return_pending()

    # -- messages out (loop thread)

    def _deliver(self, outbox: Outbox, messages: list[bytes], done: bool) -> None:
        previous, self.in_io = self.in_io, True
        try:
            if done and self.signalled and not self.stopping:
                self._begin_stop(time.monotonic())  # LEAVING before the OUTPUT that frees a slot
            if outbox.answered:  # only its end, which frees its thread's slot
                messages = []
            if messages or done:
                self.link.send(outbox.conn_id, messages, done, outbox.status)
        finally:
            self.in_io = previous
        if done:
            self._done(outbox)

    def _done(self, outbox: Outbox) -> None:
        if self.active.get(outbox.conn_id) is outbox:
            del self.active[outbox.conn_id]
        self.held -= 1
        self.served += 1
        if self.limit and self.served >= self.limit:
            self._request_stop(f"max_requests {self.limit}")

    def _hand_over(self, outbox: Outbox, messages: list[bytes], done: bool) -> None:
        """From an application thread: the loop thread sends these."""
        self.results.put((outbox, messages, done))
        try:
            os.write(self.wake_w, b"r")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def _pump(self, outbox: Outbox, timeout: float) -> None:
        """Inline: wait for notices while the application's response waits for credits."""
        previous, self.in_io = self.in_io, True
        try:
            self._poll(timeout)
            if self.give_back and time.monotonic() - self.started >= dp.GIVE_BACK_AFTER:
                self._return_pending()
        finally:
            self.in_io = previous


def _unlink(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError as error:
        log.warning("cannot delete upload file %r: %s", path, error)


def _exit_now(line: bytes) -> None:
    """Leave at once, from a signal handler: no locks, no cleanup but the log's last line."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError, RuntimeError):
        pass
    os.write(2, line)
    os._exit(exits.EXIT_OK)


# --------------------------------------------------------------------------
# Entry point


def build_router(settings: Settings) -> Router:
    """The applications of ``settings`` (root and mounts), each as a :class:`Site`."""
    os.environ.update(dict(settings.env))
    prepare_path(settings.chdir, settings.virtualenv)
    if not settings.app:
        raise AppLoadError("no application given: circus-wsgi worker MODULE:CALLABLE")
    options = dict(bind=settings.bind, multithread=settings.threads > 1,
                   multiprocess=settings.workers > 1,
                   proxies=Proxies(settings.forwarded_allow_ips)
                   if settings.forwarded_allow_ips else None)
    root = Site(load_app(settings.app), "/", **options)
    mounts = [Site(app, prefix, **options) for prefix, app in load_mounts(settings.mounts)]
    return Router(root, mounts)


def run_worker(settings: Settings) -> int:
    """Entry point of ``circus-wsgi worker``: serve until stopped; the exit status."""
    logging.basicConfig(stream=sys.stderr, level=settings.log_level.upper(), force=True,
                        format="%(asctime)s [%(process)d] [%(levelname)s] %(message)s")
    die_with_parent()
    tune_malloc()
    try:
        router = build_router(settings)
        access = AccessLog(settings.access_log, settings.access_log_format)
        worker_hooks = hooks.WorkerHooks(settings)
        worker = Worker(settings, router, access)
        worker_hooks.install(worker)
    except (AppLoadError, ValueError, OSError) as error:
        print("circus-wsgi worker: " + " ".join(str(error).split()), file=sys.stderr)
        return exits.EXIT_USAGE
    worker_hooks.post_worker_init()
    try:
        return worker.run()
    finally:
        worker_hooks.worker_exit()
        worker.close()
        access.close()
