"""The dispatcher's per-connection windows (circus_wsgi.flowcontrol), without sockets."""

from __future__ import annotations

import pytest

from circus_wsgi import flowcontrol
from circus_wsgi.flowcontrol import BUDGET, Windows
from circus_wsgi.protocol import WINDOW, close, keep_alive, response

SENDER = b"sender"


def piece(conn: bytes, size: int, fill: bytes = b"x") -> bytes:
    return response(SENDER, conn, fill * size)


@pytest.fixture
def windows():
    sent: list[bytes] = []
    return Windows(sent.append), sent


def test_what_fits_the_window_goes_and_the_rest_waits_for_credits_in_order(windows):
    windows, sent = windows
    windows.opened(b"1", WINDOW)
    messages = [piece(b"1", 40000, fill) for fill in (b"a", b"b", b"c")] + [close(SENDER, b"1")]
    windows.forward(messages)
    assert sent == messages[:2]  # 80000 of 102400; the third would pass the window
    assert windows.budget(b"1") == BUDGET - 120000
    windows.credited(b"1", 10000)
    assert len(sent) == 2, "not enough credit yet"
    windows.credited(b"1", 30000)
    assert sent == messages, "the third and then the close, in order"
    assert b"1" not in windows.left and windows.held_total == 0, "closed: forgotten"


def test_a_connection_never_announced_here_has_its_whole_window(windows):
    """Its first request came to the dispatcher before a restart: nothing of its
    response is queued in mongrel2, so nothing would credit a response held back."""
    windows, sent = windows
    first, second = piece(b"7", 90000, b"a"), piece(b"7", 90000, b"b")
    windows.forward([first, second])
    assert sent == [first], "what fits a whole window goes"
    windows.credited(b"7", 90000)
    assert sent == [first, second], "the rest once credited, as on a connection seen"


def test_a_message_read_as_a_view_is_sent_as_is_but_held_as_its_own_bytes(windows):
    """A view keeps alive everything read with it (other connections' responses too):
    what waits for a slow client holds only its own bytes."""
    windows, sent = windows
    windows.opened(b"1", WINDOW)
    read = bytearray(piece(b"1", 90000) + piece(b"1", 90000))  # one read, two messages
    first, second = memoryview(read)[:len(read) // 2], memoryview(read)[len(read) // 2:]
    windows.forward([first, second])
    assert sent == [first] and sent[0] is first, "what goes at once is not copied"
    windows.credited(b"1", 90000)
    assert type(sent[1]) is bytes and sent[1] == second


def test_other_connections_are_not_held_up(windows):
    windows, sent = windows
    windows.opened(b"1", WINDOW)
    windows.opened(b"2", WINDOW)
    windows.forward([piece(b"1", 90000), piece(b"1", 90000)])
    windows.forward([piece(b"2", 500)])
    assert [m.split(b" ", 2)[1] for m in sent] == [b"1:1,", b"1:2,"]


def test_a_later_response_on_a_connection_queues_behind_what_is_held(windows):
    windows, sent = windows
    windows.opened(b"1", 1000)
    windows.forward([piece(b"1", 800), piece(b"1", 800)])
    windows.forward([piece(b"1", 10)])  # fits the window left, but must not overtake
    assert len(sent) == 1
    windows.credited(b"1", 800)
    assert len(sent) == 3


def test_control_messages_write_nothing_and_keep_their_place(windows):
    windows, sent = windows
    windows.opened(b"1", 100)
    windows.forward([keep_alive(SENDER, b"1")])
    assert windows.left[b"1"] == 100 and len(sent) == 1
    windows.forward([piece(b"1", 200), keep_alive(SENDER, b"1")])
    assert len(sent) == 1
    windows.credited(b"1", 100)
    assert len(sent) == 3


def test_budget_is_the_window_left_plus_the_spare_less_what_is_held(windows):
    windows, _ = windows
    assert windows.budget(b"9") == BUDGET  # never seen: its whole window
    windows.opened(b"1", WINDOW)
    assert windows.budget(b"1") == BUDGET
    windows.forward([piece(b"1", 60000)])
    assert windows.budget(b"1") == BUDGET - 60000


def test_past_the_total_held_limit_budgets_shrink_to_the_window(windows, monkeypatch):
    windows, _ = windows
    monkeypatch.setattr(flowcontrol, "HELD_MAX", 50000)
    windows.opened(b"1", WINDOW)
    windows.opened(b"2", WINDOW)
    windows.forward([piece(b"1", 90000), piece(b"1", 90000)])
    assert windows.held_total == 90000
    assert windows.budget(b"2") == WINDOW


def test_forget_and_abandon_drop_what_is_held(windows):
    windows, sent = windows
    windows.opened(b"1", 100)
    windows.opened(b"2", 100)
    windows.forward([piece(b"1", 200), piece(b"2", 300)])
    windows.forget(b"1")
    assert windows.held_total == 300
    assert windows.abandon() == [close(SENDER, b"2")]
    assert windows.held_total == 0 and not windows.held and sent == []


def test_a_connection_held_back_without_credits_is_probed(windows, monkeypatch):
    windows, sent = windows
    clock = [100.0]
    monkeypatch.setattr(flowcontrol.time, "monotonic", lambda: clock[0])
    windows.opened(b"1", 100)
    windows.forward([piece(b"1", 200)])
    windows.probe(clock[0] + 0.5)
    assert sent == []
    clock[0] += 2
    windows.probe(clock[0])
    assert sent == [keep_alive(SENDER, b"1")]  # mongrel2 answers a disconnect if it is gone
    windows.probe(clock[0] + 0.5)
    assert len(sent) == 1, "once per PROBE_AFTER"
    windows.credited(b"1", 100)
    assert sent[-1] == piece(b"1", 200) and not windows.quiet_since
