"""The console's actions on the stack, each one command to circusd.

They go through circus (``circus.client.CircusClient`` on the stack's endpoint), so
``circusctl``, circus-top, the autoscaler and the flapping plugin see every change:
add or remove a worker (circus stops the oldest; it finishes what it holds first),
set their number, reload them (gracefully: new workers for old), restart mongrel2,
and stop one chosen worker gracefully (circus's ``kill``: SIGTERM, SIGKILL after
its graceful_timeout; circus starts another in its place) or kill it (SIGKILL).
A pid is acted on only if circus lists it in the workers watcher at that moment.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from circus.client import CircusClient

#: The watchers the console steers, as circus.ini names them.
WORKERS, MONGREL2 = "workers", "mongrel2"
#: The most workers the console sets.
MAX_WORKERS = 256
#: Seconds one circus command may take to be answered.
CALL_TIMEOUT = 10.0
#: Seconds to keep asking while circusd runs another command.
BUSY_DEADLINE = 5.0


class Refused(Exception):
    """An action that was not done; the message says why, in one line."""


class Steering:
    """The actions, on the circusd at ``endpoint``."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def call(self, command: str, **properties: Any) -> dict[str, Any]:
        """circusd's answer; :class:`Refused` when it says no or does not answer. A
        command refused because circusd runs another is asked again for a few seconds."""
        client = CircusClient(endpoint=self.endpoint, timeout=CALL_TIMEOUT)
        deadline = time.monotonic() + BUSY_DEADLINE
        try:
            while True:
                try:
                    answer = client.call({"command": command, "properties": properties})
                except Exception as error:  # circus's CallError, or zmq's
                    raise Refused(f"circusd did not answer {command}: {error}") from None
                if answer.get("status") == "ok":
                    return answer
                reason = str(answer.get("reason", "refused"))
                if "already running" not in reason or time.monotonic() > deadline:
                    raise Refused(f"circusd refused {command}: {reason}")
                time.sleep(0.05)
        finally:
            client.stop()

    def wanted(self) -> int:
        return int(self.call("numprocesses", name=WORKERS)["numprocesses"])

    def worker_pids(self) -> set[int]:
        return {int(pid) for pid in self.call("list", name=WORKERS).get("pids", ())}

    # -- the actions: each returns what was done, in a few words

    def add_worker(self) -> str:
        count = self.call("incr", name=WORKERS, nb=1, waiting=True)["numprocesses"]
        return f"one more worker: {count} wanted"

    def remove_worker(self) -> str:
        if self.wanted() == 0:
            raise Refused("no worker to remove")
        self.call("decr", name=WORKERS, nb=1)
        return f"the oldest worker stops once it has finished: {self.wanted()} wanted"

    def set_workers(self, count: int) -> str:
        self.call("set", name=WORKERS, options={"numprocesses": count})
        return f"{count} workers wanted"

    def reload_workers(self) -> str:
        self.call("reload", name=WORKERS, graceful=True)
        return "new workers start; the old ones stop once they have finished"

    def restart_mongrel2(self) -> str:
        self.call("restart", name=MONGREL2)
        return "mongrel2 restarts"

    def stop_worker(self, pid: int) -> str:
        self._check_worker(pid)
        self.call("kill", name=WORKERS, pid=pid)
        return f"worker {pid} stops once it has finished; circus starts another"

    def kill_worker(self, pid: int) -> str:
        self._check_worker(pid)
        self.call("signal", name=WORKERS, pid=pid, signum=int(signal.SIGKILL))
        return f"worker {pid} killed; circus starts another"

    def _check_worker(self, pid: int) -> None:
        if pid not in self.worker_pids():
            raise Refused(f"pid {pid} is not one of circus's workers")


def count_from(body: Any) -> int:
    """The worker count a request body (``{"count": N}``) asks for; ValueError if bad."""
    count = body.get("count") if isinstance(body, dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or \
            not 0 <= count <= MAX_WORKERS:
        raise ValueError(f"count must be an integer from 0 to {MAX_WORKERS}")
    return count
