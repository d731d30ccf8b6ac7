"""Trusted proxies, sans-IO: whose X-Forwarded-For, X-Forwarded-Proto and Forwarded headers
are believed for REMOTE_ADDR and ``wsgi.url_scheme`` (setting forwarded_allow_ips).

:class:`Proxies` holds the trusted addresses and networks (gunicorn's syntax:
comma-separated, ``*`` for any peer). A :class:`~circus_wsgi.wsgi.Site` asks it
only when a request carries one of those headers, and a peer's verdict is
remembered, so a request without them costs three dict lookups.

From a trusted peer, the hops the headers list are walked from the right (each
proxy appends the address it received the request from): the first address that
is not itself a trusted proxy is the client, and the scheme is the one that hop
used. RFC 7239's ``Forwarded`` wins over the ``X-Forwarded-*`` pair when both are
sent. A value that is not an IP address (``unknown``, an obfuscated name), or a
scheme other than http and https, changes nothing. From any other peer nothing
changes; the headers reach the application as they came, like any other.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Optional

__all__ = ["Proxies"]

_SCHEMES = {"http", "https"}
_PEERS_MAX = 4096  # peer verdicts remembered (peer addresses come from the network)
#: One forwarded-pair of RFC 7239 (``for=...``, ``proto=...``); a quoted value may hold ``;``.
_SEPARATOR = re.compile(r"[;,]")
_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


class Proxies:
    """The peers whose forwarding headers are believed."""

    def __init__(self, allowed: str) -> None:
        items = [item.strip() for item in allowed.split(",") if item.strip()]
        self.anyone = "*" in items
        self.networks = tuple(ipaddress.ip_network(item) for item in items if item != "*")
        self._verdicts: dict[str, bool] = {}

    def trusts(self, address: str) -> bool:
        """Whether ``address`` (an IP address as text) is a trusted proxy."""
        verdict = self._verdicts.get(address)
        if verdict is None:
            verdict = self.anyone or _within(address, self.networks)
            if len(self._verdicts) < _PEERS_MAX:
                self._verdicts[address] = verdict
        return verdict

    def apply(self, environ: dict) -> str:
        """Set REMOTE_ADDR and wsgi.url_scheme from the headers of a trusted peer;
        return the scheme."""
        if not self.trusts(environ["REMOTE_ADDR"]):
            return environ["wsgi.url_scheme"]
        forwarded = environ.get("HTTP_FORWARDED")
        if forwarded is None:
            addresses = environ.get("HTTP_X_FORWARDED_FOR", "").split(",")
            schemes = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")
            if len(schemes) != len(addresses):  # one scheme for every hop: the last one
                schemes = schemes[-1:] * len(addresses)
        else:
            addresses, schemes = _forwarded_hops(forwarded)
        hop = self._client(addresses)
        client = _address(addresses[hop])
        if client is not None:
            environ["REMOTE_ADDR"] = client
        scheme = schemes[hop].strip().lower()
        if scheme in _SCHEMES:
            environ["wsgi.url_scheme"] = scheme
        return environ["wsgi.url_scheme"]

    def _client(self, addresses: list[str]) -> int:
        """The rightmost hop whose address is not a trusted proxy (else the leftmost)."""
        for hop in range(len(addresses) - 1, 0, -1):
            client = _address(addresses[hop])
            if client is None or not self.trusts(client):
                return hop
        return 0


def _within(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _address(value: str) -> Optional[str]:
    """The IP address in a hop (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``); None if none."""
    value = value.strip().strip('"')
    if value[:1] == "[":
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    except (OSError, ValueError):
        return None
    return value


def _forwarded_hops(value: str) -> tuple[list[str], list[str]]:
    """The ``for`` and ``proto`` of each element of RFC 7239's Forwarded, in order:
    ``for=A;proto=https, for=B`` -> ([A, B], [https, ""])."""
    addresses, schemes = [], []
    position, end = 0, len(value)
    pairs: dict[str, str] = {}
    while position < end:
        match = _PAIR.match(value, position)
        if match is None:  # malformed: skip to the next pair or element
            separator = _SEPARATOR.search(value, position)
            position = separator.start() if separator else end
        else:
            pairs.setdefault(match.group(1).lower(), match.group(2))
            position = match.end()
        if position >= end or value[position] == ",":
            addresses.append(_unquote(pairs.get("for", "")))
            schemes.append(_unquote(pairs.get("proto", "")))
            pairs = {}
        position += 1
    return addresses or [""], schemes or [""]


def _unquote(value: str) -> str:
    """A token or quoted-string's value."""
    if value[:1] != '"':
        return value
    value = value[1:-1]
    return re.sub(r"\\(.)", r"\1", value) if "\\" in value else value
