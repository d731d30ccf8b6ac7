"""Slow clients to run beside a fast load: slowloris senders and slow readers.

A *slowloris* client opens a connection and sends a request header one byte a
second, never ending it (a request line, then one header whose value grows).
When the server closes the connection (or answers it, e.g. 408), the close is
counted and the client connects again. A *slow reader* GETs ``/mb`` (1 MB,
:mod:`benchmarks.apps`) and reads it at a fixed rate (100 KB/s) through a small
receive buffer, so the kernel cannot take the response off the server's hands;
it counts the bytes it read, the responses it finished, and the connections
the server cut. Both run until ``--duration`` seconds have passed.

    python benchmarks/slowclients.py http://127.0.0.1:8000 [--slowloris 200]
        [--readers 50] [--read-rate 102400] [--duration 10]

prints one line ``BENCH-JSON {...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import sys
import time
from typing import Iterator
from urllib.parse import urlsplit

#: The receive buffer of a slow reader (the kernel doubles it): small, so the server's
#: writes wait for the reader, as they would for a slow network.
RECEIVE_BUFFER = 16 * 1024
#: asyncio's own buffer of a slow reader's stream: it stops reading past twice this.
STREAM_LIMIT = 8 * 1024


def _endless_header(host: str) -> Iterator[bytes]:
    """A request header that never ends, one byte at a time."""
    head = f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode()
    return itertools.chain((head[i:i + 1] for i in range(len(head))), itertools.repeat(b"a"))


async def slowloris(host: str, port: int, start_delay: float, stop: float,
                    counts: dict[str, int]) -> None:
    """One slowloris client, reconnecting whenever the server closes it, until ``stop``."""
    await asyncio.sleep(start_delay)
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["connect_errors"] += 1
            await asyncio.sleep(1.0)
            continue
        counts["connections"] += 1
        closed = asyncio.ensure_future(reader.read(65536))  # data or EOF: the server gave up
        cut = False
        try:
            for byte in _endless_header(host):
                writer.write(byte)
                await writer.drain()
                await asyncio.wait([closed], timeout=max(0.0, min(1.0, stop - time.monotonic())))
                if closed.done() or time.monotonic() >= stop:
                    break
        except OSError:
            cut = True
        if cut or closed.done():
            counts["closed_by_server"] += 1
        closed.cancel()
        writer.close()


async def slow_reader(host: str, port: int, rate: float, start_delay: float, stop: float,
                      counts: dict[str, int]) -> None:
    """One slow reader: GET /mb again and again, read at ``rate`` bytes/s, until ``stop``."""
    await asyncio.sleep(start_delay)
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
        except OSError:
            sock.close()
            counts["connect_errors"] += 1
            await asyncio.sleep(1.0)
            continue
        try:
            while time.monotonic() < stop:
                writer.write(f"GET /mb HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                started, left = time.monotonic(), length
                while left and time.monotonic() < stop:
                    chunk = await reader.read(min(left, STREAM_LIMIT))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(chunk)
                    counts["bytes"] += len(chunk)
                    await asyncio.sleep(max(0.0, started + (length - left) / rate
                                            - time.monotonic()))
                if not left:
                    counts["responses"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            counts["cut"] += 1
        writer.close()


async def run(url: str, slowloris_clients: int, readers: int, read_rate: float,
              duration: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    started = time.monotonic()
    stop = started + duration
    loris: dict[str, int] = {"connections": 0, "closed_by_server": 0, "connect_errors": 0}
    reading: dict[str, int] = {"bytes": 0, "responses": 0, "cut": 0, "connect_errors": 0}
    # Spread the starts over the first second, as real clients arrive.
    tasks = [asyncio.ensure_future(slowloris(host, port, i / slowloris_clients, stop, loris))
             for i in range(slowloris_clients)]
    tasks += [asyncio.ensure_future(slow_reader(host, port, read_rate, i / readers, stop,
                                                reading)) for i in range(readers)]
    _, pending = await asyncio.wait(tasks, timeout=duration + 5)
    for task in pending:
        task.cancel()
    elapsed = time.monotonic() - started
    return {"duration_us": elapsed * 1e6, "slowloris": {"clients": slowloris_clients, **loris},
            "readers": {"clients": readers, "rate": read_rate, **reading,
                        "bytes_per_s_each": reading["bytes"] / elapsed / max(1, readers)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--slowloris", type=int, default=200, help="slowloris clients")
    parser.add_argument("--readers", type=int, default=50, help="slow readers of /mb")
    parser.add_argument("--read-rate", type=float, default=100 * 1024,
                        help="bytes per second each slow reader reads")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.url, args.slowloris, args.readers, args.read_rate,
                             args.duration))
    print("BENCH-JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
