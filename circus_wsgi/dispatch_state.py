"""What the dispatcher knows: waiting and in-flight requests, workers, counters.

Plain records, no I/O; :class:`Counters` turns them into the JSON that
``circus-wsgi status`` prints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping



@dataclass(slots=True)
class Pending:
    """A request waiting for a worker."""

    conn_id: bytes
    sender: bytes
    raw: bytes  # the request as mongrel2 sent it
    arrived: float
    upload_path: bytes | None = None
    cancelled: bool = False  # its client went away while it waited


@dataclass(slots=True)
class InFlight:
    """A request handed to a worker and not yet done."""

    worker: bytes
    pending: Pending
    dispatched: float
    started: bool = False  # the response has begun: timeout no longer applies


@dataclass(slots=True)
class WorkerState:
    """One connected worker process."""

    pid: int
    pidfd: int | None
    threads: int = 1
    free: int = 0  # idle threads not yet given a request: one entry each in the slots
    held: set = field(default_factory=set)
    returned: bool = False  # gave requests back: no prefetch until it finishes one
    progress: float = 0.0  # when it last finished a request or, idle, was given one
    leaving: bool = False  # said LEAVING: takes nothing new
    doomed: bool = False  # killed for a stuck request: takes nothing new
    exited: float | None = None  # when its process was seen to exit
    dispatched: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def retired(self) -> bool:
        """Leaving, killed or exited: it gets no new request."""
        return self.leaving or self.doomed or self.exited is not None

    @property
    def takes_work(self) -> bool:
        return not self.retired and self.free > 0


@dataclass
class Counters:
    """Totals since the dispatcher started."""

    completed: int = 0
    malformed: int = 0
    failures: Counter = field(default_factory=Counter)  # "503 queue full" -> count

    def count_failure(self, reason: str) -> None:
        self.failures[reason] += 1

    def snapshot(self, queue: Iterable[Any], workers: Mapping[bytes, WorkerState],
                 in_flight: Mapping[bytes, InFlight]) -> dict[str, Any]:
        """The counters and the current state, as JSON-ready data."""
        return {
            "queue": sum(1 for pending in queue if not pending.cancelled),
            "in_flight": len(in_flight),
            "busy_workers": sum(1 for w in workers.values() if w.held),
            "idle_workers": sum(1 for w in workers.values() if not w.held),
            "completed": self.completed,
            "malformed": self.malformed,
            "failures": dict(self.failures),
            "workers": {
                str(w.pid): {"free": w.free, "holding": len(w.held), "leaving": w.leaving,
                             "dispatched": w.dispatched, "completed": w.completed,
                             "failed": w.failed}
                for w in workers.values()},
        }
