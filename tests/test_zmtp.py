"""circus_wsgi.zmtp: messages to and from real libzmq sockets (pyzmq), split any way,
and what a peer that does not speak ZMTP 3 gets."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from circus_wsgi import framing, zmtp
from framed_peer import receive_in_pieces

messages = st.lists(st.lists(st.binary(max_size=600), min_size=1, max_size=4), max_size=8)


def receive(stream: framing.FramedStream, count: int, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        select.select([stream.sock], [], [], 0.1)
        got += stream.receive()
    return got


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/socket"


def test_a_libzmq_push_reaches_our_pull_short_long_and_multipart(context, endpoint):
    push = context.socket(zmq.PUSH)
    push.bind(endpoint)
    pull = zmtp.connect(endpoint, "PULL")
    try:
        sent = [[b"hello"], [b"x" * 255], [b"y" * 256], [b"z" * (1 << 20)], [b"a", b"b" * 300],
                [b""]]
        for frames in sent:
            push.send_multipart(frames)
        assert receive(pull, len(sent)) == sent
    finally:
        pull.close()


def test_our_first_messages_right_after_connecting_are_taken(context, endpoint):
    """libzmq drops a connection whose first message arrives before it has sent its
    own READY (it takes it for a second handshake command): connect() waits for it."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(endpoint)
    for number in range(30):
        pub = zmtp.connect(endpoint, "PUB")
        try:
            pub.send([b"message %d" % number])
            assert sub.poll(5000)
            assert sub.recv_multipart() == [b"message %d" % number]
        finally:
            pub.close()


def test_our_pub_reaches_a_libzmq_sub_which_keeps_what_it_subscribed_to(context, endpoint):
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"UUID ")
    sub.bind(endpoint)
    pub = zmtp.connect(endpoint, "PUB")
    try:
        big = b"UUID 1:2, " + b"y" * (1 << 20)
        pub.send([b"UUID 1:1, at once"])  # before the handshake is even read: not lost
        pub.send([b"OTHER 1:1, filtered"])
        pub.send([big, b"UUID 1:3, second part"])
        got = []  # what the socket did not take waits for flush()
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            pub.flush()
            if sub.poll(10):
                got.append(sub.recv_multipart())
        assert got == [[b"UUID 1:1, at once"], [big, b"UUID 1:3, second part"]]
        assert not pub.backlogged and not sub.poll(200)
        # libzmq sends a 3.0 peer its subscription as a message (first byte 1)
        assert receive(pub, 1) == [[b"\x01UUID "]]
    finally:
        pub.close()


@settings(max_examples=100, deadline=None)
@given(messages, st.lists(st.integers(min_value=1, max_value=70), min_size=1))
def test_messages_come_out_whole_however_the_bytes_are_split(sent, cuts):
    layout = zmtp.ZmtpLayout()
    ping = bytes([4, 5]) + b"\x04PING"  # a command among the messages: taken, not returned
    wire = ping + b"".join(b"".join(layout.encode(frames)) for frames in sent)
    got = receive_in_pieces(wire, cuts, zmtp.ZmtpLayout())
    assert got == sent
    assert all(type(frame) is bytes for frames in got for frame in frames)


def handshake_with(peer_bytes: bytes, timeout: float = 1.0) -> None:
    """Our handshake against a peer that answers ``peer_bytes`` and closes."""
    left, right = socket.socketpair()
    try:
        left.sendall(peer_bytes)
        left.shutdown(socket.SHUT_WR)
        zmtp.handshake(right, "PUB", timeout)
    finally:
        left.close()
        right.close()


READY = zmtp.ready_command("SUB")


@pytest.mark.parametrize("answer, reason", [
    (b"GET / HTTP/1.1\r\n" * 4, "bad signature"),
    (zmtp.greeting()[:10] + b"\x02\x00" + zmtp.greeting()[12:], "ZMTP 2.0"),
    (zmtp.greeting()[:12] + b"CURVE".ljust(20, b"\x00") + zmtp.greeting()[32:], "'CURVE'"),
    (zmtp.greeting() + bytes([4, 12]) + b"\x05ERROR\x05nope!", "'nope!'"),
    (zmtp.greeting() + b"\x00\x05hello", "did not answer with READY"),
    (zmtp.greeting()[:30], "closed the connection during the handshake"),
])
def test_a_peer_that_does_not_answer_a_zmtp_3_null_handshake_is_refused(answer, reason):
    with pytest.raises(ValueError, match=reason):
        handshake_with(answer)


def test_the_handshake_with_a_zmtp_peer_succeeds_and_a_silent_one_times_out():
    handshake_with(zmtp.greeting() + READY)
    left, right = socket.socketpair()
    try:
        with pytest.raises(TimeoutError):
            zmtp.handshake(right, "PUB", timeout=0.2)
    finally:
        left.close()
        right.close()


def stream_fed(data: bytes) -> framing.FramedStream:
    left, right = socket.socketpair()
    left.sendall(data)
    left.close()
    return framing.FramedStream(right, zmtp.ZmtpLayout())


def test_an_error_command_after_the_handshake_gives_its_reason():
    body = b"\x05ERROR\x0bbad account"
    stream = stream_fed(bytes([4, len(body)]) + body)
    try:
        with pytest.raises(ValueError, match="bad account"):
            stream.receive()
        assert stream.closed
    finally:
        stream.close()


def test_a_frame_of_absurd_size_is_a_corrupt_stream():
    stream = stream_fed(b"\x02" + (1 << 40).to_bytes(8, "big") + b"x")
    try:
        with pytest.raises(ValueError, match="a frame of"):
            stream.receive()
    finally:
        stream.close()


def test_connect_gives_none_while_nothing_listens_and_refuses_other_endpoints(tmp_path):
    assert zmtp.connect(f"ipc://{tmp_path}/nobody", "PULL") is None
    with socket.socket() as taken:  # a port with no listener: refused
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    assert zmtp.connect(f"tcp://127.0.0.1:{port}", "PULL") is None
    with pytest.raises(ValueError, match="endpoint"):
        zmtp.connect("inproc://x", "PULL")


def test_tcp_endpoints_work_too(context):
    push = context.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    pull = zmtp.connect(f"tcp://127.0.0.1:{port}", "PULL")
    try:
        push.send(b"over tcp")
        assert receive(pull, 1) == [[b"over tcp"]]
    finally:
        pull.close()
