"""Writing a deployment: Settings -> a directory holding every configuration file.

This module owns :func:`write_configs` (``circus_wsgi.write_configs(settings,
directory)``, and ``circus-wsgi config --out DIR``): it fills the defaults that depend on
the directory, creates the private run directory (the stack's user's, see
:mod:`.privileges`), puts the TLS certificate and key where mongrel2 reads them
(:mod:`.tls`), and writes ``config.sqlite`` and ``mongrel2.conf``
(:mod:`.mongrel2`) and ``circus.ini`` (:mod:`.circusconf`). Then
``circusd DIR/circus.ini`` runs the stack.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import privileges, tls
from .circusconf import circus_ini
from .mongrel2 import write_mongrel2_config
from .mongrel2_binary import usable_mongrel2
from .rundir import RunDir
from .settings import Settings


def resolve_for(settings: Settings, directory: Path) -> Settings:
    """The settings as written into ``directory``: every default that depends on where
    or when they are written made explicit.

    run_dir defaults to ``directory/run``; chdir, a relative path, becomes absolute
    here, so circusd can be started from anywhere.
    """
    run_dir = os.path.join(os.path.abspath(directory), "run")
    resolved = settings.with_defaults_resolved(run_dir)
    return resolved.replace(chdir=os.path.abspath(settings.chdir))


def write_configs(settings: Settings, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write config.sqlite, mongrel2.conf and circus.ini into ``directory`` (created if
    missing) and create the run directory (mode 0700); return the files' paths by name:
    ``{"config.sqlite": ..., "mongrel2.conf": ..., "circus.ini": ...}``.

    The mongrel2 binary is run once first, circus.ini made next and the TLS files
    checked, so a binary that cannot run or a setting that cannot work stops before any
    file is written.
    """
    hosts_mongrel2 = settings.role == "all"  # not a host of workers alone
    if hosts_mongrel2:
        usable_mongrel2(settings.mongrel2)
    directory = Path(os.path.abspath(directory))
    resolved = resolve_for(settings, directory)
    ini_path = directory / "circus.ini"
    ini_text = circus_ini(resolved, directory / "config.sqlite")
    privileges.check_switch(resolved)
    tls.check(resolved)
    who = privileges.identity(resolved)
    owner = who.owner if who else None
    directory.mkdir(parents=True, exist_ok=True)
    run = RunDir(Path(resolved.run_dir)).create(owner)
    privileges.check_reachable(who, directory)
    if resolved.certfile:
        tls.install(resolved, run, owner)
    paths = {}
    if hosts_mongrel2:
        paths["config.sqlite"], paths["mongrel2.conf"] = \
            write_mongrel2_config(resolved, directory)
    _write_secret(resolved.metrics_token, run.metrics_token, owner)
    _write_secret(resolved.console_token, run.console_token, owner)
    ini_path.touch(mode=0o600)
    ini_path.chmod(0o600)  # before writing: it may hold secrets in the workers' environment
    ini_path.write_text(ini_text)
    return {**paths, "circus.ini": ini_path}


def _write_secret(value: str, path: Path, owner: tuple[int, int] | None) -> None:
    """A token given in the settings goes to a file of its own (mode 0600, the stack's
    user's), which the process that needs it reads: never its command line."""
    if value and not value.startswith("@"):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(value + "\n")
        if owner is not None:
            os.chown(path, *owner)
