"""``circus-wsgi serve APP``: the whole stack in the foreground, from one command.

It checks what would make the stack fail before starting anything (the app
imports, mongrel2 is installed, the port is free, the run dir is writable),
writes the configuration into a private run dir, runs circusd on it, says
where it serves and how to steer it, and on Ctrl-C or SIGTERM stops it all
and removes the run dir's sockets and upload files. A second Ctrl-C kills at
once. circusd, and through :mod:`lifeline` every process under it, dies with
this command even when it is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from circus.client import CircusClient
from circus.exc import CallError

from .deploy import write_configs
from .exits import EXIT_OK, EXIT_USAGE
from .lifeline import die_with_parent
from .rundir import RunDir
from .settings import Settings, SettingsError
from .status import read_status

#: Seconds, past the workers' graceful_timeout, that circusd may take to stop.
STOP_MARGIN = 10.0
#: How long the stack may take to become ready before serve gives up.
START_TIMEOUT = 30.0

_IMPORT_CHECK = """\
import json, sys
from circus_wsgi.appload import AppLoadError, load_app, load_mounts, prepare_path
chdir, virtualenv, app, mounts = json.loads(sys.argv[1])
try:
    prepare_path(chdir, virtualenv)
    load_app(app)
    load_mounts([tuple(m) for m in mounts])
except AppLoadError as error:
    sys.exit(str(error))
"""


class ServeError(Exception):
    """Something that stops the stack from starting; the message is one line."""


def check_app(settings: Settings) -> None:
    """Import the app (and mounts) once in a child process, as a worker would."""
    if not settings.app:
        raise SettingsError("app", None, "required: the WSGI application as MODULE:CALLABLE")
    args = json.dumps([settings.chdir, settings.virtualenv, settings.app,
                       list(settings.mounts)])
    result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, args],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise ServeError(lines[-1])


def check_mongrel2() -> None:
    if shutil.which("mongrel2") is None:
        raise ServeError("mongrel2 is not installed: apt-get install mongrel2-core "
                         "(or run make serve, which installs it)")


def check_port(bind: str) -> None:
    """Fail now if the HTTP address cannot be listened on."""
    host, _, port = bind.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as error:
            raise ServeError(f"cannot listen on {bind}: {error.strerror}") from None


def prepare_run_dir(settings: Settings) -> tuple[Settings, bool]:
    """Settings with their run dir made (private); True when serve created it."""
    if not settings.run_dir:
        return settings.replace(run_dir=tempfile.mkdtemp(prefix="cw-", dir="/tmp")), True
    try:
        RunDir(Path(settings.run_dir)).create()
        probe = Path(settings.run_dir, ".write-test")
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ServeError(f"run dir {settings.run_dir} is not writable: "
                         f"{error.strerror}") from None
    return settings, False


def clean_run_dir(run_dir: Path, created: bool) -> None:
    """Remove what a stopped stack leaves: the whole dir if serve made it, else its
    sockets, pid file and upload temp files."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for leftover in [*run_dir.glob("*.sock"), *run_dir.glob("*.pid"),
                     *RunDir(run_dir).uploads.glob("*")]:
        leftover.unlink(missing_ok=True)


class Stack:
    """circusd running the generated circus.ini, and the means to stop it."""

    def __init__(self, settings: Settings, circus_ini: Path) -> None:
        self.settings = settings
        self.process = subprocess.Popen(
            [sys.executable, "-m", "circus.circusd", str(circus_ini)],
            start_new_session=True, preexec_fn=die_with_parent)
        self.stop_requested = 0

    def wait_ready(self) -> None:
        """Return once mongrel2 listens and (with the dispatcher) a worker is ready."""
        host, _, port = self.settings.bind.rpartition(":")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None or self.stop_requested:
                raise ServeError("the stack stopped before it was ready (see the log above)")
            if _listening(host, int(port)) and self._workers_ready():
                return
            time.sleep(0.05)
        raise ServeError(f"the stack was not ready within {START_TIMEOUT:.0f} s")

    def _workers_ready(self) -> bool:
        if self.settings.mode == "direct":
            return True
        try:
            return read_status(self.settings, timeout=0.2)["idle_workers"] > 0
        except TimeoutError:
            return False

    def request_stop(self, signum: int, frame: object) -> None:
        """First signal: stop gracefully (done by :meth:`wait`). Second: kill everything now."""
        self.stop_requested += 1
        if self.stop_requested > 1:
            self.kill()

    def kill(self) -> None:
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for process in [self.process, *tree]:
            _signal(process.pid, signal.SIGKILL)

    def wait(self) -> int:
        """Wait for circusd to exit, stopping the stack in order once a stop is requested."""
        while True:
            try:
                return self.process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if self.stop_requested:
                    return self._stop_in_order()

    def _stop_in_order(self) -> int:
        """Workers first (they finish what they hold while mongrel2 still delivers their
        responses), then circusd and the rest; past the deadline, kill."""
        limit = self.settings.graceful_timeout + STOP_MARGIN
        endpoint = self.settings.endpoint or RunDir(Path(self.settings.run_dir)).circus_endpoint
        client = CircusClient(endpoint=endpoint, timeout=limit)
        try:
            client.call({"command": "stop", "properties": {"name": "workers", "waiting": True}})
        except CallError as error:
            print(f"circus-wsgi: stopping the workers: {error}", file=sys.stderr)
        finally:
            client.stop()
        _signal(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"circus-wsgi: circusd did not stop within {limit:.0f} s; killing it",
                  file=sys.stderr)
            self.kill()
            return self.process.wait()


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
    print(f"Serving {settings.app} at http://{settings.bind}/ with {settings.workers} "
          f"workers{threads}", flush=True)
    print(f"Control: export CIRCUSCTL_ENDPOINT={endpoint}", flush=True)
    print(f"Watch:   circus-top --endpoint {run.circus_stats}    "
          f"Status: circus-wsgi status --run-dir {settings.run_dir}", flush=True)


def serve(settings: Settings) -> int:
    """Run the stack in the foreground until Ctrl-C or SIGTERM; return the exit status."""
    try:
        check_mongrel2()
        check_port(settings.bind)
        check_app(settings)
        settings, created = prepare_run_dir(settings)
    except ServeError as error:
        print(f"circus-wsgi: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    run_dir = Path(settings.run_dir)
    try:
        if settings.endpoint.startswith("tcp://"):
            print(f"circus-wsgi: warning: circusd listens on {settings.endpoint}: anyone on "
                  "this host can control the stack", file=sys.stderr)
        files = write_configs(settings, run_dir)
        stack = Stack(settings, files["circus.ini"])
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stack.request_stop)
        try:
            stack.wait_ready()
        except ServeError as error:
            print(f"circus-wsgi: error: {error}", file=sys.stderr)
            stack.request_stop(signal.SIGTERM, None)
            stack.wait()
            return 1
        _announce(settings)
        status = stack.wait()
        return EXIT_OK if stack.stop_requested and status in (0, -signal.SIGTERM) else (
            status or 1)
    finally:
        clean_run_dir(run_dir, created)

