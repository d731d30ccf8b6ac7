"""Micro-benchmark of the worker's hello path: ``python tests/bench_worker.py``.

1. in-process: the Python cost alone — parse, environ, app, framing, the
   response message — with the socket replaced by a list (no zmq, no syscalls).
2. worker process, fake dispatcher: a listener here keeps N requests in flight to
   a real worker process; the worker's CPU time (user + system, all its threads)
   per request.
3. worker process in direct mode behind the real mongrel2, loaded by wrk: CPU
   per request of the worker and of mongrel2.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from circus_wsgi import dispatch_protocol as dp  # noqa: E402
from circus_wsgi.accesslog import AccessLog  # noqa: E402
from circus_wsgi.rundir import RunDir  # noqa: E402
from circus_wsgi.settings import Settings  # noqa: E402
from circus_wsgi.worker import Worker, build_router  # noqa: E402
from framed_peer import FramedListener  # noqa: E402
from harness import TESTS_DIR, Stack, circus_wsgi  # noqa: E402
from test_worker_dispatcher import m2_request  # noqa: E402


class ListLink:
    """A link that keeps what is sent: the worker without sockets."""

    direct = True

    def __init__(self) -> None:
        self.sent = 0

    def send(self, conn_id: bytes, messages: list, done: bool, status: int) -> None:
        self.sent += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def in_process(count: int, access_log: str) -> float:
    """Microseconds of Python per hello request, sockets left out."""
    run_dir = Path(tempfile.mkdtemp(prefix="cw-b-", dir="/tmp"))
    settings = Settings(app="worker_apps:hello", chdir=str(TESTS_DIR), mode="direct",
                        flow_control=False, run_dir=str(run_dir), access_log=access_log)
    access = AccessLog(settings.access_log, settings.access_log_format)
    worker = Worker(settings, build_router(settings), access)
    worker.link.close()
    worker.link = link = ListLink()
    raw = m2_request(b"1", b"/", credits=None, user_agent=b"bench", accept=b"*/*")
    def serve() -> None:
        worker._on_message(raw)
        worker._serve(*worker.pending.popleft())

    for _ in range(1000):
        serve()
    started = time.process_time()
    for _ in range(count):
        serve()
    spent = time.process_time() - started
    assert link.sent == count + 1000
    worker.close()
    shutil.rmtree(run_dir)
    return spent / count * 1e6


def fake_dispatcher(count: int, batch: int) -> tuple[float, float]:
    """(user, system) microseconds of worker CPU per request, given ``batch`` requests per
    REQUEST message and answering with one OUTPUT per batch (prefetch ``batch - 1``)."""
    run_dir = Path(tempfile.mkdtemp(prefix="cw-b-", dir="/tmp"))
    RunDir(run_dir).create()
    listener = FramedListener(RunDir(run_dir).dispatcher)
    settings = Settings(app="worker_apps:hello", chdir=str(TESTS_DIR), run_dir=str(run_dir),
                        access_log="", prefetch=batch - 1)
    worker = circus_wsgi("worker", settings, run_dir / "worker.log")
    link = listener.accept(10)
    try:
        command, *_ = link.recv_multipart()
        assert command == dp.READY
        requests = [m2_request(b"%d" % conn, b"/", user_agent=b"bench", accept=b"*/*")
                    for conn in range(batch)]

        def run(number: int) -> None:
            done = 0
            link.send_multipart([dp.REQUEST, b"", *requests])
            while done < number:
                frames = link.recv_multipart()
                if frames[0] != dp.OUTPUT:
                    continue
                finished = len(frames[1].split())
                done += finished
                if done + batch <= number and finished:
                    link.send_multipart([dp.REQUEST, b"", *requests[:finished]])

        run(2000)
        process = psutil.Process(worker.pid)
        before = process.cpu_times()
        run(count)
        after = process.cpu_times()
        return ((after.user - before.user) / count * 1e6,
                (after.system - before.system) / count * 1e6)
    finally:
        worker.stop(5)
        link.close()
        listener.close()
        shutil.rmtree(run_dir)


def behind_mongrel2(seconds: int) -> dict[str, float]:
    """Requests/s and CPU microseconds per request, direct mode, wrk with 16 connections."""
    with Stack(app="worker_apps:hello", mode="direct", access_log="") as stack:
        url = f"http://127.0.0.1:{stack.port}/"
        subprocess.run(["wrk", "-t1", "-c16", "-d1s", url], capture_output=True, check=True)
        processes = {"worker": psutil.Process(stack.worker_processes[0].pid),
                     "mongrel2": psutil.Process(stack.mongrel2.pid)}
        before = {k: sum(p.cpu_times()[:2]) for k, p in processes.items()}
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", url], capture_output=True,
                             text=True, check=True).stdout
        after = {k: sum(p.cpu_times()[:2]) for k, p in processes.items()}
    count = int(re.search(r"(\d+) requests in", out).group(1))
    result = {k: (after[k] - before[k]) / count * 1e6 for k in processes}
    result["requests/s"] = count / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    print(f"in-process, no access log:    {in_process(args.count, ''):6.1f} us/request")
    print(f"in-process, access log file:  {in_process(args.count, '/dev/null'):6.1f} us/request")
    for batch in (1, 8):
        user, system = fake_dispatcher(args.count, batch)
        print(f"worker process, fake dispatcher, batches of {batch}: {user + system:6.1f} "
              f"us CPU/request (user {user:.1f}, system {system:.1f})")
    if shutil.which("wrk"):
        result = behind_mongrel2(5)
        print(f"direct mode behind mongrel2 (wrk -c16): {result['requests/s']:.0f} requests/s, "
              f"worker {result['worker']:.1f} us CPU/request, "
              f"mongrel2 {result['mongrel2']:.1f} us CPU/request")


if __name__ == "__main__":
    main()
