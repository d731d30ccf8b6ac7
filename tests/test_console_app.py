"""The console's web application (circus_wsgi.console.ConsoleApp), called as WSGI: who
may ask what, the CSRF and origin rules, the headers, the files it serves.

Its view is fed one look by hand and its actions go to a recorder standing in for
circus (tests/test_console.py drives the real thing, in a browser).
"""

from __future__ import annotations

import io
import json
from http.cookies import SimpleCookie
from typing import Any

import pytest

from circus_wsgi.console import MAX_STREAMS, ConsoleApp, Live
from circus_wsgi.monitor import Look, Process
from circus_wsgi.steering import Refused, count_from

TOKEN = "t0ken-for-tests"
HOST = "127.0.0.1:9000"


class Recorder:
    """Stands in for Steering: records each action it is asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        def act(*args: Any) -> str:
            if args and args[0] == 4242:
                raise Refused("pid 4242 is not one of circus's workers")
            self.calls.append((name, *args))
            return f"{name} done"
        return act


class Reply:
    def __init__(self, status: str, headers: list, body: bytes) -> None:
        self.code = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
def app() -> ConsoleApp:
    live = Live(monitor=None)
    live.trends.add(Look(1.0, None, {"workers": "active"}, {"workers": 1},
                         [Process("workers", 1, 101, 3.0, 1 << 20, 0.1)]))
    live.version = 1
    return ConsoleApp(live, Recorder(), TOKEN, cookie_name="cw_test")


def call(app: ConsoleApp, method: str, path: str, headers: dict | None = None,
         body: bytes = b"", query: str = "") -> Reply:
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "HTTP_HOST": HOST, "REMOTE_ADDR": "127.0.0.1", "wsgi.input": io.BytesIO(body),
               "CONTENT_LENGTH": str(len(body))}
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started = {}

    def start_response(status, response_headers):
        started.update(status=status, headers=response_headers)

    chunks = app(environ, start_response)
    body = b"".join(chunks) if isinstance(chunks, list) else b""
    return Reply(started["status"], started["headers"], body)


def login(app: ConsoleApp) -> tuple[dict, str]:
    """Headers that carry a fresh session, and its CSRF token (read from the page)."""
    reply = call(app, "GET", "/", query=f"token={TOKEN}")
    cookie = SimpleCookie(reply.headers["set-cookie"])
    session = {"Cookie": f"cw_test={cookie['cw_test'].value}"}
    page = call(app, "GET", "/", session).body.decode()
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    return session, csrf


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/api/status"), ("GET", "/api/history"), ("GET", "/api/events"),
    ("GET", "/static/console.js"), ("GET", "/nothing"), ("POST", "/api/workers/add")])
def test_nothing_is_served_without_the_token_or_a_session(app, method, path) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "cw_test=forged"}):
        reply = call(app, method, path, headers)
        assert reply.code == 401, (path, headers)
        assert "Bearer" in reply.headers["www-authenticate"]
    assert app.steering.calls == []


def test_the_401_page_says_how_to_log_in(app) -> None:
    text = call(app, "GET", "/").body.decode()
    assert "?token=TOKEN" in text and "circus-wsgi serve" in text
    assert "Authorization: Bearer" in call(app, "GET", "/api/status").json()["error"]
    assert call(app, "GET", "/", query="token=wrong").code == 401


def test_the_token_becomes_an_httponly_strict_cookie_and_leaves_the_address_bar(app) -> None:
    reply = call(app, "GET", "/", query=f"token={TOKEN}")
    assert reply.code == 303 and reply.headers["location"] == "/"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    session, csrf = login(app)
    status = call(app, "GET", "/api/status", session)
    assert status.code == 200 and status.json()["csrf"] == csrf
    assert [p["pid"] for p in status.json()["processes"]] == [101]
    # each login is a session of its own, with a CSRF token of its own
    assert login(app)[1] != csrf


def test_a_script_authenticates_with_the_bearer_token(app) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status = call(app, "GET", "/api/status", bearer)
    assert status.code == 200
    csrf = status.json()["csrf"]
    reply = call(app, "POST", "/api/workers/add", {**bearer, "X-CSRF-Token": csrf})
    assert reply.code == 200 and reply.json() == {"ok": True, "done": "add_worker done"}
    assert call(app, "POST", "/api/workers/add", bearer).code == 403


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(app) -> None:
    session, csrf = login(app)
    other_session, other_csrf = login(app)
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": other_csrf},
                    {"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
                    {"X-CSRF-Token": csrf, "Origin": "null"},
                    {"X-CSRF-Token": csrf, "Referer": "http://evil.example/"},
                    {"X-CSRF-Token": csrf, "Referer": f"http://{HOST}.evil.example/"}):
        reply = call(app, "POST", "/api/workers/add", {**session, **headers})
        assert reply.code == 403, headers
        assert reply.json()["ok"] is False
    assert app.steering.calls == []
    same_origin = {**session, "X-CSRF-Token": csrf, "Origin": f"http://{HOST}",
                   "Referer": f"http://{HOST}/"}
    assert call(app, "POST", "/api/workers/add", same_origin).code == 200
    assert app.steering.calls == [("add_worker",)]


def test_each_action_is_one_call(app) -> None:
    session, csrf = login(app)
    headers = {**session, "X-CSRF-Token": csrf, "Origin": f"http://{HOST}"}
    for path in ("/api/workers/add", "/api/workers/remove", "/api/workers/reload",
                 "/api/mongrel2/restart", "/api/workers/101/stop", "/api/workers/101/kill"):
        assert call(app, "POST", path, headers).code == 200, path
    assert call(app, "POST", "/api/workers/count", headers, b'{"count": 3}').code == 200
    assert app.steering.calls == [
        ("add_worker",), ("remove_worker",), ("reload_workers",), ("restart_mongrel2",),
        ("stop_worker", 101), ("kill_worker", 101), ("set_workers", 3)]
    refused = call(app, "POST", "/api/workers/4242/kill", headers)
    assert refused.code == 409 and "not one of circus's workers" in refused.json()["error"]
    for path, body in (("/api/workers/count", b'{"count": -1}'),
                       ("/api/workers/count", b'{"count": "3"}'),
                       ("/api/workers/count", b"not json"),
                       ("/api/workers/count", b"x" * 5000)):
        assert call(app, "POST", path, headers, body).code == 400, body
    for path in ("/api/workers/-1/kill", "/api/workers/1/exec", "/api/run", "/api/workers/x/stop"):
        assert call(app, "POST", path, headers).code == 404, path
    assert call(app, "PUT", "/api/workers/add", headers).code == 405
    assert len(app.steering.calls) == 7


def test_count_from_takes_only_an_integer_in_range() -> None:
    assert count_from({"count": 0}) == 0 and count_from({"count": 256}) == 256
    for body in ({"count": 257}, {"count": True}, {"count": 2.5}, {}, [], None):
        with pytest.raises(ValueError):
            count_from(body)


def test_every_answer_carries_the_security_headers(app) -> None:
    session, csrf = login(app)
    replies = [call(app, "GET", "/"), call(app, "GET", "/", session),
               call(app, "GET", "/api/status", session),
               call(app, "GET", "/static/console.js", session),
               call(app, "POST", "/api/workers/add", session)]
    for reply in replies:
        policy = reply.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["cache-control"] == "no-store"
        assert reply.headers["x-content-type-options"] == "nosniff"


def test_only_the_packaged_files_are_served(app) -> None:
    session, _ = login(app)
    page = call(app, "GET", "/", session).body.decode()
    assert "<script>" not in page and " on" + "click" not in page  # no inline script
    assert 'src="/static/console.js"' in page and "//" not in page.replace("http://www.w3", "")
    js = call(app, "GET", "/static/console.js", session)
    assert js.code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert b"createElementNS" in js.body
    for path in ("/static/../console.py", "/static/..%2fconsole.py", "/static/console.html",
                 "/static/", "/etc/passwd", "/static/console.js/x"):
        assert call(app, "GET", path, session).code == 404, path


def test_event_streams_are_capped(app) -> None:
    session, _ = login(app)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/events", "QUERY_STRING": "",
               "HTTP_HOST": HOST, "HTTP_COOKIE": session["Cookie"],
               "wsgi.input": io.BytesIO(b"")}
    streams = []
    for _ in range(MAX_STREAMS):
        streams.append(app(environ, lambda status, headers: None))
    first = iter(streams[0])
    assert next(first) == b"retry: 2000\n\n"
    event = next(first).decode()
    assert event.startswith("event: status\ndata: ")
    assert json.loads(event.split("data: ", 1)[1])["status"]["processes"][0]["pid"] == 101
    assert call(app, "GET", "/api/events", session).code == 503
    streams[0].close()  # a page went away: its place is free
    assert call(app, "GET", "/api/events", session).code == 200
