"""WSGI applications for the ``circus-wsgi serve`` tests (tests/test_serve.py).

Environment variables steer the import, so a test can break it on purpose:

- ``SERVE_APPS_IMPORT_ERROR=TEXT``: the import raises ``RuntimeError(TEXT)``.
- ``SERVE_APPS_CRASH_FLAG=PATH``: the import raises while the file PATH exists, so
  workers started after a test creates it crash at start (a bad deploy). With
  ``SERVE_APPS_ARM_FLAG=1`` too, an import that passes creates PATH: the app imports
  once (in serve's check) and never again.

``app`` routes on the path: ``/`` says hello with the worker's pid, ``/sleep?s=N``
sleeps N seconds first, ``/whoami`` answers the worker's uid, gid and groups.
``from_env()`` is a factory that needs
``SERVE_APPS_GREETING`` (a setting ``env`` of serve) to build its app.
"""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs

if os.environ.get("SERVE_APPS_IMPORT_ERROR"):
    raise RuntimeError(os.environ["SERVE_APPS_IMPORT_ERROR"])

_CRASH_FLAG = os.environ.get("SERVE_APPS_CRASH_FLAG")
if _CRASH_FLAG and os.path.exists(_CRASH_FLAG):
    raise RuntimeError(f"crash flag {_CRASH_FLAG} is set")
if _CRASH_FLAG and os.environ.get("SERVE_APPS_ARM_FLAG"):
    open(_CRASH_FLAG, "x").close()


def _text(start_response, text: str) -> list[bytes]:
    body = text.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    if environ["PATH_INFO"] == "/sleep":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
        time.sleep(seconds)
        return _text(start_response, f"slept {seconds}")
    if environ["PATH_INFO"] == "/whoami":
        return _text(start_response, f"{os.getuid()} {os.getgid()} {sorted(os.getgroups())}")
    return _text(start_response, f"hello from {os.getpid()}")


def from_env():
    greeting = os.environ["SERVE_APPS_GREETING"]

    def greet(environ, start_response):
        return _text(start_response, greeting)

    return greet
