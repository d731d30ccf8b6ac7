"""``circus-wsgi console``: the live stack in a browser, and buttons that steer it.

It runs as a circus watcher of its own (``console``), so restarting mongrel2 or the
workers does not take it down and it dies with the stack; ``circus-wsgi console
--run-dir DIR`` attaches the same console to a stack started some other way. A
thread takes a look at the stack every :data:`LOOK_EVERY` seconds
(:mod:`circus_wsgi.monitor`, :mod:`circus_wsgi.trends`); the page gets each new view
pushed as a server-sent event. Actions go through circus (:mod:`circus_wsgi.steering`).

Security: every request needs the token (``?token=`` once, exchanged for an HttpOnly,
SameSite=Strict session cookie and dropped from the address bar by a redirect; or
``Authorization: Bearer TOKEN``), else 401. Every action is a POST with the CSRF
token in ``X-CSRF-Token`` (the session's, rendered into the page; for a bearer, the
one ``GET /api/status`` gives), and a POST from another origin (``Origin`` or
``Referer``) is refused: 403. The cookie has no Secure flag: the console speaks plain
HTTP. What it serves is fixed at start (the page, its script and style, from the
package); no request names a file or a command. Headers: a Content-Security-Policy
that allows only this origin's script and style (no inline script), X-Frame-Options
DENY, no-store.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import secrets
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs

from .exits import EXIT_OK, EXIT_USAGE
from .httpserver import (bearer_matches, make_listener, read_token, serve_until_killed,
                         split_address, url)
from .lifeline import die_with_parent
from .monitor import Monitor
from .settings import Settings
from .steering import Refused, Steering, count_from
from .trends import Trends

log = logging.getLogger("circus_wsgi.console")

#: Seconds between two looks at the stack (each one pushed to every open page).
LOOK_EVERY = 1.0
#: Event streams open at once; one more gets 503.
MAX_STREAMS = 8
#: Sessions kept; a new one past this ends the oldest.
MAX_SESSIONS = 64
#: The largest request body read (an action's JSON).
MAX_BODY = 4096

HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
     "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]
#: The files of the page, by URL path, with their types; nothing else is served.
STATIC = {"/static/console.js": "text/javascript; charset=utf-8",
          "/static/console.css": "text/css; charset=utf-8",
          "/static/favicon.svg": "image/svg+xml"}

Start = Callable[..., Any]  # a WSGI start_response


def _package_file(name: str) -> bytes:
    return (resources.files("circus_wsgi") / "static" / name).read_bytes()


# --------------------------------------------------------------------------
# The live view, refreshed by one thread


class Live:
    """The stack's view, a look every :data:`LOOK_EVERY` seconds (sooner after an
    action), and a way for event streams to wait for the next one."""

    def __init__(self, monitor: Monitor, every: float = LOOK_EVERY) -> None:
        self.monitor, self.every = monitor, every
        self.trends = Trends()
        self.version = 0
        self.changed = threading.Condition()
        self.woken = threading.Event()

    def start(self) -> None:
        """Take the first look (so there is a view to serve), then one every second."""
        self._look()
        threading.Thread(target=self._run, name="looks", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.woken.wait(self.every)
            self.woken.clear()
            self._look()

    def _look(self) -> None:
        try:
            look = self.monitor.look()
            with self.changed:
                self.trends.add(look)
                self.version += 1
                self.changed.notify_all()
        except Exception:  # the page shows the last view; the next look may do better
            log.exception("console: a look at the stack failed")

    def wake(self) -> None:
        """Look again now (an action changed something)."""
        self.woken.set()

    def status(self) -> dict[str, Any]:
        with self.changed:
            return self.trends.view()

    def history(self) -> list[dict[str, Any]]:
        with self.changed:
            return self.trends.history()

    def next(self, seen: int, timeout: float) -> tuple[int, dict[str, Any], Any] | None:
        """The view and newest point after version ``seen``; None after ``timeout``."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.version > seen, timeout):
                return None
            points = self.trends.points
            return self.version, self.trends.view(), points[-1] if points else None


# --------------------------------------------------------------------------
# Who is asking


@dataclass
class Session:
    csrf: str


class Sessions:
    """Sessions by random id, in memory: they end when the console does."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self.by_id: OrderedDict[str, Session] = OrderedDict()
        self.lock = threading.Lock()

    def create(self) -> tuple[str, Session]:
        sid, session = secrets.token_urlsafe(32), Session(secrets.token_urlsafe(32))
        with self.lock:
            self.by_id[sid] = session
            while len(self.by_id) > self.limit:
                self.by_id.popitem(last=False)
        return sid, session

    def get(self, sid: str) -> Session | None:
        with self.lock:
            for known, session in self.by_id.items():
                if hmac.compare_digest(known, sid):
                    return session
        return None


def _json(status: str, body: Any) -> tuple[str, list[tuple[str, str]], bytes]:
    return status, [("Content-Type", "application/json")], json.dumps(body).encode()


def _login_page(why: str) -> bytes:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
            f"circus-wsgi console: log in</title></head><body><h1>circus-wsgi console"
            f"</h1><p>{html.escape(why)}</p><p>Open the address the console printed "
            f"when it started: <code>Console: http://HOST:PORT/?token=TOKEN</code> (in the "
            f"output of <code>circus-wsgi serve</code>, or of <code>circus-wsgi console "
            f"--run-dir DIR</code>). Scripts send <code>Authorization: Bearer TOKEN"
            f"</code>.</p></body></html>").encode()


class ConsoleApp:
    """The console as a WSGI application: the page, its API, the actions."""

    def __init__(self, live: Live, steering: Steering, token: str,
                 cookie_name: str = "circus_wsgi_console") -> None:
        self.live, self.steering, self.token = live, steering, token
        self.cookie_name = cookie_name
        self.sessions = Sessions()
        self.bearer_csrf = secrets.token_urlsafe(32)  # for scripts, from /api/status
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.page = _package_file("console.html").decode()
        self.files = {path: _package_file(path.rpartition("/")[2]) for path in STATIC}
        self.actions: dict[str, Callable[[dict[str, Any]], str]] = {
            "/api/workers/add": lambda body: steering.add_worker(),
            "/api/workers/remove": lambda body: steering.remove_worker(),
            "/api/workers/count": lambda body: steering.set_workers(count_from(body)),
            "/api/workers/reload": lambda body: steering.reload_workers(),
            "/api/mongrel2/restart": lambda body: steering.restart_mongrel2(),
        }
        self.worker_actions: dict[str, Callable[[int], str]] = {
            "stop": steering.stop_worker, "kill": steering.kill_worker}

    def __call__(self, environ: dict[str, Any], start_response: Start) -> Iterable[bytes]:
        status, headers, body = self._answer(environ)
        if isinstance(body, bytes):
            headers = [*headers, ("Content-Length", str(len(body)))]
            body = [body]
        start_response(status, [*headers, *HEADERS])
        return body

    # -- routing

    def _answer(self, environ: dict[str, Any]) -> tuple[str, list, Any]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
        token = parse_qs(environ.get("QUERY_STRING", "")).get("token")
        if method == "GET" and path == "/" and token:
            return self._login(environ, token[0])
        csrf = self._csrf_of(environ)
        if csrf is None:
            return self._unauthorized(path, "You are not logged in, or the console was "
                                      "restarted since.")
        if method == "GET":
            return self._get(path, csrf)
        if method != "POST":
            return ("405 Method Not Allowed", [("Allow", "GET, POST"),
                                               ("Content-Type", "text/plain")], b"GET or POST\n")
        refusal = _forged(environ, csrf)
        if refusal:
            return _json("403 Forbidden", {"ok": False, "error": refusal})
        return self._act(environ, path)

    def _get(self, path: str, csrf: str) -> tuple[str, list, Any]:
        if path == "/":
            page = self.page.replace("{{csrf}}", html.escape(csrf)).encode()
            return "200 OK", [("Content-Type", "text/html; charset=utf-8")], page
        if path in self.files:
            return "200 OK", [("Content-Type", STATIC[path])], self.files[path]
        if path == "/api/status":
            return _json("200 OK", {**self.live.status(), "csrf": csrf})
        if path == "/api/history":
            return _json("200 OK", {"points": self.live.history()})
        if path == "/api/events":
            return self._events()
        return "404 Not Found", [("Content-Type", "text/plain")], b"not found\n"

    # -- authentication

    def _login(self, environ: dict[str, Any], given: str) -> tuple[str, list, Any]:
        """A valid ``?token=`` begins a session; the redirect drops the token from the
        address bar."""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._unauthorized("/", "That token is not this console's (it changes "
                                      "at every start unless console_token is set).")
        sid, _ = self.sessions.create()
        cookie = f"{self.cookie_name}={sid}; HttpOnly; SameSite=Strict; Path=/"
        log.info("console: a session began for %s", environ.get("REMOTE_ADDR"))
        return "303 See Other", [("Location", "/"), ("Set-Cookie", cookie),
                                 ("Content-Type", "text/plain")], b"logged in\n"

    def _csrf_of(self, environ: dict[str, Any]) -> str | None:
        """The CSRF token of whoever asks: its session's, or the bearers'; None when the
        request carries neither a session nor the token."""
        if bearer_matches(environ, self.token):
            return self.bearer_csrf
        try:
            cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        except CookieError:
            return None
        morsel = cookie.get(self.cookie_name)
        session = self.sessions.get(morsel.value) if morsel is not None else None
        return session.csrf if session is not None else None

    def _unauthorized(self, path: str, why: str) -> tuple[str, list, Any]:
        challenge = ("WWW-Authenticate", 'Bearer realm="circus-wsgi console"')
        if path.startswith("/api/"):
            status, headers, body = _json("401 Unauthorized", {
                "error": f"{why} Open the console's URL (?token=TOKEN) or send "
                         "Authorization: Bearer TOKEN."})
            return status, [*headers, challenge], body
        return ("401 Unauthorized", [("Content-Type", "text/html; charset=utf-8"), challenge],
                _login_page(why))

    # -- what the page shows

    def _events(self) -> tuple[str, list, Any]:
        if not self.streams.acquire(blocking=False):
            return ("503 Service Unavailable", [("Content-Type", "text/plain"),
                                                ("Retry-After", "5")],
                    f"at most {MAX_STREAMS} pages at once\n".encode())
        return ("200 OK", [("Content-Type", "text/event-stream")],
                _Stream(self.live, self.streams.release))

    # -- actions

    def _act(self, environ: dict[str, Any], path: str) -> tuple[str, list, Any]:
        try:
            body = _read_json(environ)
        except ValueError as error:
            return _json("400 Bad Request", {"ok": False, "error": str(error)})
        action = self.actions.get(path)
        parts = path.split("/")  # /api/workers/PID/stop
        if action is None and len(parts) == 5 and parts[:3] == ["", "api", "workers"] and \
                parts[3].isdigit() and parts[4] in self.worker_actions:
            act, pid = self.worker_actions[parts[4]], int(parts[3])
            action = lambda body: act(pid)  # noqa: E731
        if action is None:
            return _json("404 Not Found", {"ok": False, "error": f"no action {path}"})
        try:
            done = action(body)
        except ValueError as error:
            return _json("400 Bad Request", {"ok": False, "error": str(error)})
        except Refused as error:
            log.warning("console: %s from %s refused: %s", path, environ.get("REMOTE_ADDR"),
                        error)
            return _json("409 Conflict", {"ok": False, "error": str(error)})
        log.info("console: %s from %s: %s", path, environ.get("REMOTE_ADDR"), done)
        self.live.wake()
        return _json("200 OK", {"ok": True, "done": done})


def _forged(environ: dict[str, Any], csrf: str) -> str:
    """Why a POST may have been sent by another site ('' when it was not): a missing or
    wrong CSRF token, or an Origin (else Referer) that is not this console's."""
    given = environ.get("HTTP_X_CSRF_TOKEN", "")
    if not given or not hmac.compare_digest(given.encode(), csrf.encode()):
        return "this action needs the X-CSRF-Token header (the page's, or csrf from " \
               "GET /api/status)"
    here = f"http://{environ.get('HTTP_HOST', '')}"
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None:
        return "" if origin == here else f"refused from another origin ({origin})"
    referer = environ.get("HTTP_REFERER")
    if referer is not None and not (referer == here or referer.startswith(here + "/")):
        return "refused from another origin (Referer)"
    return ""


def _read_json(environ: dict[str, Any]) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ValueError("bad Content-Length") from None
    if length > MAX_BODY:
        raise ValueError(f"the body may have at most {MAX_BODY} bytes")
    data = environ["wsgi.input"].read(length) if length else b""
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except ValueError:
        raise ValueError("the body must be JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


class _Stream:
    """One page's server-sent events: a ``status`` event per new view (with the plots'
    newest point). Closing it frees its place among the :data:`MAX_STREAMS`."""

    def __init__(self, live: Live, release: Callable[[], None]) -> None:
        self.live, self.release = live, release
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"retry: 2000\n\n"
        seen = 0
        while not self.closed:
            news = self.live.next(seen, timeout=15)
            if news is None:
                yield b": still here\n\n"  # a comment: lets a gone client be noticed
                continue
            seen, view, point = news
            data = json.dumps({"status": view, "point": point}, separators=(",", ":"))
            yield f"event: status\ndata: {data}\n\n".encode()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.release()


# --------------------------------------------------------------------------


def run_console(settings: Settings) -> int:
    """Entry point of ``circus-wsgi console``: serve until killed; the exit status."""
    die_with_parent()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(message)s")
    if not settings.run_dir:
        print("circus-wsgi console: give --run-dir of the running stack", file=sys.stderr)
        return EXIT_USAGE
    try:
        token = read_token(settings.console_token) if settings.console_token \
            else secrets.token_urlsafe(24)
    except OSError as error:
        print(f"circus-wsgi console: console_token: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not token:
        print("circus-wsgi console: console_token: the file is empty", file=sys.stderr)
        return EXIT_USAGE
    host, port = split_address(settings.console) if settings.console else ("127.0.0.1", 0)
    monitor = Monitor(settings)
    live = Live(monitor)
    try:
        server = make_listener(host, port, lambda environ, start: [])
    except OSError as error:
        print(f"circus-wsgi console: cannot listen on {url(host, port)}: {error.strerror}",
              file=sys.stderr)
        return EXIT_USAGE
    port = server.server_address[1]
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        print(f"circus-wsgi console: warning: listening on {url(host, port)} over plain HTTP: "
              "its token and session cookie cross the network in clear (an SSH tunnel or a "
              "TLS proxy in front keeps them private)", file=sys.stderr)
    server.set_app(ConsoleApp(live, Steering(monitor.endpoint), token,
                              cookie_name=f"circus_wsgi_console_{port}"))
    live.start()
    print(f"Console: {url(host, port)}/?token={token}", flush=True)
    serve_until_killed(server)
    return EXIT_OK
