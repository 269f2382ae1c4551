"""Secure by default: a server reachable from other machines does not start without TLS.

Plaintext on loopback is fine (only this machine can connect, as in ``amm cluster`` and the
tests); anywhere else it would let anyone on the network steer the AMM or read every value, so it
takes an explicit ``--insecure``.
"""

from __future__ import annotations

import ipaddress

from amm.base.security.errors import SecurityError

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def listen_host(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port`` or a bare ``:port`` (empty: every interface)."""
    host, sep, _port = address.rpartition(":")
    if not sep:
        host = address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(address: str) -> bool:
    """Whether ``address`` (``host:port``) listens on loopback only: 127.0.0.0/8, ::1 or
    localhost. Other host names are not trusted to resolve to loopback."""
    host = listen_host(address).lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(address: str, tls: bool, insecure: bool) -> None:
    """Refuse (``SecurityError``) to listen on a non-loopback ``address`` without TLS unless the
    operator said ``--insecure``."""
    if tls or insecure or is_loopback(address):
        return
    raise SecurityError(
        f"refusing to listen on {address} without TLS: pass --tls DIR, or --insecure to accept "
        "unauthenticated access"
    )
