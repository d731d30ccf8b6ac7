"""Processes of the stack die with circusd instead of lingering.

circus starts every child in a new session, so when circusd is killed its
children live on. A child that asks the kernel for a parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) before it runs is sent SIGTERM when circusd goes.
The setting survives ``exec`` of a normal binary, so
``python -m circus_wsgi.lifeline PROGRAM ARGS...`` sets it and execs PROGRAM:
that is how circus.ini runs mongrel2. Python processes of the stack call
:func:`die_with_parent` themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when the parent exits; exit now if it already has."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent or parent == 1:
        sys.exit(f"lifeline: parent process {parent} is gone")


def run(argv: list[str]) -> None:
    """Set the parent-death signal, then exec the program named in ``argv``."""
    die_with_parent()
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        sys.exit(f"lifeline: cannot run {argv[0]}: {error.strerror}")


def main(argv: list[str] | None = None) -> None:
    """``python -m circus_wsgi.lifeline PROGRAM [ARGS...]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m circus_wsgi.lifeline PROGRAM [ARGS...]")
    run(argv)


if __name__ == "__main__":
    main()
