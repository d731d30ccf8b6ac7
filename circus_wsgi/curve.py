"""CURVE keys for the link between a front and its worker hosts (ZeroMQ's, zmq.auth's files).

A key directory holds this host's key pair, as zmq.auth writes them
(``NAME.key``, the public one, and ``NAME.key_secret``, mode 0600), and, in
``authorized/``, the public keys of the peers it trusts: on the front, its worker
hosts'; on a worker host, its front's. ``circus-wsgi keys DIR --name NAME``
writes a pair (:func:`write_pair`); copying a public ``.key`` file into a peer's
``authorized/`` trusts it. The front checks every connecting worker's key
against ``authorized/`` as it is at that moment (:class:`Authorized`), so a key
added or removed takes effect without a restart.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger("circus_wsgi.curve")


class CurveKeysError(ValueError):
    """A key directory that cannot be used; the message says what to do."""


def write_pair(directory: str | os.PathLike[str], name: str = "") -> tuple[Path, Path]:
    """Write a key pair named ``name`` (default: this host's name) into ``directory``,
    and create ``authorized/`` beside it; the public and secret files' paths."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "authorized").mkdir(mode=0o700, exist_ok=True)
    name = name or socket.gethostname()
    if (directory / f"{name}.key_secret").exists():
        raise CurveKeysError(f"{directory / name}.key_secret exists already: remove it to "
                             "replace it")
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def own_pair(directory: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """This host's (public, secret) key: the one ``*.key_secret`` file in ``directory``."""
    secrets = sorted(Path(directory).glob("*.key_secret"))
    if len(secrets) != 1:
        raise CurveKeysError(f"{directory} must hold exactly one *.key_secret (this host's "
                             f"key: circus-wsgi keys {directory}); it holds {len(secrets)}")
    public, secret = zmq.auth.load_certificate(secrets[0])
    if secret is None:
        raise CurveKeysError(f"{secrets[0]} holds no secret key")
    return public, secret


def trusted(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """The public keys in ``directory/authorized``, each with its file's name."""
    keys = {}
    for path in sorted(Path(directory, "authorized").glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as error:
            log.warning("%s is not a public key file (%s): ignored", path, error)
            continue
        keys[public] = path.stem
    return keys


def the_front(directory: str | os.PathLike[str]) -> bytes:
    """The front's public key, for a worker host: the one key in ``authorized/``."""
    keys = trusted(directory)
    if len(keys) != 1:
        raise CurveKeysError(f"{Path(directory, 'authorized')} must hold exactly one .key "
                             f"(the front's public key); it holds {len(keys)}")
    return next(iter(keys))


class Authorized:
    """zmq.auth's credentials provider: a key is let in if ``authorized/`` holds it now.
    Refusals are logged, with the key, once per key."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.refused: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator's thread for each connecting peer (z85 ``key``)."""
        if key in trusted(self.directory):
            self.refused.discard(key)
            return True
        if key not in self.refused:
            self.refused.add(key)
            log.warning("refused a worker host whose key %s is not in %s",
                        key.decode("ascii", "replace"), self.directory / "authorized")
        return False


def serve_curve(sock: zmq.Socket, directory: str | os.PathLike[str]) -> None:
    """Make ``sock`` a CURVE server with this host's key (before it binds)."""
    public, secret = own_pair(directory)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def connect_curve(sock: zmq.Socket, directory: str | os.PathLike[str]) -> None:
    """Make ``sock`` a CURVE client of the front (before it connects)."""
    public, secret = own_pair(directory)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = the_front(directory)
