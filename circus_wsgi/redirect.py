"""The plain-HTTP port that sends every request to HTTPS (setting ``http_redirect``).

mongrel2 has no redirect directive, and one mongrel2 process is one server, so
a second port would be a second mongrel2 plus a handler for it. Cheaper: circusd
binds the port (as root, so 80 works), as a circus socket, and passes it to this
small process (``circus-wsgi`` watcher ``http-redirect``, run as the stack's
user), which answers every request with 301 (GET, HEAD) or 308 (any other
method, which must be repeated as it was) to the same path and query on
``https://HOST[:PORT]``, HOST from the request's Host header. A request without a
usable Host header gets 400. Python's ``http.server`` parses the requests;
connections are served by at most :data:`CONNECTIONS` threads, and each has
:data:`TIMEOUT` seconds to send its request.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from .lifeline import die_with_parent

#: Connections answered at once; more wait in the listen queue.
CONNECTIONS = 64
#: Seconds a connection has to send its request line and headers.
TIMEOUT = 10.0
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?")


def location(host_header: Optional[str], target: str, https_port: int) -> Optional[str]:
    """Where a request for ``target`` with this Host header is sent (None: nowhere)."""
    match = _HOST.fullmatch(host_header or "")
    if match is None or not target.startswith("/") or target.startswith("//"):
        return None
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{match.group(1).lower()}{port}{target}"


class Redirect(BaseHTTPRequestHandler):
    """Every method: a redirect to HTTPS, then the connection is closed."""

    timeout = TIMEOUT
    https_port = 443
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "circus-wsgi"

    def redirect(self) -> None:
        target = location(self.headers.get("Host"), self.path, self.https_port)
        if target is None:
            self.send_error(400, "Bad Request", "no usable Host header")
            return
        self.send_response(301 if self.command in ("GET", "HEAD") else 308)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = redirect

    def log_message(self, format: str, *args: Any) -> None:
        """The access log is the workers'; a redirect is not worth a line."""


class Server(ThreadingHTTPServer):
    """A threading HTTP server on an inherited listening socket, with bounded threads."""

    daemon_threads = True

    def __init__(self, listener: socket.socket) -> None:
        super().__init__(listener.getsockname()[:2], Redirect, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.slots = threading.BoundedSemaphore(CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.slots.acquire()
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def main(argv: list[str] | None = None) -> None:
    """``python -m circus_wsgi.redirect --fd FD --https-port PORT``: serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m circus_wsgi.redirect")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket")
    parser.add_argument("--https-port", type=int, default=443)
    args = parser.parse_args(argv)
    die_with_parent()
    Redirect.https_port = args.https_port
    listener = socket.socket(fileno=args.fd)
    print(f"redirecting http://{listener.getsockname()[0]}:{listener.getsockname()[1]}/ "
          f"to https, port {args.https_port}", file=sys.stderr, flush=True)
    Server(listener).serve_forever()


if __name__ == "__main__":
    main()
