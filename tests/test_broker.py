"""The broker on its own: events in, actions out, on a fake clock (plain numbers).

No sockets, no processes, no sleeps. The last test drives it with hypothesis
through any interleaving of arrivals, hand-outs, worker deaths, give-backs,
disconnects, completions and mongrel2 restarts, against a model of the workers
that numbers and begins requests as real ones do (:mod:`circus_wsgi.board`).
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st

from circus_wsgi import broker as b
from circus_wsgi.broker import Broker, Close, Discard, Fail, Kill


def make(prefetch: int = 0, max_queue: int = 100, queue_timeout: float = 5.0,
         timeout: float = 30.0) -> Broker:
    return Broker(prefetch=prefetch, max_queue=max_queue, queue_timeout=queue_timeout,
                  timeout=timeout, replayable=lambda raw: raw.startswith(b"GET"))


def arrive(broker: Broker, conn: bytes, now: float = 0.0, upload: bytes | None = None) -> None:
    broker.arrive(conn, b"sender", b"POST " + conn, now, upload)


def handed(broker: Broker, now: float = 0.0) -> dict[bytes, list[bytes]]:
    """Dispatch, then the connections handed to each worker."""
    broker.dispatch(now)
    return {w: [r.conn for r in batch] for w, batch in broker.take_batches().items()}


def output(broker: Broker, worker: bytes, done: list[bytes], started: list[bytes],
           now: float) -> set[bytes] | None:
    """The worker's OUTPUT: ``done`` answered 200."""
    return broker.output(worker, done, started, now, [b"200"] * len(done))


def kinds(broker: Broker) -> list[tuple]:
    """The actions taken, each as (kind, connection or pid, status or reason)."""
    out = []
    for action in broker.take_actions():
        if isinstance(action, Fail):
            out.append(("fail", action.request.conn, action.status))
        elif isinstance(action, Close):
            out.append(("close", action.request.conn))
        elif isinstance(action, Kill):
            out.append(("kill", action.pid))
        else:
            out.append(("discard", action.request.conn))
    return out


# ---------------------------------------------------------------- dispatching


def test_the_oldest_request_goes_to_the_least_recently_freed_slot():
    broker = make()
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    broker.worker_ready(b"B", 2, 1, 1, 0, 0.0)
    arrive(broker, b"1")
    arrive(broker, b"2")
    assert handed(broker) == {b"A": [b"1"], b"B": [b"2"]}
    output(broker, b"B", [b"2"], [], 1.0)  # B is freed first
    output(broker, b"A", [b"1"], [], 1.1)
    arrive(broker, b"3")
    assert handed(broker) == {b"B": [b"3"]}


def test_requests_are_numbered_per_worker_from_what_it_received_before():
    broker = make(prefetch=4)
    broker.worker_ready(b"A", 1, 1, 1, 7, 0.0)  # it had received 7 from a previous dispatcher
    for conn in (b"1", b"2", b"3"):
        arrive(broker, conn)
    broker.dispatch(0.0)
    assert [r.index for r in broker.take_batches()[b"A"]] == [8, 9, 10]


def test_pipelined_requests_wait_behind_the_one_before_them():
    broker = make()
    broker.worker_ready(b"A", 1, 2, 2, 0, 0.0)
    arrive(broker, b"1")
    arrive(broker, b"1")  # pipelined on the same connection
    assert handed(broker) == {b"A": [b"1"]}
    assert broker.waiting() == 0 and len(broker.behind[b"1"]) == 1
    output(broker, b"A", [b"1"], [], 1.0)
    assert handed(broker) == {b"A": [b"1"]}  # now the second one


def test_a_full_queue_answers_503_with_retry_after():
    broker = make(max_queue=2)
    for conn in (b"1", b"2", b"3"):
        arrive(broker, conn)
    (action,) = broker.take_actions()
    assert (action.request.conn, action.status, action.retry_after) == (b"3", 503, True)


def test_no_worker_within_queue_timeout_is_503():
    broker = make(queue_timeout=5.0)
    arrive(broker, b"1", now=0.0)
    broker.tick(4.9)
    assert kinds(broker) == []
    broker.tick(5.1)
    assert kinds(broker) == [("fail", b"1", 503)]


def test_prefetch_only_while_no_slot_is_free_and_not_to_a_stalled_worker():
    broker = make(prefetch=2)
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    arrive(broker, b"1")
    arrive(broker, b"2")
    assert handed(broker, 0.0) == {b"A": [b"1", b"2"]}  # the second one prefetched
    arrive(broker, b"3")
    assert handed(broker, 1.0) == {}  # A has finished nothing for a second: stalled


def test_a_returned_request_goes_first_and_not_back_to_its_worker():
    broker = make(prefetch=2)
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    for conn in (b"1", b"2"):
        arrive(broker, conn)
    assert handed(broker) == {b"A": [b"1", b"2"]}
    arrive(broker, b"3")
    broker.returned(b"A", [b"2"], 0.0)
    broker.worker_ready(b"B", 2, 1, 1, 0, 0.0)
    assert handed(broker) == {b"B": [b"2", b"3"]}  # A gave back: no prefetch to it now
    assert broker.given_back == 1


# ------------------------------------------------------------- worker deaths


def held_by_a(broker: Broker, count: int) -> None:
    """Worker A (1 thread, prefetch) holding requests 1..count."""
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    for number in range(1, count + 1):
        arrive(broker, b"%d" % number)
    assert handed(broker) == {b"A": [b"%d" % n for n in range(1, count + 1)]}


def test_a_dead_worker_s_unbegun_requests_go_back_to_the_head_in_order():
    broker = make(prefetch=4)
    held_by_a(broker, 4)
    arrive(broker, b"9")  # queued behind them all
    # 1 had ended, its response not yet sent (a POST: not run again); 2 was running
    broker.worker_gone(b"A", 2, {2}, 0.0, "worker exited")
    assert kinds(broker) == [("fail", b"1", 502), ("fail", b"2", 502)]
    broker.worker_ready(b"B", 2, 4, 4, 0, 0.0)
    assert handed(broker) == {b"B": [b"3", b"4", b"9"]}
    assert broker.requeued == 2


def test_an_idempotent_request_that_ended_unsent_runs_again_the_running_one_does_not():
    broker = make(prefetch=4)
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    for conn in (b"1", b"2"):
        broker.arrive(conn, b"sender", b"GET " + conn, 0.0)
    handed(broker)
    broker.worker_gone(b"A", 2, {2}, 0.0, "worker exited")  # 1 ended unsent, 2 running
    assert kinds(broker) == [("fail", b"2", 502)]
    assert broker.waiting() == 1 and broker.replayed == 1


def test_an_upload_that_ended_unsent_does_not_run_again_its_file_is_read():
    broker = make(prefetch=4)
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    broker.arrive(b"1", b"sender", b"GET 1", 0.0, b"/run/uploads/upload.x")
    handed(broker)
    broker.worker_gone(b"A", 1, (), 0.0, "worker exited")  # it ended, unsent
    assert kinds(broker) == [("fail", b"1", 502)]


def test_a_begun_request_whose_response_had_begun_is_closed_not_answered():
    broker = make(prefetch=4)
    held_by_a(broker, 2)
    output(broker, b"A", [], [b"1"], 0.1)
    broker.worker_gone(b"A", 1, {1}, 0.0, "worker exited")
    assert kinds(broker) == [("close", b"1")]
    assert broker.waiting() == 1


def test_without_a_board_every_held_request_counts_as_begun():
    broker = make(prefetch=4)
    held_by_a(broker, 3)
    broker.worker_gone(b"A", None, (), 0.0, "worker exited")
    assert [k[2] for k in kinds(broker)] == [502, 502, 502]
    assert broker.waiting() == 0


def test_requests_sent_to_a_worker_found_gone_are_requeued_once_not_answered():
    """The race the issue names: a batch for a worker that is gone by the time it is sent.
    Each of its requests ends up queued again, never answered and queued both."""
    broker = make(prefetch=4)
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    for conn in (b"1", b"2"):
        arrive(broker, conn)
    broker.dispatch(0.0)
    batch = broker.take_batches()[b"A"]
    broker.worker_gone(b"A", 0, (), 0.0, "worker unreachable")  # its board: nothing begun
    assert kinds(broker) == []
    assert [r.state for r in batch] == [b.QUEUED, b.QUEUED]
    assert broker.waiting() == 2


def test_requests_handed_out_but_not_yet_sent_to_a_worker_that_is_gone_are_not_sent():
    broker = make(prefetch=4)
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    broker.worker_ready(b"B", 2, 1, 1, 0, 0.0)
    arrive(broker, b"1")
    arrive(broker, b"2")
    broker.dispatch(0.0)  # A gets 1, B gets 2; not taken yet
    broker.worker_gone(b"A", 0, (), 0.0, "worker exited")
    broker.dispatch(0.0)
    batches = {w: [r.conn for r in batch] for w, batch in broker.take_batches().items()}
    assert batches == {b"B": [b"2", b"1"]}  # 1 went back and on to B, once


def test_a_worker_cannot_give_back_a_request_whose_response_began():
    broker = make(prefetch=4)
    held_by_a(broker, 1)
    output(broker, b"A", [], [b"1"], 0.1)
    broker.returned(b"A", [b"1"], 0.2)  # a confused worker: ignored
    assert broker.waiting() == 0 and broker.holder(b"1") == b"A"


def test_a_worker_that_exited_is_settled_after_the_grace_if_its_link_stays_open():
    broker = make(prefetch=4)
    held_by_a(broker, 1)
    broker.worker_exited(b"A", 1.0)
    arrive(broker, b"2", now=1.0)
    assert handed(broker, 1.0) == {}  # an exited worker gets nothing new
    assert broker.tick(1.0 + b.EXIT_GRACE / 2) == []
    assert broker.tick(1.0 + b.EXIT_GRACE * 2) == [b"A"]


def test_a_stuck_request_gives_504_and_kills_its_worker_once():
    broker = make(timeout=30.0, prefetch=4)
    held_by_a(broker, 2)
    broker.tick(29.0)
    assert kinds(broker) == []
    broker.tick(31.0)  # 1 runs (one thread); 2 waits behind it
    assert kinds(broker) == [("fail", b"1", 504), ("kill", 1)]
    assert broker.workers[b"A"].state == "leaving"
    broker.tick(32.0)
    assert kinds(broker) == []  # killed once; what else it holds waits for its end
    broker.worker_gone(b"A", 1, {1}, 0.0, "worker exited")
    assert kinds(broker) == [] and broker.waiting() == 1  # 2 goes to another worker


def test_a_killed_worker_that_stays_gives_504_for_all_it_holds():
    broker = make(timeout=30.0, prefetch=4)
    held_by_a(broker, 2)
    broker.tick(31.0)
    assert kinds(broker) == [("fail", b"1", 504), ("kill", 1)]
    broker.tick(31.0 + b.KILL_GRACE + 0.1)  # it caught the signal
    assert kinds(broker) == [("fail", b"2", 504)]


def test_a_response_that_began_is_not_cut_by_timeout():
    broker = make(timeout=30.0)
    held_by_a(broker, 1)
    output(broker, b"A", [], [b"1"], 1.0)
    broker.tick(100.0)
    assert kinds(broker) == []


# ------------------------------------------------------------- clients going


def test_a_disconnect_drops_what_waits_and_names_the_holder():
    broker = make()
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    arrive(broker, b"1")
    handed(broker)
    arrive(broker, b"1")  # pipelined
    arrive(broker, b"2", upload=b"/run/uploads/upload.x")  # queued: no slot
    assert broker.disconnect(b"1") == b"A"
    assert broker.disconnect(b"2") is None
    assert kinds(broker) == [("discard", b"2")]  # its upload file goes
    assert broker.waiting() == 0 and not broker.behind


def test_after_a_mongrel2_restart_held_responses_are_discarded_and_nothing_answered():
    broker = make(prefetch=4)
    held_by_a(broker, 2)
    arrive(broker, b"3")
    orphans = broker.mongrel2_restarted()
    assert sorted(r.conn for r in orphans) == [b"1", b"2"]  # their worker is told
    assert broker.waiting() == 0
    arrive(broker, b"1")  # the new mongrel2 reuses connection ids: this waits behind
    assert output(broker, b"A", [b"1"], [b"2"], 1.0) == {b"1", b"2"}
    assert handed(broker, 1.0) == {b"A": [b"1"]}  # the new client's request
    broker.worker_gone(b"A", 3, {3}, 0.0, "worker exited")  # the orphan 2 dies with it
    assert [k for k in kinds(broker) if k[0] != "discard"] == [("fail", b"1", 502)]


def test_stop_answers_what_waits_and_closes_what_workers_hold():
    broker = make()
    held_by_a(broker, 1)
    arrive(broker, b"2")
    broker.stop(1.0)
    assert kinds(broker) == [("close", b"1"), ("fail", b"2", 503)]
    assert broker.idle


def test_the_counters_add_up():
    broker = make(prefetch=4)
    held_by_a(broker, 4)
    output(broker, b"A", [b"1"], [], 0.1)
    broker.returned(b"A", [b"4"], 0.0)
    broker.worker_gone(b"A", 2, {2}, 0.0, "worker exited")
    snapshot = broker.snapshot(0.0)
    assert snapshot["handed_out"] == 4
    assert (snapshot["completed"], snapshot["failed_held"], snapshot["given_back"],
            snapshot["requeued"]) == (1, 1, 1, 1)


# ----------------------------------------------------- any interleaving at all


class WorkerModel:
    """A worker as the broker's tests see it: it receives requests in the order they
    are handed out, numbers them, begins them in that order on its threads."""

    def __init__(self, identity: bytes, threads: int) -> None:
        self.id, self.threads = identity, threads
        self.received: list[b.Request] = []  # not yet begun, in order
        self.running: list[b.Request] = []
        self.unsent: list[b.Request] = []  # ended, responses kept for the next flush
        self.begun_upto = 0
        self.count = 0
        self.exited = False  # its process is gone: it begins nothing more


OPERATIONS = st.lists(st.tuples(
    st.sampled_from(["arrive"] * 4 + ["dispatch"] * 3 + ["begin"] * 3 + ["finish"] * 3 +
                    ["ready", "ready", "respond", "give_back", "die", "die_blind", "exit",
                     "leave", "disconnect", "restart", "tick", "end_quietly", "flush"]),
    st.integers(0, 5), st.integers(0, 3)), max_size=150)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS, st.integers(0, 3))
def test_every_request_is_answered_once_or_requeued_never_both(operations, prefetch):
    run_interleaving(operations, prefetch)


def newest(broker: b.Broker, conn: bytes, *args) -> b.Request:
    """``broker.arrive(conn, *args)``; the new request: behind the one before it on its
    connection, or at the front of it, or refused at once (its Fail the last action)."""
    was_front = conn in broker.fronts
    broker.arrive(conn, *args)
    if was_front:
        return broker.behind[conn][-1]
    return broker.fronts[conn] if conn in broker.fronts else broker.actions[-1].request


def run_interleaving(operations, prefetch: int) -> None:
    broker = make(prefetch=prefetch, max_queue=3, queue_timeout=3.0, timeout=5.0)
    created: list[b.Request] = []
    models: dict[bytes, WorkerModel] = {}
    seen: dict[int, b.Request] = {}  # every request ever observed
    last: dict[int, int] = {}  # its state when last observed
    answers: Counter[int] = Counter()  # Fail and Close actions per request
    begun: set[int] = set()  # requests that must not run again: running, or ended unsent
    # and not idempotent
    order: dict[bytes, list[int]] = {}  # per connection: requests in arrival order
    first_handed: dict[bytes, list[int]] = {}
    clock = [0.0]
    names = iter(range(1, 10_000))

    def observe():
        for action in broker.take_actions():
            if isinstance(action, (Fail, Close)):
                answers[id(action.request)] += 1
                assert answers[id(action.request)] == 1, "answered twice"
            if isinstance(action, Discard):
                assert action.request.state == b.DROPPED
        for request in created:
            seen[id(request)] = request
        for key, request in list(seen.items()):
            state = request.state
            before = last.get(key)
            if before is not None and before != state:
                assert state in b.TRANSITIONS[before], \
                    f"{b.STATE_NAMES[before]} -> {b.STATE_NAMES[state]}"
            last[key] = state
            if state == b.DROPPED:
                assert answers[key] == 0, "answered and dropped"
        # Who holds what agrees on both sides, and the counters add up.
        for worker in broker.workers.values():
            for conn, request in worker.held.items():
                assert broker.in_flight[conn] is request and request.worker == worker.id
        assert sum(len(w.held) for w in broker.workers.values()) == len(broker.in_flight)
        assert broker.handed_out == broker.completed + broker.failed_held + \
            broker.given_back + broker.requeued + len(broker.in_flight)

    def deliver():
        broker.dispatch(clock[0])
        for identity, batch in broker.take_batches().items():
            model = models[identity]
            for request in batch:
                assert id(request) not in begun, "a request the application saw, handed again"
                model.count += 1
                assert request.index == model.count, "numbered as the worker numbers it"
                model.received.append(request)
                conn_list = first_handed.setdefault(request.conn, [])
                if id(request) not in conn_list:
                    conn_list.append(id(request))

    def pick(number: int) -> WorkerModel | None:
        alive = [m for m in models.values() if m.id in broker.workers]
        return alive[number % len(alive)] if alive else None

    def forget(model: WorkerModel) -> None:
        models.pop(model.id, None)

    for operation, number, conn_number in operations:
        clock[0] += 0.1
        now = clock[0]
        conn = b"%d" % conn_number
        model = pick(number)
        if operation == "arrive":
            created.append(newest(broker, conn, b"s", b"GET" if number % 2 else b"POST", now,
                                  b"/up" if number == 5 else None))
            order.setdefault(conn, []).append(id(created[-1]))
        elif operation == "ready":
            identity = b"w%d" % next(names)
            models[identity] = WorkerModel(identity, 1 + number % 2)
            broker.worker_ready(identity, number, 1 + number % 2, 1 + number % 2, 0, now)
        elif operation == "dispatch":
            deliver()
        elif operation == "begin" and model and not model.exited and model.received and \
                len(model.running) < model.threads:
            request = model.received.pop(0)
            model.begun_upto = request.index
            if request.state in b.HOLDING:  # else answered meanwhile (504): it begins anyway
                begun.add(id(request))
            model.running.append(request)
        elif operation == "respond" and model and model.running:
            output(broker, model.id, [], [model.running[0].conn], now)
        elif operation == "finish" and model and model.running:
            request = model.running.pop(0)
            output(broker, model.id, [request.conn], [], now)
        elif operation == "end_quietly" and model and model.running:
            request = model.running.pop(0)
            model.unsent.append(request)
            if request.raw.startswith(b"GET") and request.upload is None:
                begun.discard(id(request))  # it may run again if its worker dies now
        elif operation == "flush" and model and model.unsent:
            output(broker, model.id, [r.conn for r in model.unsent], [], now)
            model.unsent = []
        elif operation == "give_back" and model and model.received:
            back, model.received = model.received, []
            broker.returned(model.id, [r.conn for r in back], now)
        elif operation in ("die", "die_blind") and model:
            if operation == "die":
                broker.worker_gone(model.id, model.begun_upto,
                                   {r.index for r in model.running}, now)
            else:
                broker.worker_gone(model.id, None, (), now)
            forget(model)
        elif operation == "exit" and model:
            model.exited = True
            broker.worker_exited(model.id, now)
        elif operation == "leave" and model:
            broker.leaving(model.id)
        elif operation == "disconnect":
            broker.disconnect(conn)
        elif operation == "restart":
            broker.mongrel2_restarted()
        elif operation == "tick":
            for identity in broker.tick(now):
                gone = models[identity]
                broker.worker_gone(identity, gone.begun_upto,
                                   {r.index for r in gone.running}, now)
                forget(gone)
        observe()

    # The end: the workers finish everything, and time passes: nothing is left waiting.
    for _ in range(200):
        clock[0] += 0.1
        deliver()
        observe()
        for model in list(models.values()):
            if model.id not in broker.workers:
                continue
            while model.received and len(model.running) < model.threads:
                request = model.received.pop(0)
                model.begun_upto = request.index
                model.running.append(request)
            for request in model.running + model.unsent:
                output(broker, model.id, [request.conn], [], clock[0])
            model.running, model.unsent = [], []
        observe()
        for identity in broker.tick(clock[0]):
            gone = models[identity]
            broker.worker_gone(identity, gone.begun_upto, {r.index for r in gone.running},
                               clock[0])
            forget(gone)
        observe()
    broker.stop(clock[0])
    observe()
    assert len(created) == broker.arrived
    for key, request in seen.items():
        assert request.state in (b.DONE, b.FAILED, b.DROPPED), request
        assert (request.state == b.FAILED) == (answers[key] == 1)
    # Pipelined requests of one connection reach workers in their arrival order.
    for conn, arrived in order.items():
        firsts = [key for key in first_handed.get(conn, []) if key in arrived]
        assert firsts == [key for key in arrived if key in firsts]


# ------------------------------------------------------------- remote workers


def test_a_local_free_worker_is_taken_before_a_remote_one():
    broker = make()
    broker.worker_ready(b"r1", 7, 1, 1, 0, 0.0, host="192.0.2.2")
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    for conn in (b"1", b"2"):
        arrive(broker, conn)
    assert handed(broker) == {b"A": [b"1"], b"r1": [b"2"]}


def test_an_upload_goes_to_this_host_s_workers_only():
    broker = make(prefetch=4)
    broker.worker_ready(b"r1", 7, 1, 1, 0, 0.0, host="192.0.2.2")
    broker.arrive(b"1", b"s", b"POST", 0.0, b"/run/uploads/upload.x")
    assert handed(broker) == {}  # the remote one is free, but the file is here
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    assert handed(broker) == {b"A": [b"1"]}


def test_a_remote_worker_begins_only_what_it_was_told_to_and_that_counts_as_begun():
    broker = make(prefetch=4)
    broker.worker_ready(b"r1", 7, 1, 1, 5, 0.0, host="192.0.2.2")
    for conn in (b"1", b"2", b"3"):
        arrive(broker, conn)
    assert handed(broker) == {b"r1": [b"1", b"2", b"3"]}  # numbered 6, 7, 8
    assert broker.take(b"r1", [6], 1.0) == [6]
    assert broker.running(b"r1") == {6: 1.0}  # what the status shows it runs
    broker.tick(31.0)  # 7 and 8 were handed out long ago too: only 6 gets its 504
    assert kinds(broker) == [("fail", b"1", 504), ("kill", 7)]
    assert broker.running(b"r1") == {}
    assert broker.take(b"r1", [6, 7], 31.5) == [7]  # 6 ended meanwhile
    assert broker.running(b"r1") == {7: 31.5}
    worker = broker.workers[b"r1"]
    broker.worker_gone(b"r1", worker.began, {r.index for r in worker.held.values()}, 32.0,
                       "worker host silent")
    assert kinds(broker) == [("fail", b"2", 502)]  # 7 was begun; 8 goes to another
    assert broker.waiting() == 1


def test_a_remote_worker_runs_what_it_was_told_to_begin_until_it_ends():
    broker = make(prefetch=4)
    broker.worker_ready(b"r1", 7, 1, 1, 0, 0.0, host="192.0.2.2")
    for conn in (b"1", b"2"):
        arrive(broker, conn)
    assert handed(broker) == {b"r1": [b"1", b"2"]}  # numbered 1, 2
    assert broker.take(b"r1", [1], 1.0) == [1]
    output(broker, b"r1", [], [b"1"], 1.1)  # its response has begun: it still runs
    assert broker.take(b"r1", [2], 1.2) == [2]
    assert broker.running(b"r1") == {1: 1.0, 2: 1.2}
    output(broker, b"r1", [b"1"], [], 1.3)
    assert broker.running(b"r1") == {2: 1.2}
