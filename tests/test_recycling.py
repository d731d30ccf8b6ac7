"""Workers replaced on purpose: max_worker_memory (and max_requests) under serve."""

from __future__ import annotations

import http.client

from harness import wait_for
from test_serve import serving


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def test_a_worker_over_max_worker_memory_is_replaced_and_flapping_does_not_count_it():
    """Four leaks in a few seconds: four workers replaced cleanly, none of it a crash
    loop (three crashes within five seconds would stop the watcher)."""
    with serving("--workers", "1", "--max-worker-memory", "120", "--access-log", "",
                 app="chaos_app:app") as served:
        for _ in range(4):
            status, body = get(served.port, "/hog?mb=150")
            assert status == 200
            leaker = int(body)
            wait_for(lambda: served.circusctl("list", "workers") not in ("", str(leaker)),
                     10, 0.05, "circus to replace the worker")
            assert get(served.port, "/fast?t=after")[0] == 200
        assert served.circusctl("status", "workers") == "active"
        left = [line for line in served.lines("workers.")
                if "max_worker_memory 120 MiB" in line]
        assert len(left) >= 4, served.output()[-3000:]
