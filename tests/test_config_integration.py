"""The generated files on the real programs: mongrel2 alone, then circusd running the stack.

Each stack is started once per module and shared by its tests. Ports come from
the OS and a start is retried when mongrel2 reports the port taken. circusd is
stopped with a deadline and SIGKILL after it (circusd 0.19 was once seen not to
exit within 20 s); any process of the stack still alive after that is killed
and reported. The dispatcher and workers are other modules' business: these
tests only need them listed, and assert on mongrel2 and its static route.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import zmq

from circus_wsgi import Settings, write_configs
from circus_wsgi.deploy import resolve_for
from circus_wsgi.mongrel2 import MONGREL2_WORKING_DIR
from circus_wsgi.mongrel2_binary import Mongrel2Binary
from circus_wsgi.rundir import RunDir
from harness import oversized_request

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "examples" / "static"
CIRCUSD = Path(sys.executable).with_name("circusd")
CIRCUSCTL = Path(sys.executable).with_name("circusctl")
PORT_TAKEN = "Address already in use"
CIRCUSD_STOP_DEADLINE = 20.0


@dataclass
class Stack:
    settings: Settings  # as written, resolved
    directory: Path
    process: subprocess.Popen
    log: Path

    @property
    def port(self) -> int:
        return int(self.settings.bind.rpartition(":")[2])

    @property
    def run(self) -> RunDir:
        return RunDir(Path(self.settings.run_dir))

    def output(self) -> str:
        """What the process and its children have printed so far."""
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def serving(port: int) -> bool:
    try:
        return get(port, "/static/")[0] == 200
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def stop(process: subprocess.Popen, deadline: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited by the deadline."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(deadline)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def start_stack(command: Callable[[Settings, dict[str, Path]], list[str]], cwd: str | None,
                startup: float, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Write the configuration with a free port, run ``command`` on it in ``cwd`` (default:
    the configuration's directory) with ``env`` (default: this process's) until the static
    route answers, with a few tries when the port turns out taken; yield the stack; stop
    it."""
    directory = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))  # short ipc paths
    try:
        for _ in range(3):
            settings = Settings(app="examples.hello:app", chdir=str(ROOT), workers=1,
                                graceful_timeout=1, bind=f"127.0.0.1:{free_port()}",
                                static={"/static": str(STATIC)})
            paths = write_configs(settings, directory)
            settings = resolve_for(settings, directory)
            log = directory / "output.log"
            with log.open("wb") as output:
                process = subprocess.Popen(command(settings, paths), cwd=cwd or directory,
                                           stdout=output, stderr=subprocess.STDOUT, env=env)
            stack = Stack(settings, directory, process, log)
            wait_for(lambda: process.poll() is not None or PORT_TAKEN in stack.output()
                     or serving(stack.port), startup)
            if PORT_TAKEN not in stack.output() and serving(stack.port):
                break
            stop_tree(stack)
            if PORT_TAKEN not in stack.output():
                pytest.fail(f"the stack did not serve /static/:\n{stack.output()[-3000:]}")
        else:
            pytest.fail("no free port after 3 tries")
        yield stack
        stop_tree(stack)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def stop_tree(stack: Stack) -> None:
    """Stop the process; kill and report any of its descendants that outlive it."""
    try:
        descendants = psutil.Process(stack.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stop(stack.process, CIRCUSD_STOP_DEADLINE)
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for survivor in alive:
        survivor.kill()
    assert not alive, f"processes outlived {stack.process.args[0]}: {alive}"


# -- mongrel2 alone on config.sqlite


@pytest.fixture(scope="module")
def mongrel2(mongrel2_binary: Mongrel2Binary) -> Iterator[Stack]:
    yield from start_stack(
        lambda settings, paths: [mongrel2_binary.path, str(paths["config.sqlite"]),
                                 settings.server_uuid], cwd=MONGREL2_WORKING_DIR, startup=10,
        env=mongrel2_binary.env())


def test_mongrel2_serves_the_static_route(mongrel2: Stack) -> None:
    status, headers, body = get(mongrel2.port, "/static/")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()
    assert headers["Content-Type"] == "text/html"
    assert get(mongrel2.port, "/static/index.html")[2] == body
    assert get(mongrel2.port, "/static/missing.html")[0] == 404


def test_mongrel2_keeps_its_files_in_the_run_dir(mongrel2: Stack) -> None:
    run = mongrel2.run
    assert run.mongrel2_pid_file.read_text().strip() == str(mongrel2.process.pid)
    for endpoint in (run.mongrel2_send, run.mongrel2_recv, run.mongrel2_control):
        assert Path(endpoint.removeprefix("ipc://")).is_socket()
    assert not run.mongrel2_access_log.exists()  # turned off: the workers write the true one


# -- circusd on circus.ini


@pytest.fixture(scope="module")
def circusd() -> Iterator[Stack]:
    yield from start_stack(lambda settings, paths: [str(CIRCUSD), str(paths["circus.ini"])],
                           cwd=None, startup=30)


def circusctl(stack: Stack, *args: str) -> str:
    result = subprocess.run([str(CIRCUSCTL), "--endpoint", stack.run.circus_endpoint,
                             "--timeout", "10", *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def stack_processes(stack: Stack) -> list[psutil.Process]:
    root = psutil.Process(stack.process.pid)
    return [root, *root.children(recursive=True)]


def test_circusctl_lists_the_watchers(circusd: Stack) -> None:
    watchers = set(circusctl(circusd, "list").split(","))
    assert {"mongrel2", "dispatcher", "workers", "plugin:flapping"} <= watchers


def test_the_mongrel2_watcher_serves_the_static_route(circusd: Stack) -> None:
    [pid] = circusctl(circusd, "list", "mongrel2").split(",")
    listener = [c for c in psutil.Process(int(pid)).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN]
    assert [(c.laddr.ip, c.laddr.port) for c in listener] == [("127.0.0.1", circusd.port)]
    status, _, body = get(circusd.port, "/static/index.html")
    assert status == 200 and body == (STATIC / "index.html").read_bytes()


def test_nothing_listens_on_udp_or_tcp_but_mongrel2(circusd: Stack) -> None:
    # circusd's multicast discovery socket would be bound on 0.0.0.0:12027
    assert all(c.laddr.port != 12027 for c in psutil.net_connections("udp"))
    for process in stack_processes(circusd):
        for connection in process.net_connections("inet"):
            assert connection.type != socket.SOCK_DGRAM, (process, connection)
            if connection.status == psutil.CONN_LISTEN:
                assert connection.laddr.port == circusd.port, (process, connection)


def test_circus_top_gets_stats(circusd: Stack) -> None:
    # circus-top subscribes to "stat." on the stats endpoint; ask for mongrel2's
    with zmq.Context() as context, context.socket(zmq.SUB) as sub:
        sub.linger = 0
        sub.subscribe(b"stat.mongrel2")
        sub.connect(circusd.run.circus_stats)
        assert sub.poll(15_000), "no stats for mongrel2 from circusd-stats"
        topic, stat = sub.recv_multipart()
    assert topic.startswith(b"stat.mongrel2") and "cpu" in json.loads(stat)


def test_mongrel2_output_reaches_circusd_prefixed(circusd: Stack) -> None:
    [pid] = circusctl(circusd, "list", "mongrel2").split(",")
    oversized_request(circusd.port)  # at the default log level mongrel2 shows only errors
    assert wait_for(lambda: f"mongrel2.{pid} | " in circusd.output(), 10)
