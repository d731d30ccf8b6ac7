"""Which of mongrel2's request messages become requests for the application (sans-IO).

A request carrying both Content-Length and Transfer-Encoding is refused with 400
(mongrel2 1.12 would read the rest of its body as a second request), one whose
body is over ``max_body_size`` with 413, and what follows on a refused
connection is dropped for :data:`REFUSED_FOR` seconds. An upload (a body mongrel2
spools to a temp file) is admitted only once done, and only if both of its
notices name the same file in the run dir's upload directory: clients can send
upload headers themselves, and mongrel2 passes them through on requests whose
body arrives inline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .protocol import UPLOAD_START, Message, is_smuggling_risk

#: After a refusal, what follows on that connection is dropped this long (seconds).
REFUSED_FOR = 2.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Answer ``status`` and close; ``reason`` is for the log and the counters."""

    status: int
    reason: str


FORGED = Refusal(400, "forged upload header")


class Gate:
    """The uploads under way and the connections refused lately."""

    def __init__(self, upload_dir: bytes, content_length: int, max_body_size: int) -> None:
        self.upload_dir = upload_dir
        self.content_length, self.max_body_size = content_length, max_body_size
        self.refused: dict[bytes, float] = {}  # conn -> until when its requests are dropped
        self.uploads: dict[bytes, bytes] = {}  # conn -> the temp file being uploaded

    def blocked(self, conn: bytes) -> bool:
        """Whether what comes on ``conn`` is dropped (it was refused lately)."""
        return conn in self.refused

    def request(self, message: Message, now: float) -> Refusal | None:
        """A request (its body inline, or an upload done): None to admit it."""
        refusal = self._check(message)
        if refusal is not None:
            self.refuse(message.conn_id, now)
        return refusal

    def upload_started(self, message: Message,
                       now: float) -> tuple[Refusal | None, bytes | None]:
        """An upload begins: (a refusal or None, a file to delete now). A refused
        genuine upload is aborted by the answer; its file is deleted."""
        path = message.headers.get(UPLOAD_START)
        if not self._spooled(message) or not isinstance(path, bytes) or \
                not self._in_uploads(path):
            self.refuse(message.conn_id, now)
            return FORGED, None
        refusal = self.request(message, now)
        if refusal is not None:
            return refusal, path
        self.uploads[message.conn_id] = path
        return None, None

    def upload_done(self, message: Message, now: float) -> tuple[Refusal | None, bytes | None]:
        """An upload is done: (a refusal or None, the file it was expected in). With no
        refusal and a file, the request is admitted with that file as its body."""
        expected = self.uploads.pop(message.conn_id, None)
        if expected is None or message.upload_path != expected:
            self.refuse(message.conn_id, now)
            return FORGED, expected
        return None, expected

    def refuse(self, conn: bytes, now: float) -> None:
        self.refused[conn] = now + REFUSED_FOR

    def gone(self, conn: bytes) -> bytes | None:
        """The connection closed: forget it; the file of an upload it left unfinished."""
        self.refused.pop(conn, None)
        return self.uploads.pop(conn, None)

    def expire(self, now: float) -> None:
        for conn in [c for c, until in self.refused.items() if until < now]:
            del self.refused[conn]

    def reset(self) -> list[bytes]:
        """mongrel2 restarted: forget every connection; the files of unfinished uploads."""
        files = list(self.uploads.values())
        self.refused.clear()
        self.uploads.clear()
        return files

    def _check(self, message: Message) -> Refusal | None:
        if is_smuggling_risk(message):
            return Refusal(400, "Content-Length with Transfer-Encoding")
        length = message.headers.get(b"content-length")
        if self.max_body_size and isinstance(length, bytes) and length.isdigit() \
                and int(length) > self.max_body_size:
            return Refusal(413, "body over max_body_size")
        return None

    def _spooled(self, message: Message) -> bool:
        """True when mongrel2 puts this request's body in a temp file, not inline."""
        length = message.headers.get(b"content-length")
        return b"transfer-encoding" in message.headers or (
            isinstance(length, bytes) and length.isdigit()
            and int(length) > self.content_length)

    def _in_uploads(self, path: bytes) -> bool:
        return os.path.dirname(os.path.normpath(path)) == self.upload_dir
