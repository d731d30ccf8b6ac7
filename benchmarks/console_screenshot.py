"""The console under load, photographed: docs/console.png.

Starts ``circus-wsgi serve --console`` (autoscaling 2 to 4 workers of 2 threads) on
tests/chaos_app.py, opens the console's URL in Debian's headless Chromium (the test
suite's, tests/browser.py), and runs about a minute of closed-loop clients: fast
requests, 0.2 s ones, one that takes 20 s (a stuck-looking request), a few 500s of
the application and one worker killed by its request (a 502). Then it saves the whole
page as a PNG.

    python benchmarks/console_screenshot.py [docs/console.png]
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))

from browser import chromium  # noqa: E402
from harness import free_port, wait_for  # noqa: E402

#: (seconds from the start, the paths of the clients from then on)
PHASES = ((0, ["/fast"] * 3),
          (20, ["/fast"] * 6 + ["/slow?s=0.2"] * 6 + ["/status?code=500"]),
          (45, ["/fast"] * 4 + ["/slow?s=0.2"] * 2))
STUCK_AT, STUCK_SECONDS, DIE_AT, SHOT_AT = 40, 20, 30, 55


def serve(directory: Path, port: int, console: int) -> subprocess.Popen:
    argv = [str(Path(sys.executable).parent / "circus-wsgi"), "serve", "chaos_app:app",
            "--chdir", str(PROJECT / "tests"), "--bind", f"127.0.0.1:{port}",
            "--run-dir", str(directory / "run"), "--threads", "2", "--workers-min", "2",
            "--workers-max", "4", "--scale-down-idle", "10", "--access-log", "",
            "--console", str(console)]
    log = open(directory / "serve.log", "wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def get(port: int, path: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        connection.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass
    finally:
        connection.close()


def client(port: int, number: int, paths: list[list[str]], stop: threading.Event) -> None:
    while not stop.is_set():
        if number >= len(paths[0]):
            time.sleep(0.05)
            continue
        get(port, paths[0][number])


def main(out: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="cw-shot-", dir="/tmp"))
    port, console = free_port(), free_port()
    process = serve(directory, port, console)
    stop, current = threading.Event(), [[]]
    try:
        log = directory / "serve.log"
        wait_for(lambda: "Console: http://" in log.read_text(), 60, 0.1, "serve to start")
        url = re.search(r"^Console: (\S+)$", log.read_text(), re.M).group(1)
        threads = [threading.Thread(target=client, args=(port, n, current, stop), daemon=True)
                   for n in range(max(len(paths) for _, paths in PHASES))]
        for thread in threads:
            thread.start()
        with chromium() as driver:
            driver.get(url)
            started, phases, extras = time.monotonic(), list(PHASES), {
                STUCK_AT: f"/slow?s={STUCK_SECONDS}&t=stuck", DIE_AT: "/die"}
            while time.monotonic() - started < SHOT_AT:
                elapsed = time.monotonic() - started
                while phases and elapsed >= phases[0][0]:
                    current[0] = phases.pop(0)[1]
                for at in [at for at in extras if elapsed >= at]:
                    threading.Thread(target=get, args=(port, extras.pop(at)), daemon=True).start()
                time.sleep(0.1)
            for _ in range(3):  # the window's height is not all the page's: grow to fit
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1400, height + 140)
                time.sleep(0.5)
            time.sleep(1)  # a fresh view at the new size
            driver.save_screenshot(str(out))
        print(f"wrote {out}")
    finally:
        stop.set()
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else PROJECT / "docs" / "console.png"))
