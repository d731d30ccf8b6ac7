"""The dispatcher in the whole stack: real mongrel2, circusd and workers, under load.

Each test drives the stack with a client that records every request, and
steers it the way an operator does (circusctl incr/decr/reload/restart,
kill -9), then checks that nothing was lost and no client hung.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from circus_stack import CircusStack, Load
from circus_wsgi.status import read_status
from harness import wait_for


def get(port: int, path: str, timeout: float = 15.0) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one request; HTTP errors are answers too."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status, reply.read(), time.monotonic() - started
    except urllib.error.HTTPError as error:
        return error.code, error.read(), time.monotonic() - started


def in_background(function, *args) -> list:
    """Run ``function(*args)`` in a thread; its result lands in the returned list."""
    result: list = []
    threading.Thread(target=lambda: result.append(function(*args)), daemon=True).start()
    return result


@pytest.fixture(scope="module")
def stack():
    with CircusStack(workers=2, queue_timeout=5) as running:
        yield running


def test_a_slow_request_does_not_hold_up_the_fast_ones(stack):
    slow = Load(stack.port, ["/slow?s=1"])
    fast = Load(stack.port, ["/hello", "/hello"])
    with slow, fast:
        time.sleep(10)
    assert not fast.failures() and not slow.failures()
    slowest = max(o.seconds for o in fast.outcomes)
    assert len(fast.outcomes) > 200 and slowest < 0.5, (len(fast.outcomes), slowest)


def test_scaling_and_reloading_under_load_lose_nothing(stack):
    stack.call("incr", name="workers", nb=1)
    wait_for(lambda: len(stack.pids("workers")) == 3, 10)
    with Load(stack.port, ["/slow?s=0.05"] * 4 + ["/hello"] * 2) as load:
        for _ in range(10):
            stack.call("decr", name="workers", nb=1, waiting=True)
            stack.call("incr", name="workers", nb=1, waiting=True)
        for _ in range(5):
            stack.call("reload", name="workers", waiting=True)
            time.sleep(0.3)
    assert len(load.outcomes) > 100
    assert load.failures() == []
    assert max(o.seconds for o in load.outcomes) < 5.05
    stack.call("decr", name="workers", nb=1, waiting=True)


def test_restarting_the_workers_under_load_loses_nothing(stack):
    with Load(stack.port, ["/slow?s=0.05"] * 3) as load:
        time.sleep(0.5)
        stack.call("restart", name="workers", waiting=True)
        time.sleep(1)
    assert load.failures() == [] and max(o.seconds for o in load.outcomes) < 5.05


def test_a_worker_killed_holding_a_request_answers_502_within_a_second(stack):
    victim_reply = in_background(get, stack.port, "/slow?s=5")
    wait_for(lambda: stack_status(stack)["in_flight"] == 1, 5)
    holder = next(int(pid) for pid, worker in stack_status(stack)["workers"].items()
                  if worker["holding"])
    with Load(stack.port, ["/hello"]) as bystanders:
        time.sleep(0.2)
        killed = time.monotonic()
        os.kill(holder, signal.SIGKILL)
        wait_for(lambda: victim_reply, 5)
        answered = time.monotonic()
        time.sleep(0.5)
    status, body, _ = victim_reply[0]
    assert status == 502 and answered - killed < 1.0
    assert bystanders.failures() == [] and len(bystanders.outcomes) > 10
    wait_for(lambda: len(stack.pids("workers")) == 2 and stack_status(stack)["idle_workers"] == 2,
             10)


def test_the_dispatcher_restart_answers_or_closes_and_serving_resumes(stack):
    with Load(stack.port, ["/slow?s=0.05"] * 3, timeout=10) as load:
        time.sleep(0.5)
        stack.call("restart", name="dispatcher", waiting=True)
        time.sleep(3)
    hung = [o for o in load.outcomes if o.status == "timeout"]
    assert hung == [] and max(o.seconds for o in load.outcomes) < 5.05
    assert [o for o in load.outcomes[-10:] if o.status != 200] == []  # serving resumed


def test_no_worker_gives_503_then_serving_resumes(stack):
    stack.call("stop", name="workers", waiting=True)
    try:
        status, body, seconds = get(stack.port, "/hello")
        assert status == 503 and seconds < stack.settings.queue_timeout + 1
    finally:
        stack.call("start", name="workers", waiting=True)
    wait_for(lambda: get(stack.port, "/hello")[0] == 200, 10)


def stack_status(stack: CircusStack) -> dict:
    return read_status(stack.settings)


def test_status_counts_what_the_dispatcher_did(stack):
    wait_for(lambda: set(stack_status(stack)["workers"]) == {
        str(pid) for pid in stack.pids("workers")}, 10)
    before = stack_status(stack)["completed"]
    for _ in range(5):
        assert get(stack.port, "/hello")[0] == 200
    status = stack_status(stack)
    assert status["completed"] - before == 5
    assert sum(w["completed"] for w in status["workers"].values()) >= 5
    assert json.loads(json.dumps(status)) == status


def test_a_stuck_worker_gets_504_and_is_replaced_without_tripping_flapping():
    with CircusStack(workers=1, timeout=1, flapping_attempts=1) as stack:
        [old] = stack.pids("workers")
        status, _, seconds = get(stack.port, "/slow?s=30")
        assert status == 504 and seconds < 3
        wait_for(lambda: stack.pids("workers") not in ([], [old]), 10)
        assert get(stack.port, "/hello")[0] == 200
        assert stack.status("workers") == "active"


def test_recycling_workers_do_not_trip_flapping_and_lose_nothing():
    with CircusStack(workers=2, max_requests=20, flapping_attempts=1) as stack:
        with Load(stack.port, ["/hello"] * 3) as load:
            time.sleep(5)
        assert len(load.outcomes) > 200 and load.failures() == []
        assert stack.status("workers") == "active"


def test_workers_that_crash_at_start_are_stopped_by_flapping():
    stack = CircusStack(workers=2, flapping_attempts=2, flapping_max_retry=1)
    stack.start()
    try:
        stack.call("set", name="workers", options={"env": {"CRASH_AT_IMPORT": "1"}})
        stack.call("set", name="workers", options={"cmd": stack.call(
            "get", name="workers", keys=["cmd"])["options"]["cmd"].replace(
                "worker_apps:rules", "crash_app:app")})
        stack.call("restart", name="workers", waiting=True)
        wait_for(lambda: stack.status("workers") == "stopped", 20)
        time.sleep(3)  # the fixed plugin gives up for good: no stale timer restarts it
        assert stack.status("workers") == "stopped"
    finally:
        stack.stop()


def test_after_a_kill_9_of_the_dispatcher_workers_responses_still_reach_their_clients(stack):
    """A small response, and one of 80 KB (over half of mongrel2's window), for
    connections whose window the next dispatcher never saw announced."""
    wait_for(lambda: stack_status(stack)["idle_workers"] == 2, 10)
    replies = [in_background(get, stack.port, f"/slow?s=1.5&pad={pad}") for pad in (0, 80000)]
    wait_for(lambda: stack_status(stack)["in_flight"] == 2, 5)
    [dispatcher] = stack.pids("dispatcher")
    os.kill(dispatcher, signal.SIGKILL)
    wait_for(lambda: all(replies), 10, what="both responses")
    assert [reply[0][0] for reply in replies] == [200, 200]  # held by workers: not lost
    assert len(json.loads(replies[1][0][1])["pad"]) == 80000
    wait_for(lambda: stack.pids("dispatcher") not in ([], [dispatcher]), 10)
    wait_for(lambda: get(stack.port, "/hello")[0] == 200, 10)


def test_after_a_kill_9_of_the_dispatcher_the_clients_of_what_it_queued_do_not_hang(stack):
    """What only the killed dispatcher held is lost, but its clients' connections are
    closed within seconds (recovery.py), not left to mongrel2's 120 s reaper; what the
    workers held still gets its response."""
    wait_for(lambda: stack_status(stack)["idle_workers"] == 2, 10)
    held = [in_background(get, stack.port, "/slow?s=2") for _ in range(2)]
    wait_for(lambda: stack_status(stack)["busy_workers"] == 2, 5)
    time.sleep(0.1)  # the workers have finished nothing for 5 ms: no prefetch to them
    queued = [in_background(outcome_of, stack.port, "/hello") for _ in range(3)]
    wait_for(lambda: stack_status(stack)["queue"] == 3, 5)
    [dispatcher] = stack.pids("dispatcher")
    killed_at = time.monotonic()
    os.kill(dispatcher, signal.SIGKILL)
    wait_for(lambda: all(held) and len(queued_outcomes(queued)) == 3, 10)
    assert [reply[0][0] for reply in held] == [200, 200]
    for outcome, seconds in queued_outcomes(queued):
        assert outcome == "closed" and seconds - killed_at < 5, (outcome, seconds - killed_at)
    wait_for(lambda: get(stack.port, "/hello")[0] == 200, 10)


def outcome_of(port: int, path: str) -> tuple[int | str, float]:
    """(status or "closed", when it came) of one request."""
    try:
        status = get(port, path)[0]
    except (OSError, http.client.HTTPException):
        status = "closed"
    return status, time.monotonic()


def queued_outcomes(replies: list) -> list[tuple[int | str, float]]:
    return [reply[0] for reply in replies if reply]


def test_the_dispatcher_connects_again_to_a_restarted_mongrel2(stack):
    [dispatcher] = stack.pids("dispatcher")
    [mongrel2] = stack.pids("mongrel2")
    stack.call("restart", name="mongrel2", waiting=True)
    assert stack.pids("mongrel2") != [mongrel2]

    def answers() -> bool:
        try:
            return get(stack.port, "/hello", timeout=2)[:2] == (200, b"Hello, World!")
        except OSError:  # mongrel2 not listening yet
            return False

    wait_for(answers, 15)
    assert stack.pids("dispatcher") == [dispatcher]  # the same one, connected again
    assert [get(stack.port, "/hello")[0] for _ in range(20)] == [200] * 20
