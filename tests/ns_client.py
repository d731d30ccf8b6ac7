"""An HTTP client run inside a network namespace (``ip netns exec NS python ns_client.py
PORT``): it reads one JSON request a line on stdin, {"id": ..., "path": ...}, sends each
on its own connection in a thread of its own, and prints one JSON line per answer:
{"id": ..., "status": 200 or "closed" or "timeout", "body": ..., "seconds": ...}.
An empty line ends it once every answer is out."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time

PORT = int(sys.argv[1])
TIMEOUT = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
out = threading.Lock()


def ask(request: dict) -> None:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=TIMEOUT)
    try:
        connection.request("GET", request["path"])
        reply = connection.getresponse()
        status, body = reply.status, reply.read().decode("latin-1")
    except TimeoutError:
        status, body = "timeout", ""
    except (OSError, http.client.HTTPException):
        status, body = "closed", ""
    finally:
        connection.close()
    line = json.dumps({"id": request["id"], "status": status, "body": body,
                       "seconds": time.monotonic() - started})
    with out:
        print(line, flush=True)


threads = []
for text in sys.stdin:
    if not text.strip():
        break
    thread = threading.Thread(target=ask, args=(json.loads(text),))
    thread.start()
    threads.append(thread)
for thread in threads:
    thread.join()
