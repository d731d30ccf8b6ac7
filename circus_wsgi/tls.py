"""HTTPS: the certificate and key checked before anything starts, and handed to mongrel2.

mongrel2 reads its certificate and key from ``certdir`` as ``<server uuid>.crt`` and
``<server uuid>.key``, once at start, as the user it runs as. So :func:`install`
copies the files the settings ``certfile`` and ``keyfile`` name into the run dir's
:attr:`~circus_wsgi.rundir.RunDir.certdir`, private to that user: a key only root
may read (``/etc/letsencrypt/live/...``) still works. A renewed certificate needs
the configuration written again and mongrel2 restarted.

:func:`check` loads both files with Python's ``ssl`` module first, so a missing,
unreadable or malformed file, a key that does not match the certificate or a key
with a passphrase (mongrel2 cannot ask for one) is one line naming the setting.
"""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

from .rundir import RunDir
from .settings import Settings, SettingsError


class _Passphrase(Exception):
    """The key asked for a passphrase."""


def _no_passphrase() -> str:
    raise _Passphrase


def check(settings: Settings) -> None:
    """Raise :class:`SettingsError` (one line) unless certfile and keyfile can serve HTTPS."""
    if not settings.certfile:
        return
    for name in ("certfile", "keyfile"):
        path = getattr(settings, name)
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise SettingsError(name, path, f"cannot read it: {error.strerror}") from None
    try:
        ssl.create_default_context(cafile=settings.certfile)
    except ssl.SSLError:
        raise SettingsError("certfile", settings.certfile,
                            "holds no PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile, password=_no_passphrase)
    except _Passphrase:
        raise SettingsError("keyfile", settings.keyfile, "the key has a passphrase, which "
                            "mongrel2 cannot ask for: write it without one") from None
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            raise SettingsError("keyfile", settings.keyfile,
                                f"is not the key of certfile {settings.certfile}") from None
        raise SettingsError("keyfile", settings.keyfile, "holds no PEM private key") from None


def install(settings: Settings, run: RunDir, owner: tuple[int, int] | None = None) -> None:
    """Copy certfile and keyfile to where mongrel2 reads them, readable by ``owner``
    (uid, gid) alone, or by this user."""
    certdir = run.certdir
    certdir.mkdir(mode=0o700, exist_ok=True)
    for source, suffix in ((settings.certfile, ".crt"), (settings.keyfile, ".key")):
        target = certdir / f"{settings.server_uuid}{suffix}"
        target.unlink(missing_ok=True)
        target.touch(mode=0o600)
        shutil.copyfile(source, target)
        if owner is not None:
            os.chown(target, *owner)
    if owner is not None:
        os.chown(certdir, *owner)


def certdir_setting(run: RunDir) -> str:
    """mongrel2's ``certdir``: it appends the file name to it, so it ends in ``/``."""
    return str(run.certdir) + "/"


def remove(run: RunDir) -> None:
    """Remove the copies :func:`install` made (a run dir that outlives the stack)."""
    shutil.rmtree(Path(run.certdir), ignore_errors=True)
