"""circus output streams: each line prefixed with its source; mongrel2's lines by level.

circus.ini sets ``stdout_stream.class = circus_wsgi.logstream.PrefixedStream``
and ``stdout_stream.prefix = workers`` (likewise for stderr), so the terminal
shows ``workers.4242 | GET / ...``: which watcher, which process.

mongrel2 has no log level of its own: it writes some 30 INFO lines at every start
and logs as errors events that are none. :class:`Mongrel2Stream` shows its lines
by the stack's ``log_level``: its INFO lines at ``debug`` only, its warnings and
errors at ``warning`` and ``error``, except :data:`NOT_ERRORS`, shown at ``debug``,
and everything it says once it has been told to stop (it reports its own sockets
closing as errors). A line that is not the start of a log entry belongs to the
entry before it.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

#: The stack's log levels, least severe first.
LEVELS = ("debug", "info", "warning", "error")
#: mongrel2's level names, as the stack's.
_MONGREL2_LEVELS = {"DEBUG": "debug", "INFO": "debug", "WARN": "warning", "ERROR": "error"}
_ENTRY = re.compile(r"\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT \[([A-Z]+)\] (?:\([^)]*\) )?(.*)")
#: What mongrel2 1.12 logs as an error but is not one, and why.
NOT_ERRORS = tuple(re.compile(pattern) for pattern in (
    r"Failed to open PID file .* for reading",  # at every start: no earlier pid file
    r"No handler to notify",  # a connection closed without a request for the app
    r"Failed to find cert for ",  # SNI for a name without its own file: certfile is used
    r"Handshake failed with error code",  # a client's TLS handshake failed (TLS 1.0, ...)
    r"SSL handshake failed",  # the same handshake, reported again
))
_STOPPING = "SHUTDOWN REQUESTED"


class PrefixedStream:
    """Write each line of a process's output as ``PREFIX.PID | line`` to stdout."""

    def __init__(self, prefix: str = "", **_options: Any) -> None:
        self.prefix = prefix
        self.out: TextIO = sys.stdout
        self._partial: dict[int, bytes] = {}

    def __call__(self, data: dict[str, Any]) -> None:
        pid = data.get("pid", 0)
        complete, newline, rest = (self._partial.pop(pid, b"") + data["data"]).rpartition(b"\n")
        if rest:
            self._partial[pid] = rest
        if newline:
            self._write_lines(pid, complete.decode("utf-8", "replace"))
            self.out.flush()

    def _write_lines(self, pid: int, lines: str) -> None:
        """Write ``lines`` (one or more, without the last newline), each prefixed: one
        write for all the lines a read brought (a worker's batch of access-log lines)."""
        prefix = f"{self.prefix}.{pid} | "
        self.out.write(prefix + lines.replace("\n", "\n" + prefix) + "\n")

    def close(self) -> None:
        for pid, rest in self._partial.items():
            self._write_lines(pid, rest.decode("utf-8", "replace"))
        self._partial.clear()
        self.out.flush()


class Mongrel2Stream(PrefixedStream):
    """A :class:`PrefixedStream` that keeps the mongrel2 lines at or above ``level``."""

    def __init__(self, prefix: str = "mongrel2", level: str = "info", **options: Any) -> None:
        super().__init__(prefix, **options)
        self.minimum = LEVELS.index(level)
        self._entry_level: dict[int, str] = {}  # per process: the level of its last entry
        self._stopping: set[int] = set()

    def _write_lines(self, pid: int, lines: str) -> None:
        for line in lines.split("\n"):
            if LEVELS.index(self._level(pid, line)) >= self.minimum:
                super()._write_lines(pid, line)

    def _level(self, pid: int, line: str) -> str:
        entry = _ENTRY.match(line)
        if entry is None:
            return self._entry_level.get(pid, "info")
        name, message = entry.groups()
        if message.startswith(_STOPPING):
            self._stopping.add(pid)
        level = _MONGREL2_LEVELS.get(name, "error")
        if pid in self._stopping or any(pattern.match(message) for pattern in NOT_ERRORS):
            level = "debug"
        self._entry_level[pid] = level
        return level
