"""The environ, start_response and framing of circus_wsgi.wsgi, without sockets."""

from __future__ import annotations

import io
import sys
import warnings

import pytest
from hypothesis import given, settings, strategies as st

from circus_wsgi.protocol import WINDOW, Kind, Message
from circus_wsgi.wsgi import (BURST, HOLD_MAX, INTERVAL, PIECE, ClientGone, Exchange,
                              Pacer, Router, Site, wants_keep_alive)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import worker_apps  # noqa: E402  (tests/ holds the test applications)


def request(path: bytes = b"/", method: bytes = b"GET", body: bytes = b"", *,
            version: bytes = b"HTTP/1.1", query: bytes | None = None, pattern: bytes = b"/",
            **headers) -> Message:
    """A request as mongrel2 would send it; keyword headers use _ for -."""
    fields = {b"METHOD": method, b"VERSION": version, b"PATH": path, b"PATTERN": pattern,
              b"URI": path + (b"?" + query if query is not None else b""),
              b"URL_SCHEME": b"http", b"REMOTE_ADDR": b"10.1.2.3"}
    if query is not None:
        fields[b"QUERY"] = query
    for name, value in headers.items():
        fields[name.replace("_", "-").encode()] = value
    return Message(b"uuid", b"7", path, fields, body, Kind.REQUEST)


class Out:
    """An Outbox that records what it is given."""

    def __init__(self, gone_after: int = -1) -> None:
        self.status = 0
        self.writes: list[bytes] = []
        self.finished: list[tuple[bytes, bool]] = []
        self.gone_after = gone_after

    def write(self, data: bytes) -> None:
        if len(self.writes) == self.gone_after:
            raise ClientGone
        self.writes.append(data)

    def finish(self, data: bytes, close: bool, body: bytes = b"") -> None:
        self.finished.append((data + body, close))

    @property
    def wire(self) -> bytes:
        return b"".join(self.writes) + b"".join(data for data, _ in self.finished)

    @property
    def closed(self) -> bool:
        return self.finished[-1][1]


def serve(app, message: Message | None = None, site: Site | None = None) -> tuple[Out, Exchange]:
    message = message or request()
    out = Out()
    exchange = Exchange(out, message.headers[b"METHOD"], wants_keep_alive(message),
                        message.headers[b"VERSION"] == b"HTTP/1.0")
    exchange.run(app, (site or Site(app)).environ(message))
    assert len(out.finished) == 1, "finish() is called exactly once"
    return out, exchange


def split(wire: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(": ")
        assert name.lower() not in headers, f"repeated header {name}"
        headers[name.lower()] = value
    return status, headers, body


def app_with(status: str = "200 OK", headers=(("Content-Type", "text/plain"),), body=(b"hi",)):
    def app(environ, start_response):
        start_response(status, list(headers))
        return body() if callable(body) else list(body)
    return app


# --------------------------------------------------------------------------- environ


def test_environ_basics():
    message = request(b"/caf%C3%A9/a%20b", query=b"x=1&y=%20", host=b"example.com:8080",
                      user_agent=b"t", content_type=b"text/plain", content_length=b"3",
                      body=b"abc", method=b"POST")
    env = Site(worker_apps.hello).environ(message)
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/caf\u00c3\u00a9/a b"  # UTF-8 bytes as latin-1 characters
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["RAW_URI"] == "/caf%C3%A9/a%20b?x=1&y=%20"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.com", "8080")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert (env["CONTENT_TYPE"], env["CONTENT_LENGTH"]) == ("text/plain", "3")
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["HTTP_USER_AGENT"] == "t"
    assert env["REMOTE_ADDR"] == "10.1.2.3"
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.input"].read() == b"abc"
    assert env["wsgi.errors"] is sys.stderr
    assert "METHOD" not in env and "HTTP_METHOD" not in env and "HTTP_PATTERN" not in env


@pytest.mark.parametrize("host, scheme, expected", [
    (b"example.com", b"http", ("example.com", "80")),
    (b"example.com", b"https", ("example.com", "443")),
    (b"Example.COM:81", b"http", ("example.com", "81")),
    (b"[::1]:8080", b"http", ("::1", "8080")),
    (b"[::1]", b"http", ("::1", "80")),
    (None, b"http", ("10.0.0.1", "9000")),
])
def test_server_name_and_port(host, scheme, expected):
    message = request() if host is None else request(host=host)
    message.headers[b"URL_SCHEME"] = scheme
    env = Site(worker_apps.hello, bind="10.0.0.1:9000").environ(message)
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == expected


def test_repeated_headers_and_dropped_names():
    message = request(x_a=[b"1", b"2"], cookie=[b"a=1", b"b=2"])
    message.headers[b"x_forwarded_for"] = b"spoof"
    message.headers[b"x-mongrel2-upload-start"] = b"/etc/passwd"
    env = Site(worker_apps.hello).environ(message)
    assert env["HTTP_X_A"] == "1, 2"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert "HTTP_X_FORWARDED_FOR" not in env
    assert not [k for k in env if "MONGREL2" in k]


def test_latin1_header_bytes_survive():
    env = Site(worker_apps.hello).environ(request(x_l=b"caf\xe9"))
    assert env["HTTP_X_L"] == "caf\xe9"


def test_flags_and_file_wrapper():
    env = Site(worker_apps.hello, multithread=True, multiprocess=False).environ(request())
    assert env["wsgi.multithread"] is True and env["wsgi.multiprocess"] is False
    assert env["wsgi.run_once"] is False
    wrapper = env["wsgi.file_wrapper"](io.BytesIO(b"abcdef"), 4)
    assert list(wrapper) == [b"abcd", b"ef"]
    wrapper.close()


def test_upload_body_gives_content_length():
    body = io.BytesIO(b"x" * 100)
    env = Site(worker_apps.hello).environ(request(transfer_encoding=b"chunked"), body, 100)
    assert env["CONTENT_LENGTH"] == "100" and env["wsgi.input"] is body


@pytest.mark.parametrize("how", ["read", "read-n", "readline", "readlines", "iter"])
def test_input_reading(how):
    data = b"line one\nline two\n" * 500
    message = request(b"/body", b"POST", data, query=b"how=" + how.encode(),
                      content_length=str(len(data)).encode())
    out, _ = serve(worker_apps.rules, message)
    assert b'"size": %d' % len(data) in out.wire


def test_router_mounts():
    root, api = Site(worker_apps.hello), Site(worker_apps.mounted, "/api")
    router = Router(root, [api])
    assert router.site(request(b"/api", pattern=b"/api")) is api
    assert router.site(request(b"/api/x", pattern=b"/api")) is api
    assert router.site(request(b"/apix", pattern=b"/api")) is root
    assert router.site(request(b"/other")) is root
    env = api.environ(request(b"/api/x%2Fy", pattern=b"/api"))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/api", "/x/y")
    assert api.environ(request(b"/api", pattern=b"/api"))["PATH_INFO"] == ""
    assert Router(root).site(request(b"/api")) is root


# --------------------------------------------------------------------------- framing


def test_small_response_is_one_finish_with_length():
    out, exchange = serve(worker_apps.hello)
    assert out.writes == [] and out.finished[0][1] is False
    status, headers, body = split(out.wire)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-length"] == "13" and body == b"Hello, World!"
    assert headers["server"] == "circus-wsgi" and headers["date"].endswith("GMT")
    assert (exchange.status, exchange.sent) == (200, 13)


def test_length_is_computed_for_lists():
    out, _ = serve(app_with(body=[b"a", b"bc"]))
    assert split(out.wire)[1]["content-length"] == "3"


@pytest.mark.parametrize("version, connection, closes, header", [
    (b"HTTP/1.1", None, False, None),
    (b"HTTP/1.1", b"close", True, "close"),
    (b"HTTP/1.1", b"Keep-Alive, Close", True, "close"),
    (b"HTTP/1.0", None, True, "close"),
    (b"HTTP/1.0", b"keep-alive", False, "keep-alive"),
])
def test_keep_alive_or_close(version, connection, closes, header):
    extra = {"connection": connection} if connection else {}
    out, _ = serve(worker_apps.hello, request(version=version, **extra))
    assert out.closed is closes
    assert split(out.wire)[1].get("connection") == header


def test_generator_is_chunked_on_http11():
    out, _ = serve(worker_apps.rules, request(b"/stream", query=b"blocks=3&size=2"))
    status, headers, body = split(out.wire)
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert body == b"2\r\naa\r\n2\r\nbb\r\n2\r\ncc\r\n0\r\n\r\n"
    assert out.writes[0].endswith(b"2\r\naa\r\n"), "headers leave with the first block"
    assert out.closed is False


def test_generator_on_http10_is_delimited_by_close():
    out, _ = serve(worker_apps.rules, request(b"/stream", query=b"blocks=2&size=2",
                                              version=b"HTTP/1.0", connection=b"keep-alive"))
    status, headers, body = split(out.wire)
    assert "transfer-encoding" not in headers and headers["connection"] == "close"
    assert body == b"aabb" and out.closed


def test_write_callable():
    out, exchange = serve(worker_apps.rules, request(b"/write"))
    body = split(out.wire)[2]
    assert body == b"9\r\nwritten, \r\n5\r\nthen \r\n8\r\nreturned\r\n0\r\n\r\n"
    assert exchange.sent == len(b"written, then returned")


def test_empty_generator_and_empty_list():
    out, _ = serve(app_with(body=lambda: iter([])))
    assert split(out.wire)[1]["content-length"] == "0"
    out, _ = serve(worker_apps.rules, request(b"/empty"))
    assert split(out.wire)[1]["content-length"] == "0"


def test_head_has_no_body():
    out, _ = serve(worker_apps.hello, request(method=b"HEAD"))
    status, headers, body = split(out.wire)
    assert headers["content-length"] == "13" and body == b""
    out, _ = serve(worker_apps.rules, request(b"/stream", method=b"HEAD"))
    status, headers, body = split(out.wire)
    assert "transfer-encoding" not in headers and body == b"" and not out.closed


@pytest.mark.parametrize("code", ["100", "204", "304"])
def test_no_body_statuses(code):
    out, _ = serve(worker_apps.rules, request(b"/status", query=b"code=" + code.encode()))
    status, headers, body = split(out.wire)
    assert status.startswith("HTTP/1.1 " + code)
    assert body == b"" and "content-length" not in headers
    assert "transfer-encoding" not in headers


@pytest.mark.parametrize("kind", ["crlf", "lf", "latin", "name", "colon", "bytes"])
def test_invalid_headers_give_500(kind):
    out, exchange = serve(worker_apps.rules,
                          request(b"/bad-header", query=b"kind=" + kind.encode()))
    assert split(out.wire)[0] == "HTTP/1.1 500 Internal Server Error"
    assert b"evil" not in out.wire and b"X-Bad" not in out.wire and exchange.status == 500


@pytest.mark.parametrize("status", ["200 OK\r\nX-Evil: 1", "2000 Too long", "abc", "200", 200,
                                    "200 caf\u2603"])
def test_invalid_status_gives_500(status):
    out, _ = serve(app_with(status=status))
    assert split(out.wire)[0] == "HTTP/1.1 500 Internal Server Error"
    assert b"Evil" not in out.wire


def test_app_exception_gives_500_without_traceback(caplog):
    out, exchange = serve(worker_apps.fail)
    status, headers, body = split(out.wire)
    assert status == "HTTP/1.1 500 Internal Server Error" and b"secret" not in out.wire
    assert "secret" in caplog.text and "Traceback" in caplog.text
    assert not out.closed, "a complete 500 keeps the connection"


def test_exception_after_headers_closes_and_calls_close():
    before = worker_apps.closed["count"]
    out, _ = serve(worker_apps.rules, request(b"/fail-after"))
    assert out.writes and out.closed and out.finished[-1][0] == b""
    assert not out.wire.endswith(b"0\r\n\r\n"), "no chunk terminator: the client sees a cut"
    assert worker_apps.closed["count"] == before + 1


def test_close_called_on_success_and_when_client_gone():
    before = worker_apps.closed["count"]
    serve(worker_apps.rules, request(b"/stream"))
    out = Out(gone_after=1)
    exchange = Exchange(out, b"GET", True, False)
    exchange.run(worker_apps.rules, Site(worker_apps.rules).environ(request(b"/forever")))
    assert out.finished == [(b"", False)]
    assert worker_apps.closed["count"] == before + 2


def test_exc_info_replaces_headers_not_yet_sent():
    out, _ = serve(worker_apps.rules, request(b"/exc-info"))
    status, _, body = split(out.wire)
    assert status == "HTTP/1.1 503 Service Unavailable" and body == b"error page"


def test_start_response_twice_is_an_error():
    def app(environ, start_response):
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b""]
    out, _ = serve(app)
    assert split(out.wire)[0] == "HTTP/1.1 500 Internal Server Error"


def test_no_start_response_is_an_error():
    out, _ = serve(lambda environ, start_response: [b"x"])
    assert split(out.wire)[0] == "HTTP/1.1 500 Internal Server Error"


def test_declared_length_bounds_the_body():
    out, _ = serve(worker_apps.rules, request(b"/long"))
    assert split(out.wire)[2] == b"123" and not out.closed
    out, _ = serve(worker_apps.rules, request(b"/short"))
    assert split(out.wire)[2] == b"12345" and out.closed


def test_app_headers_win_and_hop_by_hop_are_dropped():
    app = app_with(headers=[("Date", "yesterday"), ("Server", "mine"), ("Keep-Alive", "x"),
                            ("Transfer-Encoding", "gzip"), ("Connection", "close")])
    out, _ = serve(app)
    headers = split(out.wire)[1]
    assert headers["date"] == "yesterday" and headers["server"] == "mine"
    assert "keep-alive" not in headers and "transfer-encoding" not in headers
    assert headers["connection"] == "close" and out.closed


def test_file_wrapper_response():
    out, _ = serve(worker_apps.rules, request(b"/file"))
    status, headers, body = split(out.wire)
    assert headers["transfer-encoding"] == "chunked"
    assert body.count(b"\r\n1000\r\n") + body.startswith(b"1000\r\n") == 24


def test_validator_finds_nothing():
    paths = [b"/hello", b"/environ", b"/stream", b"/write", b"/file", b"/empty"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in paths:
            out, exchange = serve(worker_apps.validated, request(path))
            assert exchange.status == 200, (path, out.wire[:300])
        data = b"a\nb\n"
        message = request(b"/body", b"POST", data, query=b"how=readline",
                          content_length=b"4")
        assert serve(worker_apps.validated, message)[1].status == 200


# --------------------------------------------------------------------------- pacing


def bodies(taken: list[list]) -> list[bytes]:
    """The message bodies a Pacer gave, each joined from its parts."""
    return [b"".join(parts) for parts in taken]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3 * PIECE // 2), max_size=6),
       st.integers(min_value=0, max_value=3 * PIECE))
def test_pacer_cuts_pieces_across_blocks_without_copying_them(sizes, budget):
    blocks = [bytes([number]) * size for number, size in enumerate(sizes)]
    pacer = Pacer(4 * PIECE, budget)
    for block in blocks:
        pacer.add(block)
    sent = []
    while pacer.held:
        taken = pacer.take(0.0)
        for parts in taken:
            assert sum(map(len, parts)) <= PIECE
            assert all(any(part is block or getattr(part, "obj", None) is block
                           for block in blocks) for part in parts), \
                "each part is a block or a view of one, not a copy"
        sent += bodies(taken)
        pacer.granted(PIECE)
    assert b"".join(sent) == b"".join(blocks)


def test_pacer_without_flow_control_coalesces_after_a_burst():
    pacer = Pacer(None)
    assert pacer.fits(10 * HOLD_MAX)
    now = 100.0
    sent = []
    for _ in range(BURST):
        pacer.add(b"x")
        sent += bodies(pacer.take(now))
    assert sent == [b"x"] * BURST, "the first blocks go at once"
    pacer.add(b"a")
    pacer.add(b"b")
    assert pacer.take(now) == [] and pacer.held == 2
    assert pacer.wait_time(now) == pytest.approx(INTERVAL)
    assert bodies(pacer.take(now + INTERVAL)) == [b"ab"], \
        "then coalesced, one message per interval"
    pacer.add(b"y" * HOLD_MAX)
    assert pacer.blocked()
    assert pacer.settled() is False


def test_pacer_keeps_to_its_credit_in_pieces():
    pacer = Pacer(2 * PIECE + 4096, 2 * PIECE + 4096)
    pacer.add(b"z" * (5 * PIECE))
    assert [len(p) for p in bodies(pacer.take(0.0))] == [PIECE] * 2
    assert pacer.credit == 4096 and pacer.blocked() and pacer.wait_time(0.0) is None
    assert pacer.take(0.0) == [], "no slivers: wait for a quarter piece of credit"
    pacer.granted(PIECE)
    assert [len(p) for p in bodies(pacer.take(0.0))] == [PIECE]
    sent = 3 * PIECE
    while pacer.held:
        pieces = bodies(pacer.take(0.0))
        assert all(len(p) <= PIECE for p in pieces)
        assert sum(map(len, pieces)) <= pacer.window
        sent += sum(map(len, pieces))
        pacer.granted(10 ** 9)
    assert sent == 5 * PIECE and pacer.credit == pacer.window and pacer.settled()


def test_pacer_sends_what_fits_the_window_left_in_one_message_and_settles_when_sent():
    pacer = Pacer(1 << 20, 90 * 1024)
    assert pacer.fits(90 * 1024) and not pacer.fits(90 * 1024 + 1)
    assert not Pacer(1 << 20).fits(WINDOW + 1), "no message passes mongrel2's window"
    pacer.add(b"q" * (50 * 1024))
    assert len(b"".join(bodies(pacer.take(0.0)))) == 50 * 1024
    assert pacer.settled(), "sent is settled: the dispatcher counts what is uncredited"
    pacer.add(b"r" * (90 * 1024))
    assert not pacer.settled()
    assert Pacer(1000, 5000).credit == 1000
