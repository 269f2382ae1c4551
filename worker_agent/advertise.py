"""Which address an agent advertises: the ``host:port`` the AMM and its peers dial.

1. ``advertise`` given as ``HOST:PORT``: used as given.
2. ``advertise`` is ``auto``: this machine's IP address on the route to the AMM, with the bound
   port. It is meant for replicas of one container definition (``docker compose up --scale
   worker=6``), where no per-replica address can be written down; the agent must then listen on
   a wildcard address (``0.0.0.0:PORT``). Without an AMM, or when its name does not resolve yet,
   the address the host name resolves to (a container's own IP, from its ``/etc/hosts``).
3. Nothing given: the bound address, with a wildcard host replaced by the host name, since peers
   cannot dial ``0.0.0.0``.

Looking a name up may block, so the agent calls ``advertised_address`` off its event loop.
"""

from __future__ import annotations

import logging
import socket

from worker_agent.config import ADVERTISE_AUTO

log = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def advertised_address(bound: str, advertise: str | None, amm: str | None) -> str:
    """The address to advertise, given the bound ``host:port`` and the agent's settings.

    Raises ``OSError`` when ``auto`` finds no address at all.
    """
    host, _, port = bound.rpartition(":")
    if advertise is None:
        return f"{socket.gethostname()}:{port}" if host in WILDCARD_HOSTS else bound
    if advertise != ADVERTISE_AUTO:
        return advertise
    ip = local_ip(amm)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def local_ip(amm: str | None) -> str:
    """This machine's IP address that ``amm`` (``host:port``) can reach, else the host name's.

    Connecting a UDP socket only asks the kernel for a route: it sends nothing, so it works
    before the AMM listens.
    """
    if amm is not None:
        host, _, port = amm.rpartition(":")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_DGRAM
            )[0]
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(sockaddr)
                return str(sock.getsockname()[0])
        except OSError as err:
            log.info("no route to the AMM at %s yet (%s): advertising the host name's IP", amm, err)
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError as err:
        raise OSError(
            f"cannot work out an address to advertise: host name {name!r} does not resolve "
            f"({err}); set --advertise HOST:PORT"
        ) from err
