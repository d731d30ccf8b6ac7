"""The private run directory: where every socket, pid file, log and upload lives.

One place names every path, so mongrel2's config, circus.ini, the dispatcher
and the workers agree on them. The directory is created with mode 0700.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: Longest path a Unix socket address may have (sun_path is 108 bytes with its NUL).
IPC_PATH_MAX = 107
#: The file names of the sockets in a run directory (the properties below use them).
SOCKETS = ("m2-requests.sock", "m2-responses.sock", "m2-control.sock", "dispatcher.sock",
           "dispatcher-status.sock", "circus.sock", "circus-pubsub.sock", "circus-stats.sock")
#: Longest run directory path (in bytes) whose every socket path fits IPC_PATH_MAX.
RUN_DIR_MAX = IPC_PATH_MAX - 1 - max(len(name) for name in SOCKETS)


@dataclass(frozen=True)
class RunDir:
    """The paths inside one run directory."""

    path: Path

    def _ipc(self, name: str) -> str:
        return f"ipc://{self.path / name}"

    @property
    def mongrel2_send(self) -> str:
        """mongrel2's PUSH socket (handler send_spec): requests out of mongrel2."""
        return self._ipc("m2-requests.sock")

    @property
    def mongrel2_recv(self) -> str:
        """mongrel2's SUB socket (handler recv_spec): responses into mongrel2."""
        return self._ipc("m2-responses.sock")

    @property
    def mongrel2_control(self) -> str:
        return self._ipc("m2-control.sock")

    @property
    def dispatcher(self) -> str:
        """The dispatcher's Unix stream socket (a path), which workers connect to."""
        return str(self.path / "dispatcher.sock")

    @property
    def dispatcher_status(self) -> str:
        """The dispatcher's REP socket answering status queries (counters)."""
        return self._ipc("dispatcher-status.sock")

    @property
    def circus_endpoint(self) -> str:
        return self._ipc("circus.sock")

    @property
    def circus_pubsub(self) -> str:
        return self._ipc("circus-pubsub.sock")

    @property
    def circus_stats(self) -> str:
        return self._ipc("circus-stats.sock")

    @property
    def mongrel2_pid_file(self) -> Path:
        return self.path / "mongrel2.pid"

    @property
    def mongrel2_access_log(self) -> Path:
        """mongrel2's own access log: named because its config needs one, but turned off
        (it records 200 for every handler route; the workers write the true one)."""
        return self.path / "mongrel2-access.log"

    @property
    def metrics_token(self) -> Path:
        """The metrics endpoint's token, when the settings give it (mode 0600)."""
        return self.path / "metrics.token"

    @property
    def console_token(self) -> Path:
        """The console's token, written here for its watcher (mode 0600)."""
        return self.path / "console.token"

    @property
    def uploads(self) -> Path:
        """Directory of mongrel2's upload temp files."""
        return self.path / "uploads"

    @property
    def certdir(self) -> Path:
        """Where mongrel2 reads its TLS certificate and key (copies, see :mod:`.tls`)."""
        return self.path / "certs"

    @property
    def upload_template(self) -> str:
        """mongrel2's upload.temp_store: an mkstemp template."""
        return str(self.uploads / "upload.XXXXXX")

    def create(self, owner: Optional[tuple[int, int]] = None) -> "RunDir":
        """Create the directory (and uploads/) private to this user, or to ``owner``
        (uid, gid): mode 0700."""
        for directory in (self.path, self.uploads):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, stat.S_IRWXU)
            if owner is not None:
                os.chown(directory, *owner)
        return self
