"""Server hooks: gunicorn's hooks, called where this stack does what gunicorn does.

The settings ``on_starting``, ``when_ready`` and ``on_exit`` run in ``circus-wsgi
serve`` (:class:`ServerHooks`), gunicorn's master; ``post_worker_init``,
``pre_request``, ``post_request`` and ``worker_exit`` run in each worker
(:class:`WorkerHooks`). A hook that raises is logged with its name and traceback,
and the stack goes on; only ``on_starting`` stops the start (:class:`HookFailed`).

The arguments stand in for gunicorn's objects: :class:`Server` for its
Arbiter, :class:`WorkerView` for its Worker, :class:`Request` and
:class:`Response` for its request and response. ``pre_request`` and
``post_request`` cost nothing when they are not set: :meth:`WorkerHooks.install` then
leaves the worker's :class:`~circus_wsgi.wsgi.Exchange` as it is, and otherwise
gives it a subclass that calls them around the application.
"""

from __future__ import annotations

import http
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .callref import UnresolvedReference, arguments_taken, resolve
from .rundir import RunDir
from .settings import HOOK_ARGUMENTS, Settings, SettingsError
from .wsgi import Exchange

__all__ = ["HookFailed", "Server", "WorkerView", "Request", "Response", "ServerHooks",
           "WorkerHooks"]

log = logging.getLogger("circus_wsgi.hooks")

Hook = Callable[..., Any]


class HookFailed(Exception):
    """on_starting raised: the start stops; the message is one line."""


def _load(settings: Settings, name: str) -> Optional[Hook]:
    """The hook ``name`` of ``settings`` as a function taking all its arguments, or None."""
    value = getattr(settings, name)
    if value is None:
        return None
    try:
        function = resolve(value)
        arguments, fewest = HOOK_ARGUMENTS[name]
        most = len(arguments)
        taken = arguments_taken(function, most, fewest)
    except (UnresolvedReference, ValueError) as error:
        raise SettingsError(name, value, str(error)) from None
    if taken == most:
        return function
    return lambda *arguments: function(*arguments[:taken])


def _call(name: str, function: Hook, *arguments: Any) -> None:
    """Call a hook; log what it raises, with the hook's name, and go on."""
    try:
        function(*arguments)
    except Exception as error:
        log.error("hook %s failed: %s: %s", name, type(error).__name__, error, exc_info=True)


@dataclass
class Server:
    """The ``server`` argument, gunicorn's Arbiter: ``cfg`` (the :class:`Settings`),
    ``pid`` (serve's, or in a worker circusd's), ``log``, ``endpoint`` (circusd's)."""

    cfg: Settings
    pid: int
    log: logging.Logger

    @property
    def endpoint(self) -> str:
        """circusd's control endpoint (what ``circusctl`` and ``CircusClient`` talk to)."""
        if self.cfg.endpoint or not self.cfg.run_dir:
            return self.cfg.endpoint
        return RunDir(Path(self.cfg.run_dir)).circus_endpoint

    @property
    def num_workers(self) -> int:
        """The setting workers (``circusctl incr/decr workers`` change the live number)."""
        return self.cfg.workers


class WorkerView:
    """The ``worker`` argument, gunicorn's Worker: ``pid``, ``ppid``, ``cfg``, ``log``,
    ``nr`` (requests served so far) and ``alive`` (not stopping)."""

    __slots__ = ("_worker", "pid", "ppid", "cfg", "log")

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self.pid, self.ppid = os.getpid(), os.getppid()
        self.cfg: Settings = worker.settings
        self.log = logging.getLogger("circus_wsgi.worker")

    @property
    def nr(self) -> int:
        return self._worker.served

    @property
    def alive(self) -> bool:
        return not self._worker.signalled


class Request:
    """The ``req`` argument, read from the request's environ: ``method``, ``uri``,
    ``path``, ``query``, ``version`` (``(1, 1)``), ``headers`` (gunicorn's list of
    upper-case names and values), ``scheme``, ``remote_addr``; ``environ`` too."""

    __slots__ = ("environ",)

    def __init__(self, environ: dict) -> None:
        self.environ = environ

    method = property(lambda self: self.environ["REQUEST_METHOD"])
    uri = property(lambda self: self.environ["RAW_URI"])
    path = property(lambda self: self.environ["RAW_URI"].partition("?")[0])
    query = property(lambda self: self.environ.get("QUERY_STRING", ""))
    scheme = property(lambda self: self.environ["wsgi.url_scheme"])
    remote_addr = property(lambda self: self.environ.get("REMOTE_ADDR", ""))

    @property
    def version(self) -> tuple[int, int]:
        major, _, minor = self.environ["SERVER_PROTOCOL"].partition("/")[2].partition(".")
        return int(major or 1), int(minor or 0)

    @property
    def headers(self) -> list[tuple[str, str]]:
        found = []
        for key, value in self.environ.items():
            if key.startswith("HTTP_"):
                found.append((key[5:].replace("_", "-"), value))
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                found.append((key.replace("_", "-"), value))
        return found


class Response:
    """The ``resp`` argument of post_request: ``status_code``, ``status`` (``"200 OK"``),
    ``headers`` (the application's) and ``sent`` (body bytes sent)."""

    __slots__ = ("_exchange",)

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    status_code = property(lambda self: self._exchange.status)
    sent = property(lambda self: self._exchange.sent)

    @property
    def status(self) -> str:
        line = self._exchange._line[9:-2].decode("latin-1")  # "HTTP/1.1 200 OK\r\n"
        if line[:3] == str(self.status_code):
            return line
        try:
            return f"{self.status_code} {http.HTTPStatus(self.status_code).phrase}"
        except ValueError:
            return str(self.status_code)

    @property
    def headers(self) -> list[tuple[str, str]]:
        lines = self._exchange._headers.decode("latin-1").split("\r\n")
        return [(name, value.strip()) for name, _, value in
                (line.partition(":") for line in lines if line)]


class _Hooks:
    """Some hooks of ``settings``, loaded: each a function taking all its arguments, or None."""

    def __init__(self, settings: Settings, names: tuple[str, ...]) -> None:
        self.hooks = {name: _load(settings, name) for name in names}

    def _call(self, name: str, *arguments: Any) -> None:
        hook = self.hooks[name]
        if hook is not None:
            _call(name, hook, *arguments)


# --------------------------------------------------------------------------
# In serve

#: The hooks only serve runs: under plain circusd, circusd is the master.
SERVE_ONLY = ("on_starting", "when_ready", "on_exit")


def serve_only(settings: Settings) -> list[str]:
    """The hooks set in ``settings`` that run only under ``circus-wsgi serve``."""
    return [name for name in SERVE_ONLY if getattr(settings, name) is not None]


class ServerHooks(_Hooks):
    """on_starting, when_ready and on_exit for ``circus-wsgi serve``."""

    def __init__(self, settings: Settings) -> None:
        named = [getattr(settings, name) for name in SERVE_ONLY]
        if any(isinstance(value, str) for value in named) and settings.chdir not in sys.path:
            sys.path.insert(0, settings.chdir)  # MODULE:NAME imports as gunicorn's master does
        super().__init__(settings, SERVE_ONLY)
        server_log = logging.getLogger("circus_wsgi.server")
        if any(self.hooks.values()) and not server_log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("circus-wsgi: %(message)s"))
            for logger in (server_log, log):
                logger.addHandler(handler)
                logger.setLevel(settings.log_level.upper())
                logger.propagate = False
        self.server = Server(settings, os.getpid(), server_log)
        self.started = False

    def on_starting(self) -> None:
        """Before anything starts; HookFailed (one line) if the hook raises."""
        hook = self.hooks["on_starting"]
        if hook is not None:
            try:
                hook(self.server)
            except Exception as error:
                raise HookFailed(f"hook on_starting failed: {type(error).__name__}: "
                                 f"{' '.join(str(error).split())}") from None
        self.started = True

    def when_ready(self, settings: Settings) -> None:
        """The stack serves; ``settings`` are those it runs with (run_dir filled in)."""
        self.server.cfg = settings
        self._call("when_ready", self.server)

    def on_exit(self) -> None:
        """serve is about to exit (once on_starting has run)."""
        if self.started:
            self._call("on_exit", self.server)


# --------------------------------------------------------------------------
# In a worker


class WorkerHooks(_Hooks):
    """post_worker_init, worker_exit, pre_request and post_request of one worker.

    Loaded before the worker is made (SettingsError if a hook names no function it
    can call), then :meth:`install`-ed in it.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, ("post_worker_init", "worker_exit", "pre_request",
                                    "post_request"))
        self.server = Server(settings, os.getppid(), logging.getLogger("circus_wsgi.worker"))
        self.view: Optional[WorkerView] = None

    def install(self, worker: Any) -> None:
        """With pre_request or post_request, ``worker``'s requests run in an Exchange
        that calls them (``worker.exchange_type``); without, nothing changes."""
        self.view = WorkerView(worker)
        before, after = self.hooks["pre_request"], self.hooks["post_request"]
        if before is not None or after is not None:
            worker.exchange_type = _hooked_exchange(self.view, before, after)

    def post_worker_init(self) -> None:
        self._call("post_worker_init", self.view)

    def worker_exit(self) -> None:
        self._call("worker_exit", self.server, self.view)


def _hooked_exchange(view: WorkerView, before: Optional[Hook],
                     after: Optional[Hook]) -> type[Exchange]:
    class HookedExchange(Exchange):
        """An Exchange that calls pre_request before the application, post_request after."""

        __slots__ = ()

        def run(self, app: Callable[..., Any], environ: dict) -> None:
            request = Request(environ)
            if before is not None:
                _call("pre_request", before, view, request)
            try:
                super().run(app, environ)
            finally:
                if after is not None:
                    _call("post_request", after, view, request, environ, Response(self))

    return HookedExchange
