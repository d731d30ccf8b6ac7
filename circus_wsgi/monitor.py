"""What the stack looks like now, for the metrics endpoint and the console.

One look gathers the dispatcher's snapshot (its counters: the same data
``circus-wsgi status`` prints, so nothing is counted twice) and, from circusd,
every watcher's status and wanted process count and each process's wid and age,
with its resident memory and CPU seconds read by psutil on the pids circus
gives. Each part that does not answer is left empty: a look never fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from circus.client import CircusClient

from .rundir import RunDir
from .settings import Settings
from .status import read_status

#: How long one part of a look may take, in seconds.
TIMEOUT = 1.0


@dataclass
class Process:
    """One process circus runs."""

    watcher: str
    wid: int
    pid: int
    age: float  # seconds since it started
    rss: int  # resident memory, bytes
    cpu_seconds: float  # user + system


@dataclass
class Look:
    """The stack at one moment (``at``: time.time())."""

    at: float
    dispatcher: dict[str, Any] | None = None  # None: the dispatcher did not answer
    watchers: dict[str, str] = field(default_factory=dict)  # name -> circus status
    wanted: dict[str, int] = field(default_factory=dict)  # name -> numprocesses
    processes: list[Process] = field(default_factory=list)


class Monitor:
    """Looks at one stack (its run dir and circus endpoint)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.endpoint = settings.endpoint or RunDir(Path(settings.run_dir)).circus_endpoint

    def look(self) -> Look:
        look = Look(time.time())
        try:
            look.dispatcher = read_status(self.settings, timeout=TIMEOUT)
        except TimeoutError:
            pass
        client = CircusClient(endpoint=self.endpoint, timeout=TIMEOUT)
        try:
            look.watchers = self._call(client, "status").get("statuses", {})
            for name in look.watchers:
                options = self._call(client, "get", name=name, keys=["numprocesses"])
                if "options" in options:
                    look.wanted[name] = int(options["options"]["numprocesses"])
            infos = self._call(client, "stats").get("infos", {})
        finally:
            client.stop()
        look.processes = sorted(_processes(infos), key=lambda p: (p.watcher, p.wid))
        return look

    @staticmethod
    def _call(client: CircusClient, command: str, **properties: Any) -> dict[str, Any]:
        try:
            answer = client.call({"command": command, "properties": properties})
        except Exception:  # circus's client raises CallError, or zmq's errors
            return {}
        return answer if answer.get("status") == "ok" else {}


def _processes(infos: dict[str, Any]) -> list[Process]:
    found = []
    for watcher, processes in infos.items():
        if not isinstance(processes, dict):
            continue
        for pid, info in processes.items():
            if not isinstance(info, dict) or "wid" not in info:
                continue
            try:
                process = psutil.Process(int(pid))
                with process.oneshot():
                    rss = process.memory_info().rss
                    times = process.cpu_times()
            except (psutil.Error, ValueError):
                continue
            found.append(Process(watcher, int(info["wid"]), int(pid),
                                 float(info.get("age") or 0.0), rss, times.user + times.system))
    return found
