"""Facts of mongrel2's handler wire that circus-wsgi relies on, checked on the real mongrel2.

A scripted handler (PULL + XPUB on mongrel2's sockets) and a raw client socket;
no worker, no dispatcher.
"""

from __future__ import annotations

import socket

import pytest
import zmq

from circus_wsgi.protocol import Kind, keep_alive, parse, response
from harness import Stack

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def handler():
    """mongrel2 alone, and a handler's two sockets attached to it."""
    with Stack(workers=0, mode="direct") as stack:
        context = zmq.Context()
        requests = context.socket(zmq.PULL)
        requests.connect(stack.run.mongrel2_send)
        responses = context.socket(zmq.XPUB)
        responses.connect(stack.run.mongrel2_recv)
        assert responses.poll(10000), "mongrel2 never subscribed"
        responses.recv()
        try:
            yield stack, requests, responses
        finally:
            context.destroy(linger=0)


def receive(requests: zmq.Socket, timeout_ms: int = 5000):
    assert requests.poll(timeout_ms), "nothing from mongrel2"
    return parse(requests.recv())


def test_a_keep_alive_probe_writes_nothing_and_answers_a_disconnect_once_gone(handler):
    stack, requests, responses = handler
    client = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        request = receive(requests)
        responses.send(keep_alive(request.sender, request.conn_id))
        client.settimeout(0.5)
        with pytest.raises(socket.timeout):
            client.recv(100)  # the probe wrote nothing to the client
        assert not requests.poll(200), "no notice for a live connection"
        responses.send(response(request.sender, request.conn_id,
                                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        client.settimeout(5)
        assert client.recv(100).endswith(b"\r\n\r\nok")  # and the connection still serves
    finally:
        client.close()
    assert receive(requests).kind is Kind.DISCONNECT
    responses.send(keep_alive(request.sender, request.conn_id))
    notice = receive(requests)
    assert (notice.kind, notice.conn_id) == (Kind.DISCONNECT, request.conn_id)
