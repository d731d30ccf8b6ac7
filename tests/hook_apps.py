"""What the server hooks of the tests (tests/test_hooks.py) record of their calls.

``record(hook, ...)`` appends one JSON line to the file ``HOOK_RECORD`` names:
the hook, the process that called it and what its arguments showed (the
``server``, ``worker``, ``req`` and ``resp`` helpers below). A hook named in
``HOOK_RAISE`` (comma-separated) raises ``RuntimeError("<hook> broke")`` after
recording, so a test sees both that it was called and that the stack went on.
"""

from __future__ import annotations

import json
import os


def record(hook: str, **seen: object) -> None:
    line = json.dumps({"hook": hook, "pid": os.getpid(), **seen})
    with open(os.environ["HOOK_RECORD"], "a") as out:
        out.write(line + "\n")
    if hook in os.environ.get("HOOK_RAISE", "").split(","):
        raise RuntimeError(f"{hook} broke")


def read(path: str) -> list[dict]:
    with open(path) as records:
        return [json.loads(line) for line in records]


def server(server) -> dict:
    return {"server_pid": server.pid, "app": server.cfg.app, "workers": server.num_workers,
            "endpoint": server.endpoint}


def worker(worker) -> dict:
    return {"worker_pid": worker.pid, "worker_ppid": worker.ppid, "nr": worker.nr,
            "alive": worker.alive, "worker_app": worker.cfg.app}


def req(req) -> dict:
    return {"method": req.method, "path": req.path, "query": req.query, "uri": req.uri,
            "version": req.version, "headers": req.headers}


def resp(environ, resp) -> dict:
    return {"path_info": environ["PATH_INFO"], "status": resp.status,
            "status_code": resp.status_code, "sent": resp.sent, "resp_headers": resp.headers}
