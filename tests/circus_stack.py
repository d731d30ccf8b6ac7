"""The whole stack under the real circusd, and a load that records every request.

- :class:`CircusStack`: ``write_configs(Settings(...), dir)`` then ``circusd dir/circus.ini``
  on a free port; :meth:`CircusStack.call` sends circusctl commands through
  circus's own client. Stopped with a deadline and SIGKILL fallback; no process
  or file is left.
- :class:`Load`: client threads in closed loops, each request's status and
  latency recorded, so a lost or hung request is counted (wrk cannot count them).
"""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from circus.client import CircusClient

from circus_wsgi import write_configs
from circus_wsgi.settings import Settings
from circus_wsgi.status import read_status
from harness import TESTS_DIR, free_port, port_open, python_env, stop_circusd, wait_for


def circus_call(endpoint: str, command: str, timeout: float = 30.0, **properties) -> dict:
    """A circusctl command to the circusd at ``endpoint``, through circus's own client.

    circusd refuses a command while it runs another one (its own periodic
    check included): such a refusal is retried for a few seconds.
    """
    client = CircusClient(endpoint=endpoint, timeout=timeout)
    deadline = time.monotonic() + 10
    try:
        while True:
            answer = client.call({"command": command, "properties": properties})
            if "already running" not in answer.get("reason", "") or \
                    time.monotonic() > deadline:
                return answer
            time.sleep(0.05)
    finally:
        client.stop()


class CircusStack:
    """mongrel2, the dispatcher and the workers under circusd, from one Settings."""

    def __init__(self, **options) -> None:
        self.options = {"app": "worker_apps:rules", "chdir": str(TESTS_DIR), "access_log": "",
                        "flapping_window": 1.0, "flapping_retry_in": 1.0, **options}
        self.path = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))
        self.circusd: subprocess.Popen | None = None
        self.settings: Settings | None = None

    def start(self) -> "CircusStack":
        for _ in range(5):
            self.settings = Settings(bind=f"127.0.0.1:{free_port()}", **self.options)
            files = write_configs(self.settings, self.path)
            self.settings = self.settings.with_defaults_resolved(str(self.path / "run"))
            log = open(self.path / "circusd.log", "wb")
            self.circusd = subprocess.Popen(
                [sys.executable, "-m", "circus.circusd", str(files["circus.ini"])],
                stdout=log, stderr=subprocess.STDOUT, env=python_env(),
                start_new_session=True)
            log.close()
            try:
                wait_for(self._serving, 20, 0.05, "the stack to serve")
                return self
            except AssertionError:
                if "Can't announce on TCP port" not in self.log():
                    self.stop()
                    raise
                self.stop(keep_dir=True)  # the port was taken after all: another one
        raise RuntimeError("no free port for mongrel2")

    def _serving(self) -> bool:
        """mongrel2 listens and every worker has announced itself to the dispatcher."""
        assert self.circusd.poll() is None, f"circusd exited:\n{self.log()[-3000:]}"
        if not port_open(self.port):
            return False
        try:
            return read_status(self.settings, timeout=0.5)["idle_workers"] == \
                self.settings.workers
        except TimeoutError:
            return False

    @property
    def port(self) -> int:
        return int(self.settings.bind.rpartition(":")[2])

    def log(self) -> str:
        path = self.path / "circusd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def call(self, command: str, timeout: float = 30.0, **properties) -> dict:
        """A circusctl command (:func:`circus_call`); an error answer fails the test."""
        answer = circus_call(f"ipc://{self.path}/run/circus.sock", command, timeout,
                             **properties)
        assert answer.get("status") != "error", answer
        return answer

    def pids(self, watcher: str) -> list[int]:
        return sorted(self.call("list", name=watcher)["pids"])

    def status(self, watcher: str) -> str:
        return self.call("status", name=watcher)["status"]

    def stop(self, keep_dir: bool = False) -> None:
        """SIGTERM circusd; past a deadline, SIGKILL it and every process under it."""
        if self.circusd is not None:
            try:
                tree = psutil.Process(self.circusd.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            stop_circusd(self.circusd)
            _, alive = psutil.wait_procs(tree, timeout=10)
            for process in alive:
                process.kill()
        if not keep_dir:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "CircusStack":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@dataclass
class Outcome:
    path: str
    status: int | str  # an HTTP status, or what went wrong ("timeout", "ConnectionReset...")
    seconds: float


@dataclass
class Load:
    """Threads each sending ``path`` in a closed loop until :meth:`stop` (over HTTPS when
    given a ``context``)."""

    port: int
    paths: list[str]
    timeout: float = 15.0
    outcomes: list[Outcome] = field(default_factory=list)
    context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(path,), daemon=True)
                         for path in self.paths]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def _loop(self, path: str) -> None:
        connection = None
        while not self._stop.is_set():
            if connection is None:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=self.timeout) if self.context is None \
                    else http.client.HTTPSConnection("127.0.0.1", self.port,
                                                     timeout=self.timeout, context=self.context)
            started = time.monotonic()
            try:
                connection.request("GET", path)
                reply = connection.getresponse()
                reply.read()
                status: int | str = reply.status
                if reply.will_close:
                    connection.close()
                    connection = None
            except TimeoutError:
                status = "timeout"
                connection.close()
                connection = None
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
                connection.close()
                connection = None
            self.outcomes.append(Outcome(path, status, time.monotonic() - started))

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]
