"""Which mongrel2 binary runs the stack, and what it needs to run: the ``mongrel2`` setting.

Unset, the setting means the mongrel2 that ``make deps`` unpacked into this
environment's prefix (:data:`PREFIX`: where the distribution ships no
mongrel2-core, scripts/install-mongrel2 fetches Debian 12's there), else
``mongrel2`` on PATH. Set, it is a path or a command name looked up on PATH.

A binary in a prefix of its own (``PREFIX/bin/mongrel2`` with libraries in
``PREFIX/lib`` or ``PREFIX/lib/<triplet>``) runs with those library directories
on ``LD_LIBRARY_PATH``; a binary of the system's own (``/usr/bin``) needs none.
:func:`usable_mongrel2` also runs the binary once, so a missing library is
reported before anything starts, in one line that names what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .settings import SettingsError

#: Where ``make deps`` unpacks a mongrel2 fetched from the Debian registry.
PREFIX = Path(sys.prefix) / "mongrel2"
#: The mongrel2 in :data:`PREFIX`, the default when it exists.
PREFIX_BINARY = PREFIX / "usr" / "bin" / "mongrel2"
#: Prefixes whose libraries the dynamic loader finds by itself.
SYSTEM_PREFIXES = ("/", "/usr", "/usr/local")
#: What to do about a missing or broken mongrel2.
INSTALL_HINT = ("install Debian's mongrel2-core: make deps does it (where the system has "
                "none, it fetches Debian 12's into .venv/mongrel2)")
#: mongrel2 run without arguments prints this and exits: it runs.
USAGE_LINE = "usage: mongrel2"
#: How long mongrel2 may take to print its usage.
CHECK_TIMEOUT = 10.0

_MISSING_LIBRARY = re.compile(r"error while loading shared libraries: ([^:\s]+)")


class Mongrel2Unavailable(SettingsError):
    """The mongrel2 the setting names cannot be found or run; the message is one line."""

    def __init__(self, setting: str, problem: str) -> None:
        self.name, self.value, self.allowed = "mongrel2", setting, problem
        where = f"setting 'mongrel2': {problem}" if setting else problem
        ValueError.__init__(self, f"{where}: {INSTALL_HINT}")


@dataclass(frozen=True)
class Mongrel2Binary:
    """A mongrel2 binary and the library directories it runs with."""

    path: str
    library_path: tuple[str, ...] = ()

    def environment(self) -> dict[str, str]:
        """What mongrel2's environment needs on top of the caller's."""
        return {"LD_LIBRARY_PATH": os.pathsep.join(self.library_path)} if self.library_path \
            else {}

    def env(self) -> dict[str, str]:
        """This process's environment with :meth:`environment` added, for a child."""
        return {**os.environ, **self.environment()}

    def tool(self, name: str) -> str | None:
        """A program of the same installation (``m2sh``): beside the binary, else on PATH."""
        sibling = Path(self.path).with_name(name)
        return str(sibling) if os.access(sibling, os.X_OK) else shutil.which(name)


def library_path(binary: str) -> tuple[str, ...]:
    """The library directories of the prefix ``binary`` lies in (none for the system's):
    ``lib`` and ``lib/<triplet>`` beside its ``bin``, those that hold shared libraries."""
    prefix = Path(binary).resolve().parent.parent
    if str(prefix) in SYSTEM_PREFIXES:
        return ()
    candidates = [prefix / "lib", *sorted((prefix / "lib").glob("*-linux-*"))]
    return tuple(str(d) for d in candidates if d.is_dir() and any(d.glob("lib*.so*")))


def locate(setting: str) -> Mongrel2Binary:
    """The binary the ``mongrel2`` setting names ('' for the default), without running it."""
    if setting:
        found = shutil.which(setting)
        if found is None:
            if os.sep not in setting:
                problem = "is not on PATH"
            elif os.path.exists(setting):
                problem = "is not an executable file"
            else:
                problem = "does not exist"
            raise Mongrel2Unavailable(setting, f"{setting} {problem}")
    elif os.access(PREFIX_BINARY, os.X_OK):
        found = str(PREFIX_BINARY)
    else:
        found = shutil.which("mongrel2")
        if found is None:
            raise Mongrel2Unavailable(setting, f"mongrel2 is not installed (neither "
                                      f"{PREFIX_BINARY} nor mongrel2 on PATH)")
    path = os.path.abspath(found)
    return Mongrel2Binary(path, library_path(path))


def check(binary: Mongrel2Binary, setting: str) -> None:
    """Run ``binary`` once without arguments: it must print mongrel2's usage line."""
    try:
        result = subprocess.run([binary.path], env=binary.env(), capture_output=True,
                                text=True, errors="replace", timeout=CHECK_TIMEOUT)
    except OSError as error:
        raise Mongrel2Unavailable(setting, f"cannot run {binary.path}: {error.strerror}"
                                  ) from None
    except subprocess.TimeoutExpired:
        raise Mongrel2Unavailable(setting, f"{binary.path} did not answer within "
                                  f"{CHECK_TIMEOUT:.0f} s") from None
    output = result.stderr + result.stdout
    missing = _MISSING_LIBRARY.search(output)
    if missing:
        raise Mongrel2Unavailable(setting, f"cannot run {binary.path}: its library "
                                  f"{missing.group(1)} is missing")
    if USAGE_LINE not in output:
        raise Mongrel2Unavailable(setting, f"{binary.path} is not mongrel2 (run without "
                                  f"arguments, it exited {result.returncode} without "
                                  f"{USAGE_LINE!r})")


def usable_mongrel2(setting: str) -> Mongrel2Binary:
    """The binary the ``mongrel2`` setting names, checked to run here."""
    binary = locate(setting)
    check(binary, setting)
    return binary
