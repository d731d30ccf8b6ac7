"""The stack run as an unprivileged user (settings ``user`` and ``group``).

circusd stays root; every process it starts runs as the user. circus itself
switches the dispatcher, the workers, circusd-stats and the flapping plugin
(the watcher options ``uid`` and ``gid``). mongrel2 starts through
``python -m circus_wsgi.privileges``, which gives the user circus's pipe of its
output (mongrel2 opens ``/dev/stderr`` by name, which a pipe owned by root
refuses to another user) and execs util-linux's ``setpriv``: it switches to the
user, keeps the one capability CAP_NET_BIND_SERVICE when mongrel2 must listen
on a port under 1024, sets the parent-death signal again (a change of user
clears it, see :mod:`.lifeline`) and execs mongrel2.

What the user's processes share with circusd must be theirs: the run dir (its
sockets, uploads, pid files and the copy of the TLS key) is made theirs, and
:func:`own_circus_sockets`, a circus hook run by circusd before the first
watcher starts, hands them circusd's ipc sockets, which circusd-stats and the
plugin connect to. The run dir stays 0700, so those sockets are the user's and
root's alone.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import lifeline
from .settings import Settings, SettingsError

#: Ports below this one need CAP_NET_BIND_SERVICE to listen on.
PRIVILEGED_PORTS_END = 1024
#: What ``own_circus_sockets`` is called as in circus.ini.
HOOK = "circus_wsgi.privileges.own_circus_sockets"


@dataclass(frozen=True)
class Identity:
    """Who the stack's processes run as."""

    user: str
    group: str
    uid: int
    gid: int

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid


def identity(settings: Settings) -> Optional[Identity]:
    """The user and group of ``settings`` (None: the stack runs as whoever starts it)."""
    if not settings.user:
        return None
    entry = pwd.getpwnam(settings.user)
    gid = grp.getgrnam(settings.group).gr_gid if settings.group else entry.pw_gid
    return Identity(entry.pw_name, grp.getgrgid(gid).gr_name, entry.pw_uid, gid)


def check_switch(settings: Settings) -> None:
    """Only root may start processes as another user."""
    who = identity(settings)
    if who is not None and os.geteuid() not in (0, who.uid):
        raise SettingsError("user", settings.user,
                            "only root can run the stack as another user")


def as_user(who: Identity) -> dict[str, Any]:
    """subprocess.run's arguments that run a child as ``who``, with the user's groups."""
    return dict(user=who.uid, group=who.gid, extra_groups=os.getgrouplist(who.user, who.gid))


def check_reachable(who: Optional[Identity], directory: Path) -> None:
    """The user can enter ``directory``, or the setting user is refused."""
    if who is None:
        return
    if subprocess.run(["test", "-x", str(directory)], timeout=30, **as_user(who)).returncode:
        raise SettingsError("user", who.user, f"cannot reach {directory}: every directory "
                            f"above it must let {who.user} through")


def mongrel2_argv(argv: list[str], who: Identity, port: int) -> list[str]:
    """``argv`` (mongrel2's command) run as ``who``, able to listen on ``port``."""
    bind = ["--bind-service"] if port < PRIVILEGED_PORTS_END else []
    return [sys.executable, "-m", "circus_wsgi.privileges", str(who.uid), str(who.gid),
            *bind, "--", *argv]


def own_circus_sockets(watcher: Any, arbiter: Any, hook_name: str, **_: Any) -> bool:
    """circus hook (``before_start``): give the watcher's user circusd's ipc sockets."""
    from circus.util import to_gid, to_uid

    uid, gid = to_uid(watcher.uid), to_gid(watcher.gid)
    for endpoint in (arbiter.endpoint, arbiter.pubsub_endpoint):
        if endpoint.startswith("ipc://"):
            os.chown(endpoint[len("ipc://"):], uid, gid)
    return True


def _give_pipes(uid: int, gid: int) -> None:
    """Make the pipes of stdout and stderr the user's, so they can be opened by name."""
    for fd in (1, 2):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.fchown(fd, uid, gid)


def main(argv: list[str] | None = None) -> None:
    """``python -m circus_wsgi.privileges UID GID [--bind-service] -- PROGRAM ARGS...``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        uid, gid, *options = argv[:argv.index("--")]
        program = argv[argv.index("--") + 1:]
        uid_number, gid_number = int(uid), int(gid)
    except ValueError:
        program = []
    if not program or set(options) - {"--bind-service"}:
        sys.exit("usage: python -m circus_wsgi.privileges UID GID [--bind-service] -- "
                 "PROGRAM [ARGS...]")
    _give_pipes(uid_number, gid_number)
    caps = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"] \
        if options else []
    # setpriv's change of user clears the parent-death signal lifeline sets: it sets it again
    lifeline.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", *caps,
                  "--pdeathsig=TERM", "--", *program])


if __name__ == "__main__":
    main()
