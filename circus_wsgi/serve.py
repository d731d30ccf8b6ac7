"""``circus-wsgi serve APP``: the whole stack in the foreground, from one command.

It checks what would make the stack fail before starting anything (the mongrel2
binary runs, the user may be switched to, the TLS certificate and key work, the
ports are free, the app imports as a worker would import it, the run dir is
private and writable), writes the configuration into the run dir,
runs circusd on it and says where it serves and how to steer it once a worker
is ready. A watcher that circus stops while the stack starts (a crash loop
stopped by the flapping plugin) ends the start with one line.

Ctrl-C or SIGTERM stops the workers first (they finish what they hold while
mongrel2 still delivers their responses), then circusd and the rest; a second
Ctrl-C kills everything at once. Then the run dir is removed, or for a
user-given one, its sockets and upload temp files. circusd, and through
:mod:`lifeline` every process under it, dies with this command even when it
is killed; this command is the subreaper of the stack, so when circusd is
killed, what it leaves behind is reparented here and ended.

Exit status: 2 when a check fails (nothing started), 0 once a stop was asked
for and the stack is gone, 1 when the stack fails to start or circusd exits on
its own.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import psutil
from circus.client import CircusClient, make_message

from . import privileges, tls
from .deploy import write_configs
from .exits import EXIT_OK, EXIT_USAGE
from .flapping import describe
from .hooks import HookFailed, ServerHooks
from .httpserver import address_url, read_token, split_address
from .lifeline import die_with_parent
from .mongrel2_binary import usable_mongrel2
from .rundir import RunDir
from .settings import Settings, SettingsError
from .status import read_status

#: Seconds, past the workers' graceful_timeout, that circusd may take to stop.
STOP_MARGIN = 10.0
#: How long the stack may take to become ready before serve gives up.
START_TIMEOUT = 30.0
#: How long the app's import check may take.
IMPORT_TIMEOUT = 120.0
#: How long processes left behind by a killed circusd get to exit after SIGTERM.
ORPHAN_TIMEOUT = 5.0
#: The watchers serve runs, as circus.ini names them.
WATCHERS = ("mongrel2", "dispatcher", "workers", "metrics", "console")

PR_SET_CHILD_SUBREAPER = 36

_IMPORT_CHECK = """\
import json, os, sys
from circus_wsgi.appload import AppLoadError, load_app, load_mounts, prepare_path
chdir, virtualenv, env, app, mounts, access_log = json.loads(sys.argv[1])
os.environ.update(env)
try:
    prepare_path(chdir, virtualenv)
    if access_log not in ("", "-"):
        try:
            open(access_log, "a").close()
        except OSError as error:
            sys.exit(f"setting 'access_log': cannot write {os.path.abspath(access_log)}: "
                     f"{error.strerror}")
    load_app(app)
    load_mounts([tuple(m) for m in mounts])
except AppLoadError as error:
    sys.exit(str(error))
"""


class ServeError(Exception):
    """Something that stops the stack from starting; the message is one line."""


# --------------------------------------------------------------------------
# Preflight: what would make the stack fail, checked before anything starts


def check_app(settings: Settings) -> None:
    """Start as a worker would, once, in a child process: as the stack's ``user``, in
    ``chdir``, with the ``virtualenv`` and the ``env`` setting; open the access log and
    import the app (and mounts)."""
    if not settings.app:
        raise SettingsError("app", None, "required: the WSGI application as MODULE:CALLABLE")
    args = json.dumps([settings.chdir, settings.virtualenv, dict(settings.env), settings.app,
                       list(settings.mounts), settings.access_log])
    who = privileges.identity(settings)
    as_user = {} if who is None else privileges.as_user(who)
    try:
        result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, args],
                                capture_output=True, text=True, timeout=IMPORT_TIMEOUT,
                                **as_user)
    except subprocess.TimeoutExpired:
        raise ServeError(f"importing {settings.app} took more than {IMPORT_TIMEOUT:.0f} s"
                         ) from None
    except PermissionError as error:
        runner = who.user if who else "this user"
        raise ServeError(f"{runner} cannot run {sys.executable}: {error.strerror}") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise ServeError(lines[-1])


def check_port(bind: str, what: str = "") -> None:
    """Fail now if the address (HTTP's, or ``what``'s) cannot be listened on."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as error:
            raise ServeError(f"cannot listen on {bind}{what}: {error.strerror}") from None


def check_keys(settings: Settings) -> None:
    """The CURVE keys the remote link needs are there (curve.py says what is missing)."""
    from .curve import CurveKeysError, own_pair, the_front

    if not settings.curve_keys or not (settings.remote_workers or settings.connect):
        return
    try:
        own_pair(settings.curve_keys)
        if settings.connect:
            the_front(settings.curve_keys)
    except CurveKeysError as error:
        raise ServeError(f"setting 'curve_keys': {error}") from None


def check_token(value: str, name: str) -> None:
    """A token given as @FILE must be readable and not empty."""
    if value.startswith("@"):
        try:
            if not Path(value[1:]).read_text().strip():
                raise ServeError(f"setting {name!r}: {value[1:]} is empty")
        except OSError as error:
            raise ServeError(f"setting {name!r}: cannot read {value[1:]}: "
                             f"{error.strerror}") from None


def prepare_run_dir(settings: Settings) -> tuple[Settings, bool]:
    """Settings with their run dir made (private); True when serve created it.

    A user-given directory that exists must be private already (serve does not
    chmod what it did not make: think of ``--run-dir /tmp``) and must not be the
    run dir of a running stack, whose sockets a second circusd would take over.
    What a killed stack left in it (sockets, pid files, uploads) is removed.
    """
    who = privileges.identity(settings)
    owner = who.owner if who else None
    if not settings.run_dir:
        run_dir = tempfile.mkdtemp(prefix="cw-", dir="/tmp")
        RunDir(Path(run_dir)).create(owner)
        return settings.replace(run_dir=run_dir), True
    path = Path(settings.run_dir)
    try:
        if path.is_dir():
            _check_private(path, owner[0] if owner else os.getuid())
            busy = [sock.name for sock in path.glob("*.sock") if _accepts(sock)]
            if busy:
                raise ServeError(f"run dir {path} is in use by a running stack "
                                 f"({busy[0]} answers): stop it, or name another directory")
            clean_run_dir(path, created=False)  # what a killed stack left
        RunDir(path).create(owner)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ServeError(f"run dir {path} is not writable: {error.strerror}") from None
    privileges.check_reachable(who, path)
    return settings, False


def _check_private(path: Path, uid: int) -> None:
    info = path.stat()
    if info.st_uid != uid or info.st_mode & 0o077:
        raise ServeError(f"run dir {path} is open to other users (mode "
                         f"{info.st_mode & 0o7777:04o}): chmod 700 it, or name a new "
                         "directory")


def _accepts(path: Path) -> bool:
    """True when a process listens on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def clean_run_dir(run_dir: Path, created: bool) -> None:
    """Remove what a stopped stack leaves: the whole dir if serve made it, else its
    sockets, pid file and upload temp files."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for leftover in [*run_dir.glob("*.sock"), *run_dir.glob("*.pid"),
                     *RunDir(run_dir).uploads.glob("*")]:
        leftover.unlink(missing_ok=True)
    tls.remove(RunDir(run_dir))


# --------------------------------------------------------------------------
# The running stack


class Stack:
    """circusd running the generated circus.ini, and the means to stop it."""

    def __init__(self, settings: Settings, circus_ini: Path) -> None:
        self.settings = settings
        self.circus_ini = circus_ini
        self.endpoint = settings.endpoint or RunDir(Path(settings.run_dir)).circus_endpoint
        self.process: Optional[subprocess.Popen] = None
        self.stop_requested = 0

    def start(self) -> None:
        """Run circusd in its own session (Ctrl-C in the terminal reaches only this
        command, which stops the stack in order); it gets SIGTERM if this command dies."""
        _become_subreaper()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "circus.circusd", str(self.circus_ini)],
            start_new_session=True, preexec_fn=die_with_parent)

    @property
    def circusd(self) -> subprocess.Popen:
        """The circusd process (once :meth:`start` has run)."""
        if self.process is None:
            raise RuntimeError("circusd was not started")
        return self.process

    def request_stop(self, signum: int = signal.SIGTERM, frame: object = None) -> None:
        """First signal: stop gracefully (done by :meth:`wait`). Second: kill everything now."""
        self.stop_requested += 1
        if self.stop_requested > 1:
            self.kill()

    def _interrupted(self) -> bool:
        return self.stop_requested > 1 or self.circusd.poll() is not None

    # -- starting

    def wait_ready(self) -> None:
        """Return once mongrel2 listens and (with the dispatcher) a worker is ready, or
        once a stop is requested."""
        host, _, port = self.settings.bind.rpartition(":")
        started: set[str] = set()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.stop_requested:
                return
            if self.circusd.poll() is not None:
                raise ServeError(f"circusd exited ({describe(self.circusd.returncode)}) "
                                 "before the stack was ready (see the log above)")
            if self.settings.role == "workers":  # no mongrel2 here: circus runs the workers
                if self._workers_running():
                    return
            elif _listening(host, int(port)) and self._workers_ready() and \
                    self._listeners_ready():
                return
            self._check_watchers(started)
            time.sleep(0.05)
        raise ServeError(f"the stack was not ready within {START_TIMEOUT:.0f} s "
                         "(see the log above)")

    def _check_watchers(self, started: set[str]) -> None:
        """Fail when a watcher that had started is stopped again: circus's flapping
        plugin stopped a crash loop."""
        reply = self.call("status", timeout=0.2) or {}
        for name, status in reply.get("statuses", {}).items():
            if name not in WATCHERS:
                continue
            if status != "stopped":
                started.add(name)
            elif name in started:
                raise ServeError(f"{name} crashed in a loop at start and circus stopped "
                                 f"its watcher (see the {name}. lines above)")

    def _listeners_ready(self) -> bool:
        """The metrics endpoint and the console listen, when asked for."""
        return all(_listening(*split_address(address))
                   for address in (self.settings.metrics, self.settings.console) if address)

    def _workers_running(self) -> bool:
        """circus runs every worker of a host of workers alone."""
        reply = self.call("list", timeout=0.2, name="workers") or {}
        return len(reply.get("pids", ())) >= self.settings.starting_workers

    def _workers_ready(self) -> bool:
        if self.settings.mode == "direct":
            return True
        try:
            return read_status(self.settings, timeout=0.2)["idle_workers"] > 0
        except TimeoutError:
            return False

    # -- running and stopping

    def call(self, command: str, timeout: float, **properties: Any) -> Optional[dict]:
        """circusd's reply to ``command``; None after ``timeout`` seconds, or at once when
        circusd is gone or a second stop signal came."""
        client = CircusClient(endpoint=self.endpoint)
        try:
            message = make_message(command, **properties)
            message["id"] = call_id = uuid.uuid4().hex
            client.socket.send_string(json.dumps(message))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._interrupted():
                if client.socket.poll(50):
                    reply = json.loads(client.socket.recv())
                    if reply.get("id") == call_id:
                        return reply
            return None
        finally:
            client.stop()

    def wait(self) -> int:
        """Wait for circusd to exit, stopping the stack in order once a stop is requested;
        then end whatever a killed circusd left behind."""
        while True:
            try:
                status = self.circusd.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if self.stop_requested:
                    status = self._stop_in_order()
                    break
        _end_descendants()
        return status

    def _stop_in_order(self) -> int:
        """Workers first (they finish what they hold while mongrel2 still delivers their
        responses), then circusd and the rest; past the deadline, kill."""
        limit = self.settings.graceful_timeout + STOP_MARGIN
        reply = self.call("stop", timeout=limit, name="workers", waiting=True)
        if reply is None and not self._interrupted():
            print(f"circus-wsgi: the workers did not stop within {limit:.0f} s",
                  file=sys.stderr)
        elif reply is not None and reply.get("status") != "ok":
            print(f"circus-wsgi: stopping the workers: {reply.get('reason')}",
                  file=sys.stderr)
        _signal(self.circusd.pid, signal.SIGTERM)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                return self.circusd.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if self.stop_requested > 1:
                    return self.circusd.wait()
        print(f"circus-wsgi: circusd did not stop within {limit:.0f} s; killing it",
              file=sys.stderr)
        self.kill()
        return self.circusd.wait()

    def kill(self) -> None:
        """SIGKILL circusd and every process under it."""
        if self.process is None:
            return
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for process in [self.process, *tree]:
            _signal(process.pid, signal.SIGKILL)


def _become_subreaper() -> None:
    """Adopt the orphans of our descendants (Linux ``PR_SET_CHILD_SUBREAPER``): when
    circusd is killed, its children become this process's, to be ended and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _end_descendants() -> None:
    """SIGTERM what is left under this process (children of a killed circusd, such as
    circusd-stats, which has no parent-death signal), SIGKILL it after a deadline."""
    left = psutil.Process().children(recursive=True)
    for process in left:
        _signal(process.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(left, timeout=ORPHAN_TIMEOUT)
    for process in alive:
        _signal(process.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=ORPHAN_TIMEOUT)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _announce(settings: Settings) -> None:
    run = RunDir(Path(settings.run_dir))
    endpoint = settings.endpoint or run.circus_endpoint
    threads = f" x {settings.threads} threads" if settings.threads > 1 else ""
    scaling = f" (autoscaling {settings.workers_min} to {settings.workers_max})" \
        if settings.autoscaling else ""
    scheme = "https" if settings.certfile else "http"
    as_user = f" as {settings.user}" if settings.user else ""
    where = f"as workers of {settings.connect}" if settings.role == "workers" else \
        f"at {scheme}://{settings.bind}/"
    print(f"Serving {settings.app} {where} with "
          f"{settings.starting_workers} workers{threads}{scaling}{as_user}", flush=True)
    if settings.remote_workers:
        print(f"Workers from other hosts: {settings.remote_workers}", flush=True)
    print(f"Control: export CIRCUSCTL_ENDPOINT={endpoint}", flush=True)
    print(f"Watch:   circus-top --endpoint {run.circus_stats}    "
          f"Status: circus-wsgi status --run-dir {settings.run_dir}", flush=True)
    if settings.metrics:
        print(f"Metrics: {address_url(settings.metrics)}/metrics", flush=True)
    if settings.console:
        print(f"Console: {address_url(settings.console)}/?token="
              f"{read_token(settings.console_token)}", flush=True)


def preflight(settings: Settings) -> tuple[Settings, bool]:
    """Every check that needs nothing running; the settings with their run dir, and
    True when serve created it."""
    privileges.check_switch(settings)
    check_keys(settings)
    if settings.role == "workers":  # no mongrel2, no port here
        check_app(settings)
        return prepare_run_dir(settings)
    usable_mongrel2(settings.mongrel2)
    tls.check(settings)
    check_port(settings.bind)
    if settings.remote_workers:
        check_port(settings.remote_workers.removeprefix("tcp://"), " (remote_workers)")
    if settings.http_redirect:
        check_port(settings.http_redirect)
    if settings.metrics:
        check_port(settings.metrics, " (metrics)")
        check_token(settings.metrics_token, "metrics_token")
    if settings.console:
        check_port(settings.console, " (console)")
        check_token(settings.console_token, "console_token")
    check_app(settings)
    return prepare_run_dir(settings)


def serve(settings: Settings) -> int:
    """Run the stack in the foreground until Ctrl-C or SIGTERM; return the exit status.

    The server hooks on_starting (before anything), when_ready (once it serves) and
    on_exit (last) run here (:mod:`.hooks`)."""
    server_hooks = ServerHooks(settings)
    try:
        server_hooks.on_starting()
    except HookFailed as error:
        print(f"circus-wsgi: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(settings, server_hooks)
    finally:
        server_hooks.on_exit()


def _run(settings: Settings, server_hooks: ServerHooks) -> int:
    try:
        settings, created = preflight(settings)
    except ServeError as error:
        print(f"circus-wsgi: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    run_dir = Path(settings.run_dir)
    if settings.console and not settings.console_token:  # a new one at every start
        settings = settings.replace(console_token=secrets.token_urlsafe(24))
    try:
        if settings.endpoint.startswith("tcp://"):
            print(f"circus-wsgi: warning: circusd listens on {settings.endpoint}: anyone on "
                  "this host can control the stack", file=sys.stderr)
        if (settings.remote_workers or settings.connect) and not settings.curve_keys:
            print(f"circus-wsgi: warning: {settings.remote_workers or settings.connect} is "
                  "plain TCP, without CURVE: anyone who reaches it can take (or serve) "
                  "requests", file=sys.stderr)
        files = write_configs(settings, run_dir)
        stack = Stack(settings, files["circus.ini"])
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stack.request_stop)
        stack.start()
        try:
            stack.wait_ready()
        except ServeError as error:
            print(f"circus-wsgi: error: {error}", file=sys.stderr)
            stack.request_stop()
            stack.wait()
            return 1
        if not stack.stop_requested:
            _announce(settings)
            server_hooks.when_ready(settings)
        status = stack.wait()
        if stack.stop_requested:
            return EXIT_OK
        print(f"circus-wsgi: error: circusd exited ({describe(status)}); the stack is "
              "stopped", file=sys.stderr)
        return 1
    finally:
        clean_run_dir(run_dir, created)
