"""A response waiting for credits (worker.Outbox), on a fake clock: no sockets, no waiting."""

from __future__ import annotations

import pytest

from circus_wsgi import protocol, worker
from circus_wsgi.protocol import Kind, Message
from circus_wsgi.wsgi import ClientGone, Pacer

SENDER, CONN = b"sender", b"7"


def credits(amount: int) -> Message:
    return Message(SENDER, CONN, b"@*", {b"METHOD": b"JSON",
                                         b"DOWNLOAD_CREDITS": b"%d" % amount}, b"", Kind.CREDITS)


class Client:
    """Takes what the outbox sends; grants ``grant`` bytes every ``every`` seconds (never,
    if None) while the outbox waits, on a clock of its own."""

    def __init__(self, monkeypatch, grant: int, every: float | None) -> None:
        self.now, self.grant, self.every = 1000.0, grant, every
        self.next_grant = self.now + every if every else None
        self.sent: list[bytes] = []
        monkeypatch.setattr(worker.time, "monotonic", lambda: self.now)

    def deliver(self, outbox: worker.Outbox, messages: list[bytes], done: bool) -> None:
        self.sent += messages

    def wait(self, outbox: worker.Outbox, seconds: float) -> None:
        until = self.now + max(seconds, 0.0)
        if self.next_grant is not None and self.next_grant <= until:
            self.now = self.next_grant
            self.next_grant += self.every
            outbox.notice(credits(self.grant))
        else:
            self.now = until

    def outbox(self, budget: int) -> worker.Outbox:
        request = Message(SENDER, CONN, b"/", {b"METHOD": b"GET"}, b"", Kind.REQUEST)
        return worker.Outbox(request, 1, Pacer(1 << 20, budget), self.deliver, self.wait, False)


@pytest.fixture(autouse=True)
def short_limits(monkeypatch):
    monkeypatch.setattr(worker, "STALLED", 10.0)
    monkeypatch.setattr(worker, "PROBE_AFTER", 1.0)


def test_a_slow_but_steady_client_is_never_cut(monkeypatch):
    """Each grant is sent at once, so the credit keeps coming back to 0: the stall limit
    counts the silence since the last grant, not the time since the first wait."""
    client = Client(monkeypatch, grant=30000, every=3.0)  # slower than PROBE_AFTER
    outbox = client.outbox(budget=30000)
    started = client.now
    for _ in range(30):
        outbox.write(b"x" * 30000)
    outbox.finish(b"", False)
    assert client.now - started > 5 * worker.STALLED, "longer than the stall limit"
    assert protocol.close(SENDER, CONN) not in client.sent
    written = sum(len(m) - len(protocol.response(SENDER, CONN, b"")) for m in client.sent
                  if m.startswith(protocol.response(SENDER, CONN, b"")))
    assert written == 30 * 30000


def test_a_silent_client_is_probed_every_second_then_closed(monkeypatch):
    client = Client(monkeypatch, grant=0, every=None)
    outbox = client.outbox(budget=1000)
    started = client.now
    with pytest.raises(ClientGone):
        outbox.write(b"x" * (300 * 1024))  # more than a piece held: the writer waits
    probes = client.sent.count(protocol.keep_alive(SENDER, CONN))
    assert 8 <= probes <= 10
    assert client.sent[-1] == protocol.close(SENDER, CONN)
    assert worker.STALLED <= client.now - started < worker.STALLED + 1
