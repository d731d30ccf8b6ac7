"""A circus output stream that prefixes each line with its source.

circus.ini sets ``stdout_stream.class = circus_wsgi.logstream.PrefixedStream``
and ``stdout_stream.prefix = workers`` (likewise for stderr), so the terminal
shows ``workers.4242 | GET / ...``: which watcher, which process.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class PrefixedStream:
    """Write each line of a process's output as ``PREFIX.PID | line`` to stdout."""

    def __init__(self, prefix: str = "", **_options: Any) -> None:
        self.prefix = prefix
        self.out: TextIO = sys.stdout
        self._partial: dict[int, bytes] = {}

    def __call__(self, data: dict[str, Any]) -> None:
        pid = data.get("pid", 0)
        text = self._partial.pop(pid, b"") + data["data"]
        *lines, rest = text.split(b"\n")
        if rest:
            self._partial[pid] = rest
        for line in lines:
            self.out.write(f"{self.prefix}.{pid} | {line.decode('utf-8', 'replace')}\n")
        self.out.flush()

    def close(self) -> None:
        for pid, rest in self._partial.items():
            self.out.write(f"{self.prefix}.{pid} | {rest.decode('utf-8', 'replace')}\n")
        self._partial.clear()
        self.out.flush()
