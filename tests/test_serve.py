"""``circus-wsgi serve`` as people run it: the real command, circusd, mongrel2, dispatcher
and workers, steered with circus's own tools.

Every test starts the command as a subprocess on 127.0.0.1 with a port from
:func:`harness.free_port` (retried when serve reports it taken) and a run dir
under /tmp with a short path. Tests that only look at a running stack share one
(module scope); tests that change or stop a stack start their own. Whatever
happens, a fixture stops each serve with a deadline and SIGKILL after it, kills
any process whose command line names the test's directory, and removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import psutil
import pytest

from circus_wsgi.memory import glibc_tunables
from circus_wsgi.mongrel2_binary import Mongrel2Binary, locate
from circus_wsgi.settings import Settings
from circus_wsgi.status import read_status
from harness import (TESTS_DIR, HTTPClient, Process, Reply, free_port, oversized_request,
                     python_env, wait_for)

BIN = Path(sys.executable).parent
CIRCUS_WSGI = str(BIN / "circus-wsgi")
CIRCUSCTL = str(BIN / "circusctl")
CIRCUSD = str(BIN / "circusd")
CIRCUS_TOP = str(BIN / "circus-top")

#: The app of most tests: ``/`` says hello and the worker's pid, ``/sleep?s=N`` sleeps.
APP = "serve_apps:app"
#: How long a serve may take to answer its first request before a test gives up
#: (the contract, 3 s, is asserted separately).
START_DEADLINE = 20.0
#: How long a stopping serve may take before the fixture kills it.
STOP_DEADLINE = 45.0
PORT_TAKEN = "cannot listen on"


# --------------------------------------------------------------------------
# Processes of a stack, found by the directory their command line names


def stack_processes(directory: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions ``directory`` (never this one)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.pid == os.getpid() or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(directory) in arg for arg in process.info["cmdline"] or ()):
            found.append(process)
    return found


def kill_stack(directory: Path) -> list[str]:
    """SIGKILL every process naming ``directory``; describe those that were alive."""
    left = stack_processes(directory)
    described = [f"{p.pid} {' '.join(p.info['cmdline'])[:120]}" for p in left]
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(left, timeout=5)
    return described


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A fresh directory with a short path; on exit, no process naming it survives."""
    path = Path(tempfile.mkdtemp(prefix="cws-", dir="/tmp"))
    try:
        yield path
    finally:
        kill_stack(path)
        shutil.rmtree(path, ignore_errors=True)


def get(port: int, path: str = "/", timeout: float = 10.0) -> Reply:
    with HTTPClient("127.0.0.1", port, timeout) as client:
        return client.request("GET", path)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError):
        return get(port, "/", timeout=5).status == 200
    return False


def _dispatcher_busy(run_dir: Path) -> bool:
    """True when the dispatcher of ``run_dir`` counts a worker busy with a request."""
    try:
        return read_status(Settings(run_dir=str(run_dir)), timeout=0.5)["busy_workers"] > 0
    except TimeoutError:
        return False


def circusctl(endpoint: str, *args: str) -> str:
    """Run the real circusctl, reaching circusd through CIRCUSCTL_ENDPOINT."""
    env = {**os.environ, "CIRCUSCTL_ENDPOINT": endpoint}
    result = subprocess.run([CIRCUSCTL, "--timeout", "10", *args], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout.strip()


# --------------------------------------------------------------------------
# One `circus-wsgi serve`


class Serve:
    """A running ``circus-wsgi serve`` with its output in a file."""

    def __init__(self, process: Process, port: int, directory: Path) -> None:
        self.process, self.port, self.directory = process, port, directory
        self.first_reply = float("nan")  # seconds from Popen to the first 200

    def output(self) -> str:
        return self.process.output()

    @property
    def endpoint(self) -> str:
        match = re.search(r"^Control: export CIRCUSCTL_ENDPOINT=(\S+)$", self.output(), re.M)
        assert match, f"no Control line:\n{self.output()[-3000:]}"
        return match.group(1)

    @property
    def run_dir(self) -> Path:
        match = re.search(r"Status: circus-wsgi status --run-dir (\S+)$", self.output(), re.M)
        assert match, f"no Status line:\n{self.output()[-3000:]}"
        return Path(match.group(1))

    def get(self, path: str = "/", timeout: float = 10.0) -> Reply:
        return get(self.port, path, timeout)

    def circusctl(self, *args: str) -> str:
        return circusctl(self.endpoint, *args)

    def pids(self, watcher: str) -> set[int]:
        return _pids(self.circusctl("list", watcher))

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output().splitlines() if line.startswith(prefix)]

    def stop(self, signum: int = signal.SIGTERM, deadline: float = STOP_DEADLINE) -> int:
        """Send ``signum``; the exit status (SIGKILL past the deadline fails the test)."""
        status = self.process.stop(deadline, signum)
        assert status is not None and status >= 0, (
            f"serve did not exit within {deadline} s of {signal.Signals(signum).name}:\n"
            f"{self.output()[-3000:]}")
        return status


def serve_argv(port: int, app: str, run_dir: Optional[Path], flags: tuple[str, ...],
               argv0: Sequence[str] = (CIRCUS_WSGI,)) -> list[str]:
    argv = [*argv0, "serve", app, "--bind", f"127.0.0.1:{port}", "--chdir",
            str(TESTS_DIR), *flags]
    return argv + (["--run-dir", str(run_dir)] if run_dir else [])


def start_serve(directory: Path, *flags: str, app: str = APP, own_run_dir: bool = True,
                env: Optional[dict] = None, attempts: int = 3,
                answers: Callable[[int], bool] = _answers, port: Optional[int] = None,
                argv0: Sequence[str] = (CIRCUS_WSGI,)) -> Serve:
    """Start serve (run dir ``directory/run`` unless ``own_run_dir`` is false) and return
    once it has answered a request (``answers(port)``) and printed its Control line.
    ``argv0`` is the command that runs circus-wsgi."""
    for attempt in range(attempts):
        port_tried = port or free_port()
        argv = serve_argv(port_tried, app, directory / "run" if own_run_dir else None, flags,
                          argv0)
        started = time.monotonic()
        process = Process(argv, directory / f"serve-{attempt}.log", cwd=str(directory),
                          env={**python_env(), **(env or {})})
        served = Serve(process, port_tried, directory)
        try:
            wait_for(lambda: not process.alive() or answers(port_tried), START_DEADLINE, 0.02,
                     "serve's first 200")
            if not process.alive():
                if PORT_TAKEN in served.output():
                    continue
                pytest.fail(f"serve exited ({process.popen.returncode}):\n"
                            f"{served.output()[-3000:]}")
            served.first_reply = time.monotonic() - started
            process.wait_output("Control: export CIRCUSCTL_ENDPOINT=", 10)
            return served
        except BaseException:
            process.stop(STOP_DEADLINE)
            raise
    pytest.fail(f"no free port after {attempts} tries")


@contextlib.contextmanager
def serving(*flags: str, **options) -> Iterator[Serve]:
    """A serve in a scratch directory; stopped (deadline, then SIGKILL) on exit."""
    with scratch() as directory:
        served = start_serve(directory, *flags, **options)
        try:
            yield served
        finally:
            served.process.stop(STOP_DEADLINE)
            if not options.get("own_run_dir", True):
                kill_stack(served.run_dir)
                shutil.rmtree(served.run_dir, ignore_errors=True)


def assert_nothing_left(directory: Path, within: float = 5.0) -> None:
    """No process naming ``directory`` is alive ``within`` seconds from now."""
    try:
        wait_for(lambda: not stack_processes(directory), within, 0.05,
                 f"the processes of {directory} to exit")
    except AssertionError:
        raise AssertionError(f"processes outlived the stack: {kill_stack(directory)}") from None


def preflight(directory: Path, *args: str, env: Optional[dict] = None
              ) -> subprocess.CompletedProcess:
    """Run a serve expected to stop in its checks: exit 2, one line on stderr, nothing
    started and nothing on stdout."""
    result = subprocess.run([CIRCUS_WSGI, "serve", *args], cwd=str(directory),
                            env={**python_env(), **(env or {})}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("circus-wsgi: error: ")
    assert not stack_processes(directory)
    return result


# --------------------------------------------------------------------------
# Preflight: nothing starts, one line, exit 2


@pytest.fixture
def directory() -> Iterator[Path]:
    with scratch() as path:
        yield path


@pytest.mark.parametrize("app, env, last_line", [
    (APP, {"SERVE_APPS_IMPORT_ERROR": "database unreachable"},
     "cannot import 'serve_apps': RuntimeError: database unreachable"),
    ("serve_apps:nothing", {}, "module 'serve_apps' has no attribute 'nothing'"),
    ("serve_apps:from_env()", {}, "the factory failed: KeyError: 'SERVE_APPS_GREETING'"),
], ids=["import-error", "missing-attribute", "factory-error"])
def test_an_app_that_does_not_load_stops_serve_with_the_errors_last_line(
        directory: Path, app: str, env: dict, last_line: str) -> None:
    result = preflight(directory, app, "--chdir", str(TESTS_DIR), "--bind",
                       f"127.0.0.1:{free_port()}", "--run-dir", str(directory / "run"), env=env)
    assert result.stderr.rstrip().endswith(last_line)
    assert not (directory / "run").exists()


def test_a_busy_port_stops_serve_with_one_line(directory: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = "127.0.0.1:%d" % taken.getsockname()[1]
        result = preflight(directory, APP, "--chdir", str(TESTS_DIR), "--bind", bind)
    assert result.stderr == f"circus-wsgi: error: cannot listen on {bind}: " \
                            "Address already in use\n"


def test_a_missing_mongrel2_stops_serve_with_one_line(directory: Path) -> None:
    missing = directory / "bin" / "mongrel2"
    result = preflight(directory, APP, "--chdir", str(TESTS_DIR), "--mongrel2", str(missing))
    assert result.stderr.startswith(f"circus-wsgi: error: setting 'mongrel2': {missing} does "
                                    "not exist: install Debian's mongrel2-core")


def test_a_mongrel2_that_cannot_run_stops_serve_with_one_line(directory: Path) -> None:
    broken = directory / "mongrel2"
    broken.write_text("not a program")
    broken.chmod(0o755)
    result = preflight(directory, APP, "--chdir", str(TESTS_DIR), "--mongrel2", str(broken))
    assert result.stderr.startswith(f"circus-wsgi: error: setting 'mongrel2': cannot run "
                                    f"{broken}: Exec format error: install Debian's ")


def test_a_run_dir_that_cannot_be_made_stops_serve_with_one_line(directory: Path) -> None:
    (directory / "file").write_text("a regular file")
    run_dir = directory / "file" / "run"
    result = preflight(directory, APP, "--chdir", str(TESTS_DIR), "--bind",
                       f"127.0.0.1:{free_port()}", "--run-dir", str(run_dir))
    assert result.stderr == f"circus-wsgi: error: run dir {run_dir} is not writable: " \
                            "Not a directory\n"


def test_a_run_dir_open_to_others_is_refused_not_chmodded(directory: Path) -> None:
    shared = directory / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    result = preflight(directory, APP, "--chdir", str(TESTS_DIR), "--bind",
                       f"127.0.0.1:{free_port()}", "--run-dir", str(shared))
    assert f"run dir {shared} is open to other users (mode 0755)" in result.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and not any(shared.iterdir())


@pytest.mark.parametrize("flags, message", [
    (("--workers", "0"), "setting 'workers': invalid value '0': must be an integer >= 1"),
    (("--bind", "127.0.0.1:http"), "setting 'bind': invalid value '127.0.0.1:http'"),
    (("--access-log", "/nonexistent/access.log"),
     "setting 'access_log': cannot write /nonexistent/access.log: No such file or directory"),
], ids=["workers", "bind", "access-log"])
def test_a_bad_setting_stops_serve_with_one_line(directory: Path, flags: tuple,
                                                 message: str) -> None:
    result = preflight(directory, APP, "--chdir", str(TESTS_DIR), *flags)
    assert message in result.stderr


# --------------------------------------------------------------------------
# One stack, looked at by many tests


@pytest.fixture(scope="module")
def served() -> Iterator[Serve]:
    """``serve serve_apps:from_env() --env SERVE_APPS_GREETING=bonjour``, 2 workers."""
    with serving("--workers", "2", "--env", "SERVE_APPS_GREETING=bonjour",
                 app="serve_apps:from_env()") as stack:
        yield stack


def test_serve_says_where_it_serves_and_how_to_steer_it(served: Serve) -> None:
    run_dir = served.directory / "run"
    assert f"Serving serve_apps:from_env() at http://127.0.0.1:{served.port}/ with 2 " \
           "workers\n" in served.output()
    assert f"Control: export CIRCUSCTL_ENDPOINT=ipc://{run_dir}/circus.sock\n" \
           in served.output()


def test_the_first_request_is_answered_within_3_s_of_the_command(served: Serve) -> None:
    assert served.first_reply < 3.0


def test_the_env_setting_reaches_the_import_check_and_the_workers(served: Serve) -> None:
    # the factory reads SERVE_APPS_GREETING: the import check passed only with --env
    assert served.get("/").body == b"bonjour"


def test_circusctl_lists_the_watchers_and_their_processes(served: Serve) -> None:
    assert {"mongrel2", "dispatcher", "workers"} <= set(served.circusctl("list").split(","))
    [mongrel2] = served.pids("mongrel2")
    assert psutil.Process(mongrel2).name() == "mongrel2"
    [dispatcher] = served.pids("dispatcher")
    assert "dispatcher" in psutil.Process(dispatcher).cmdline()
    workers = served.pids("workers")
    assert len(workers) == 2
    assert all("worker" in psutil.Process(pid).cmdline() for pid in workers)


def mapped_files(pid: int) -> set[str]:
    """The files (shared libraries) mapped into process ``pid``."""
    return {m.path for m in psutil.Process(pid).memory_maps(grouped=True)}


def test_mongrel2_is_the_binary_the_setting_names_by_default(served: Serve) -> None:
    # Debian 12: the system's /usr/bin/mongrel2; Debian 13: the one make deps unpacked
    # into .venv/mongrel2, with that prefix's mbedTLS
    binary = locate("")
    [mongrel2] = served.pids("mongrel2")
    assert psutil.Process(mongrel2).exe() == os.path.realpath(binary.path)
    libraries = mapped_files(mongrel2)
    for directory in binary.library_path:
        assert any(library.startswith(directory + "/") for library in libraries), libraries


def test_serve_runs_the_mongrel2_the_setting_names_with_its_library_path(
        mongrel2_prefix: Mongrel2Binary) -> None:
    [library_dir] = mongrel2_prefix.library_path
    with serving("--mongrel2", mongrel2_prefix.path, "--workers", "1") as stack:
        assert stack.get("/").status == 200
        [mongrel2] = stack.pids("mongrel2")
        assert psutil.Process(mongrel2).exe() == os.path.realpath(mongrel2_prefix.path)
        assert os.path.realpath(f"{library_dir}/libmbedtls.so.14") in mapped_files(mongrel2)


def test_mongrel2_runs_with_the_malloc_tuning(served: Serve) -> None:
    [mongrel2] = served.pids("mongrel2")
    # a GLIBC_TUNABLES the tests run with is serve's too, and left as it is
    expected = os.environ.get("GLIBC_TUNABLES", glibc_tunables())
    found = psutil.Process(mongrel2).environ()["GLIBC_TUNABLES"]
    # glibc 2.36 ends the value in /proc/PID/environ after the first tunable once it has
    # read them all (the process's own copy stays whole)
    assert found == expected or expected.startswith(found + ":")


def test_circusctl_stats_shows_cpu_and_memory_per_worker(served: Serve) -> None:
    # one line per process: "PID: PID NAME USER NICE RSS VMS CPU% MEM% CPU-TIME"
    rows = {}
    for line in served.circusctl("stats", "workers").splitlines()[1:]:
        match = re.match(r"(\d+): \d+ +\S+ \S+ -?\d+ ([\d.]+M) ([\d.]+M) ([\d.]+) ([\d.]+) ",
                         line.strip())
        assert match, line
        rows[int(match.group(1))] = match.groups()[1:]
    assert set(rows) == served.pids("workers")
    for rss, _, _, mem in rows.values():
        assert float(rss[:-1]) > 1 and float(mem) > 0, (rss, mem)


def test_circus_top_shows_the_workers(served: Serve) -> None:
    """circus-top is curses: run it on a pseudo-terminal and read the screen it draws."""
    stats = served.endpoint.replace("/circus.sock", "/circus-stats.sock")
    assert f"circus-top --endpoint {stats}" in served.output()
    workers = {str(pid) for pid in served.pids("workers")}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    top = subprocess.Popen([CIRCUS_TOP, "--endpoint", stats], stdin=slave, stdout=slave,
                           stderr=slave, env={**os.environ, "TERM": "xterm"},
                           start_new_session=True)
    os.close(slave)
    screen = b""
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>]", " ",
                          screen.decode("latin-1"))
            if "workers" in text and all(pid in text for pid in workers):
                break
            if select.select([master], [], [], 0.2)[0]:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        else:
            pytest.fail(f"circus-top did not show workers {workers}:\n{text[-2000:]}")
        assert "Circus Top" in text and "CPU (%)" in text and "MEMORY (%)" in text
    finally:
        top.kill()
        top.wait(10)
        os.close(master)


def test_each_log_line_names_its_source(served: Serve) -> None:
    probe = uuid.uuid4().hex
    assert served.get(f"/?probe={probe}").status == 200
    access = re.compile(r'^workers\.(\d+) \| 127\.0\.0\.1 - - \[[^]]+\] '
                        rf'"GET /\?probe={probe} HTTP/1\.1" 200 7 ', re.M)
    wait_for(lambda: access.search(served.output()), 10, 0.05, "the access log line")
    assert int(access.search(served.output()).group(1)) in served.pids("workers")
    [mongrel2] = served.pids("mongrel2")
    [dispatcher] = served.pids("dispatcher")
    oversized_request(served.port)  # mongrel2 writes only warnings and errors at this level
    wait_for(lambda: served.lines(f"mongrel2.{mongrel2} | "), 10, 0.05, "mongrel2's error")
    assert served.lines(f"dispatcher.{dispatcher} | ")
    for pid in served.pids("workers"):
        assert served.lines(f"workers.{pid} | ")


def test_the_terminal_is_not_flooded_with_debug_lines(served: Serve) -> None:
    output = served.output()
    assert served.get("/?debug-probe").status == 200
    wait_for(lambda: "debug-probe" in served.output()[len(output):], 10, 0.1, "its access log")
    time.sleep(1)  # what runs in the background (circusd-stats, the plugin) has a say too
    assert "[DEBUG]" not in served.output()


def test_the_run_dir_is_private(served: Serve) -> None:
    run_dir = served.directory / "run"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "uploads").stat().st_mode) == 0o700


def test_every_socket_of_the_stack_is_an_ipc_file_in_the_run_dir(served: Serve) -> None:
    run_dir = served.directory / "run"
    processes = stack_processes(served.directory)
    assert len(processes) >= 7  # serve, circusd, mongrel2, dispatcher, 2 workers, ...
    bound = set()
    for process in processes:
        for connection in process.net_connections("inet"):
            assert connection.type != socket.SOCK_DGRAM, (process, connection)
            if connection.status == psutil.CONN_LISTEN:
                assert connection.laddr == ("127.0.0.1", served.port), (process, connection)
        for connection in process.net_connections("unix"):
            if connection.laddr:
                assert Path(connection.laddr).parent == run_dir, (process, connection)
                bound.add(Path(connection.laddr).name)
    assert {"circus.sock", "circus-pubsub.sock", "circus-stats.sock", "dispatcher.sock",
            "dispatcher-status.sock", "m2-requests.sock", "m2-responses.sock",
            "m2-control.sock"} <= bound


def test_a_second_serve_on_a_running_stacks_run_dir_is_refused(served: Serve,
                                                               directory: Path) -> None:
    run_dir = served.directory / "run"
    result = preflight(directory, APP, "--chdir", str(TESTS_DIR), "--bind",
                       f"127.0.0.1:{free_port()}", "--run-dir", str(run_dir))
    assert f"run dir {run_dir} is in use by a running stack" in result.stderr
    assert served.get("/").status == 200


# --------------------------------------------------------------------------
# Live control: incr, decr, reload while a client keeps asking


class Traffic:
    """A client sending requests one after the other until stopped; records statuses."""

    def __init__(self, port: int) -> None:
        self.port, self.statuses, self.errors = port, [], []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with HTTPClient("127.0.0.1", self.port, 10) as client:
            while self.running:
                try:
                    self.statuses.append(client.request("GET", "/").status)
                except OSError as error:
                    self.errors.append(repr(error))
                    client.close()

    def stop(self) -> None:
        self.running = False
        self.thread.join(15)

    def check(self) -> None:
        assert not self.errors and set(self.statuses) == {200}, (
            self.errors, sorted(set(self.statuses)))
        assert len(self.statuses) > 20


@pytest.fixture(scope="module")
def controlled() -> Iterator[Serve]:
    with serving("--workers", "2") as stack:
        yield stack


def test_incr_and_decr_workers_change_the_worker_processes_while_serving(
        controlled: Serve) -> None:
    before = controlled.pids("workers")
    traffic = Traffic(controlled.port)
    try:
        controlled.circusctl("incr", "workers")
        wait_for(lambda: len(controlled.pids("workers")) == 3, 10, 0.1, "a third worker")
        added = controlled.pids("workers") - before
        wait_for(lambda: any(controlled.lines(f"workers.{pid} | ") for pid in added), 10,
                 0.05, "the new worker's log")
        controlled.circusctl("decr", "workers")
        wait_for(lambda: len(controlled.pids("workers")) == 2, 10, 0.1, "two workers")
    finally:
        traffic.stop()
    traffic.check()


def test_reload_workers_replaces_every_worker_while_serving(controlled: Serve) -> None:
    before = controlled.pids("workers")
    traffic = Traffic(controlled.port)
    try:
        controlled.circusctl("reload", "workers")
        wait_for(lambda: len(controlled.pids("workers")) == 2
                 and not controlled.pids("workers") & before, 20, 0.1, "two new workers")
        wait_for(lambda: not any(psutil.pid_exists(pid) for pid in before), 10, 0.05,
                 "the old workers to exit")
    finally:
        traffic.stop()
    traffic.check()


# --------------------------------------------------------------------------
# Crash loops


def test_a_crash_loop_after_start_is_stopped_by_the_flapping_plugin() -> None:
    with scratch() as directory:
        flag = directory / "crash"
        served = start_serve(directory, "--workers", "2", "--env",
                             f"SERVE_APPS_CRASH_FLAG={flag}", "--flapping-retry-in", "1",
                             "--flapping-max-retry", "1", "--queue-timeout", "1")
        try:
            flag.touch()  # the next import of the app fails: a bad deploy
            served.circusctl("restart", "workers")
            # stopped, started once more after retry_in, crashing again, stopped for good
            wait_for(lambda: served.circusctl("status", "workers") == "stopped", 20, 0.1,
                     "the plugin to stop the workers")
            wait_for(lambda: served.circusctl("status", "workers") != "stopped", 5, 0.05,
                     "the plugin's retry")
            wait_for(lambda: served.circusctl("status", "workers") == "stopped", 20, 0.1,
                     "the plugin to stop the workers again")
            # a negative check: for three times retry_in, no timer starts it again
            give_up = time.monotonic() + 3
            while time.monotonic() < give_up:
                assert served.circusctl("status", "workers") == "stopped"
                time.sleep(0.2)
            assert not served.pids("workers")
            assert served.get("/").status == 503  # from the dispatcher, after queue_timeout
            crashes = re.findall(r"^workers\.\d+ \| .*RuntimeError: crash flag", served.output(),
                                 re.M)
            assert len(crashes) >= 4, served.output()[-3000:]
            log = served.output()
            assert served.stop() == 0
        finally:
            served.process.stop(STOP_DEADLINE)
        assert_nothing_left(directory)
    assert "workers: crash loop: watcher stopped for good" in log, (
        "the flapping plugin's reasons are not in serve's output:\n" + log[-3000:])


def test_workers_crashing_at_start_end_serve_with_one_line() -> None:
    """The app imports in serve's check but not in the workers (it arms a flag the
    first time): the plugin stops the workers, serve says so and stops the stack."""
    with scratch() as directory:
        flag = directory / "crash"
        env = {**python_env(), "SERVE_APPS_CRASH_FLAG": str(flag), "SERVE_APPS_ARM_FLAG": "1"}
        started = time.monotonic()
        result = subprocess.run(
            serve_argv(free_port(), APP, directory / "run", ("--workers", "2")),
            cwd=str(directory), env=env, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stderr[-3000:]
        assert "circus-wsgi: error: workers crashed in a loop at start and circus stopped " \
               "its watcher" in result.stderr
        assert "RuntimeError: crash flag" in result.stdout
        assert "Serving " not in result.stdout
        assert elapsed < 15
        assert_nothing_left(directory)
        assert not any((directory / "run").glob("*.sock"))


# --------------------------------------------------------------------------
# Stopping


def test_sigterm_stops_everything_and_removes_the_run_dir_serve_made() -> None:
    with serving(own_run_dir=False) as served:
        run_dir = served.run_dir
        assert run_dir.parent == Path("/tmp") and run_dir.is_dir()
        assert stack_processes(run_dir)
        assert served.stop(signal.SIGTERM) == 0
        assert_nothing_left(run_dir, within=0)
        assert not run_dir.exists()


def test_sigterm_lets_requests_finish_then_cleans_a_given_run_dir() -> None:
    with serving("--workers", "2") as served:
        run_dir = served.directory / "run"
        leftover = run_dir / "uploads" / "upload.abc123"  # as mongrel2 names them
        leftover.write_bytes(b"part of a body")
        replies: list[Reply] = []
        sleeper = threading.Thread(target=lambda: replies.append(served.get("/sleep?s=2")))
        sleeper.start()
        wait_for(lambda: _dispatcher_busy(run_dir), 10, 0.02, "the request to reach a worker")
        assert served.stop(signal.SIGTERM) == 0
        sleeper.join(10)
        assert [r.status for r in replies] == [200] and replies[0].body == b"slept 2.0"
        assert_nothing_left(served.directory, within=0)
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "circus.ini", "config.sqlite", "mongrel2.conf", "uploads"]  # mongrel2 logs no access
        assert not any((run_dir / "uploads").iterdir())


def test_a_second_ctrl_c_stops_at_once() -> None:
    """The first Ctrl-C waits for the workers (graceful_timeout 30 s); the second kills."""
    with serving("--workers", "1", "--graceful-timeout", "30") as served:
        run_dir = served.directory / "run"
        failures: list[BaseException] = []

        def slow_request() -> None:
            try:
                served.get("/sleep?s=30", timeout=60)
            except OSError as error:
                failures.append(error)

        sleeper = threading.Thread(target=slow_request, daemon=True)
        sleeper.start()
        wait_for(lambda: _dispatcher_busy(run_dir), 10, 0.02, "the request to reach a worker")
        served.process.send_signal(signal.SIGINT)
        wait_for(lambda: served.circusctl("status", "workers") == "stopping", 10, 0.05,
                 "circus to be stopping the workers")
        assert served.process.alive()  # waiting for the request, up to graceful_timeout
        interrupted = time.monotonic()
        status = served.stop(signal.SIGINT, deadline=10)
        assert time.monotonic() - interrupted < 5
        assert status == 0
        sleeper.join(10)
        assert failures  # the request in flight was cut
        assert_nothing_left(served.directory, within=0)
        assert not any(run_dir.glob("*.sock"))


def test_when_circusd_is_killed_the_whole_stack_exits() -> None:
    with serving("--workers", "2") as served:
        [circusd] = [p for p in psutil.Process(served.process.pid).children()
                     if "circus.circusd" in p.cmdline()]
        started = time.monotonic()
        circusd.kill()
        status = served.process.popen.wait(15)
        assert time.monotonic() - started < 10
        assert status == 1
        assert "circus-wsgi: error: circusd exited (killed by SIGKILL)" in served.output()
        assert_nothing_left(served.directory, within=0)
        assert not any((served.directory / "run").glob("*.sock"))


def test_when_serve_is_killed_the_whole_stack_exits_and_serve_starts_again() -> None:
    with scratch() as directory:
        served = start_serve(directory, "--workers", "2")
        try:
            assert len(stack_processes(directory)) >= 7
            served.process.popen.kill()
            served.process.popen.wait(5)
            assert_nothing_left(directory, within=10)
            # nobody was left to clean up: the next serve on this run dir does
            assert (directory / "run" / "circus.sock").is_socket()
            again = start_serve(directory, "--workers", "1")
            assert again.stop() == 0
            assert not any((directory / "run").glob("*.sock"))
        finally:
            served.process.stop(STOP_DEADLINE)


# --------------------------------------------------------------------------
# A TCP control endpoint, and the files of `circus-wsgi config`


def test_a_tcp_endpoint_works_and_serve_warns_that_anyone_may_use_it() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with serving("--workers", "1", "--endpoint", endpoint) as served:
        assert f"circus-wsgi: warning: circusd listens on {endpoint}: anyone on this host " \
               "can control the stack" in served.output()
        assert served.endpoint == endpoint
        assert "workers" in served.circusctl("list").split(",")
        assert served.stop() == 0


@contextlib.contextmanager
def plain_circusd(directory: Path, attempts: int = 3) -> Iterator[tuple[Process, int, Path]]:
    """``circus-wsgi config APP --out DIR`` then ``circusd DIR/circus.ini``, answering on
    its port; yields (circusd, port, DIR) and stops circusd (deadline, then SIGKILL)."""
    for _ in range(attempts):
        port = free_port()
        out = directory / f"conf-{port}"
        subprocess.run([CIRCUS_WSGI, "config", APP, "--out", str(out), "--chdir",
                        str(TESTS_DIR), "--workers", "1", "--bind", f"127.0.0.1:{port}"],
                       check=True, capture_output=True, timeout=60)
        circusd = Process([CIRCUSD, str(out / "circus.ini")], directory / f"circusd-{port}.log",
                          cwd="/", env=python_env())
        try:
            wait_for(lambda: not circusd.alive() or "Address already in use"
                     in circusd.output() or _answers(port), START_DEADLINE, 0.05,
                     "circusd's stack to answer")
            if "Address already in use" in circusd.output():
                continue
            assert circusd.alive(), circusd.output()[-3000:]
            yield circusd, port, out
            return
        finally:
            circusd.stop(STOP_DEADLINE)
    pytest.fail(f"no free port after {attempts} tries")


def test_the_files_of_circus_wsgi_config_run_the_stack_under_plain_circusd() -> None:
    with scratch() as directory, plain_circusd(directory) as (circusd, port, out):
        reply = get(port, "/")
        assert reply.status == 200 and reply.body.startswith(b"hello from ")
        assert "worker" in psutil.Process(int(reply.body.split()[-1])).cmdline()
        assert circusd.stop(30) == 0
        assert_nothing_left(out, within=0)


@pytest.fixture(scope="module")
def orphans() -> Iterator[dict[str, set[int]]]:
    """The processes of each watcher of a plain circusd, just after a kill -9 of circusd."""
    with scratch() as directory, plain_circusd(directory) as (circusd, port, out):
        endpoint = f"ipc://{out}/run/circus.sock"
        pids = {name: _pids(circusctl(endpoint, "list", name))
                for name in ("mongrel2", "dispatcher", "workers", "circusd-stats")}
        circusd.popen.kill()
        circusd.popen.wait(5)
        yield pids


def _pids(listed: str) -> set[int]:
    return {int(pid) for pid in listed.split(",") if pid}


def _all_exit(pids: set[int], within: float) -> bool:
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), within, 0.05)
        return True
    return False


def test_kill_9_of_plain_circusd_ends_mongrel2_the_dispatcher_and_the_workers(
        orphans: dict[str, set[int]]) -> None:
    pids = orphans["mongrel2"] | orphans["dispatcher"] | orphans["workers"]
    assert len(pids) == 3
    assert _all_exit(pids, within=5), [psutil.Process(p).cmdline() for p in pids
                                       if psutil.pid_exists(p)]


def test_kill_9_of_plain_circusd_ends_circusd_stats(orphans: dict[str, set[int]]) -> None:
    assert len(orphans["circusd-stats"]) == 1
    assert _all_exit(orphans["circusd-stats"], within=5)
