"""What the console makes of successive looks (circus_wsgi.trends): no I/O."""

from __future__ import annotations

import math
import random

import pytest

from circus_wsgi.monitor import Look, Process
from circus_wsgi.tallies import DURATION_BUCKETS, Histogram
from circus_wsgi.trends import APPLICATION_5XX, HISTORY, POINT_EVERY, Trends, quantile, point

BOUNDS = list(DURATION_BUCKETS)


def snapshot(durations: Histogram | None = None, failures: dict | None = None,
             **counters) -> dict:
    """A dispatcher snapshot as the broker makes one."""
    durations = durations or Histogram()
    base = {"queue": 0, "oldest_wait": 0.0, "in_flight": 0, "active": 0, "prefetched": 0,
            "busy_workers": 0, "idle_workers": 0, "leaving_workers": 0, "arrived": 0,
            "handed_out": 0, "completed": 0, "failed_held": 0, "given_back": 0,
            "requeued": 0, "replayed": 0, "dropped": 0, "failures": dict(failures or {}),
            "durations": durations.snapshot(), "waits": Histogram().snapshot(),
            "workers": {}, "decisions": []}
    return {**base, **counters}


def test_quantile_interpolates_within_a_bucket_as_prometheus_does() -> None:
    # 10 in (0, 0.005], 10 in (0.005, 0.01]: the median is the first bucket's top
    counts = [10, 10] + [0] * (len(BOUNDS) - 1)
    assert quantile(0.5, BOUNDS, counts) == pytest.approx(0.005)
    assert quantile(0.75, BOUNDS, counts) == pytest.approx(0.0075)
    assert quantile(0.25, BOUNDS, counts) == pytest.approx(0.0025)
    assert quantile(0.5, BOUNDS, [0] * (len(BOUNDS) + 1)) is None
    # past the last finite bound: that bound, as histogram_quantile answers
    assert quantile(0.99, BOUNDS, [0] * len(BOUNDS) + [5]) == BOUNDS[-1]


def test_quantile_lands_in_the_bucket_of_the_true_value() -> None:
    rng = random.Random(7)
    values = [rng.expovariate(1 / 0.05) for _ in range(5000)]
    histogram = Histogram()
    for value in values:
        histogram.observe(("GET", "200"), value)
    counts = histogram.counts[("GET", "200")]
    for q in (0.5, 0.9, 0.99):
        true = sorted(values)[math.ceil(q * len(values)) - 1]
        estimate = quantile(q, BOUNDS, counts)
        index = next(i for i, b in enumerate(BOUNDS) if true <= b)
        lower = BOUNDS[index - 1] if index else 0.0
        assert lower <= estimate <= BOUNDS[index], (q, true, estimate)


def test_a_point_is_the_difference_of_two_snapshots() -> None:
    before_h, after_h = Histogram(), Histogram()
    for _ in range(10):
        before_h.observe(("GET", "200"), 0.002)
        after_h.observe(("GET", "200"), 0.002)
    for _ in range(30):
        after_h.observe(("GET", "200"), 0.2)  # 30 new ones, all in (0.1, 0.25]
    for _ in range(4):
        after_h.observe(("GET", "503"), 1.0)  # the stack's own 503s
    for _ in range(2):
        after_h.observe(("POST", "500"), 0.01)  # the application's 500s
    before = snapshot(before_h, {"503 queue full": 1}, arrived=10, completed=10)
    after = snapshot(after_h, {"503 queue full": 5, "closed: worker exited": 3},
                     arrived=46, completed=42, queue=7)
    got = point(before, after, 2.0, at=100.0)
    assert got["rate"] == pytest.approx(36 / 2)
    assert 0.1 < got["p50"] <= 0.25 and got["p99"] > 0.5
    assert got["errors"] == {"503 queue full": pytest.approx(2.0),
                             APPLICATION_5XX: pytest.approx(1.0)}
    assert got["queue"] == 7 and got["at"] == 100.0


def test_after_a_dispatcher_restart_all_it_counted_is_new() -> None:
    old, new = Histogram(), Histogram()
    for _ in range(100):
        old.observe(("GET", "200"), 0.002)
    for _ in range(6):
        new.observe(("GET", "200"), 0.002)
    got = point(snapshot(old, {"502 worker exited": 9}, arrived=100, completed=100),
                snapshot(new, {"502 worker exited": 1}, arrived=6, completed=6), 2.0, at=1.0)
    assert got["rate"] == pytest.approx(3.0)
    assert got["errors"] == {"502 worker exited": pytest.approx(0.5)}


def test_the_first_point_has_no_rate() -> None:
    got = point(None, snapshot(queue=3), 0.0, at=5.0)
    assert got["rate"] is None and got["p50"] is None and got["queue"] == 3


def process(watcher: str, wid: int, pid: int, cpu_seconds: float = 0.0) -> Process:
    return Process(watcher, wid, pid, age=10.0, rss=50 << 20, cpu_seconds=cpu_seconds)


def look(at: float, processes: list[Process], dispatcher: dict | None = None,
         watchers: dict | None = None) -> Look:
    if watchers is None:
        watchers = {"workers": "active", "mongrel2": "active"}
    return Look(at, dispatcher, watchers, {"workers": 2, "mongrel2": 1}, processes)


def test_the_view_joins_circus_and_the_dispatcher_by_pid() -> None:
    trends = Trends()
    workers = {"101": {"state": "busy", "holding": 2, "completed": 7, "failed": 0,
                       "running": [{"method": "GET", "path": "/slow", "seconds": 4.5}]},
               "999": {"state": "leaving", "holding": 1, "completed": 1, "failed": 0,
                       "running": []}}
    first = [process("workers", 1, 101, 1.0), process("workers", 2, 102, 2.0),
             process("mongrel2", 1, 50, 0.5)]
    trends.add(look(10.0, first, snapshot(workers=workers)))
    assert all(p["cpu"] is None for p in trends.view()["processes"])  # one look: no CPU %
    later = [process("workers", 1, 101, 1.5), process("workers", 2, 102, 2.0),
             process("mongrel2", 1, 50, 0.5)]
    trends.add(look(12.0, later, snapshot(workers=workers)))
    view = trends.view()
    assert {p["pid"]: p["cpu"] for p in view["processes"]} == {101: 25.0, 102: 0.0, 50: 0.0}
    assert [(w["pid"], w["wid"], w["state"]) for w in view["workers"]] == [
        (101, 1, "busy"), (102, 2, "starting"), (999, None, "leaving")]
    assert view["workers"][0]["running"] == [{"method": "GET", "path": "/slow",
                                              "seconds": 4.5}]
    assert {w["name"]: (w["processes"], w["wanted"]) for w in view["watchers"]} == {
        "workers": (2, 2), "mongrel2": (1, 1)}
    assert view["dispatcher"]["queue"] == 0 and "durations" not in view["dispatcher"]


def test_when_circusd_does_not_answer_the_view_keeps_what_it_said_last() -> None:
    trends = Trends()
    trends.add(look(1.0, [process("workers", 1, 101, 1.0)]))
    trends.add(look(2.0, [process("workers", 1, 101, 2.0)]))
    trends.add(look(3.0, [], watchers={}))  # circusd busy with another command
    view = trends.view()
    assert view["circus"] is False
    assert [p["pid"] for p in view["processes"]] == [101]
    assert view["processes"][0]["cpu"] == 100.0
    assert [w["name"] for w in view["watchers"]] == ["mongrel2", "workers"]


def test_points_come_every_two_seconds_and_fifteen_minutes_are_kept() -> None:
    trends = Trends()
    for second in range(int(HISTORY) + 120):
        trends.add(look(float(second), [], snapshot(arrived=second, completed=second)))
    points = trends.history()
    assert len(points) == HISTORY / POINT_EVERY
    assert [b["at"] - a["at"] for a, b in zip(points, points[1:], strict=False)] == \
        [POINT_EVERY] * (len(points) - 1)
    assert points[-1]["at"] - points[0]["at"] < HISTORY


def test_decisions_outlive_a_dispatcher_restart_and_are_kept_once() -> None:
    trends = Trends()
    stop = {"at": 5.0, "by": "flapping", "action": "stop", "reason": "workers",
            "detail": "workers: crash loop: watcher stopped; retry 1 of 2 in 5s"}
    up = {"at": 6.0, "by": "autoscaler", "action": "up", "reason": "queue", "detail": "1 -> 2"}
    trends.add(look(1.0, [], snapshot(decisions=[stop])))
    trends.add(look(2.0, [], snapshot(decisions=[stop, up])))
    trends.add(look(3.0, [], snapshot(decisions=[])))  # a new dispatcher remembers none
    assert trends.view()["decisions"] == [up, stop]
