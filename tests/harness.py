"""A harness for tests on the real binaries: mongrel2, workers, the dispatcher, a client.

- :func:`free_port`: a free TCP port on 127.0.0.1, outside the ephemeral range
  (ports there collided with other sockets on these machines).
- :func:`wait_for`, :func:`wait_for_port`: wait for a condition, with a deadline.
- :func:`oversized_request`: one that makes mongrel2 log an error.
- :class:`Process`: a child whose output goes to a file, stopped with SIGTERM,
  then SIGKILL after a deadline.
- :func:`m2sh`: mongrel2's m2sh, of the same installation as the mongrel2 the
  tests run (the ``mongrel2`` setting's default), with the environment it needs.
- :class:`Stack`: mongrel2 from :class:`Settings` on a free port, the
  dispatcher (``mode='dispatcher'``) and N workers, in a private run dir that
  is deleted afterwards. A context manager: every process it starts is stopped.
- :class:`HTTPClient`: one keep-alive connection; records status, headers, body
  and latency; can send raw bytes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from circus_wsgi.mongrel2 import write_mongrel2_config
from circus_wsgi.mongrel2_binary import locate
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import Settings

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_DIR = TESTS_DIR.parent


# --------------------------------------------------------------------------
# Waiting


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> object:
    """Return ``condition()``'s first true value; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    wait_for(lambda: port_open(port, host), timeout, 0.02, f"{host}:{port} to accept")


def oversized_request(port: int) -> None:
    """A request mongrel2 refuses (400) and logs as an error, for a test that needs one of
    its lines (seen: 'Too many small packet read attempts')."""
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A port nobody listens on now, below the ephemeral range."""
    for _ in range(100):
        port = random.randint(low, high)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port found")


# --------------------------------------------------------------------------
# Processes


class Process:
    """A child process whose stdout and stderr go to ``log``."""

    def __init__(self, argv: list[str], log: Path, cwd: Optional[str] = None,
                 env: Optional[dict] = None) -> None:
        self.argv, self.log = argv, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                          env=env, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        """Wait until ``text`` appears in the output; fail early if the process exits."""
        def seen() -> bool:
            if text in self.output():
                return True
            if not self.alive():
                raise AssertionError(f"{self.argv[:4]} exited ({self.popen.returncode}) "
                                     f"before printing {text!r}:\n{self.output()[-3000:]}")
            return False
        wait_for(seen, timeout, 0.02, f"{text!r} in {self.log.name}")

    def send_signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 10.0, signum: int = signal.SIGTERM) -> Optional[int]:
        """Send ``signum``, wait up to ``timeout``, then SIGKILL; the exit status."""
        self.send_signal(signum)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def peak_rss(self) -> int:
        """Peak resident memory in bytes (VmHWM), while the process is alive."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def stop_circusd(circusd: subprocess.Popen, deadline: float = 30.0) -> None:
    """SIGTERM circusd until it exits; past ``deadline`` seconds, SIGKILL it.

    circusd ignores a SIGTERM that comes while it runs another command (such as
    a watcher stop), so one SIGTERM is not enough.
    """
    end = time.monotonic() + deadline
    while circusd.poll() is None and time.monotonic() < end:
        circusd.terminate()
        try:
            circusd.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
    if circusd.poll() is None:
        circusd.kill()
        circusd.wait()


def m2sh(*args: str) -> subprocess.CompletedProcess:
    """Run m2sh (beside the default mongrel2, else on PATH) with ``args``; its output as text.
    m2sh warns without LOGNAME, so it gets one."""
    binary = locate("")
    program = binary.tool("m2sh")
    if program is None:
        raise AssertionError(f"no m2sh beside {binary.path} nor on PATH: run `make test`, "
                             "which installs mongrel2-core")
    env = {**binary.env(), "LOGNAME": os.environ.get("LOGNAME", "circus-wsgi")}
    return subprocess.run([program, *args], env=env, capture_output=True, text=True,
                          timeout=30)


def python_env() -> dict:
    """The environment for Python children: the project importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def circus_wsgi(command: str, settings: Settings, log: Path) -> Process:
    """``circus-wsgi COMMAND`` with ``settings`` as flags."""
    argv = [sys.executable, "-m", "circus_wsgi", command, *settings.to_argv()]
    return Process(argv, log, env=python_env())


# --------------------------------------------------------------------------
# A stack


class Stack:
    """mongrel2, the dispatcher (in dispatcher mode) and workers, from one Settings.

    ``Stack(app="worker_apps:hello", workers=2, mode="direct")``; any setting
    can be given. Apps are imported from tests/ (the default chdir).
    """

    def __init__(self, workers: int = 1, **options) -> None:
        self.workers, self.options = workers, options
        self.mongrel2: Optional[Process] = None
        self.dispatcher: Optional[Process] = None
        self.worker_processes: list[Process] = []
        self.settings: Optional[Settings] = None
        self.path: Optional[Path] = None

    @property
    def port(self) -> int:
        return int(self.settings.bind.rpartition(":")[2])

    @property
    def run(self) -> RunDir:
        return RunDir(self.path)

    def start(self) -> "Stack":
        self.path = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))
        try:
            self._start_mongrel2()
            if self.settings.mode == "dispatcher":
                self.dispatcher = circus_wsgi("dispatcher", self.settings,
                                              self.path / "dispatcher.log")
                self.dispatcher.wait_output("ready")
            for _ in range(self.workers):
                self.add_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_mongrel2(self, attempts: int = 5) -> None:
        options = {"chdir": str(TESTS_DIR), "access_log": "", "workers": max(self.workers, 1),
                   **self.options}
        if options.get("mode") == "direct":
            options.setdefault("flow_control", False)
        for _ in range(attempts):
            port = free_port()
            self.settings = Settings(bind=f"127.0.0.1:{port}", run_dir=str(self.path),
                                     **options).with_defaults_resolved(str(self.path))
            RunDir(self.path).create()
            config, _ = write_mongrel2_config(self.settings, self.path)
            binary = locate(self.settings.mongrel2)
            self.mongrel2 = Process([binary.path, str(config), self.settings.server_uuid],
                                    self.path / "mongrel2.log", cwd="/", env=binary.env())
            try:
                wait_for(lambda: port_open(port) or not self.mongrel2.alive(), 10, 0.02,
                         "mongrel2 to listen")
            except AssertionError:
                self.mongrel2.stop(5)
                raise
            if self.mongrel2.alive():
                return
            self.mongrel2.stop(1)  # the port was taken after all: try another
        raise RuntimeError(f"mongrel2 did not start:\n{self.mongrel2.output()[-2000:]}")

    def add_worker(self, wait: bool = True, **changes) -> Process:
        """Start one more worker (with settings ``changes``); wait until it serves."""
        settings = self.settings.replace(**changes) if changes else self.settings
        number = len(self.worker_processes)
        worker = circus_wsgi("worker", settings, self.path / f"worker-{number}.log")
        self.worker_processes.append(worker)
        if wait:
            worker.wait_output("serving")
        return worker

    def stop(self) -> None:
        """Stop every process (deadline, then SIGKILL) and delete the run dir."""
        for worker in self.worker_processes:
            worker.send_signal(signal.SIGTERM)
        for process in [*self.worker_processes, self.dispatcher, self.mongrel2]:
            if process is not None:
                process.stop(10)
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client(self, timeout: float = 10.0) -> "HTTPClient":
        return HTTPClient("127.0.0.1", self.port, timeout)

    def uploads_left(self) -> list[str]:
        return sorted(os.listdir(self.run.uploads))

    def logs(self) -> str:
        """Every process's output, for a failing test's message."""
        parts = []
        for process in [self.mongrel2, self.dispatcher, *self.worker_processes]:
            if process is not None:
                parts.append(f"--- {process.log.name}\n{process.output()[-4000:]}")
        return "\n".join(parts)


# --------------------------------------------------------------------------
# HTTP client


@dataclass
class Reply:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    latency: float
    after_close: bytes = b""  # bytes the server sent after the response, before closing

    def header(self, name: str) -> Optional[str]:
        """A header's value (repeated ones joined with ", "); None if absent."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


class HTTPClient:
    """HTTP/1.1 over one socket, kept alive between requests (reconnects if closed)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: Optional[socket.socket] = None
        self.buffer = b""
        self.connects = 0

    def connect(self) -> None:
        self.close()
        self.sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.connects += 1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "HTTPClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        if self.sock is None:
            self.connect()
        self.sock.sendall(data)

    def request(self, method: str, path: str, headers: Iterable[tuple[str, str]] = (),
                body: bytes | Iterable[bytes] | None = None, version: str = "HTTP/1.1",
                host: Optional[str] = "localhost") -> Reply:
        """Send one request (an iterable body goes chunked) and read its reply."""
        lines = [f"{method} {path} {version}"]
        if host is not None:
            lines.append(f"Host: {host}")
        lines += [f"{k}: {v}" for k, v in headers]
        if isinstance(body, (bytes, bytearray)):
            lines.append(f"Content-Length: {len(body)}")
            payload = bytes(body)
        elif body is not None:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in body if c) + b"0\r\n\r\n"
        else:
            payload = b""
        started = time.perf_counter()
        self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        reply = self.read_reply(method)
        reply.latency = time.perf_counter() - started
        return reply

    def download(self, path: str) -> tuple[Reply, int]:
        """GET ``path``, counting the body's bytes instead of keeping them."""
        counted = [0]

        def count(data: bytes) -> None:
            counted[0] += len(data)

        self.send_raw(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode("latin-1"))
        reply = self.read_reply(sink=count)
        return reply, counted[0]

    # -- reading

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        self.buffer += data
        return bool(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("connection closed before a complete line")
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError(f"connection closed with {len(self.buffer)} of "
                                      f"{size} bytes")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_until_close(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        self.close()
        return data

    def read_reply(self, method: str = "GET", sink: Optional[Callable[[bytes], None]] = None
                   ) -> Reply:
        """Read one response; with ``sink``, the body goes there instead of into memory."""
        started = time.perf_counter()
        version, _, rest = self._line().decode("latin-1").partition(" ")
        status, _, reason = rest.partition(" ")
        headers = []
        for line in iter(self._line, b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip()))
        reply = Reply(int(status), reason, version, headers, b"", 0.0)
        reply.body = self._body(reply, method, sink or (lambda data: None), sink is None)
        reply.latency = time.perf_counter() - started
        if (reply.header("Connection") or "").lower() == "close":
            reply.after_close = self.read_until_close()
        return reply

    def _body(self, reply: Reply, method: str, sink: Callable[[bytes], None],
              keep: bool) -> bytes:
        if method == "HEAD" or reply.status < 200 or reply.status in (204, 304):
            return b""
        parts: list[bytes] = []
        emit = parts.append if keep else sink
        if (reply.header("Transfer-Encoding") or "").lower() == "chunked":
            while True:
                size = int(self._line().split(b";")[0], 16)
                if not size:
                    self._line()
                    break
                emit(self._exactly(size))
                self._exactly(2)
        elif reply.header("Content-Length") is not None:
            remaining = int(reply.header("Content-Length"))
            while remaining:
                if not self.buffer and not self._fill():
                    raise ConnectionError(f"connection closed {remaining} bytes short")
                data = self.buffer[:remaining]
                self.buffer = self.buffer[len(data):]
                remaining -= len(data)
                emit(data)
        else:
            while self._fill():
                emit(self.buffer)
                self.buffer = b""
            self.close()
        return b"".join(parts)
