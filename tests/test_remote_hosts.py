"""A front and a worker host as two hosts: two network namespaces joined by a veth pair.

The test makes them (addresses from TEST-NET-1, 192.0.2.0/24, inside the
namespaces only, no default route) and removes them, whatever happens. The front
runs ``circus-wsgi serve ... --remote-workers tcp://192.0.2.1:PORT`` in one, the
worker host ``circus-wsgi serve ... --role workers --connect ...`` in the other,
both with CURVE keys; clients run in the front's namespace (tests/ns_client.py).
Cutting the link is ``ip link set ... down``. Skipped, with the reason, where
``ip netns add`` fails (no root, no iproute2).
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from circus.client import CircusClient

from circus_wsgi.curve import write_pair
from harness import TESTS_DIR, Process, python_env, wait_for
from netns import FRONT_ADDRESS, HOST_ADDRESS, Hosts
from test_serve import CIRCUS_WSGI, scratch

REMOTE_PORT, HTTP_PORT = 7700, 8000
REMOTE_TIMEOUT = 3.0


def in_namespace(namespace: str, argv: list[str], log: Path) -> Process:
    return Process(Hosts.inside(namespace, argv), log, env=python_env(), cwd=str(TESTS_DIR))


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    made = Hosts()
    try:
        made.make()
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        made.remove()
        detail = getattr(error, "stderr", b"") or b""
        pytest.skip(f"cannot make network namespaces here: {detail.decode().strip() or error}")
    try:
        yield made
    finally:
        made.remove()


class Client:
    """Requests sent from inside the front's namespace, each answer kept by its id."""

    def __init__(self, hosts: Hosts) -> None:
        self.process = subprocess.Popen(
            Hosts.inside(hosts.front, [sys.executable, str(TESTS_DIR / "ns_client.py"),
                                       str(HTTP_PORT)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=python_env())
        self.answers: dict[str, dict] = {}
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            answer = json.loads(line)
            self.answers[answer["id"]] = answer

    def send(self, name: str, path: str) -> None:
        self.process.stdin.write(json.dumps({"id": name, "path": path}) + "\n")
        self.process.stdin.flush()

    def answer(self, name: str, timeout: float = 30) -> dict:
        return wait_for(lambda: self.answers.get(name), timeout, 0.02, f"the answer to {name}")

    def close(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.close()
        self.process.wait(60)


def pids(run_dir: Path, watcher: str = "workers") -> set[int]:
    client = CircusClient(endpoint=f"ipc://{run_dir}/circus.sock", timeout=5)
    try:
        return set(client.call({"command": "list", "properties": {"name": watcher}})
                   .get("pids", ()))
    finally:
        client.stop()


def front_status(run_dir: Path) -> dict:
    out = subprocess.run([CIRCUS_WSGI, "status", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=10)
    return json.loads(out.stdout)


def remote_shown(run_dir: Path) -> list[dict]:
    try:
        return [w for w in front_status(run_dir)["workers"].values() if w["host"]]
    except ValueError:
        return []


class Pair:
    """The front's and the worker host's ``circus-wsgi serve``, with their run dirs."""

    def __init__(self, front: Process, host: Process, front_run: Path, host_run: Path) -> None:
        self.front, self.host, self.front_run, self.host_run = front, host, front_run, host_run


@contextlib.contextmanager
def served(hosts: Hosts, tmp_path: Path, front_workers: int, host_workers: int,
           trusted: bool = True, front_options: tuple[str, ...] = ()) -> Iterator[Pair]:
    """The front serving worker_apps:rules with ``front_workers``, the worker host with
    ``host_workers``, both with CURVE keys (the host's trusted by the front or not)."""
    front_keys, host_keys = tmp_path / "front-keys", tmp_path / "host-keys"
    front_public, _ = write_pair(front_keys, "front")
    host_public, _ = write_pair(host_keys, "worker-host")
    if trusted:
        shutil.copy(host_public, front_keys / "authorized")
    shutil.copy(front_public, host_keys / "authorized")
    endpoint = f"tcp://{FRONT_ADDRESS}:{REMOTE_PORT}"
    with scratch() as front_run, scratch() as host_run:
        front = in_namespace(hosts.front, [
            CIRCUS_WSGI, "serve", "worker_apps:rules", "--bind", f"127.0.0.1:{HTTP_PORT}",
            "--workers", str(front_workers), "--run-dir", str(front_run),
            "--remote-workers", endpoint, "--curve-keys", str(front_keys), *front_options],
            tmp_path / "front.log")
        host = in_namespace(hosts.host, [
            CIRCUS_WSGI, "serve", "worker_apps:rules", "--role", "workers",
            "--connect", endpoint, "--workers", str(host_workers), "--run-dir", str(host_run),
            "--curve-keys", str(host_keys)], tmp_path / "host.log")
        try:
            front.wait_output("Workers from other hosts: " + endpoint, 30)
            host.wait_output("as workers of " + endpoint, 30)
            yield Pair(front, host, front_run, host_run)
        finally:
            for process in (host, front):
                process.stop(30)


@contextlib.contextmanager
def client_of(hosts: Hosts) -> Iterator[Client]:
    client = Client(hosts)
    try:
        yield client
    finally:
        client.close()


def test_a_worker_host_serves_loses_its_link_and_comes_back(hosts: Hosts,
                                                          tmp_path: Path) -> None:
    with served(hosts, tmp_path, 2, 1, front_options=("--queue-timeout", "20")) as pair, \
            client_of(hosts) as client:
        front_run = pair.front_run
        wait_for(lambda: remote_shown(front_run), 15, 0.1, "the worker host to announce")
        [remote_pid] = pids(pair.host_run)
        assert remote_shown(front_run)[0]["host"] == HOST_ADDRESS
        # Both of the front's own workers busy: requests go to the other host.
        for number in (1, 2):
            client.send(f"busy{number}", "/slow?s=8")
        wait_for(lambda: front_status(front_run)["busy_workers"] == 2, 10, 0.05, "busy")
        client.send("remote", "/pid")
        assert json.loads(client.answer("remote")["body"]) == {"pid": remote_pid}
        # A slow request on the other host; the link is cut in the middle of it.
        client.send("cut", "/slow?s=6")  # over by the time the link is back
        wait_for(lambda: [r["path"] for r in remote_shown(front_run)[0]["running"]] ==
                 ["/slow"], 10, 0.05, "begun there (one not begun would go to another worker)")
        cut_at = time.monotonic()
        hosts.cut(down=True)
        client.send("meanwhile", "/pid")
        cut = client.answer("cut", 15)
        assert cut["status"] == 502 and time.monotonic() - cut_at < REMOTE_TIMEOUT + 2, cut
        meanwhile = client.answer("meanwhile", 20)  # served by a local worker once free
        assert meanwhile["status"] == 200
        assert json.loads(meanwhile["body"])["pid"] in pids(front_run)
        assert remote_shown(front_run) == []
        # The link is back: the worker host connects again and serves again.
        up_at = time.monotonic()
        hosts.cut(down=False)
        wait_for(lambda: remote_shown(front_run), 5, 0.05, "the worker host to come back")
        for number in (3, 4):
            client.send(f"busy{number}", "/slow?s=5")
        wait_for(lambda: front_status(front_run)["busy_workers"] == 2, 10, 0.05, "busy")
        client.send("again", "/pid")
        again = client.answer("again", 10)
        assert json.loads(again["body"]) == {"pid": remote_pid}
        assert time.monotonic() - up_at < 5 + 5  # back within 5 s, then one request
        for name in ("busy1", "busy2", "busy3", "busy4"):
            assert client.answer(name, 30)["status"] == 200  # no client hangs


def test_a_worker_host_with_an_unknown_key_serves_nothing(hosts: Hosts,
                                                         tmp_path: Path) -> None:
    with served(hosts, tmp_path, 1, 1, trusted=False) as pair, client_of(hosts) as client:
        wait_for(lambda: "refused a worker host whose key" in pair.front.output(), 10, 0.1,
                 "the front to refuse the worker host")
        for number in range(4):
            client.send(f"pid{number}", "/pid")
        local = pids(pair.front_run)
        for number in range(4):
            assert json.loads(client.answer(f"pid{number}")["body"])["pid"] in local
        assert remote_shown(pair.front_run) == []


def test_circusctl_decr_on_the_worker_host_loses_nothing(hosts: Hosts, tmp_path: Path) -> None:
    with served(hosts, tmp_path, 1, 2) as pair, client_of(hosts) as client:
        wait_for(lambda: len(remote_shown(pair.front_run)) == 2, 15, 0.1, "both to announce")
        for number in range(8):  # more than the three workers' threads: some prefetched
            client.send(f"slow{number}", "/slow?s=1.5")
        wait_for(lambda: sum(w["holding"] for w in remote_shown(pair.front_run)) >= 2, 10,
                 0.02, "the worker host to hold requests")
        circus = CircusClient(endpoint=f"ipc://{pair.host_run}/circus.sock", timeout=10)
        try:
            assert circus.call({"command": "decr",
                                "properties": {"name": "workers", "nb": 1}})["status"] == "ok"
        finally:
            circus.stop()
        answers = [client.answer(f"slow{number}", 30) for number in range(8)]
        assert [answer["status"] for answer in answers] == [200] * 8
        wait_for(lambda: len(remote_shown(pair.front_run)) == 1, 10, 0.1,
                 "the one that left to be gone from the front's status")
        assert len(pids(pair.host_run)) == 1
        assert "worker host" not in pair.front.output()  # nothing silent, nothing unreachable
