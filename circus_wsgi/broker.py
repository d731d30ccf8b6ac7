"""The broker: where every request is, which worker holds what, and when the stack
answers for the application. Sans-IO: events in (method calls, each given the
time), actions out; no sockets, no clock, no files. :mod:`circus_wsgi.dispatcher`
feeds it from its sockets and carries out what it decides.

A request's states, and the only transitions allowed (:data:`TRANSITIONS`):

=============  ==============================================================
QUEUED         waiting for a worker, oldest first (re-queued ones at the head)
BEHIND         pipelined behind an earlier request of its connection not ended
HELD           handed to a worker, which may or may not have begun it
RESPONDING     the worker said part of its response went out
ORPHANED       held by a worker, but its client went with a restarted mongrel2
DONE           the worker finished its response                       (end)
FAILED         the broker answered it (503, 502, 504) or closed it    (end)
DROPPED        its client left before anything was owed to it         (end)
=============  ==============================================================

=====================  ========================  =============================
event                  from                      to
=====================  ========================  =============================
arrive                 (new)                     QUEUED, BEHIND, FAILED (queue full)
dispatch               QUEUED                    HELD
done (of the one       BEHIND                    QUEUED (head)
before it)
output: started        HELD                      RESPONDING
output: done           HELD, RESPONDING          DONE
output: done           ORPHANED                  DROPPED
returned               HELD                      QUEUED (head)
returned               ORPHANED                  DROPPED
worker gone            HELD, not begun           QUEUED (head, in its order)
worker gone            HELD, ended unsent,       QUEUED (head: run again)
                       idempotent, no upload
worker gone            HELD, running, or ended   FAILED (502)
                       unsent otherwise
worker gone            RESPONDING                FAILED (connection closed)
worker gone            ORPHANED                  DROPPED
tick: timeout          HELD (the oldest, one     FAILED (504; the worker is killed)
                       per thread)
tick: queue_timeout    QUEUED                    FAILED (503)
disconnect             QUEUED, BEHIND            DROPPED
a request before it    BEHIND                    DROPPED
fails
mongrel2 restarted     QUEUED, BEHIND            DROPPED
mongrel2 restarted     HELD, RESPONDING          ORPHANED
stop                   QUEUED                    FAILED (503)
stop                   HELD, RESPONDING          FAILED (connection closed)
stop                   BEHIND, ORPHANED          DROPPED
=====================  ========================  =============================

Whether a held request was begun comes from the worker: it numbers the requests it
receives on its connection as the broker numbers those it hands out
(:attr:`Request.index`), runs them in that order, and records in shared memory
the number of each before the application is called, and while it runs
(:mod:`circus_wsgi.board`). When it dies, the dispatcher reads that record:
requests numbered above the last one begun never reached the application and go
to another worker. One running at its death gets 502: it may be what killed it.
One that had ended, its response kept to go out with the next batch, lost that
response: if its method is idempotent and it has no upload (whose file the
worker has read and deleted), it runs again on another worker, as a proxy such
as nginx retries such a request on its next upstream; otherwise 502. Without a
record, every request it held counts as running.

A worker's free threads are its *slots*, handed out least recently freed first,
those of this host's workers before those of remote ones (a request waits less
on a worker that needs no network). While no thread is free, a worker may be
given up to ``prefetch`` more requests (a local one first, then the one holding
the fewest), except one that has finished nothing for :data:`STALLED_WORKER`
plus its round trip (it is busy with a slow request) or that gave requests back
and has finished none since.

A remote worker has no board in shared memory: it asks before it begins a
request (:meth:`Broker.take`), and is told which it may begin; what it was told
counts as begun when it is gone. A remote worker also gets one request more per
thread than ``prefetch``, to run while it asks for the next. An upload goes to
this host's workers only: its body is a file here.

Actions, collected in :attr:`Broker.actions` and taken by the dispatcher with
:meth:`Broker.take_actions`: :class:`Fail` (answer with an error and close),
:class:`Close` (close a connection whose response had begun), :class:`Kill`
(a stuck worker), :class:`Discard` (a request that ended unanswered: delete its
upload file). Requests to hand out are taken per worker with
:meth:`Broker.take_batches`, at the end of each loop turn.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Sequence, Union

from .tallies import Histogram, method_label

# A request's states.
QUEUED, BEHIND, HELD, RESPONDING, ORPHANED, DONE, FAILED, DROPPED = range(8)
STATE_NAMES = ("queued", "behind", "held", "responding", "orphaned", "done", "failed",
               "dropped")
#: The transitions a request may make (the table above); anything else is a bug.
TRANSITIONS = {
    QUEUED: {HELD, FAILED, DROPPED},
    BEHIND: {QUEUED, DROPPED},
    HELD: {RESPONDING, DONE, QUEUED, FAILED, ORPHANED},
    RESPONDING: {DONE, FAILED, ORPHANED},
    ORPHANED: {DROPPED},
    DONE: set(),
    FAILED: set(),
    DROPPED: set(),
}
#: States in which a worker holds the request.
HOLDING = frozenset((HELD, RESPONDING, ORPHANED))

#: A worker holding requests that has finished none for this long (seconds) is busy
#: with a slow one: it gets no prefetched request until it finishes something.
STALLED_WORKER = 0.005
#: After a worker's process exits, how long its last messages (sent, perhaps not yet
#: read) may take to arrive before what it still holds is settled.
EXIT_GRACE = 0.1
#: A worker killed for a stuck request that is still there this long after (it caught
#: the signal) gets 504 for everything it holds past timeout.
KILL_GRACE = 5.0


class Request:
    """One request from mongrel2, from arrival to its end."""

    __slots__ = ("conn", "sender", "raw", "method", "arrived", "queued_at", "upload", "state",
                 "worker", "index", "handed_at")

    def __init__(self, conn: bytes, sender: bytes, raw: bytes, arrived: float,
                 upload: bytes | None = None, method: str = "_OTHER") -> None:
        self.conn, self.sender, self.raw, self.arrived = conn, sender, raw, arrived
        self.method = method  # its method as a label (tallies.method_label)
        self.queued_at = arrived  # queue_timeout counts from here (pipelined: from release)
        self.upload = upload  # its body's temp file, for an upload
        self.state = QUEUED
        self.worker: bytes = b""  # who holds it, while held
        self.index = 0  # its number among the requests handed to that worker
        self.handed_at = -1.0  # when it was last handed out (never: negative)

    def __repr__(self) -> str:
        return f"<Request {self.conn!r} {STATE_NAMES[self.state]}>"


class Worker:
    """What the broker knows of one connected worker process."""

    __slots__ = ("id", "pid", "host", "threads", "free", "held", "handed", "began", "begun",
                 "round_trip", "returned", "progress", "leaving", "doomed", "exited",
                 "dispatched", "completed", "failed")

    def __init__(self, identity: bytes, pid: int, received: int, host: str = "") -> None:
        self.id, self.pid = identity, pid
        self.host = host  # "" for this host's, else the remote host's address
        self.threads = 1
        self.free = 0  # idle threads not yet given a request: one slot entry each
        self.held: dict[bytes, Request] = {}  # conn -> request, in hand-out order
        self.handed = received  # the number of the last request handed to it
        self.began = received  # remote: the number of the last it was told to begin
        self.begun: dict[int, float] = {}  # remote: number -> when it was told to begin it
        self.round_trip = 0.0  # remote: seconds of a message there and back
        self.returned = False  # gave requests back: no prefetch until it finishes one
        self.progress = 0.0  # when it last finished a request or, idle, was given one
        self.leaving = False  # said it is stopping: takes nothing new
        self.doomed: float | None = None  # when killed for a stuck request: takes nothing new
        self.exited: float | None = None  # when its process was seen to exit
        self.dispatched = self.completed = self.failed = 0

    @property
    def retired(self) -> bool:
        """Leaving, killed or exited: it gets no new request."""
        return self.leaving or self.doomed is not None or self.exited is not None

    @property
    def key(self) -> str:
        """How the status names it: its pid, and a remote one's host before it."""
        return f"{self.host}:{self.pid}" if self.host else str(self.pid)

    @property
    def state(self) -> str:
        """idle, busy or leaving, as the status and metrics show it."""
        if self.retired:
            return "leaving"
        return "busy" if self.held else "idle"


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer ``request`` with ``status`` and close its connection."""

    request: Request
    status: int
    reason: str
    retry_after: bool = False


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection of ``request``, whose response had begun."""

    request: Request
    reason: str


@dataclass(frozen=True, slots=True)
class Kill:
    """Kill the worker process ``pid`` (of ``host``, "" for this one): it has been stuck
    on a request. (A remote one cannot be killed from here: it just gets nothing more.)"""

    pid: int
    reason: str
    host: str = ""


@dataclass(frozen=True, slots=True)
class Discard:
    """``request`` ended unanswered (its client left): delete its upload file, if any."""

    request: Request


Action = Union[Fail, Close, Kill, Discard]


class Broker:
    """Every request and worker of one dispatcher; see the module's tables.

    Each connection with a request not ended has a *front*: its oldest such
    request, QUEUED or held by a worker. Those after it wait BEHIND it, so a
    connection's requests reach the application in order, one at a time.
    """

    def __init__(self, *, prefetch: int, max_queue: int, queue_timeout: float,
                 timeout: float, replayable: Callable[[bytes], bool]) -> None:
        self.prefetch, self.max_queue = prefetch, max_queue
        self.queue_timeout, self.timeout = queue_timeout, timeout
        self.replayable = replayable  # whether a request (its raw bytes) may run twice
        self.queue: deque[Request] = deque()  # QUEUED fronts (and ended ones, skipped)
        self.fronts: dict[bytes, Request] = {}  # conn -> its front request
        self.behind: dict[bytes, deque[Request]] = {}  # conn -> BEHIND its front, in order
        self.in_flight: dict[bytes, Request] = {}  # conn -> its front, held by a worker
        self.workers: dict[bytes, Worker] = {}
        # One entry per free slot, least recently freed first: this host's workers', and
        # remote ones' (used only once no local one is free).
        self.slots: deque[bytes] = deque()
        self.remote_slots: deque[bytes] = deque()
        self.batches: dict[bytes, list[Request]] = {}  # handed out this turn, per worker
        self.actions: list[Action] = []
        # Totals since start: handed_out = completed + failed_held + given_back + requeued
        # + the requests held now.
        self.arrived = self.handed_out = self.completed = self.given_back = 0
        self.requeued = self.failed_held = self.dropped = self.replayed = 0
        self.failures: Counter[str] = Counter()  # "503 queue full" -> count
        # Every answered request by (method, status), and each wait from arrival to the
        # first hand-out: seconds.
        self.durations = Histogram()
        self.waits = Histogram()

    # ------------------------------------------------------------ arrivals

    def arrive(self, conn: bytes, sender: bytes, raw: bytes, now: float,
               upload: bytes | None = None, method: bytes = b"") -> None:
        """A request from mongrel2 (``upload``: its body's temp file, checked genuine)."""
        self.arrived += 1
        request = Request(conn, sender, raw, now, upload, method_label(method))
        if conn in self.fronts:
            request.state = BEHIND
            waiting = self.behind.get(conn)
            if waiting is None:
                self.behind[conn] = deque((request,))
            else:
                waiting.append(request)
            return
        if len(self.queue) >= self.max_queue:  # counting those that ended while queued
            self.dispatch(now)  # those arrived at this wake-up may have slots
            self.queue = deque(r for r in self.queue if r.state == QUEUED)
            if len(self.queue) >= self.max_queue:
                return self._fail(request, now, 503, "queue full", retry_after=True)
        self.fronts[conn] = request
        self.queue.append(request)

    def disconnect(self, conn: bytes) -> bytes | None:
        """The client of ``conn`` left: drop what waits for it; the id of the worker
        holding its request, which must be told, or None."""
        self._end_behind(conn)
        front = self.fronts.get(conn)
        if front is None:
            return None
        if front.state == QUEUED:
            self._drop(front)
            return None
        return front.worker

    def holder(self, conn: bytes) -> bytes | None:
        """The id of the worker holding the request of ``conn`` (for its notices)."""
        request = self.in_flight.get(conn)
        return None if request is None else request.worker

    def mongrel2_restarted(self) -> list[Request]:
        """mongrel2 went away and came back: every client it had is gone. What waits is
        dropped; what workers hold is orphaned (their responses must be discarded:
        the new mongrel2 gives its connections ids the old one used). Returns the
        orphans: their workers are to be told that the clients left."""
        for request in self.queue:
            if request.state == QUEUED:
                self._drop(request)
        self.queue.clear()
        for conn in list(self.behind):
            self._end_behind(conn)
        for request in self.in_flight.values():
            request.state = ORPHANED
        self.fronts = dict(self.in_flight)
        return list(self.in_flight.values())

    # ----------------------------------------------------------- workers

    def worker_ready(self, identity: bytes, pid: int, free: int, threads: int,
                     received: int, now: float, host: str = "") -> None:
        """A worker announced itself (first on its connection, then now and again):
        ``free`` of its ``threads`` are idle; it has received ``received`` requests
        before this connection (where this broker's numbering of them starts);
        ``host``: a remote worker's address ("" for this host's)."""
        worker = self.workers.get(identity)
        if worker is None:
            worker = self.workers[identity] = Worker(identity, pid, received, host)
        worker.leaving = False
        worker.threads = threads
        worker.free = free
        worker.progress = now
        self._rebuild_slots()

    def leaving(self, identity: bytes) -> Worker | None:
        """The worker takes nothing new; it finishes what it holds."""
        worker = self.workers.get(identity)
        if worker is not None:
            worker.leaving = True
            self._rebuild_slots()
        return worker

    def output(self, identity: bytes, done: Sequence[bytes], started: Iterable[bytes],
               now: float, statuses: Sequence[bytes]) -> set[bytes] | None:
        """The worker sent responses: ``started`` have begun, ``done`` are finished, with
        ``statuses`` (their HTTP statuses as digits, one per ``done``; b"" if unknown).
        Returns the connections among them whose messages must be discarded (orphans),
        or None (the usual case)."""
        in_flight = self.in_flight
        discard = None
        for conn in started:
            request = in_flight.get(conn)
            if request is not None and request.worker == identity:
                if request.state == HELD:
                    request.state = RESPONDING
                elif request.state == ORPHANED:
                    discard = (discard or set()) | {conn}
        worker = self.workers.get(identity)
        observe = self.durations.observe
        for conn, status in zip(done, statuses, strict=True):
            request = in_flight.get(conn)
            if request is None or request.worker != identity:
                continue
            del in_flight[conn]
            self.completed += 1
            if worker is not None:
                del worker.held[conn]
                worker.completed += 1
            if request.state == ORPHANED:
                discard = (discard or set()) | {conn}
                self._orphan_ended(request, now)
                continue
            request.state = DONE
            if status:
                observe((request.method, status), now - request.arrived)
            if conn in self.behind:
                self._next_front(conn, now)
            else:
                del self.fronts[conn]
        if worker is not None and done:
            worker.progress = now
            worker.returned = False
            if not worker.retired:
                spare = worker.threads - len(worker.held) - worker.free
                if spare > 0:
                    worker.free += spare
                    (self.remote_slots if worker.host else self.slots).extend(
                        [identity] * spare)
        return discard

    def take(self, identity: bytes, indexes: Iterable[int], now: float) -> list[int]:
        """A remote worker asks to begin the requests numbered ``indexes``: those it
        still holds unbegun may be (from now on they count as begun, and run: see
        :meth:`running`); the others ended meanwhile (504, or its client left with a
        restarted mongrel2)."""
        worker = self.workers.get(identity)
        if worker is None:
            return []
        held = {r.index: r for r in worker.held.values() if r.state == HELD}
        granted = [i for i in indexes if i in held]
        if granted:
            worker.began = max(worker.began, *granted)
            worker.begun = self.running(identity)  # what ended since is forgotten
            worker.begun.update(dict.fromkeys(granted, now))
        return granted

    def running(self, identity: bytes) -> dict[int, float]:
        """What a remote worker runs: the number of each request it was told to begin and
        still holds (its response begun or not), and when it was told."""
        worker = self.workers.get(identity)
        if worker is None:
            return {}
        holds = {r.index for r in worker.held.values()}
        return {index: since for index, since in worker.begun.items() if index in holds}

    def round_trip(self, identity: bytes, seconds: float) -> None:
        """A remote worker's messages take ``seconds`` there and back (a recent measure)."""
        worker = self.workers.get(identity)
        if worker is not None:
            worker.round_trip = seconds

    def returned(self, identity: bytes, conns: Iterable[bytes], now: float) -> None:
        """The worker gives back requests it has not begun: to the head of the queue,
        in their order."""
        worker = self.workers.get(identity)
        if worker is None:
            return
        back = []
        for conn in conns:
            request = worker.held.get(conn)
            if request is None:
                continue
            if request.state == HELD:
                back.append(request)
            elif request.state == ORPHANED:  # nobody waits for it any more
                self._unhold(worker, request)
                self.given_back += 1
                self._orphan_ended(request, now)
        for request in reversed(back):
            self._unhold(worker, request)
            self.given_back += 1
            self._requeue(request)
        if back:
            worker.returned = True

    def worker_exited(self, identity: bytes, now: float) -> None:
        """The worker's process ended. It gets nothing more; what it holds is settled
        once its connection ends, or :meth:`tick` says to :data:`EXIT_GRACE` later (a
        child it forked may keep the connection open)."""
        worker = self.workers.get(identity)
        if worker is not None and worker.exited is None:
            worker.exited = now
            self._rebuild_slots()

    def worker_gone(self, identity: bytes, began: int | None, running: Collection[int],
                    now: float, reason: str = "worker exited") -> Worker | None:
        """The worker is gone. ``began``: the number of the last request it began (None:
        no record, all may have been); ``running``: those it was running. What it had not
        begun goes back to the queue, with what had ended unsent and may run again; the
        rest is answered. Returns the worker, or None if unknown."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return None
        self.batches.pop(identity, None)  # not sent yet: those requests are held, below
        back = []
        for request in worker.held.values():
            del self.in_flight[request.conn]
            if request.state == HELD and began is not None and (
                    request.index > began or request.index not in running and
                    request.upload is None and self.replayable(request.raw)):
                if request.index <= began:
                    self.replayed += 1
                back.append(request)
                continue
            worker.failed += 1
            self.failed_held += 1
            if request.state == ORPHANED:
                self._orphan_ended(request, now)
            elif request.state == RESPONDING:
                self._close(request, "closed: " + reason)
            else:
                self._fail(request, now, 502, reason)
        worker.held = {}
        for request in reversed(back):
            self.requeued += 1
            self._requeue(request)
        self._rebuild_slots()
        return worker

    # ------------------------------------------------------- dispatching

    def dispatch(self, now: float) -> None:
        """Hand queued requests to free slots, oldest request to the least recently freed
        slot; while no slot is free, prefetch to the worker holding the fewest."""
        queue, slots, workers = self.queue, self.slots, self.workers
        in_flight, batches = self.in_flight, self.batches
        while queue:
            request = queue.popleft()
            if request.state != QUEUED:
                continue  # dropped or failed while it waited
            while slots:
                worker = workers.get(slots.popleft())
                if worker is not None and worker.free > 0 and not worker.retired:
                    worker.free -= 1
                    break
            else:  # (an upload's body is a file on this host: for this host's workers only)
                local_only = request.upload is not None
                worker = self._remote_slot() if self.remote_slots and not local_only \
                    else None
                if worker is None:
                    worker = self._prefetch_target(now, local_only)
                if worker is None:
                    queue.appendleft(request)
                    return
            if not worker.held:
                worker.progress = now  # busy from now
            if request.handed_at < 0:
                self.waits.observe((), now - request.arrived)
            worker.dispatched += 1
            worker.handed += 1
            request.state, request.worker, request.index = HELD, worker.id, worker.handed
            request.handed_at = now
            worker.held[request.conn] = request
            in_flight[request.conn] = request
            self.handed_out += 1
            batch = batches.get(worker.id)
            if batch is None:
                batches[worker.id] = [request]
            else:
                batch.append(request)

    def _remote_slot(self) -> Worker | None:
        """A free slot of a remote worker (taken), or None."""
        while self.remote_slots:
            worker = self.workers.get(self.remote_slots.popleft())
            if worker is not None and worker.free > 0 and not worker.retired:
                worker.free -= 1
                return worker
        return None

    def _prefetch_target(self, now: float, local_only: bool = False) -> Worker | None:
        """The worker with room beyond its threads that holds the fewest requests, a local
        one before a remote one (``local_only``: no remote one), leaving out those that
        have finished nothing for :data:`STALLED_WORKER` (and, remote, their round trip)."""
        best, fewest = None, None
        stalled = now - STALLED_WORKER
        limit = self.prefetch
        for worker in self.workers.values():
            held = len(worker.held)
            if worker.host:  # remote: one more per thread, and it takes a round trip
                if local_only or worker.returned or worker.retired or \
                        held >= 2 * worker.threads + limit or \
                        worker.progress < stalled - worker.round_trip:
                    continue
                held += 1 << 20  # after any local one
            elif worker.returned or worker.retired or held >= worker.threads + limit or \
                    worker.progress < stalled:
                continue
            if fewest is None or held < fewest:
                best, fewest = worker, held
        return best

    def take_batches(self) -> dict[bytes, list[Request]]:
        """The requests handed out since the last call, per worker id, in order."""
        batches, self.batches = self.batches, {}
        return batches

    def take_actions(self) -> list[Action]:
        """What the dispatcher must do, in order, since the last call."""
        actions, self.actions = self.actions, []
        return actions

    # -------------------------------------------------------------- time

    def tick(self, now: float) -> list[bytes]:
        """Deadlines: queue_timeout (503), timeout (504 and a kill). Returns the ids of
        the workers whose process exited :data:`EXIT_GRACE` ago and whose connection
        is still open: they are gone (:meth:`worker_gone`)."""
        if self.queue:  # all of it: the head may be a request released just now
            queue_limit = now - self.queue_timeout
            for request in self.queue:
                if request.state == QUEUED and request.queued_at < queue_limit:
                    self._fail(request, now, 503, "no worker took it in queue_timeout",
                               retry_after=True)
            self.queue = deque(r for r in self.queue if r.state == QUEUED)
        stuck_limit = now - self.timeout
        for worker in list(self.workers.values()):
            # Of what it holds, at most one request per thread runs: the oldest. The rest
            # are settled by its board once the killed worker is gone.
            if worker.doomed is not None and now < worker.doomed + KILL_GRACE:
                continue
            stuck = [r for r in worker.held.values()
                     if r.state == HELD and r.handed_at < stuck_limit]
            for request in stuck if worker.doomed is not None else stuck[:worker.threads]:
                self._stuck(worker, request, now)
        exit_limit = now - EXIT_GRACE
        return [w.id for w in self.workers.values()
                if w.exited is not None and w.exited < exit_limit]

    def _stuck(self, worker: Worker, request: Request, now: float) -> None:
        """No response began within timeout: 504, and the worker is killed (a new one
        takes its place; what it held and had not begun goes to others when it dies)."""
        self._unhold(worker, request)
        worker.failed += 1
        self.failed_held += 1
        self._fail(request, now, 504, "response not started within timeout")
        if worker.doomed is None:
            worker.doomed = now
            self.actions.append(Kill(worker.pid, f"stuck for {self.timeout:g}s on a request",
                                     worker.host))
            self._rebuild_slots()

    def refused(self, status: int, reason: str, method: bytes) -> None:
        """A request admission answered itself (400, 413): counted with the others."""
        self.failures[f"{status} {reason}"] += 1
        self.durations.observe((method_label(method), b"%d" % status), 0.0)

    # ------------------------------------------------------------ stopping

    def stop(self, now: float) -> None:
        """The dispatcher stops for good: the connections of what workers still hold are
        closed (what was pipelined behind goes with them); what waits gets 503."""
        for request in list(self.in_flight.values()):
            worker = self.workers[request.worker]
            self._unhold(worker, request)
            worker.failed += 1
            self.failed_held += 1
            if request.state == ORPHANED:
                self._orphan_ended(request, now)
            else:
                self._close(request, "closed: dispatcher stopping")
        while self.queue:
            request = self.queue.popleft()
            if request.state == QUEUED:
                self._fail(request, now, 503, "dispatcher stopping", retry_after=True)

    @property
    def idle(self) -> bool:
        """Nothing waits and no worker holds anything."""
        return not self.fronts

    # ---------------------------------------------------------- internals

    def _unhold(self, worker: Worker, request: Request) -> None:
        del worker.held[request.conn]
        del self.in_flight[request.conn]

    def _requeue(self, request: Request) -> None:
        """Back to the head of the queue; it stays its connection's front."""
        request.state, request.worker = QUEUED, b""
        self.queue.appendleft(request)

    def _next_front(self, conn: bytes, now: float) -> None:
        """The front of ``conn`` ended well: the next pipelined request takes its place,
        at the head of the queue."""
        waiting = self.behind[conn]
        request = waiting.popleft()
        if not waiting:
            del self.behind[conn]
        request.state, request.queued_at = QUEUED, now
        self.fronts[conn] = request
        self.queue.appendleft(request)

    def _orphan_ended(self, request: Request, now: float) -> None:
        """An orphan ends unanswered; a new client's request may wait behind it."""
        self._drop(request)
        if request.conn in self.behind:
            self._next_front(request.conn, now)

    def _end_behind(self, conn: bytes) -> None:
        """What waits behind the front of ``conn`` is dropped (its connection closes)."""
        for request in self.behind.pop(conn, ()):
            self._drop(request)

    def _fail(self, request: Request, now: float, status: int, reason: str,
              retry_after: bool = False) -> None:
        request.state = FAILED
        self.failures[f"{status} {reason}"] += 1
        self.durations.observe((request.method, b"%d" % status), now - request.arrived)
        self.actions.append(Fail(request, status, reason, retry_after))
        self._front_closed(request)

    def _close(self, request: Request, reason: str) -> None:
        request.state = FAILED
        self.failures[reason] += 1
        self.actions.append(Close(request, reason))
        self._front_closed(request)

    def _front_closed(self, request: Request) -> None:
        """The stack answered ``request`` and closed its connection: if it was the
        front, what waits behind it goes too."""
        if self.fronts.get(request.conn) is request:
            del self.fronts[request.conn]
            self._end_behind(request.conn)

    def _drop(self, request: Request) -> None:
        """It ends unanswered; a front leaves its connection with none (what waits
        behind it is the caller's to drop or move up)."""
        request.state = DROPPED
        self.dropped += 1
        if request.upload:
            self.actions.append(Discard(request))
        if self.fronts.get(request.conn) is request:
            del self.fronts[request.conn]

    def _rebuild_slots(self) -> None:
        """One slot entry per free thread of each worker that takes work, in LRU order."""
        self.slots = self._slots_of(self.slots, remote=False)
        self.remote_slots = self._slots_of(self.remote_slots, remote=True)

    def _slots_of(self, slots: deque[bytes], remote: bool) -> deque[bytes]:
        seen: Counter[bytes] = Counter()
        kept: deque[bytes] = deque()
        workers = self.workers
        for identity in slots:
            worker = workers.get(identity)
            if worker is not None and not worker.retired and seen[identity] < worker.free:
                seen[identity] += 1
                kept.append(identity)
        for identity, worker in workers.items():
            if bool(worker.host) == remote and not worker.retired and \
                    worker.free > seen[identity]:
                kept.extend([identity] * (worker.free - seen[identity]))
        return kept

    # ------------------------------------------------------------ reading

    def waiting(self) -> int:
        """Requests queued now (pipelined ones behind others not counted)."""
        return sum(1 for request in self.queue if request.state == QUEUED)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The counters and the current state, as JSON-ready data. ``durations``: every
        answered request by method and status; ``waits``: from arrival to hand-out."""
        workers = self.workers.values()
        queued = [r.queued_at for r in self.queue if r.state == QUEUED]
        return {
            "queue": len(queued),
            "oldest_wait": round(now - min(queued), 6) if queued else 0.0,
            "in_flight": len(self.in_flight),
            "active": len(self.fronts) + sum(len(w) for w in self.behind.values()),
            "prefetched": sum(max(0, len(w.held) - w.threads) for w in workers),
            "busy_workers": sum(1 for w in workers if w.state == "busy"),
            "idle_workers": sum(1 for w in workers if w.state == "idle"),
            "leaving_workers": sum(1 for w in workers if w.state == "leaving"),
            "arrived": self.arrived,
            "handed_out": self.handed_out,
            "completed": self.completed,
            "failed_held": self.failed_held,
            "given_back": self.given_back,
            "requeued": self.requeued,
            "replayed": self.replayed,
            "dropped": self.dropped,
            "failures": dict(self.failures),
            "durations": self.durations.snapshot(),
            "waits": self.waits.snapshot(),
            "workers": {
                w.key: {"state": w.state, "host": w.host, "pid": w.pid, "free": w.free,
                        "holding": len(w.held), "leaving": w.leaving,
                        "dispatched": w.dispatched, "completed": w.completed,
                        "failed": w.failed}
                for w in workers},
        }
