"""The workers' access log, in gunicorn's format language.

mongrel2's own access log records 200 for every handler request, so the
gateway writes the real one. The format (setting ``access_log_format``) uses
gunicorn's atoms::

    h remote address        l '-'                  u user (REMOTE_USER or Basic auth)
    t [time of request]     r request line         m method
    U path                  q query string         H protocol
    s status                B body bytes           b body bytes, or '-' for none
    f referer               a user agent           p process id
    T duration in s         M in ms                D in us
    L in decimal seconds    {name}i request header {name}e environ variable

The format is read once: each line computes only the atoms it uses. Lines
go to a file (opened for appending), ``-`` for stderr, or nowhere for ``''``.
They are kept until the worker's loop next sends its responses (:meth:`AccessLog.flush`;
an application thread's line, within the loop's tick), then written in one ``write`` on
an ``O_APPEND`` descriptor: one system call (and, on stderr, one wake-up of circusd,
which relays it) for all the requests of a batch; the lines of threads and processes
never interleave. A worker killed with ``kill -9``
loses the lines of its last batch.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections import deque
from typing import Callable, Optional

__all__ = ["AccessLog", "Entry"]

_ATOM = re.compile(r"%\(([^)]*)\)s")


class Entry:
    """What the access log knows of one finished request."""

    __slots__ = ("environ", "status", "sent", "started", "duration")

    def __init__(self, environ: dict, status: int, sent: int, started: float,
                 duration: float) -> None:
        self.environ, self.status, self.sent = environ, status, sent
        self.started, self.duration = started, duration


def _user(entry: Entry) -> str:
    user = entry.environ.get("REMOTE_USER")
    if user:
        return user
    auth = entry.environ.get("HTTP_AUTHORIZATION", "")
    if auth[:6].lower() == "basic ":
        try:
            return base64.b64decode(auth[6:].strip()).decode("latin-1").partition(":")[0]
        except ValueError:
            return "-"
    return "-"


_stamp: tuple[int, str] = (0, "")


def _time(entry: Entry) -> str:
    global _stamp
    second = int(entry.started)
    if _stamp[0] != second:
        _stamp = (second, time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second)))
    return _stamp[1]


def _request_line(entry: Entry) -> str:
    env = entry.environ
    return f"{env['REQUEST_METHOD']} {env.get('RAW_URI', '')} {env['SERVER_PROTOCOL']}"


_ATOMS: dict[str, Callable[[Entry], str]] = {
    "h": lambda e: e.environ.get("REMOTE_ADDR") or "-",
    "l": lambda e: "-",
    "u": _user,
    "t": _time,
    "r": _request_line,
    "m": lambda e: e.environ["REQUEST_METHOD"],
    "U": lambda e: e.environ.get("SCRIPT_NAME", "") + e.environ.get("PATH_INFO", ""),
    "q": lambda e: e.environ.get("QUERY_STRING", ""),
    "H": lambda e: e.environ["SERVER_PROTOCOL"],
    "s": lambda e: str(e.status),
    "B": lambda e: str(e.sent),
    "b": lambda e: str(e.sent) if e.sent else "-",
    "f": lambda e: e.environ.get("HTTP_REFERER", "-"),
    "a": lambda e: e.environ.get("HTTP_USER_AGENT", "-"),
    "p": lambda e: f"<{os.getpid()}>",
    "T": lambda e: str(int(e.duration)),
    "M": lambda e: str(int(e.duration * 1000)),
    "D": lambda e: str(int(e.duration * 1_000_000)),
    "L": lambda e: f"{e.duration:.6f}",
}


def _atom(name: str) -> Callable[[Entry], str]:
    """The function computing one atom; unknown atoms give '-', as in gunicorn."""
    found = _ATOMS.get(name)
    if found is not None:
        return found
    if len(name) > 3 and name[0] == "{" and name[-2] == "}":
        key, where = name[1:-2], name[-1]
        if where == "i":
            key = "HTTP_" + key.upper().replace("-", "_")
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                key = key[5:]
            return lambda e: e.environ.get(key, "-")
        if where == "e":
            return lambda e: os.environ.get(key, "-")
    return lambda e: "-"


class AccessLog:
    """Writes one line per request to ``target`` (a path, ``-`` for stderr, ``''`` for none)."""

    def __init__(self, target: str, fmt: str) -> None:
        self.fmt = fmt
        # The format with its atoms as positions: "%(h)s %(s)s" -> "%s %s" and (h, s).
        self._positional = _ATOM.sub("%s", fmt)
        self._atoms = [_atom(name) for name in _ATOM.findall(fmt)]
        self._check()
        self._kept: deque[bytes] = deque()  # appended by any thread, written by one
        self._fd: Optional[int] = None
        self._own = False
        if target == "-":
            self._fd = 2
        elif target:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._own = True

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def _check(self) -> None:
        sample = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "RAW_URI": "/"}
        try:
            self.fmt % {name: "-" for name in _ATOM.findall(self.fmt)}  # gunicorn's reading
            self.line(Entry(sample, 200, 0, time.time(), 0.0))
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"setting 'access_log_format': {self.fmt!r} is not a valid "
                             f"format ({error}); use atoms like %(h)s %(r)s %(s)s") from None

    def line(self, entry: Entry) -> str:
        """The log line of ``entry``, without its newline."""
        return self._positional % tuple([atom(entry) for atom in self._atoms])

    def log(self, entry: Entry) -> None:
        """Keep the line of ``entry`` for the next :meth:`flush` (any thread)."""
        if self._fd is None:
            return
        self._kept.append((self.line(entry) + "\n").encode("utf-8", "backslashreplace"))

    def flush(self) -> None:
        """Write the kept lines, in one write where the descriptor takes them at once;
        a failing log never fails a request. (Called by the worker's loop thread.)"""
        kept = self._kept
        if not kept or self._fd is None:
            return
        lines = []
        while kept:  # (popleft and append are each atomic: a line added now waits)
            lines.append(kept.popleft())
        data = b"".join(lines)
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            pass

    def close(self) -> None:
        self.flush()
        if self._own and self._fd is not None:
            os.close(self._fd)
        self._fd = None
