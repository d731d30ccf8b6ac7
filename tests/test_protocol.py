"""The mongrel2 wire format (circus_wsgi.protocol), on messages as mongrel2 1.12.2 sends them."""

from __future__ import annotations

import pytest
import tnetstring
from hypothesis import given, settings, strategies as st

from circus_wsgi import protocol
from circus_wsgi.protocol import Kind, ProtocolError

UUID = b"7daf8664-cd82-5753-9188-7a6d4a715840"

# Recorded from mongrel2 1.12.2 (tnetstring protocol).
GET = (UUID + b" 1 /a%20b/%C3%A9 303:11:REMOTE_ADDR,9:127.0.0.1,6:METHOD,3:GET,10:URL_SCHEME,"
       b"4:http,7:PATTERN,1:/,5:QUERY,9:x=1&y=%20,3:URI,23:/a%20b/%C3%A9?x=1&y=%20,7:VERSION,"
       b"8:HTTP/1.1,4:PATH,13:/a%20b/%C3%A9,6:cookie,12:3:a=1,3:b=2,]4:host,15:localhost:23456,"
       b"3:x-a,8:1:1,1:2,]16:DOWNLOAD_CREDITS,6:102400,15:x-forwarded-for,9:127.0.0.1,}0:,")
CREDITS = UUID + b' 1 @* 44:16:DOWNLOAD_CREDITS,5:60000,6:METHOD,4:JSON,}18:{"type":"credits"},'
DISCONNECT = UUID + b' 2 @* 16:6:METHOD,4:JSON,}21:{"type":"disconnect"},'
_UPLOAD_HEADERS = (b"11:REMOTE_ADDR,9:127.0.0.1,6:METHOD,4:POST,4:PATH,3:/up,"
                   b"23:x-mongrel2-upload-start,12:/up/upload.1,")
UPLOAD_START = UUID + b" 2 /up %d:%s}0:," % (len(_UPLOAD_HEADERS), _UPLOAD_HEADERS)
_DONE_HEADERS = _UPLOAD_HEADERS + b"22:x-mongrel2-upload-done,12:/up/upload.1,"
UPLOAD_DONE = UUID + b" 2 /up %d:%s}0:," % (len(_DONE_HEADERS), _DONE_HEADERS)
# protocol='json', with a raw latin-1 byte in a header value as mongrel2 writes it.
_JSON_HEADERS = (b'{"PATH":"/api","x-l":"caf\xe9","METHOD":"GET","VERSION":"HTTP/1.0",'
                 b'"URI":"/api","PATTERN":"/api","x":["1","2"]}')
JSON_GET = UUID + b" 5 /api %d:%s,3:abc," % (len(_JSON_HEADERS), _JSON_HEADERS)
JSON_DISCONNECT = UUID + b' 1 @* 17:{"METHOD":"JSON"},21:{"type":"disconnect"},'


def test_request_fields():
    message = protocol.parse(GET)
    assert (message.sender, message.conn_id, message.path) == (UUID, b"1", b"/a%20b/%C3%A9")
    assert message.kind is Kind.REQUEST
    assert message.headers[b"METHOD"] == b"GET"
    assert message.headers[b"QUERY"] == b"x=1&y=%20"
    assert message.header(b"x-a") == b"1, 2"
    assert message.header(b"missing") is None
    assert message.body == b""
    assert message.credits == 102400


def test_control_notices():
    credits = protocol.parse(CREDITS)
    assert credits.kind is Kind.CREDITS and credits.credits == 60000
    assert credits.conn_id == b"1"
    assert protocol.parse(DISCONNECT).kind is Kind.DISCONNECT
    assert protocol.parse(JSON_DISCONNECT, "json").kind is Kind.DISCONNECT


def test_client_json_method_is_a_request():
    headers = b"6:METHOD,4:JSON,4:PATH,2:/x,"
    raw = UUID + b" 3 /x %d:%s}7:notjson," % (len(headers), headers)
    assert protocol.parse(raw).kind is Kind.REQUEST


def test_uploads():
    start, done = protocol.parse(UPLOAD_START), protocol.parse(UPLOAD_DONE)
    assert start.kind is Kind.UPLOAD_START and start.upload_path is None
    assert done.kind is Kind.UPLOAD_DONE and done.upload_path == b"/up/upload.1"


def test_upload_file_must_lie_in_the_upload_directory():
    done = protocol.parse(UPLOAD_DONE)
    assert protocol.upload_file(done, "/up") == b"/up/upload.1"
    assert protocol.upload_file(done, b"/up/") == b"/up/upload.1"
    assert protocol.upload_file(done, "/elsewhere") is None
    assert protocol.upload_file(protocol.parse(UPLOAD_START), "/up") is None
    forged = protocol.Message(UUID, b"1", b"/", {
        b"METHOD": b"POST", b"x-mongrel2-upload-start": b"/up/../etc/passwd",
        b"x-mongrel2-upload-done": b"/up/../etc/passwd"}, b"", Kind.UPLOAD_DONE)
    assert protocol.upload_file(forged, "/up") is None


def test_json_protocol_is_detected():
    assert protocol.parse(JSON_GET).headers[b"x-l"] == b"caf\xe9"
    assert protocol.parse(GET).headers[b"METHOD"] == b"GET"


def test_forged_upload_done_beside_a_real_start_is_a_start():
    headers = _UPLOAD_HEADERS + b"22:x-mongrel2-upload-done,11:/etc/passwd,"
    raw = UUID + b" 2 /up %d:%s}0:," % (len(headers), headers)
    message = protocol.parse(raw)
    assert message.kind is Kind.UPLOAD_START and message.upload_path is None


def test_json_protocol_is_byte_safe():
    message = protocol.parse(JSON_GET, "json")
    assert message.headers[b"x-l"] == b"caf\xe9"
    assert message.headers[b"x"] == [b"1", b"2"]
    assert message.body == b"abc"
    assert message.kind is Kind.REQUEST


@pytest.mark.parametrize("raw", [
    b"",
    b"no spaces here",
    UUID + b" x /p 2:{}0:,",  # connection id is not a number
    UUID + b" 1 /p 99:6:METHOD,3:GET,}0:,",  # length past the end
    UUID + b" 1 /p 16:6:METHOD,3:GET,}0:,junk",  # trailing bytes
    UUID + b" 1 /p 16:6:METHOD,3:GET,}3:ab,",  # truncated body
    UUID + b" 1 /p 8:3:GET,]0:,",  # headers are not a dict
    UUID + b" 1 /p 14:4:PATH,2:/p,}0:,",  # no METHOD
    UUID + b" 1 /p 25:6:METHOD,3:GET,1:x,2:12#}0:,",  # a value is not bytes
    UUID + b" 1 /p 16:6:METHOD,3:GET,}0:;",  # body netstring not ended by ','
    UUID + b" 1 /p x:6:METHOD,3:GET,}0:,",
])
def test_malformed_messages_raise_protocol_error(raw):
    with pytest.raises(ProtocolError):
        protocol.parse(raw)


def _deeply_nested_headers() -> bytes:
    value = b"0:~"
    for _ in range(2000):
        value = b"%d:%s]" % (len(value), value)
    return UUID + b" 1 /p %s0:," % value


def test_deeply_nested_headers():
    with pytest.raises(ProtocolError):
        protocol.parse(_deeply_nested_headers())


@pytest.mark.parametrize("raw", [
    UUID + b" 1 /p 5:[1,2],0:,",
    UUID + b' 1 /p 18:{"METHOD":["GET"]},0:,',
    UUID + b" 1 /p 4:{\"a\",0:,",
])
def test_malformed_json_headers(raw):
    with pytest.raises(ProtocolError):
        protocol.parse(raw, "json")


def test_response_and_close():
    assert protocol.response(UUID, b"7", b"hi") == UUID + b" 1:7, hi"
    assert protocol.response(UUID, [b"1", b"22"], b"x") == UUID + b" 4:1 22, x"
    assert protocol.close(UUID, b"7") == UUID + b" 1:7, "
    many = [str(n).encode() for n in range(protocol.MAX_TARGETS)]
    assert protocol.response(UUID, many, b"").startswith(UUID + b" ")
    with pytest.raises(ProtocolError):
        protocol.response(UUID, many + [b"999"], b"x")
    with pytest.raises(ProtocolError):
        protocol.response(UUID, [], b"x")


def _with_headers(*pairs: bytes) -> protocol.Message:
    headers = {b"METHOD": b"POST"}
    for name, value in zip(pairs[::2], pairs[1::2], strict=True):
        headers[name] = value
    return protocol.Message(UUID, b"1", b"/", headers, b"", Kind.REQUEST)


@pytest.mark.parametrize("pairs, risky", [
    ((), False),
    ((b"content-length", b"12"), False),
    ((b"transfer-encoding", b"chunked"), False),
    ((b"content-length", b"12", b"transfer-encoding", b"chunked"), True),
    ((b"content-length", [b"12", b"12"]), True),
    ((b"transfer-encoding", [b"chunked", b"chunked"]), True),
    ((b"content-length", b"12abc"), True),
    ((b"content-length", b"-1"), True),
    ((b"transfer-encoding", b"gzip, chunked"), True),
    ((b"transfer-encoding", b"Chunked"), True),
])
def test_smuggling_risk(pairs, risky):
    assert protocol.is_smuggling_risk(_with_headers(*pairs)) is risky


def _parse_or_protocol_error(raw: bytes, kind: str) -> None:
    try:
        message = protocol.parse(raw, kind)
    except ProtocolError:
        return
    assert isinstance(message.headers, dict) and isinstance(message.body, bytes)
    assert message.kind in Kind
    protocol.is_smuggling_risk(message)
    assert isinstance(message.credits, int)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["tnetstring", "json", "auto"]))
def test_arbitrary_bytes_raise_only_protocol_error(raw, kind):
    _parse_or_protocol_error(raw, kind)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([GET, CREDITS, DISCONNECT, UPLOAD_DONE, JSON_GET]),
       st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=3), st.integers(0, 3)),
                max_size=4),
       st.sampled_from(["tnetstring", "json", "auto"]))
def test_mutated_messages_raise_only_protocol_error(raw, edits, kind):
    """Real messages with bytes replaced, inserted or removed: near misses reach deep."""
    data = bytearray(raw)
    for position, insert, remove in edits:
        position %= len(data) + 1
        data[position:position + remove] = insert
    _parse_or_protocol_error(bytes(data), kind)


# ------------------------------------------------------------------ the dispatcher's fast path

PLAIN = GET.replace(b"16:DOWNLOAD_CREDITS,6:102400,", b"").replace(b" 303:", b" %d:" % (303 - 29))


def test_plain_request_reads_sender_and_connection_of_a_request_with_nothing_to_check():
    assert protocol.parse(PLAIN).kind is Kind.REQUEST
    assert protocol.plain_request(PLAIN) == (UUID, b"1", 0, b"GET")
    assert protocol.plain_request(GET) == (UUID, b"1", 102400, b"GET")  # a first request
    for other in (CREDITS, DISCONNECT, UPLOAD_START, UPLOAD_DONE, JSON_GET, JSON_DISCONNECT):
        assert protocol.plain_request(other) is None  # read in full instead


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([PLAIN, GET, CREDITS, DISCONNECT, UPLOAD_DONE, JSON_GET]),
       st.lists(st.tuples(st.integers(0, 400), st.binary(max_size=3), st.integers(0, 3)),
                max_size=4))
def test_plain_request_never_passes_what_parse_would_check(raw, edits):
    """Whatever the fast path takes is a well-formed request with no body, no upload
    and no body-length header, from the same sender and connection, with its window
    and method."""
    data = bytearray(raw)
    for position, insert, remove in edits:
        position %= len(data) + 1
        data[position:position + remove] = insert
    plain = protocol.plain_request(bytes(data))
    if plain is None:
        return
    message = protocol.parse(bytes(data))
    assert (message.sender, message.conn_id, message.credits,
            message.headers[b"METHOD"]) == plain
    assert message.kind is Kind.REQUEST
    assert message.body == b"" and not protocol.is_smuggling_risk(message)
    assert not {b"content-length", b"transfer-encoding"} & set(message.headers)


def test_granted_reads_a_credits_notice():
    assert protocol.granted(CREDITS) == 60000
    assert protocol.granted(DISCONNECT) == 0 and protocol.granted(b"garbage") == 0


def test_addressed_tells_connections_and_bytes_written():
    assert protocol.addressed(protocol.response(UUID, b"12", b"hello")) == ([b"12"], 5)
    assert protocol.addressed(protocol.close(UUID, [b"1", b"2"])) == ([b"1", b"2"], 0)
    assert protocol.addressed(protocol.keep_alive(UUID, b"7")) == ([b"7"], -1)
    assert protocol.addressed(b"no header") == ([], -1)
    assert protocol.addressed(b"uuid x:1, body") == ([], -1)
    big = protocol.response(UUID, b"3", b"x" * (1 << 20))
    assert protocol.addressed(big) == ([b"3"], 1 << 20)


@pytest.mark.parametrize("message", [
    protocol.response(UUID, b"3", b"x" * (1 << 20)),
    protocol.close(UUID, [b"%d" % n for n in range(1000, 1000 + protocol.MAX_TARGETS)]),
    protocol.keep_alive(UUID, b"7"),
])
def test_a_message_read_as_a_view_is_addressed_and_sent_like_bytes(message):
    """The dispatcher forwards workers' large frames as memoryviews."""
    view = memoryview(bytearray(message))
    assert protocol.addressed(view) == protocol.addressed(message)
    assert protocol.sender_of(view) == protocol.sender_of(message) == UUID


def test_a_disconnect_notice_of_our_own_reads_as_mongrel2_s():
    message = protocol.parse(protocol.disconnect_notice(b"f400bf85", b"42"))
    assert (message.kind, message.conn_id, message.sender) == (Kind.DISCONNECT, b"42",
                                                                b"f400bf85")


@pytest.mark.parametrize("method, idempotent", [(b"GET", True), (b"PUT", True),
                                                (b"POST", False), (b"PATCH", False)])
def test_idempotent_methods_are_those_of_rfc_9110(method, idempotent):
    raw = b"s 1 / %s0:," % tnetstring.dumps({b"METHOD": method, b"PATH": b"/"})
    assert protocol.is_idempotent(raw) is idempotent
    assert protocol.is_idempotent(b"not a request") is False
