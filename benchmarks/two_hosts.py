"""circus-wsgi with one local and one remote worker, the remote one on another "host":
two network namespaces joined by a veth pair (tests/netns.py), CURVE on the link.

    python -m benchmarks.two_hosts PORT TAG RUN_DIR

makes the namespaces ``cwf-TAG`` (the front: mongrel2 on 127.0.0.1:PORT, the
dispatcher, one worker) and ``cww-TAG`` (one worker, ``--role workers``), runs
both ``circus-wsgi serve`` until SIGTERM, then stops them and removes the
namespaces and keys, whatever happens. Clients must run in ``cwf-TAG``
(benchmarks/run.py does: :attr:`Launch.namespace`). The front's run dir is
RUN_DIR, so its status says when the remote worker has announced itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from netns import FRONT_ADDRESS, Hosts  # noqa: E402

from circus_wsgi.curve import write_pair  # noqa: E402

BIN = Path(sys.executable).parent
APP = "benchmarks.apps:app"
REMOTE_PORT = 7700


def main(port: int, tag: str, run_dir: str, serve_args: list[str]) -> int:
    hosts = Hosts(tag)
    keys = Path(tempfile.mkdtemp(prefix="cwk-", dir="/tmp"))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    processes: list[subprocess.Popen] = []
    try:
        hosts.make()
        front_public, _ = write_pair(keys / "front", "front")
        host_public, _ = write_pair(keys / "host", "host")
        shutil.copy(host_public, keys / "front" / "authorized")
        shutil.copy(front_public, keys / "host" / "authorized")
        endpoint = f"tcp://{FRONT_ADDRESS}:{REMOTE_PORT}"
        common = ["--workers", "1", "--chdir", str(ROOT), "--access-log=", *serve_args]
        processes.append(subprocess.Popen(hosts.inside(hosts.front, [
            str(BIN / "circus-wsgi"), "serve", APP, "--bind", f"127.0.0.1:{port}",
            "--run-dir", run_dir, "--remote-workers", endpoint,
            "--curve-keys", str(keys / "front"), *common])))
        processes.append(subprocess.Popen(hosts.inside(hosts.host, [
            str(BIN / "circus-wsgi"), "serve", APP, "--role", "workers", "--connect", endpoint,
            "--curve-keys", str(keys / "host"), *common])))
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        hosts.remove()
        shutil.rmtree(keys, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]))
