"""The slow-mix load: 1 request in 100 sleeps 1 s; the latency of every request, by kind.

wrk cannot tell fast requests from slow ones in its percentiles, so this client
sends them itself. It is *open loop*: request ``i`` is due at ``start + i/rate``
whatever happened to earlier ones, and its latency runs from that due time, so
a server that stalls is charged for the time requests waited for a free
connection (no coordinated omission). Every ``slow_every``-th request goes to
``/slow`` (1 s in the app), the others to ``/`` (hello).

The rate is chosen so that the slow requests keep about one of the two worker
processes asleep on average (80 req/s: a slow request every 1.25 s). A server
that hands a fast request only to a free worker answers it at once; one that
deals requests blindly parks half of them behind a sleeping worker, and its
fast p99 approaches 1 s.

    python benchmarks/slowmix.py http://127.0.0.1:8000 [--rate 80] [--duration 20]

prints one line ``BENCH-JSON {...}`` with count, errors and p50/p90/p99/max in
microseconds for each kind ("fast", "slow").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        """Send GET ``path``, read the whole response, return its status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run(url: str, rate: float, duration: float, connections: int, slow_every: int,
              timeout: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    total = int(rate * duration)
    tickets: asyncio.Queue = asyncio.Queue()
    latencies: dict[str, list[float]] = {"fast": [], "slow": []}
    errors: dict[str, int] = {"fast": 0, "slow": 0}
    start = time.monotonic() + 0.1

    async def connection() -> None:
        client = Client(host, port)
        while True:
            ticket = await tickets.get()
            if ticket is None:
                client.close()
                return
            kind, due = ticket
            try:
                status = await asyncio.wait_for(
                    client.get("/slow" if kind == "slow" else "/"), timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                    IndexError):
                client.close()
                errors[kind] += 1
                continue
            if status != 200:
                errors[kind] += 1
            latencies[kind].append(time.monotonic() - due)

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tickets.put_nowait(("slow" if i % slow_every == slow_every // 2 else "fast", due))
    for _ in workers:
        tickets.put_nowait(None)
    await asyncio.wait(workers, timeout=timeout + 5)
    for task in workers:
        task.cancel()
    elapsed = time.monotonic() - start
    report: dict = {"requests": sum(map(len, latencies.values())), "duration_us": elapsed * 1e6,
                    "rate": rate, "slow_every": slow_every}
    for kind, values in latencies.items():
        values.sort()
        report[kind] = {"count": len(values), "errors": errors[kind],
                        "latency_us": {str(q): round(percentile(values, q) * 1e6)
                                       for q in (50, 90, 99)}}
        report[kind]["latency_us"]["max"] = round((values[-1] if values else 0) * 1e6)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=80.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of sending")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--slow-every", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.url, args.rate, args.duration, args.connections,
                             args.slow_every, args.timeout))
    print("BENCH-JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
