"""A worker's record of the requests it has begun, in memory the dispatcher shares.

A worker numbers the requests it receives from the dispatcher (1, 2, 3, ... over
its life) and runs them in that order. Before the application is called for
one, the thread that takes it writes its number and the time into its own
cell of the worker's board, a small file in the run directory mapped by both
processes; when the call is over it clears the time. Whatever way the worker
dies, the board keeps what it last wrote, so the dispatcher can tell which of
the requests it held reached the application (:mod:`circus_wsgi.broker`), and
at any moment what each thread runs and since when (the status and console).
It costs the worker two stores into memory per request: no system call.

Layout: float64 numbers, native order: the thread count, then for each thread
the number of the request it took last and since when it runs it
(``time.monotonic()``, 0.0 when idle).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

_CELL = 8  # bytes per number


def board_path(run_dir: Path, pid: int) -> Path:
    """Where the worker ``pid`` keeps its board."""
    return run_dir / f"board-{pid}"


class Board:
    """The worker's side: ``cells[1 + 2 * thread]`` is the number of the request that
    thread took last, ``cells[2 + 2 * thread]`` since when it runs it (0.0 idle)."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        size = _CELL * (1 + 2 * threads)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.cells = memoryview(self._map).cast("d")
        self.cells[0] = threads

    def close(self) -> None:
        """The worker ends cleanly: nothing it held is left, so the board goes."""
        self.cells.release()
        self._map.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class BoardReader:
    """The dispatcher's side: the board of one worker, mapped while it lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < _CELL or size % _CELL:
                raise OSError(f"{path} is not a worker's board")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.cells = memoryview(self._map).cast("d")
        self.threads = min(int(self.cells[0]), (len(self.cells) - 1) // 2)

    @classmethod
    def open(cls, path: Path) -> BoardReader | None:
        """The board at ``path``, or None when there is none (or not a board)."""
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def began(self) -> int:
        """The number of the last request the worker began (0: none). Those before it
        were begun too; all that are not :meth:`running` have ended."""
        return int(max(self.cells[1:1 + 2 * self.threads:2], default=0))

    def running(self) -> dict[int, float]:
        """Request number -> since when, for each thread running a request now."""
        cells = self.cells
        return {int(cells[1 + 2 * t]): cells[2 + 2 * t] for t in range(self.threads)
                if cells[2 + 2 * t] > 0}

    def close(self, remove: bool = False) -> None:
        """Stop reading; ``remove``: the worker is dead, delete its board too."""
        self.cells.release()
        self._map.close()
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _boards(run_dir: Path) -> dict[int, Path]:
    return {int(path.name[len("board-"):]): path for path in run_dir.glob("board-*")
            if path.name[len("board-"):].isdigit()}


def live_workers(run_dir: Path) -> set[int]:
    """The pids of the workers of ``run_dir`` that are running (they have a board)."""
    return {pid for pid in _boards(run_dir) if os.path.exists(f"/proc/{pid}")}


def remove_stale(run_dir: Path) -> None:
    """Delete the boards of workers that no longer exist (left by a crash while no
    dispatcher was running)."""
    for pid, path in _boards(run_dir).items():
        if not os.path.exists(f"/proc/{pid}"):
            try:
                path.unlink()
            except OSError:
                pass
