"""A quiet terminal: circus's output streams, mongrel2's lines by level (sans-IO), and what
a start of ``circus-wsgi serve`` prints at the default level and at ``--log-level debug``."""

from __future__ import annotations

import io
import re

import pytest

from circus_wsgi.logstream import Mongrel2Stream, PrefixedStream
from harness import oversized_request, wait_for
from test_serve import Serve, serving

STAMP = "Wed, 02 Dec 2026 00:56:23 GMT"
#: What mongrel2 1.12.2 wrote at a start and a stop (seen), a few lines of each kind.
START = [
    f"{STAMP} [INFO] (src/mime.c:49) MAX limits.mime_ext_len=128",
    f"{STAMP} [ERROR] (src/unixy.c:123: errno: No such file or directory) Failed to open PID "
    "file /tmp/cw-x/mongrel2.pid for reading.",
    f"{STAMP} [INFO] (src/mongrel2.c:231) -- Starting Mongrel2/1.12.2. Copyright (C) Zed A. "
    "Shaw. Licensed BSD.",
    "",
    f"{STAMP} [INFO] (src/mongrel2.c:303) -- Mongrel2/1.12.2 Running. Copyright (C) Zed A. "
    "Shaw. Licensed BSD.",
]
NOISE = [
    f"{STAMP} [ERROR] (src/connection.c:114: errno: None) No handler to notify",
    f"{STAMP} [ERROR] (src/connection.c:1070: errno: No such file or directory) Failed to find "
    "cert for localhost",
    f"{STAMP} [ERROR] (src/io.c:149: errno: None) Handshake failed with error code: -29568",
    f"{STAMP} [ERROR] (src/io.c:195: errno: None) SSL handshake failed: -1",
]
TROUBLE = [
    f"{STAMP} [WARN] (src/mongrel2.c:205: errno: None) Timeout task killed 3 tasks, waiting 10 "
    "seconds for more.",
    f"{STAMP} [ERROR] (src/connection.c:1381: errno: Resource temporarily unavailable) Too many "
    "small packet read attempts.",
]
STOP = [
    f"{STAMP} [INFO] (src/mongrel2.c:96) SHUTDOWN REQUESTED: GRACEFUL (SIGINT again to EXIT NOW)",
    f"{STAMP} [ERROR] (src/task/net.c:290: errno: Invalid argument) Failed to accept after "
    "doing a poll on the socket.",
    f"{STAMP} [WARN] (src/handler.c:371: errno: None) Handler task signaled, exiting.",
]


def shown(stream: PrefixedStream, *chunks: bytes, pid: int = 7) -> list[str]:
    stream.out = io.StringIO()
    for chunk in chunks:
        stream({"pid": pid, "data": chunk})
    stream.close()
    return stream.out.getvalue().splitlines()


def lines(*texts: str) -> bytes:
    return "".join(text + "\n" for text in texts).encode()


def test_each_line_is_prefixed_and_split_reads_are_joined() -> None:
    assert shown(PrefixedStream("workers"), b"one\ntw", b"o\nthree") == [
        "workers.7 | one", "workers.7 | two", "workers.7 | three"]


@pytest.mark.parametrize("level, expected", [
    ("debug", START + NOISE + TROUBLE + STOP),
    ("info", TROUBLE),
    ("warning", TROUBLE),
    ("error", TROUBLE[1:]),
])
def test_mongrel2_lines_are_shown_by_level(level: str, expected: list[str]) -> None:
    output = shown(Mongrel2Stream("mongrel2", level), lines(*START, *NOISE, *TROUBLE, *STOP))
    assert output == [f"mongrel2.7 | {line}" for line in expected]


def test_a_line_that_starts_no_entry_has_the_level_of_the_entry_before() -> None:
    output = shown(Mongrel2Stream("mongrel2", "info"),
                   lines(TROUBLE[1], "  continued", START[0], "  continued too"))
    assert output == [f"mongrel2.7 | {TROUBLE[1]}", "mongrel2.7 |   continued"]


def test_stopping_is_per_process() -> None:
    stream = Mongrel2Stream("mongrel2", "info")
    stream.out = io.StringIO()
    stream({"pid": 1, "data": lines(STOP[0])})
    stream({"pid": 2, "data": lines(TROUBLE[1])})  # the next mongrel2, after a restart
    assert stream.out.getvalue().splitlines() == [f"mongrel2.2 | {TROUBLE[1]}"]


# -- the real start


def _before_banner(served: Serve) -> list[str]:
    output = served.output()
    return output[:output.index("Serving ")].splitlines()


def test_a_start_prints_a_few_lines_and_the_banner_and_errors_still_show() -> None:
    with serving("--workers", "2") as served:
        before = _before_banner(served)
        # per worker "serving" and the dispatcher's "ready"; the dispatcher's own two lines
        assert len(before) <= 6, "\n".join(before)
        assert all(re.match(r"(workers|dispatcher)\.\d+ \| ", line) for line in before), before
        assert not re.search(r"^mongrel2\.", served.output(), re.M)
        assert "circus[" not in served.output()  # circusd's, circusd-stats', the plugin's
        oversized_request(served.port)
        wait_for(lambda: re.search(r"^mongrel2\.\d+ \| .* \[ERROR\] .*Too many small packet",
                                   served.output(), re.M), 10, 0.05, "mongrel2's error line")


def test_log_level_debug_shows_mongrel2_and_circus_at_start() -> None:
    with serving("--workers", "1", "--log-level", "debug") as served:
        before = "\n".join(_before_banner(served))
        assert re.search(r"^mongrel2\.\d+ \| .* \[INFO\] .*Starting Mongrel2", before, re.M)
        assert re.search(r"^mongrel2\.\d+ \| .*Failed to open PID file", before, re.M)
        assert re.search(r"circus\[\d+\] \[INFO\] mongrel2 started", before)
