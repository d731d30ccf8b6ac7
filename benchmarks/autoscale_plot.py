"""A real run of autoscaling, plotted: docs/autoscaling.png.

Starts ``circus-wsgi serve`` with ``--workers-min 1 --workers-max 4
--scale-down-idle 3`` on the 0.2 s request of tests/chaos_app.py, steps the load
from 1 to 16 closed-loop clients and back to none, and samples every 0.25 s the
clients, circus's wanted worker count, the workers connected, the queue and the
answered rate (from the dispatcher's counters). Writes the plot and prints the
decisions the autoscaler logged.

    python benchmarks/autoscale_plot.py [docs/autoscaling.png]
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from circus.client import CircusClient

from circus_wsgi.settings import Settings
from circus_wsgi.status import read_status

PROJECT = Path(__file__).resolve().parent.parent
#: (seconds from the start, clients from then on)
STEPS = ((0, 1), (5, 16), (20, 0), (40, 0))


def serve(directory: Path, port: int) -> subprocess.Popen:
    argv = [str(Path(sys.executable).parent / "circus-wsgi"), "serve", "chaos_app:app",
            "--chdir", str(PROJECT / "tests"), "--bind", f"127.0.0.1:{port}",
            "--run-dir", str(directory / "run"), "--workers-min", "1", "--workers-max", "4",
            "--scale-down-idle", "3", "--access-log", ""]
    log = open(directory / "serve.log", "wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def client(port: int, number: int, active: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        if number >= active[0]:
            time.sleep(0.05)
            continue
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/slow?s=0.2&t=plot")
            connection.getresponse().read()
        except OSError:
            time.sleep(0.05)
        finally:
            connection.close()


def main(out: str) -> int:
    directory = Path(tempfile.mkdtemp(prefix="cwa-", dir="/tmp"))
    port = 28000 + os.getpid() % 1000
    process = serve(directory, port)
    stack = Settings(run_dir=str(directory / "run"))
    samples: list[tuple[float, int, int, int, int, float]] = []
    stop = threading.Event()
    active = [0]
    threads = [threading.Thread(target=client, args=(port, n, active, stop), daemon=True)
               for n in range(16)]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                read_status(stack, timeout=0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise SystemExit("serve did not start") from None
        circus = CircusClient(endpoint=f"ipc://{directory}/run/circus.sock", timeout=5)
        for thread in threads:
            thread.start()
        start = time.monotonic()
        last_done, last_at = None, start
        while (now := time.monotonic()) - start < STEPS[-1][0]:
            active[0] = [n for at, n in STEPS if now - start >= at][-1]
            status = read_status(stack, timeout=1)
            wanted = circus.call({"command": "numprocesses",
                                  "properties": {"name": "workers"}})["numprocesses"]
            done = status["completed"]
            rate = 0.0 if last_done is None else (done - last_done) / (now - last_at)
            last_done, last_at = done, now
            samples.append((now - start, active[0], wanted,
                            status["busy_workers"] + status["idle_workers"], status["queue"],
                            rate))
            time.sleep(0.25)
        circus.stop()
    finally:
        stop.set()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    decisions = [line for line in (directory / "serve.log").read_text().splitlines()
                 if "autoscale: " in line]
    shutil.rmtree(directory, ignore_errors=True)
    plot(samples, out)
    print("\n".join(decisions))
    return 0


def plot(samples: list[tuple], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [s[0] for s in samples]
    figure, (load, workers) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    load.plot(seconds, [s[1] for s in samples], label="clients (0.2 s requests)")
    load.plot(seconds, [s[4] for s in samples], label="queued in the dispatcher")
    load.plot(seconds, [s[5] / 5 for s in samples], label="answered per second / 5")
    load.set_ylabel("requests")
    load.legend(loc="upper right", fontsize="small")
    workers.step(seconds, [s[2] for s in samples], where="post", label="wanted (circus)")
    workers.plot(seconds, [s[3] for s in samples], label="connected to the dispatcher")
    workers.set_ylabel("workers")
    workers.set_xlabel("seconds")
    workers.set_ylim(0, 5)
    workers.legend(loc="upper right", fontsize="small")
    figure.suptitle("--workers-min 1 --workers-max 4 --scale-down-idle 3")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/autoscaling.png"))
