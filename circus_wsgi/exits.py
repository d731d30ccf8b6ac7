"""How a process of the stack ends, and which ends are crashes.

The flapping plugin stops a watcher whose processes crash in a loop, so it
must tell a crash from a planned end: a clean exit (recycling after
max_requests, a graceful stop), a stop by circus (SIGTERM), or a stuck worker
killed by the dispatcher. The dispatcher kills stuck workers with
:data:`STUCK_SIGNAL`, a signal the workers leave at its default action
(terminate), so that kill is told apart from a crash or an OOM kill (SIGKILL).
"""

from __future__ import annotations

import signal

#: Exit status of a clean, planned exit.
EXIT_OK = 0
#: Exit status for a bad setting or an application that cannot be imported.
EXIT_USAGE = 2
#: The signal the dispatcher kills a stuck worker with.
STUCK_SIGNAL = signal.SIGUSR2

_PLANNED = {EXIT_OK, -signal.SIGTERM, -STUCK_SIGNAL}


def is_crash(exit_code: int | None) -> bool:
    """True when an exit (circus's code: negative for a signal) was not planned."""
    return exit_code is not None and exit_code not in _PLANNED
