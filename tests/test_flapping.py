"""The flapping plugin in a real circusd: crash loops stop for good, planned exits never count.

One circusd runs every watcher below side by side for the whole module; a
subscriber records circusd's events, and circusd's output (where the plugin's
log shows, with ``debug = True``) goes to a file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
import zmq
from circus.client import CircusClient

from circus_wsgi import exits
from circus_wsgi.flapping import Flapping
from harness import stop_circusd

BIN = Path(sys.executable).parent
CHECK_DELAY, ATTEMPTS, WINDOW, RETRY_IN, MAX_RETRY = 0.3, 3, 2.0, 1.5, 2


def python(code: str) -> str:
    return f'{sys.executable} -c "{code}"'


# name: (command, number of processes)
WATCHERS = {
    "crasher": ("/bin/false", 1),
    "killer": (python("import os; os.kill(os.getpid(), 9)"), 1),
    "recycler": (python("import time; time.sleep(0.2)"), 2),
    "stuck": (python(f"import os; os.kill(os.getpid(), {int(exits.STUCK_SIGNAL)})"), 1),
    "reloaded": ("/bin/sleep 60", 2),
    # process 1 crashes at once; the others run until a stop kills them, then exit 1
    "doomed": (python("import signal, sys, time; "
                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(1)); "
                      "sys.exit(1) if sys.argv[1] == '1' else time.sleep(60)")
               + " $(circus.wid)", 3),
}


def circus_ini(run: Path) -> str:
    watchers = "".join(
        f"\n[watcher:{name}]\ncmd = {cmd}\nnumprocesses = {n}\ngraceful_timeout = 2\n"
        for name, (cmd, n) in WATCHERS.items())
    return f"""[circus]
endpoint = ipc://{run}/ctl.sock
pubsub_endpoint = ipc://{run}/pub.sock
multicast_endpoint =
check_delay = {CHECK_DELAY}
debug = True

[plugin:flapping]
use = circus_wsgi.flapping.Flapping
attempts = {ATTEMPTS}
window = {WINDOW}
retry_in = {RETRY_IN}
retries = {MAX_RETRY}
{watchers}"""


class Events(threading.Thread):
    """Records circusd's watcher events as (watcher, action, message)."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        self.socket.connect(endpoint)
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            if self.socket.poll(100):
                topic, msg = self.socket.recv_multipart()
                _, name, action = topic.decode().split(".")
                self.seen.append((name, action, json.loads(msg)))
        self.socket.close(linger=0)

    def of(self, name: str, action: str, since: float = 0) -> list[dict[str, Any]]:
        """The messages of one watcher's events of one kind, published at ``since`` or later."""
        return [msg for n, a, msg in list(self.seen)
                if (n, a) == (name, action) and msg.get("time", 0) >= since]


class Circus:
    def __init__(self, run: Path) -> None:
        self.run = run
        (run / "circus.ini").write_text(circus_ini(run))
        self.events = Events(f"ipc://{run}/pub.sock")
        self.client = CircusClient(endpoint=f"ipc://{run}/ctl.sock", timeout=5)
        with open(run / "circusd.out", "ab") as out:
            self.process = subprocess.Popen([BIN / "circusd", "circus.ini"], cwd=run,
                                            stdout=out, stderr=subprocess.STDOUT)

    def status(self, name: str) -> str:
        return self.client.call({"command": "status", "properties": {"name": name}})["status"]

    def pids(self, name: str) -> list[int]:
        return self.client.call({"command": "list", "properties": {"name": name}})["pids"]

    def log(self) -> str:
        return (self.run / "circusd.out").read_text()

    def stop(self, deadline: float = 10) -> None:
        """Stop circusd (SIGKILL after the deadline), then whatever it left running.

        circusd ignores a SIGTERM that comes while it runs another command (such
        as a watcher stop), so SIGTERM is sent again until it exits.
        """
        self.client.stop()
        stop_circusd(self.process, deadline)
        self.events.done.set()
        self.events.join()
        left = [p for p in psutil.process_iter() if _cwd(p) == str(self.run)]
        for process in left:
            process.kill()
        psutil.wait_procs(left, timeout=5)


def _cwd(process: psutil.Process) -> str | None:
    try:
        return process.cwd()
    except psutil.Error:
        return None


@pytest.fixture(scope="module")
def circus():
    run = Path(tempfile.mkdtemp(prefix="cw-flap-", dir="/tmp"))
    circus = Circus(run)
    try:
        yield circus
    finally:
        circus.stop()
        shutil.rmtree(run)


def wait_for(predicate: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return result


def gave_up(circus: Circus, name: str) -> float:
    """Wait for the plugin to give up on a watcher; return the time circusd last stopped it."""
    wait_for(lambda: f"{name}: crash loop: watcher stopped for good" in circus.log())
    wait_for(lambda: len(circus.events.of(name, "stop")) == MAX_RETRY + 1)
    return circus.events.of(name, "stop")[-1]["time"]


@pytest.mark.parametrize("name", ["crasher", "killer"])
def test_a_crash_loop_is_stopped_for_good(circus, name):
    stopped = gave_up(circus, name)
    time.sleep(max(0, stopped + 2 * RETRY_IN - time.time()))
    assert circus.status(name) == "stopped"
    assert circus.events.of(name, "start", since=stopped) == []


def test_the_log_shows_the_decisions(circus):
    gave_up(circus, "crasher")
    lines = [line for line in circus.log().splitlines() if "circus_wsgi.flapping" in line]
    decisions = [re.sub(r".*\] crasher: ", "", line) for line in lines if "] crasher: " in line]
    counted = [f"crash counted: pid \\d+ exit 1; {i} of {ATTEMPTS} in {WINDOW:g}s"
               for i in range(1, ATTEMPTS + 1)]
    expected = []
    for retry in range(1, MAX_RETRY + 1):
        expected += counted + [
            f"crash loop: watcher stopped; retry {retry} of {MAX_RETRY} in {RETRY_IN:g}s",
            "retrying: starting the watcher"]
    expected += counted + [f"crash loop: watcher stopped for good after {MAX_RETRY} retries; "
                           "fix it, then `circusctl start crasher`"]
    assert len(decisions) == len(expected), "\n".join(decisions)
    for decision, pattern in zip(decisions, expected, strict=True):
        assert re.fullmatch(pattern, decision), decision


def test_exits_caused_by_its_own_stop_are_not_counted(circus):
    gave_up(circus, "doomed")
    stop_kills = {msg["process_pid"] for msg in circus.events.of("doomed", "kill")}

    def reaped() -> dict:
        return {msg["process_pid"]: msg["exit_code"] for msg in circus.events.of("doomed", "reap")}

    wait_for(lambda: stop_kills <= set(reaped()), 5)  # events arrive on their own thread
    # some killed before their SIGTERM handler was in place end by the signal instead;
    # those that exited 1 are what a plugin counting every exit would count
    assert any(reaped()[pid] == 1 for pid in stop_kills)
    counted = {int(pid) for pid in re.findall(r"doomed: crash counted: pid (\d+)", circus.log())}
    assert counted and not counted & stop_kills


@pytest.mark.parametrize("name, exit_code", [("recycler", exits.EXIT_OK),
                                             ("stuck", -exits.STUCK_SIGNAL)])
def test_planned_exits_are_not_counted(circus, name, exit_code):
    """Many more planned exits than ``attempts`` within a window do not stop the watcher."""
    start = time.time()
    wait_for(lambda: len(circus.events.of(name, "reap", since=start)) >= 2 * ATTEMPTS)
    time.sleep(2 * CHECK_DELAY)
    assert {msg["exit_code"] for msg in circus.events.of(name, "reap")} == {exit_code}
    assert circus.status(name) == "active"
    assert circus.events.of(name, "stop") == []
    assert f"] {name}: " not in circus.log()


def test_reloading_a_watcher_does_not_trip_it(circus):
    for _ in range(ATTEMPTS + 1):
        before = circus.pids("reloaded")
        circusctl(circus, "reload", "reloaded")
        wait_for(lambda: set(circus.pids("reloaded")).isdisjoint(before))
    time.sleep(2 * CHECK_DELAY)
    assert circus.status("reloaded") == "active"
    assert circus.events.of("reloaded", "stop") == []
    assert "] reloaded: " not in circus.log()


def circusctl(circus: Circus, *args: str) -> None:
    """Run circusctl, again while circusd refuses because it runs another command."""
    command = [BIN / "circusctl", "--endpoint", f"ipc://{circus.run}/ctl.sock", *args]

    def run() -> bool:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0 or "already running" in done.stderr, done.stderr
        return done.returncode == 0

    wait_for(run, timeout=10)


def test_a_pending_retry_is_replaced_and_reset_cancels_it():
    plugin = Flapping("ipc://unused", "ipc://unused", 5.0, None, attempts="1", retries="5")
    plugin.command = lambda command, name: True
    plugin.configs["w"] = {}
    try:
        plugin.reaped("w", {"exit_code": 1, "time": 1.0, "process_pid": 10})
        first = plugin.timers["w"]
        plugin.handle_recv((b"watcher.w.stop", b"{}"))
        plugin.reaped("w", {"exit_code": 1, "time": 2.0, "process_pid": 11})
        assert first.cancelled() and not plugin.timers["w"].cancelled()
        second = plugin.timers["w"]
        plugin.reset("w")
        assert second.cancelled() and plugin.timers == {} and plugin.tries["w"] == 0
    finally:
        plugin.loop.close()
