"""The cheapest Python handlers mongrel2 can have: ceilings of circus-wsgi's design.

``python -m benchmarks.nullhandler PORT`` runs mongrel2 (its config from
circus-wsgi's own generator, flow control off) and two handler processes that
answer every request with a fixed 13-byte response: one ``recv`` and one
``send`` per request (and the close message when the client asked for
``Connection: close``), no WSGI, no parsing beyond that. No design that puts
Python processes straight behind mongrel2 can be faster.

``python -m benchmarks.nullhandler PORT --dispatcher`` runs the same mongrel2
with flow control on, circus-wsgi's real dispatcher, and two workers that
answer each ``REQUEST`` batch with one ``OUTPUT`` of fixed responses: what
circus-wsgi could reach if its workers cost nothing.

Both stop on SIGTERM or SIGINT and remove their files.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from circus_wsgi import dispatch_protocol as dp
from circus_wsgi import framing
from circus_wsgi.memory import tune_malloc
from circus_wsgi.mongrel2 import MONGREL2_WORKING_DIR, write_mongrel2_config
from circus_wsgi.protocol import close, response
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import Settings

APP = "benchmarks.apps:app"
HANDLERS = 2
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
KEEP_ALIVE = HEAD + b"\r\nHello, World!"
CLOSING = HEAD + b"Connection: close\r\n\r\nHello, World!"
#: How ``Connection: close`` reads in a tnetstring header dict (wrk sends it lower-case
#: and mongrel2 lower-cases header names).
CLOSE_HEADER = b"10:connection,5:close,"
#: The path of mongrel2's own notices (credits, disconnect): they get no answer.
NOTICE_PATH = b"@*"


def answers(sender: bytes, conn: bytes, raw: bytes) -> list[bytes]:
    """The fixed response, and the close message if the client asked for it."""
    if CLOSE_HEADER in raw:
        return [response(sender, conn, CLOSING), close(sender, conn)]
    return [response(sender, conn, KEEP_ALIVE)]


def handle(send_spec: str, recv_spec: str) -> None:
    """A handler straight on mongrel2: PULL requests, XPUB responses, until killed."""
    context = zmq.Context()
    out = context.socket(zmq.XPUB)
    out.setsockopt(zmq.SNDHWM, 0)
    out.connect(recv_spec)
    out.recv()  # mongrel2's subscription: from now on nothing sent is dropped
    requests = context.socket(zmq.PULL)
    requests.connect(send_spec)
    recv, send = requests.recv, out.send
    while True:
        raw = recv()
        sender, conn, path, _ = raw.split(b" ", 3)
        if path != NOTICE_PATH:
            for message in answers(sender, conn, raw):
                send(message)


def work(path: str) -> None:
    """A worker of the dispatcher that costs nothing: each REQUEST batch gets one OUTPUT."""
    tune_malloc()  # as the real workers do
    while (link := framing.connect(path)) is None:
        time.sleep(0.05)
    link.send((dp.READY, b"%d" % os.getpid(), b"1", b"1", b"0"))  # pid, idle, threads, received
    while not link.closed:
        select.select([link.sock], [], [])
        for frames in link.receive():
            if frames[0] != dp.REQUEST:
                continue
            done, messages = [], []
            for raw in frames[2:]:
                sender, conn, _ = raw.split(b" ", 2)
                done.append(conn)
                messages += answers(sender, conn, raw)
            if done:
                link.send((dp.OUTPUT, b" ".join(done), b"", b" ".join([b"200"] * len(done)),
                           *messages))
        link.drain(timeout=5.0)


def main(port: int, dispatcher: bool) -> int:
    base = Path(tempfile.mkdtemp(prefix="cwn-", dir="/tmp"))
    settings = Settings(app=APP, bind=f"127.0.0.1:{port}", flow_control=dispatcher,
                        mode="dispatcher" if dispatcher else "direct"
                        ).with_defaults_resolved(str(base / "run"))
    run = RunDir(Path(settings.run_dir))
    run.create()
    db, _ = write_mongrel2_config(settings, base)
    processes = [subprocess.Popen(["mongrel2", str(db), settings.server_uuid],
                                  cwd=MONGREL2_WORKING_DIR)]
    if dispatcher:
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "circus_wsgi", "dispatcher", APP, "--bind", settings.bind,
             "--server-uuid", settings.server_uuid, "--run-dir", settings.run_dir]))
        handler = ["work", run.dispatcher]
    else:
        handler = ["handle", run.mongrel2_send, run.mongrel2_recv]
    processes += [subprocess.Popen([sys.executable, "-m", "benchmarks.nullhandler", *handler])
                  for _ in range(HANDLERS)]
    try:
        signal.pause()
    except SystemExit:
        pass
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "handle":
        handle(*sys.argv[2:4])
    elif sys.argv[1] == "work":
        work(sys.argv[2])
    else:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: sys.exit(0))
        sys.exit(main(int(sys.argv[1]), "--dispatcher" in sys.argv[2:]))
