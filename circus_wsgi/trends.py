"""What the console shows, from one look at the stack after another (no I/O).

:class:`Trends` takes each :class:`~circus_wsgi.monitor.Look` and keeps two things:

- the live view (:meth:`Trends.view`, the body of ``GET /api/status``): every watcher
  with its process count, every process with its wid, age, CPU % (from the CPU seconds
  of two looks) and resident memory, each worker's state and what it runs now (joined
  by pid from circus's list and the dispatcher's), the dispatcher's counters, and the
  flapping plugin's and the autoscaler's last decisions;
- a point every :data:`POINT_EVERY` seconds for the plots, :data:`HISTORY` seconds of
  them: requests answered per second, p50 and p99 latency and the 5xx per second by
  reason, all from differences of the dispatcher's counters between two looks (the
  numbers the metrics endpoint serves). A counter that went down means the
  dispatcher restarted: the new count is all that happened since, as Prometheus's
  ``rate()`` takes it. Percentiles interpolate within a histogram bucket, as
  Prometheus's ``histogram_quantile`` does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, replace
from typing import Any, Iterable

from .monitor import Look

#: Seconds between two points of the plots.
POINT_EVERY = 2.0
#: Seconds of points kept.
HISTORY = 15 * 60.0
#: Decisions kept per plugin.
DECISIONS_KEPT = 10
#: The watcher of the workers, as circus.ini names it.
WORKERS = "workers"
#: The dispatcher's counters the view passes on (its histograms and workers are not).
COUNTERS = ("queue", "oldest_wait", "in_flight", "active", "prefetched", "busy_workers",
            "idle_workers", "leaving_workers", "arrived", "handed_out", "completed",
            "failed_held", "given_back", "requeued", "replayed", "dropped", "failures")

#: The 5xx reason of responses the application itself gave.
APPLICATION_5XX = "5xx from the application"

Histogram = dict[str, Any]  # {"bounds": [...], "series": [[labels, counts, sum], ...]}


def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """The ``q`` quantile of per-bucket ``counts`` (``+Inf`` last) with upper ``bounds``,
    interpolated linearly within its bucket; None when nothing was counted. A quantile
    in the ``+Inf`` bucket is the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, below = q * total, 0.0
    for index, count in enumerate(counts):
        if below + count >= rank and count > 0:
            if index == len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


def _reset(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """True when the dispatcher restarted between two snapshots."""
    return after["arrived"] < before["arrived"] or after["completed"] < before["completed"]


def _bucket_changes(before: Histogram | None, after: Histogram) -> list[tuple[list, list]]:
    """Per series (labels), the per-bucket counts added since ``before``."""
    old = {tuple(labels): counts for labels, counts, _ in (before or {}).get("series", ())}
    changes = []
    for labels, counts, _ in after["series"]:
        previous = old.get(tuple(labels), [0] * len(counts))
        changes.append((labels, [n - p for n, p in zip(counts, previous, strict=True)]))
    return changes


def point(before: dict[str, Any] | None, after: dict[str, Any], seconds: float,
          at: float) -> dict[str, Any]:
    """One point of the plots: ``after``'s counters against ``before``'s, ``seconds``
    apart (``before`` None: the first look, nothing to compare yet)."""
    if before is None or seconds <= 0:
        return {"at": at, "rate": None, "p50": None, "p99": None, "errors": {},
                "queue": after["queue"]}
    if _reset(before, after):
        before = {"durations": None, "failures": {}}  # all since the restart is new
    durations = _bucket_changes(before["durations"], after["durations"])
    bounds = after["durations"]["bounds"]
    buckets = [sum(column) for column in zip(*(counts for _, counts in durations), strict=True)]
    errors = {reason: count - before["failures"].get(reason, 0)
              for reason, count in after["failures"].items()
              if reason[:1] == "5" and count > before["failures"].get(reason, 0)}
    answered_5xx = sum(sum(counts) for labels, counts in durations if str(labels[1])[:1] == "5")
    if answered_5xx > sum(errors.values()):  # the stack's own are in the histogram too
        errors[APPLICATION_5XX] = answered_5xx - sum(errors.values())
    return {"at": at, "rate": sum(buckets) / seconds,
            "p50": quantile(0.5, bounds, buckets), "p99": quantile(0.99, bounds, buckets),
            "errors": {reason: count / seconds for reason, count in errors.items()},
            "queue": after["queue"]}


def cpu_percent(before: Look | None, after: Look) -> dict[int, float]:
    """Per pid seen in both looks, the CPU it used between them, in % of one core."""
    if before is None or after.at <= before.at:
        return {}
    seconds = after.at - before.at
    old = {p.pid: p.cpu_seconds for p in before.processes}
    return {p.pid: round(max(0.0, p.cpu_seconds - old[p.pid]) / seconds * 100, 1)
            for p in after.processes if p.pid in old}


def _workers(look: Look) -> list[dict[str, Any]]:
    """Every worker circus runs or the dispatcher knows, by pid: circus's wid and the
    dispatcher's state (``starting`` while circus runs it and it has not connected).
    Workers on other hosts, which this host's circus does not run, come with their host."""
    known = (look.dispatcher or {}).get("workers", {})
    wids = {p.pid: p.wid for p in look.processes if p.watcher == WORKERS}
    local = {int(key): state for key, state in known.items() if key.isdigit()}
    workers = []
    for pid in sorted(set(wids) | set(local)):
        workers.append(_worker_entry(pid, "", wids.get(pid), local.get(pid)))
    for state in known.values():
        if state.get("host"):
            workers.append(_worker_entry(state.get("pid", 0), state["host"], None, state))
    return sorted(workers, key=lambda w: (w["host"], w["wid"] is None, w["wid"] or 0,
                                          w["pid"]))


def _worker_entry(pid: int, host: str, wid: int | None,
                  state: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"pid": pid, "host": host, "wid": wid, "state": "starting",
                             "holding": 0, "completed": 0, "failed": 0, "running": []}
    if state is not None:
        entry.update({key: state.get(key, entry.get(key)) for key in
                      ("state", "holding", "completed", "failed", "running")})
    return entry


class Trends:
    """The live view and the plots' points, from successive looks."""

    def __init__(self, history: float = HISTORY, every: float = POINT_EVERY) -> None:
        self.every = every
        self.points: deque[dict[str, Any]] = deque(maxlen=int(history / every))
        self.decisions: dict[str, deque[dict[str, Any]]] = {}
        self.measured: Look | None = None  # the last look circusd answered
        self.cpu: dict[int, float] = {}  # CPU % by pid, between the last two of those
        self.compared: Look | None = None  # the look the last point was measured from
        self.snapshot: dict[str, Any] | None = None  # the dispatcher's last answer
        self._view: dict[str, Any] = {}

    def add(self, look: Look) -> None:
        """Take a new look: the view changes; a point is added every ``every`` seconds."""
        circus_answered = bool(look.watchers)
        if circus_answered:
            self.cpu = cpu_percent(self.measured, look)
            self.measured = look
        elif self.measured is not None:  # circusd was busy: keep what it said last
            look = replace(look, watchers=self.measured.watchers,
                           wanted=self.measured.wanted, processes=self.measured.processes)
        if look.dispatcher is not None:
            self._keep_decisions(look.dispatcher.get("decisions", ()))
            self._add_point(look)
        self._view = self._make_view(look, circus_answered)

    def _add_point(self, look: Look) -> None:
        if look.dispatcher is None or self.compared is not None and \
                look.at - self.compared.at < self.every * 0.95:
            return
        before = self.snapshot if self.compared is not None else None
        seconds = look.at - self.compared.at if self.compared is not None else 0.0
        self.points.append(point(before, look.dispatcher, seconds, look.at))
        self.compared, self.snapshot = look, look.dispatcher

    def _keep_decisions(self, decisions: Iterable[dict[str, Any]]) -> None:
        """Decisions outlive a dispatcher restart here: each is kept once."""
        for decision in decisions:
            kept = self.decisions.setdefault(str(decision.get("by")),
                                             deque(maxlen=DECISIONS_KEPT))
            if decision not in kept:
                kept.append(decision)

    def _make_view(self, look: Look, circus_answered: bool) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for process in look.processes:
            counts[process.watcher] = counts.get(process.watcher, 0) + 1
        snapshot = look.dispatcher
        decisions = sorted((d for kept in self.decisions.values() for d in kept),
                           key=lambda d: d.get("at", 0), reverse=True)
        return {
            "at": look.at,
            "circus": circus_answered,
            "watchers": [{"name": name, "status": status, "processes": counts.get(name, 0),
                          "wanted": look.wanted.get(name)}
                         for name, status in sorted(look.watchers.items())],
            "processes": [{**asdict(p), "cpu": self.cpu.get(p.pid), "age": round(p.age, 1),
                           "cpu_seconds": round(p.cpu_seconds, 2)} for p in look.processes],
            "workers": _workers(look),
            "dispatcher": {key: snapshot[key] for key in COUNTERS if key in snapshot}
            if snapshot is not None else None,
            "decisions": decisions,
        }

    def view(self) -> dict[str, Any]:
        """The live view (``GET /api/status``); empty before the first look."""
        return self._view

    def history(self) -> list[dict[str, Any]]:
        """The plots' points, oldest first (``GET /api/history``)."""
        return list(self.points)
