"""``circus-wsgi status``: ask the dispatcher for its counters and print them; and the
plugins' way to note a decision to it (:func:`send_note`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zmq

from .rundir import RunDir
from .settings import Settings


def read_status(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    """The dispatcher's counters; raises TimeoutError when it does not answer."""
    return _ask(settings, b"status", timeout)


def send_note(settings: Settings, decision: dict[str, Any], timeout: float = 1.0) -> bool:
    """Tell the dispatcher of a plugin's decision (``by``, ``action``, ``reason``,
    ``detail``); False if it did not take it."""
    try:
        return bool(_ask(settings, json.dumps({"decision": decision}).encode(),
                         timeout).get("ok"))
    except TimeoutError:
        return False


def _ask(settings: Settings, question: bytes, timeout: float) -> dict[str, Any]:
    if not settings.run_dir:
        raise TimeoutError("no run_dir given: pass --run-dir of the running stack")
    context: zmq.Context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(RunDir(Path(settings.run_dir)).dispatcher_status)
        sock.send(question)
        if not sock.poll(timeout * 1000):
            raise TimeoutError(f"the dispatcher in {settings.run_dir} did not answer")
        return sock.recv_json()
    finally:
        sock.close()


def print_status(settings: Settings) -> int:
    """Print the dispatcher's counters as JSON; exit status 1 when it does not answer."""
    try:
        print(json.dumps(read_status(settings), indent=2, sort_keys=True))
    except TimeoutError as error:
        print(f"circus-wsgi: {error}")
        return 1
    return 0
