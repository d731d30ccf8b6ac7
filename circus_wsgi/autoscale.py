"""Autoscaling: a circus plugin that sets the number of workers from the dispatcher's
numbers, so ``circusctl list``, circus-top and the metrics see every change.

Every :data:`TICK` it reads the dispatcher's snapshot and circus's wanted count of
the workers watcher; :class:`Scaler` (no I/O) decides:

- Up, when requests have been waiting for :data:`UP_AFTER` without a break: in the
  dispatcher's queue longer than :data:`QUEUE_WAIT`, or prefetched to workers while
  none is idle. It adds 1 worker, then 2, then 4 at a time while that lasts, up to
  ``workers_max``. Workers started but not yet connected count as capacity: none is
  added while some are starting (for :data:`START_TIMEOUT` at most).
- Down, when some worker has been idle, with nothing queued, for
  ``scale_down_idle`` without a break: it stops one (circus's ``decr``: the worker
  finishes what it holds, and its clean exit is no crash to the flapping plugin);
  never below ``workers_min``.
- After each change it waits :data:`COOLDOWN`, and it scales down no sooner than
  twice ``scale_down_idle`` after scaling up. It reads the count from circus every
  time, so a manual ``circusctl incr/decr`` stands until the load calls for a change.
  A watcher that is not active (a crash loop stopped by the flapping plugin) is left
  alone.

Each decision is logged at INFO with the numbers behind it, and noted to the
dispatcher, which counts it (``circus_wsgi_scale_events_total``) and keeps it for the
console.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from circus.plugins import CircusPlugin
from tornado import ioloop

from .lifeline import die_with_parent
from .settings import Settings
from .status import read_status, send_note

log = logging.getLogger(__name__)

#: Seconds between two looks at the numbers.
TICK = 0.25
#: Requests must have been waiting this long without a break to scale up.
UP_AFTER = 1.0
#: The oldest queued request waiting longer than this is pressure (seconds).
QUEUE_WAIT = 0.05
#: Seconds after a change before the next one.
COOLDOWN = 1.0
#: Seconds a started worker may take to connect before more may be added.
START_TIMEOUT = 10.0
#: Successive scale-ups add this many workers each (the last, again and again).
STEPS = (1, 2, 4)


@dataclass(frozen=True)
class Reading:
    """What the numbers say at ``now``."""

    now: float
    queue: int  # requests queued in the dispatcher
    oldest_wait: float  # seconds the oldest of them has waited
    prefetched: int  # requests held by workers beyond their threads
    idle: int  # connected workers with nothing to do
    connected: int  # workers connected and not leaving
    wanted: int  # circus's numprocesses for the watcher
    active: bool  # the watcher is active


@dataclass(frozen=True)
class Change:
    """Add (``up``) or stop (``down``) ``count`` workers, and why."""

    direction: str
    count: int
    reason: str  # "queue", "prefetch" or "idle": bounded, a metric label
    detail: str


class Scaler:
    """The decisions, from one :class:`Reading` after another."""

    def __init__(self, minimum: int, maximum: int, scale_down_idle: float) -> None:
        self.minimum, self.maximum, self.scale_down_idle = minimum, maximum, scale_down_idle
        self.pressed_since: float | None = None
        self.idle_since: float | None = None
        self.step = 0  # index into STEPS of the next scale-up
        self.changed_at = self.up_at = float("-inf")

    def decide(self, r: Reading) -> Change | None:
        if not r.active:
            self.pressed_since = self.idle_since = None
            return None
        waiting = r.queue > 0 and r.oldest_wait > QUEUE_WAIT
        crowded = r.prefetched > 0 and r.idle == 0
        if waiting or crowded:
            self.idle_since = None
            if self.pressed_since is None:
                self.pressed_since = r.now
            return self._up(r, "queue" if waiting else "prefetch", self.pressed_since)
        self.pressed_since, self.step = None, 0
        if r.idle > 0 and r.queue == 0:
            if self.idle_since is None:
                self.idle_since = r.now
            return self._down(r, self.idle_since)
        self.idle_since = None
        return None

    def _up(self, r: Reading, reason: str, since: float) -> Change | None:
        if r.now - since < UP_AFTER or r.now - self.changed_at < COOLDOWN:
            return None
        starting = r.wanted - r.connected
        if starting > 0 and r.now - self.up_at < START_TIMEOUT or r.wanted >= self.maximum:
            return None
        count = min(STEPS[min(self.step, len(STEPS) - 1)], self.maximum - r.wanted)
        self.step += 1
        self.changed_at = self.up_at = r.now
        return Change("up", count, reason,
                      f"{r.queue} queued (oldest {r.oldest_wait:.2f} s), {r.prefetched} "
                      f"prefetched, {r.idle} of {r.connected} workers idle, waiting for "
                      f"{r.now - since:.1f} s: {r.wanted} -> {r.wanted + count}")

    def _down(self, r: Reading, since: float) -> Change | None:
        if r.now - since < self.scale_down_idle or r.wanted <= self.minimum:
            return None
        if r.now - self.changed_at < COOLDOWN or \
                r.now - self.up_at < 2 * self.scale_down_idle:
            return None
        self.changed_at, self.idle_since = r.now, r.now
        return Change("down", 1, "idle",
                      f"{r.idle} of {r.connected} workers idle for {self.scale_down_idle:g} s, "
                      f"nothing queued: {r.wanted} -> {r.wanted - 1}")


def reading(snapshot: dict[str, Any], wanted: int, active: bool, now: float) -> Reading:
    """A :class:`Reading` from the dispatcher's snapshot and circus's numbers."""
    return Reading(now=now, queue=snapshot["queue"], oldest_wait=snapshot["oldest_wait"],
                   prefetched=snapshot["prefetched"], idle=snapshot["idle_workers"],
                   connected=snapshot["idle_workers"] + snapshot["busy_workers"],
                   wanted=wanted, active=active)


class Autoscaler(CircusPlugin):
    """The plugin: ``[plugin:autoscale]`` in circus.ini, with ``use``, ``watcher``,
    ``min``, ``max``, ``scale_down_idle`` and ``run_dir``."""

    name = "autoscale"

    def __init__(self, *args: Any, **config: Any) -> None:
        logging.getLogger().setLevel(logging.INFO)  # circusd runs plugins at DEBUG
        super().__init__(*args, **config)
        self.watcher = config.get("watcher", "workers")
        self.scaler = Scaler(int(config["min"]), int(config["max"]),
                             float(config["scale_down_idle"]))
        self.stack = Settings(run_dir=config["run_dir"])
        self.timer: ioloop.PeriodicCallback | None = None

    def handle_init(self) -> None:
        die_with_parent()

    def handle_recv(self, data: list[bytes]) -> None:
        pass  # it reads the numbers itself, every TICK

    def initialize(self) -> None:
        super().initialize()
        self.timer = ioloop.PeriodicCallback(self.check, TICK * 1000)
        self.timer.start()

    def handle_stop(self) -> None:
        if self.timer is not None:
            self.timer.stop()

    def check(self) -> None:
        try:
            snapshot = read_status(self.stack, timeout=TICK)
        except TimeoutError:
            return  # the dispatcher restarts: nothing to go by
        status = self.call("status", name=self.watcher).get("status")
        wanted = self.call("numprocesses", name=self.watcher).get("numprocesses")
        if not isinstance(wanted, int):
            return
        change = self.scaler.decide(reading(snapshot, wanted, status == "active",
                                            time.monotonic()))
        if change is not None:
            self.carry_out(change)

    def carry_out(self, change: Change) -> None:
        command = "incr" if change.direction == "up" else "decr"
        reply = self.call(command, name=self.watcher, nb=change.count)
        if reply.get("status") != "ok":
            log.warning("autoscale: circusd refused to %s %s: %s", command, self.watcher,
                        reply.get("reason"))
            return
        log.info("autoscale: %s %d (%s): %s", change.direction, change.count, change.reason,
                 change.detail)
        send_note(self.stack, {"by": "autoscaler", "action": change.direction,
                               "reason": change.reason, "detail": change.detail})
