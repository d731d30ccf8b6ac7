"""Trusted proxies (forwarded_allow_ips): which peers' X-Forwarded-For, X-Forwarded-Proto and
Forwarded headers set REMOTE_ADDR and wsgi.url_scheme, in the environ the workers build
(sans-IO) and through the real mongrel2, from a trusted and from an untrusted peer."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import given, strategies as st

from circus_wsgi.forwarded import Proxies, _forwarded_hops
from circus_wsgi.settings import Settings, SettingsError
from circus_wsgi.wsgi import Site
from harness import Stack
from test_wsgi import request

PROXY = "10.1.2.3"  # the peer address of test_wsgi.request()


def environ(allowed: str | None, **headers: bytes) -> dict:
    site = Site(lambda e, s: [], proxies=Proxies(allowed) if allowed is not None else None)
    return site.environ(request(**headers))


def client(allowed: str, **headers: bytes) -> tuple[str, str]:
    found = environ(allowed, **headers)
    return found["REMOTE_ADDR"], found["wsgi.url_scheme"]


# -- the setting


@pytest.mark.parametrize("given, kept", [
    ("127.0.0.1,::1", "127.0.0.1,::1"), (" 10.0.0.0/8 , 192.168.1.1", "10.0.0.0/8,192.168.1.1"),
    ("*", "*"), ("", ""), (["10.0.0.1", "fd00::/8"], "10.0.0.1,fd00::/8"),
])
def test_forwarded_allow_ips_takes_gunicorns_syntax(given: object, kept: str) -> None:
    assert Settings(forwarded_allow_ips=given).forwarded_allow_ips == kept


@pytest.mark.parametrize("given", ["10.0.0.1/8", "localhost", "10.0.0.300", 42])
def test_forwarded_allow_ips_refuses_what_is_not_an_address(given: object) -> None:
    with pytest.raises(SettingsError, match="forwarded_allow_ips"):
        Settings(forwarded_allow_ips=given)


def test_the_default_trusts_the_loopback_addresses_as_gunicorn() -> None:
    proxies = Proxies(Settings().forwarded_allow_ips)
    assert proxies.trusts("127.0.0.1") and proxies.trusts("::1")
    assert not proxies.trusts("127.0.0.2") and not proxies.trusts("10.0.0.1")


# -- what is believed


def test_a_trusted_proxy_sets_the_client_and_the_scheme() -> None:
    assert client(PROXY, x_forwarded_for=b"203.0.113.7", x_forwarded_proto=b"https") == (
        "203.0.113.7", "https")


def test_an_untrusted_peer_changes_nothing_and_its_headers_reach_the_app() -> None:
    found = environ("10.9.9.9", x_forwarded_for=b"203.0.113.7", x_forwarded_proto=b"https",
                    forwarded=b"for=198.51.100.1;proto=https")
    assert (found["REMOTE_ADDR"], found["wsgi.url_scheme"]) == (PROXY, "http")
    assert found["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"
    assert found["HTTP_X_FORWARDED_PROTO"] == "https"
    assert found["HTTP_FORWARDED"] == "for=198.51.100.1;proto=https"


def test_no_trusted_proxy_and_no_headers_leave_the_peer() -> None:
    assert client("", x_forwarded_for=b"203.0.113.7") == (PROXY, "http")
    assert environ(None, x_forwarded_for=b"203.0.113.7")["REMOTE_ADDR"] == PROXY
    assert client(PROXY) == (PROXY, "http")


def test_star_trusts_any_peer_and_networks_are_matched() -> None:
    assert client("*", x_forwarded_for=b"203.0.113.7")[0] == "203.0.113.7"
    assert client("10.0.0.0/8", x_forwarded_for=b"203.0.113.7")[0] == "203.0.113.7"


def test_the_client_is_the_first_untrusted_hop_from_the_right() -> None:
    chain = b"198.51.100.9, 203.0.113.7, 10.0.0.5"  # client, then two proxies
    assert client(f"{PROXY},10.0.0.5", x_forwarded_for=chain)[0] == "203.0.113.7"
    assert client(f"{PROXY},10.0.0.5,203.0.113.7", x_forwarded_for=chain)[0] == "198.51.100.9"
    # a forged first hop is never reached while an untrusted one stands before it
    assert client(PROXY, x_forwarded_for=b"127.0.0.1, 198.51.100.9")[0] == "198.51.100.9"


def test_x_forwarded_proto_per_hop_or_one_for_all() -> None:
    assert client(f"{PROXY},10.0.0.5", x_forwarded_for=b"203.0.113.7, 10.0.0.5",
                  x_forwarded_proto=b"https, http") == ("203.0.113.7", "https")
    assert client(f"{PROXY},10.0.0.5", x_forwarded_for=b"203.0.113.7, 10.0.0.5",
                  x_forwarded_proto=b"HTTPS") == ("203.0.113.7", "https")
    assert client(PROXY, x_forwarded_proto=b"https") == (PROXY, "https")


@pytest.mark.parametrize("value", [b"unknown", b"_hidden", b"999.1.1.1", b"", b"fe80::1%eth0"])
def test_a_hop_that_is_no_address_leaves_remote_addr(value: bytes) -> None:
    assert client(PROXY, x_forwarded_for=value, x_forwarded_proto=b"https") == (PROXY, "https")


@pytest.mark.parametrize("value", [b"ftp", b"javascript", b"http s"])
def test_a_scheme_other_than_http_or_https_is_ignored(value: bytes) -> None:
    assert client(PROXY, x_forwarded_proto=value)[1] == "http"


def test_ports_and_brackets_are_taken_off_addresses() -> None:
    assert client(PROXY, x_forwarded_for=b"203.0.113.7:5123")[0] == "203.0.113.7"
    assert client(PROXY, x_forwarded_for=b"[2001:db8::7]:5123")[0] == "2001:db8::7"
    assert client(PROXY, x_forwarded_for=b"2001:db8::7")[0] == "2001:db8::7"


def test_rfc_7239_forwarded_wins_over_the_x_forwarded_pair() -> None:
    assert client(PROXY, forwarded=b'for="[2001:db8:cafe::17]:4711";proto=https;by=10.1.2.3',
                  x_forwarded_for=b"203.0.113.7", x_forwarded_proto=b"http") == (
        "2001:db8:cafe::17", "https")
    assert client(f"{PROXY},10.0.0.5", forwarded=b"for=192.0.2.60;proto=https, for=10.0.0.5"
                  ) == ("192.0.2.60", "https")
    assert client(PROXY, forwarded=b"For=192.0.2.43") == ("192.0.2.43", "http")


def test_the_scheme_gives_server_port_its_default() -> None:
    found = environ(PROXY, x_forwarded_proto=b"https", host=b"example.com")
    assert (found["SERVER_NAME"], found["SERVER_PORT"]) == ("example.com", "443")


@pytest.mark.parametrize("value, hops", [
    ("for=192.0.2.43", (["192.0.2.43"], [""])),
    ('for="_gazonk"', (["_gazonk"], [""])),
    ('for=192.0.2.43, for="[2001:db8:cafe::17]";proto=https', (
        ["192.0.2.43", "[2001:db8:cafe::17]"], ["", "https"])),
    ('for="a;b,c";proto=http', (["a;b,c"], ["http"])),
    ('proto=http;;;for=1.2.3.4', (["1.2.3.4"], ["http"])),
    ("garbage, for=1.2.3.4", (["", "1.2.3.4"], ["", ""])),
    ("", ([""], [""])),
])
def test_forwarded_elements_are_parsed(value: str, hops: tuple) -> None:
    assert _forwarded_hops(value) == hops


@given(st.text(max_size=60))
def test_any_header_value_is_survived(value: str) -> None:
    for name in ("forwarded", "x_forwarded_for", "x_forwarded_proto"):
        address, scheme = client("*", **{name: value.encode("latin-1", "replace")})
        assert scheme in ("http", "https")
        assert address == PROXY or address.replace(":", "").replace(".", "").isalnum()


# -- through the real mongrel2


def _get(port: int, source: str, headers: str) -> dict:
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0)) as sock:
        sock.sendall(f"GET /environ HTTP/1.0\r\nHost: localhost\r\n{headers}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return json.loads(body)


@pytest.fixture(scope="module")
def stack():
    """mongrel2 on 127.0.0.1, trusting the proxy 127.0.0.1 only: 127.0.0.2 is anyone."""
    with Stack(app="worker_apps:rules", workers=1,
               forwarded_allow_ips="127.0.0.1") as running:
        yield running


FORWARDING = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"


def test_a_trusted_proxy_through_mongrel2(stack: Stack) -> None:
    seen = _get(stack.port, "127.0.0.1", FORWARDING)
    assert (seen["REMOTE_ADDR"], seen["wsgi.url_scheme"]) == ("203.0.113.7", "https")
    assert seen["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"  # mongrel2 did not replace it


def test_an_untrusted_peer_through_mongrel2(stack: Stack) -> None:
    seen = _get(stack.port, "127.0.0.2", FORWARDING + "Forwarded: for=198.51.100.1\r\n")
    assert (seen["REMOTE_ADDR"], seen["wsgi.url_scheme"]) == ("127.0.0.2", "http")
    assert seen["HTTP_X_FORWARDED_FOR"] == "203.0.113.7"
    assert seen["HTTP_FORWARDED"] == "for=198.51.100.1"


def test_without_the_header_mongrel2_adds_none(stack: Stack) -> None:
    seen = _get(stack.port, "127.0.0.1", "")
    assert seen["REMOTE_ADDR"] == "127.0.0.1" and "HTTP_X_FORWARDED_FOR" not in seen
