"""Two hosts on one machine: network namespaces ``front`` and ``host`` joined by a veth
pair, with addresses from TEST-NET-1 (192.0.2.0/24) inside them only and no default
route. Made and removed by whoever uses them (tests/test_remote_hosts.py,
benchmarks/two_hosts.py); needs root and iproute2."""

from __future__ import annotations

import secrets
import subprocess

FRONT_ADDRESS, HOST_ADDRESS = "192.0.2.1", "192.0.2.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """Two namespaces, ``front`` and ``host``, joined by a veth pair."""

    def __init__(self, tag: str = "") -> None:
        tag = tag or secrets.token_hex(3)
        self.front, self.host = f"cwf-{tag}", f"cww-{tag}"
        self.front_if, self.host_if = f"cwf{tag}", f"cww{tag}"

    def make(self) -> None:
        """Both namespaces and the link; on failure, CalledProcessError (what is made stays:
        call :meth:`remove`)."""
        ip("netns", "add", self.front)
        ip("netns", "add", self.host)
        ip("link", "add", self.front_if, "type", "veth", "peer", "name", self.host_if)
        for namespace, interface, address in ((self.front, self.front_if, FRONT_ADDRESS),
                                              (self.host, self.host_if, HOST_ADDRESS)):
            ip("link", "set", interface, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", namespace, "link", "set", interface, "up")
            ip("-n", namespace, "link", "set", "lo", "up")

    def cut(self, down: bool) -> None:
        """Cut the link (``down``) or mend it."""
        ip("-n", self.host, "link", "set", self.host_if, "down" if down else "up")

    def remove(self) -> None:
        """Both namespaces, and with them the veth pair (whatever of them exists)."""
        for namespace in (self.front, self.host):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)

    @staticmethod
    def inside(namespace: str, argv: list[str]) -> list[str]:
        """``argv`` run in ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]
