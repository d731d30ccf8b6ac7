"""The autoscaler's decisions, on readings made by hand (a fake clock), and the plugin
on the real stack: a load step scales the workers up and back down."""

from __future__ import annotations


from circus_wsgi.autoscale import COOLDOWN, START_TIMEOUT, UP_AFTER, Reading, Scaler


def reading(now: float, *, queue: int = 0, wait: float = 0.0, prefetched: int = 0,
            idle: int = 0, connected: int = 1, wanted: int = 1,
            active: bool = True) -> Reading:
    return Reading(now, queue, wait, prefetched, idle, connected, wanted, active)


def run(scaler: Scaler, readings: list[Reading]) -> list[tuple[float, str, int, str]]:
    changes = []
    for r in readings:
        change = scaler.decide(r)
        if change is not None:
            changes.append((r.now, change.direction, change.count, change.reason))
    return changes


def test_waiting_requests_scale_up_after_a_second_by_1_then_2_then_4_to_the_maximum():
    scaler = Scaler(1, 8, 60)
    wanted = 1
    changes = []
    for tick in range(40):  # a queue that never drains; new workers connect at once
        now = tick * 0.25
        change = scaler.decide(reading(now, queue=10, wait=0.5, connected=wanted,
                                       wanted=wanted))
        if change is not None:
            changes.append((now, change.count))
            wanted += change.count
    assert changes[0] == (UP_AFTER, 1)
    assert [count for _, count in changes] == [1, 2, 4]  # 8 is the maximum: 1+1+2+4
    assert all(b - a >= COOLDOWN for (a, _), (b, _) in zip(changes, changes[1:], strict=False))


def test_workers_still_starting_count_as_capacity():
    scaler = Scaler(1, 8, 60)
    first = run(scaler, [reading(t / 4, queue=10, wait=0.5) for t in range(5)])
    assert first == [(1.0, "up", 1, "queue")]
    # circus wants 2, the dispatcher knows 1: nothing more until it connects ...
    assert run(scaler, [reading(1.0 + t / 4, queue=10, wait=0.5, wanted=2)
                        for t in range(1, 20)]) == []
    # ... or until it should have
    late = run(scaler, [reading(1.0 + START_TIMEOUT + 0.25, queue=10, wait=0.5, wanted=2)])
    assert late == [(1.0 + START_TIMEOUT + 0.25, "up", 2, "queue")]


def test_prefetched_requests_with_no_idle_worker_are_pressure_too():
    scaler = Scaler(1, 4, 60)
    assert run(scaler, [reading(t / 4, prefetched=5) for t in range(6)]) == \
        [(1.0, "up", 1, "prefetch")]


def test_a_short_burst_scales_nothing():
    scaler = Scaler(1, 4, 60)
    readings = [reading(t / 4, queue=5, wait=0.5) for t in range(3)] + \
        [reading(0.75 + t / 4, idle=1) for t in range(1, 10)]
    assert run(scaler, readings) == []


def test_idle_workers_scale_down_one_at_a_time_never_below_the_minimum():
    scaler = Scaler(2, 8, 3)
    wanted, changes = 5, []
    for tick in range(200):
        now = tick * 0.25
        change = scaler.decide(reading(now, idle=2, connected=wanted, wanted=wanted))
        if change is not None:
            changes.append(now)
            wanted -= change.count
    assert wanted == 2 and changes == [3.0, 6.0, 9.0]


def test_no_scale_down_soon_after_a_scale_up():
    scaler = Scaler(1, 4, 3)
    assert run(scaler, [reading(t / 4, queue=9, wait=0.5) for t in range(5)]) == \
        [(1.0, "up", 1, "queue")]
    idle = [reading(1.0 + t / 4, idle=1, connected=2, wanted=2) for t in range(1, 40)]
    assert run(scaler, idle)[0][0] == 7.0  # twice scale_down_idle after the up


def test_a_watcher_that_is_not_active_is_left_alone():
    scaler = Scaler(1, 4, 3)
    assert run(scaler, [reading(t / 4, queue=9, wait=0.5, active=False)
                        for t in range(40)]) == []
    assert run(scaler, [reading(10 + t / 4, idle=3, wanted=3, active=False)
                        for t in range(40)]) == []


def test_a_manual_count_above_the_maximum_stands_until_the_workers_idle():
    scaler = Scaler(1, 4, 3)
    assert run(scaler, [reading(t / 4, queue=9, wait=0.5, connected=6, wanted=6)
                        for t in range(10)]) == []  # at or above the maximum: no more
    assert run(scaler, [reading(3 + t / 4, idle=1, connected=6, wanted=6)
                        for t in range(14)])[0][1:] == ("down", 1, "idle")
