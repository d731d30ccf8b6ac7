"""Workers on other hosts: both ends of their link to the front's dispatcher.

The front's dispatcher binds a ZeroMQ ROUTER at :setting:`remote_workers`
(:class:`RemoteWorkers`); a worker host's workers each connect a DEALER to it
(:class:`RemoteLink`, given :setting:`connect`). Both speak the worker protocol
(:mod:`circus_wsgi.dispatch_protocol`) as multipart messages, encrypted and
authenticated with CURVE (:mod:`circus_wsgi.curve`; plain TCP only with
:setting:`insecure_remote_workers`). Unlike the Unix socket of a worker on the
front, a TCP link can go quiet without ending, so both ends send a heartbeat
every :data:`~circus_wsgi.dispatch_protocol.HEARTBEAT_INTERVAL`:

- the dispatcher drops a worker it has heard nothing from for
  :setting:`remote_timeout` (what it had begun: 502; the rest: to others);
- a worker that has heard nothing from the dispatcher for :setting:`remote_timeout`
  gives up its link: it drops the requests it had not begun (the dispatcher
  gives them to others), opens a new connection (a new identity) and announces
  itself again.

A remote worker has no board the dispatcher can read, so it asks to begin each
request (TAKE) and waits for GO: the dispatcher counts a request as begun from
the moment it says GO, so none runs twice (a GO that comes late is for a request
already answered, whose response goes nowhere). A worker's heartbeat carries the
last TAKE-to-GO round trip it measured, which the dispatcher's prefetch allows
for.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, cast

import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import dispatch_protocol as dp
from .curve import Authorized, connect_curve, serve_curve
from .settings import Settings

log = logging.getLogger("circus_wsgi.remote")

#: ZeroMQ's reconnection interval for a worker's link, in milliseconds.
RECONNECT_IVL = 100
#: Messages queued for one peer before ZeroMQ refuses more (the dispatcher then drops it).
HWM = 10000


class RemoteWorkers:
    """The front's ROUTER: every remote worker's messages in, the dispatcher's out."""

    def __init__(self, settings: Settings, context: zmq.Context) -> None:
        self.timeout = settings.remote_timeout
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone peer is an error
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, HWM)
        self.socket.setsockopt(zmq.RCVHWM, HWM)
        self.authenticator: Optional[ThreadAuthenticator] = None
        if settings.curve_keys:
            self.authenticator = ThreadAuthenticator(context, log=log)
            self.authenticator.start()
            self.authenticator.configure_curve_callback(
                domain="*", credentials_provider=Authorized(settings.curve_keys))
            serve_curve(self.socket, settings.curve_keys)
        self.socket.bind(settings.remote_workers)
        self.heard: dict[bytes, float] = {}  # routing id -> when it was last heard
        self.hosts: dict[bytes, str] = {}  # routing id -> its address

    def fileno(self) -> int:
        """A descriptor that turns readable when the socket's state may have changed."""
        return cast(int, self.socket.getsockopt(zmq.FD))

    def receive(self, now: float) -> list[tuple[bytes, list[bytes]]]:
        """Every (routing id, frames) waiting (this also resets the descriptor)."""
        taken: list[tuple[bytes, list[bytes]]] = []
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return taken
            peer = parts[0].bytes
            if peer not in self.hosts:
                self.hosts[peer] = _address(parts[-1])
            self.heard[peer] = now
            taken.append((peer, [part.bytes for part in parts[1:]]))

    def send(self, peer: bytes, frames: tuple[bytes, ...] | list[bytes]) -> None:
        """Send to one worker; ConnectionError if it is not connected."""
        try:
            self.socket.send_multipart([peer, *frames], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as error:
            raise ConnectionError(str(error)) from None

    def silent(self, now: float) -> list[bytes]:
        """The peers heard from before, and nothing for :setting:`remote_timeout` since."""
        return [peer for peer, heard in self.heard.items() if now - heard > self.timeout]

    def forget(self, peer: bytes) -> None:
        self.heard.pop(peer, None)
        self.hosts.pop(peer, None)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()


def _address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, AttributeError):
        return "remote"


def round_trip(frames: list[bytes]) -> float | None:
    """The TAKE-to-GO round trip a remote worker's HEARTBEAT reports, in seconds."""
    try:
        return max(0.0, float(frames[1]))
    except (IndexError, ValueError):
        return None


class RemoteLink(dp.WorkerMessages):
    """A remote worker's link to the front: a DEALER, CURVE unless told otherwise.

    The worker protocol as with :class:`circus_wsgi.worker.DispatcherLink`, plus:
    heartbeats, leave to begin (:meth:`take`, GO), and a new connection after
    :setting:`remote_timeout` of silence. What is sent while the link is down waits
    in ZeroMQ for it to come back.
    """

    direct = False
    backlogged = False  # ZeroMQ queues what waits
    connected = True  # (giving back is always right: see the module's docstring)
    grants = True  # a request may begin only once the dispatcher says GO

    def __init__(self, settings: Settings, context: zmq.Context) -> None:
        super().__init__()
        self.settings, self.context = settings, context
        self.timeout = settings.remote_timeout
        self.socket: Optional[zmq.Socket] = None
        self.heard = self.beat_at = 0.0
        self.asked_at = 0.0  # when the last TAKE went
        self.round_trip = 0.0  # seconds from the last TAKE to its GO
        self.renewed: Callable[[], None] = lambda: None  # the worker's, on a new link

    @property
    def pollable(self) -> Optional[zmq.Socket]:
        return self.socket

    def start(self, stopped: Callable[[], bool]) -> bool:
        self._open()
        return True

    def _open(self) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        if self.settings.curve_keys:
            connect_curve(sock, self.settings.curve_keys)
        sock.connect(self.settings.connect)
        self.socket, self.heard = sock, time.monotonic()

    def reconnect(self, ready: Optional[tuple[bytes, ...]]) -> None:
        """After :setting:`remote_timeout` without a word from the dispatcher: a new
        connection, announced with ``ready`` (None: the worker is stopping)."""
        now = time.monotonic()
        if self.socket is not None and now - self.heard <= self.timeout:
            return
        if self.socket is not None:
            log.warning("worker %d heard nothing from the front for %.1f s: connecting "
                        "again", os.getpid(), now - self.heard)
            self.socket.close(linger=0)
            self.socket = None
            self.drop_output()
            self.renewed()
        self._open()
        if ready is not None:
            self._send(ready)

    def receive(self) -> list[list[bytes]]:
        """What the dispatcher sent."""
        if self.socket is None:
            return []
        taken = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.heard = time.monotonic()
            if frames[0] == dp.GO:
                self.round_trip = self.heard - self.asked_at
            taken.append(frames)
        return taken

    def beat(self) -> None:
        """A heartbeat, at most every HEARTBEAT_INTERVAL, with the last round trip."""
        now = time.monotonic()
        if now >= self.beat_at:
            self.beat_at = now + dp.HEARTBEAT_INTERVAL
            self._send((dp.HEARTBEAT, b"%.6f" % self.round_trip))

    def take(self, indexes: list[int]) -> None:
        self.asked_at = time.monotonic()
        self._send((dp.TAKE, *[b"%d" % i for i in indexes]))

    def flush(self) -> None:
        self.output()

    def _send(self, frames: tuple[bytes, ...]) -> None:
        if self.socket is None:
            return
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected: the dispatcher will not wait for it (heartbeats say)

    def close(self) -> None:
        if self.socket is not None:
            self._send((dp.BYE,))  # sent within the socket's linger
            self.socket.close()
            self.socket = None
