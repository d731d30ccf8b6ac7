"""The application of the chaos tests: every response carries the tag its request sent,
so a response that reaches the wrong client is seen.

``/fast?t=T``: T. ``/slow?t=T&s=S``: T after S seconds (default 0.5). ``/big?t=T``:
100 KiB made of T. ``/upload?t=T`` (POST): T and the SHA-256 of the body. ``/die``:
the worker kills itself with SIGKILL, as a segfault or the OOM killer would
(``&fork=S``: after forking a child that holds its connections for S seconds, and
writes its pid to ``&pidfile=P``).
``/hog?mb=N``: the worker keeps N MiB more, for good (a leak). ``/status?code=N``:
an empty response with that status.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from urllib.parse import parse_qs

BIG = 100 * 1024
leaked: list[bytes] = []


def big_body(tag: str) -> bytes:
    """The body of ``/big?t=tag``."""
    return ((tag + "-").encode() * (BIG // (len(tag) + 1) + 1))[:BIG]


def app(environ, start_response):
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    tag, path = query.get("t", ""), environ["PATH_INFO"]
    if path == "/slow":
        time.sleep(float(query.get("s", 0.5)))
        body = tag.encode()
    elif path == "/big":
        body = big_body(tag)
    elif path == "/upload":
        data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        body = f"{tag} {hashlib.sha256(data).hexdigest()}".encode()
    elif path == "/hog":
        leaked.append(b"x" * (int(query.get("mb", 1)) << 20))
        body = b"%d" % os.getpid()
    elif path == "/status":
        start_response(f"{query.get('code', '200')} Status", [("Content-Length", "0")])
        return []
    elif path == "/die":
        if query.get("fork") and os.fork() == 0:  # the child: every descriptor, held
            with open(query["pidfile"], "w") as pidfile:
                pidfile.write(str(os.getpid()))
            time.sleep(float(query["fork"]))
            os._exit(0)
        os.kill(os.getpid(), signal.SIGKILL)
        body = b""
    else:
        body = tag.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
