"""circus_wsgi.framing: messages survive any split into reads, a full socket, a lost peer."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings, strategies as st

from circus_wsgi import framing
from circus_wsgi.framing import LengthPrefixed as LP
from framed_peer import receive_in_pieces

messages = st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=6), max_size=8)


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    ends = framing.FramedStream(left, LP()), framing.FramedStream(right, LP())
    yield ends
    for end in ends:
        end.close()


def receive_all(stream: framing.FramedStream, count: int) -> list[list[bytes]]:
    got: list[list[bytes]] = []
    while len(got) < count:
        got += stream.receive()
    return got


@settings(max_examples=200, deadline=None)
@given(messages, st.lists(st.integers(min_value=1, max_value=50), min_size=1))
def test_messages_come_out_whole_however_the_bytes_are_split(sent, cuts):
    wire = b"".join(framing.encode_message(frames) for frames in sent)
    got = receive_in_pieces(wire, cuts)  # the reader sees the bytes in pieces of these sizes
    assert got == sent
    assert all(type(frame) is bytes for frames in got for frame in frames)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=5),
                min_size=1, max_size=5), st.lists(st.integers(min_value=1, max_value=4000),
                                                  min_size=1))
def test_large_frames_can_be_read_as_views_instead_of_copies(sizes, cuts):
    sent = [[bytes([n % 256]) * size for n, size in enumerate(message)] for message in sizes]
    wire = b"".join(framing.encode_message(frames) for frames in sent)
    got = receive_in_pieces(wire, cuts, framing.LengthPrefixed(view_from=1000))
    assert [[bytes(frame) for frame in frames] for frames in got] == sent
    assert all((type(frame) is memoryview) == (len(frame) >= 1000)
               for frames in got for frame in frames)


def test_what_the_kernel_does_not_take_waits_in_order_until_flush(pair):
    writer, reader = pair
    big = b"x" * (4 * framing.SEND_BUFFER)  # more than the kernel buffers
    writer.send([b"first", big])
    writer.send([b"second"])
    assert writer.backlogged
    got: list[list[bytes]] = []
    while len(got) < 2:
        writer.flush()
        got += reader.receive()
    assert got == [[b"first", big], [b"second"]] and not writer.backlogged


def test_each_send_also_writes_what_waits(pair):
    """A sender that always has more to send may never call flush()."""
    writer, reader = pair
    big = b"z" * (4 * framing.SEND_BUFFER)
    writer.send([big])
    assert writer.backlogged
    got: list[list[bytes]] = []
    for sent in range(10_000):
        got += reader.receive()
        if got:
            break
        writer.send([b"more %d" % sent])
    assert got and got[0] == [big]


def test_the_end_of_the_stream_closes_it_and_sending_then_fails(pair):
    writer, reader = pair
    writer.send([b"last"])
    writer.close()
    assert receive_all(reader, 1) == [[b"last"]]
    assert reader.receive() == [] and reader.closed
    with pytest.raises(ConnectionError):
        reader.send([b"anyone?"])


def test_messages_not_written_whole_can_go_to_another_connection(pair):
    writer, reader = pair
    big = b"y" * (4 * framing.SEND_BUFFER)
    writer.send([b"one", big])
    writer.send([b"two"])
    unsent = writer.unsent()  # the peer did not get all of "one": it is sent again whole
    assert len(unsent) == 2 and not writer.backlogged
    left, right = socket.socketpair()
    again, other = framing.FramedStream(left, LP()), framing.FramedStream(right, LP())
    try:
        again.resend(unsent)
        got: list[list[bytes]] = []
        while len(got) < 2:
            again.flush()
            got += other.receive()
        assert got == [[b"one", big], [b"two"]]
    finally:
        again.close()
        other.close()


def small_buffer_pair() -> tuple[framing.FramedStream, framing.FramedStream]:
    """A connection whose writer's kernel buffer holds a few KB: writes stop part-way
    through messages and through their buffers."""
    writer, reader = (framing.FramedStream(end, LP()) for end in socket.socketpair())
    writer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return writer, reader


def test_a_connection_asks_the_kernel_for_a_large_send_buffer(pair):
    with open("/proc/sys/net/core/wmem_max") as limit:
        allowed = min(framing.SEND_BUFFER, int(limit.read()))
    assert pair[0].sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= allowed


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=5000), min_size=1, max_size=30), min_size=1,
                max_size=10), st.integers(min_value=0, max_value=10), st.booleans())
def test_partial_writes_deliver_each_message_whole_and_once_across_a_new_connection(
        sent, switch_at, read_between):
    """Messages sent while the reader lags, the connection replaced after ``switch_at``
    of them: the first reader gets whole messages, the new connection the rest."""
    writer, reader = small_buffer_pair()
    received: list[list[bytes]] = []
    try:
        for number, frames in enumerate(sent):
            if number == switch_at:
                unsent = writer.unsent()
                writer.close()
                while not reader.closed:  # the end of a message cut off is dropped
                    received += reader.receive()
                reader.close()
                writer, reader = small_buffer_pair()
                writer.resend(unsent)
            writer.send(frames)
            if read_between:
                received += reader.receive()
        for _ in range(100_000):  # bounded: a lost byte must fail the test, not hang it
            if len(received) >= len(sent):
                break
            writer.flush()
            received += reader.receive()
        assert received == sent and not writer.backlogged
    finally:
        writer.close()
        reader.close()


def test_a_message_of_more_frames_than_one_system_call_takes(pair):
    writer, reader = pair
    frames = [b"%d" % number for number in range(3 * framing.MAX_BUFFERS)]
    writer.send(frames)
    writer.send([b"after"])
    assert receive_all(reader, 2) == [frames, [b"after"]]


@pytest.mark.parametrize("wire", [
    b"\x00\x00\x00\x08\x00\x00\x00\x05" + b"\x00" * 4,  # five frame lengths in 8 bytes
    b"\x00\x00\x00\x09\x00\x00\x00\x01\x00\x00\x00\x03ab",  # lengths add up to more
    b"\x00\x00\x00\x02\x00\x00",  # a size with no room for the frame count
])
def test_bytes_that_are_not_framed_messages_are_an_error(pair, wire):
    writer, reader = pair
    writer.sock.sendall(wire)
    with pytest.raises(ValueError):
        reader.receive()
    assert reader.closed


def test_connect_returns_none_while_nobody_listens(tmp_path):
    path = str(tmp_path / "d.sock")
    assert framing.connect(path) is None
    listener = framing.listen(path)
    try:
        client = framing.connect(path)
        server = framing.accept(listener, LP())
        client.send([b"hi"])
        assert receive_all(server, 1) == [[b"hi"]]
        client.close()
        server.close()
    finally:
        listener.close()
