"""Workers on another host, over ZeroMQ: here the other host is this one, on 127.0.0.1.

The front is the harness's stack (mongrel2 and the dispatcher, with
``remote_workers``); a remote worker is ``circus-wsgi worker --role workers
--connect ...`` with a run dir of its own, as on a worker host. The tests across
real network namespaces, where a link can be cut, are in test_remote_hosts.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from circus_wsgi.curve import write_pair
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import Settings
from circus_wsgi.status import read_status
from harness import Stack, free_port, wait_for


def remote_workers(stack: Stack) -> list[dict]:
    status = read_status(Settings(run_dir=str(stack.path)), timeout=2)
    return [w for w in status["workers"].values() if w["host"]]


@pytest.fixture
def host_dir():
    """The run dir of the other host's workers."""
    path = Path(tempfile.mkdtemp(prefix="cwh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def join(stack: Stack, host_dir: Path, endpoint: str, **options):
    """One remote worker of ``stack``, from the other host's run dir."""
    RunDir(host_dir).create()
    return stack.add_worker(wait=False, role="workers", connect=endpoint, remote_workers="",
                            run_dir=str(host_dir), **options)


def get_json(stack: Stack, path: str) -> tuple[int, dict]:
    with stack.client(timeout=15) as client:
        reply = client.request("GET", path)
    return reply.status, json.loads(reply.body) if reply.status == 200 else {}


def test_a_remote_worker_serves_and_shows_with_its_host(host_dir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Stack(workers=0, app="worker_apps:rules", remote_workers=endpoint,
               insecure_remote_workers=True) as stack:
        worker = join(stack, host_dir, endpoint, insecure_remote_workers=True)
        wait_for(lambda: remote_workers(stack), 10, 0.05, "the remote worker to announce")
        [shown] = remote_workers(stack)
        assert shown["host"] == "127.0.0.1" and shown["pid"] == worker.pid
        answers = [get_json(stack, "/pid") for _ in range(20)]
        assert answers == [(200, {"pid": worker.pid})] * 20
        status = read_status(Settings(run_dir=str(stack.path)))
        assert status["handed_out"] == status["completed"] == 20


def test_curve_lets_in_the_keys_it_trusts_and_no_other(host_dir: Path) -> None:
    front_keys, host_keys, stranger_keys = (host_dir / "front", host_dir / "host",
                                            host_dir / "stranger")
    front_public, _ = write_pair(front_keys, "front")
    host_public, _ = write_pair(host_keys, "host")
    stranger_public, _ = write_pair(stranger_keys, "stranger")
    shutil.copy(host_public, front_keys / "authorized")  # the front trusts the host ...
    for keys in (host_keys, stranger_keys):  # ... and both know the front's key
        shutil.copy(front_public, keys / "authorized")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Stack(workers=0, app="worker_apps:rules", remote_workers=endpoint,
               curve_keys=str(front_keys), queue_timeout=2) as stack:
        stranger = join(stack, host_dir / "s", endpoint, curve_keys=str(stranger_keys))
        time.sleep(1.5)
        assert remote_workers(stack) == []  # refused: it serves nothing
        assert get_json(stack, "/pid")[0] == 503
        assert "refused a worker host whose key" in stack.dispatcher.output()
        trusted = join(stack, host_dir / "t", endpoint, curve_keys=str(host_keys))
        wait_for(lambda: remote_workers(stack), 10, 0.05, "the trusted worker to announce")
        assert get_json(stack, "/pid") == (200, {"pid": trusted.pid})
        shutil.copy(stranger_public, front_keys / "authorized")  # trusted from now on
        wait_for(lambda: len(remote_workers(stack)) == 2, 10, 0.05,
                 "the stranger, trusted without a restart, to announce")
        assert {w["pid"] for w in remote_workers(stack)} == {stranger.pid, trusted.pid}


def test_a_remote_worker_killed_mid_request_costs_that_request_only(host_dir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Stack(workers=1, app="worker_apps:rules", remote_workers=endpoint,
               insecure_remote_workers=True, remote_timeout=1.0) as stack:
        worker = join(stack, host_dir, endpoint, insecure_remote_workers=True,
                      remote_timeout=1.0)
        wait_for(lambda: remote_workers(stack), 10, 0.05, "the remote worker to announce")
        held: list = []
        slow = [threading.Thread(target=lambda: held.append(get_json(stack, "/slow?s=5")))
                for _ in range(2)]  # the local worker takes one, the remote one the other
        for thread in slow:
            thread.start()
        wait_for(lambda: [r["path"] for r in remote_workers(stack)[0]["running"]] == ["/slow"],
                 5, 0.02, "the remote worker to run a request (a held one not begun would "
                 "go to another worker)")
        killed = time.monotonic()
        worker.send_signal(signal.SIGKILL)
        wait_for(lambda: len(held) == 1, 5, 0.02, "the remote worker's request to end")
        assert held[0] == (502, {}) and time.monotonic() - killed < 1.0 + 1.5
        assert remote_workers(stack) == []
        for thread in slow:
            thread.join(10)
        assert held[1][0] == 200  # the local worker's
