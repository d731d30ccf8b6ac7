"""The small HTTP servers of the stack's own watchers (``metrics``, ``console``).

Each listens on a ``[HOST:]PORT`` setting with the standard library's WSGI server,
one thread per connection (a thread blocked on a slow client holds up nobody else),
and reads its token from the setting, or from the file ``@FILE`` names: a token is
never on a command line. Bearer tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import socket
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

#: Seconds a connection may sit idle in a read or a write before it is dropped.
CONNECTION_TIMEOUT = 10.0


def read_token(value: str) -> str:
    """A token setting's token: the value, or the first line of the file ``@FILE``."""
    if value.startswith("@"):
        return Path(value[1:]).read_text().strip()
    return value


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (as the settings write it; IPv6 hosts bare) -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def url(host: str, port: int) -> str:
    """``http://HOST:PORT``, an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def address_url(address: str) -> str:
    """The URL of a ``HOST:PORT`` setting's value."""
    return url(*split_address(address))


def bearer_matches(environ: dict[str, Any], token: str) -> bool:
    """True when the request carries ``Authorization: Bearer TOKEN``."""
    given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would only fill the log


def make_listener(host: str, port: int, app: Callable) -> WSGIServer:
    """A threading WSGI server for ``app`` bound to ``host:port`` (port 0: any free one);
    raises OSError when it cannot listen there."""
    return make_server(host, port, app, server_class=_Server6 if ":" in host else _Server,
                       handler_class=_QuietHandler)


def serve_until_killed(server: WSGIServer) -> None:
    """Serve until SIGTERM (the default action ends the process) or Ctrl-C."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
