"""circus_wsgi.framing: messages survive any split into reads, a full socket, a lost peer."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings, strategies as st

from circus_wsgi import framing
from framed_peer import receive_in_pieces

messages = st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=6), max_size=8)


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    ends = framing.FramedStream(left), framing.FramedStream(right)
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


def test_what_the_kernel_does_not_take_waits_in_order_until_flush(pair):
    writer, reader = pair
    big = b"x" * (4 << 20)  # more than a Unix socket buffers
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
    big = b"z" * (4 << 20)
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
    big = b"y" * (4 << 20)
    writer.send([b"one", big])
    writer.send([b"two"])
    unsent = writer.unsent()  # the peer did not get all of "one": it is sent again whole
    assert len(unsent) == 2 and not writer.backlogged
    left, right = socket.socketpair()
    again, other = framing.FramedStream(left), framing.FramedStream(right)
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
        server = framing.accept(listener)
        client.send([b"hi"])
        assert receive_all(server, 1) == [[b"hi"]]
        client.close()
        server.close()
    finally:
        listener.close()
