"""The bulk port: a peer's value as raw bytes over a plain TCP connection, beside gRPC.

Through gRPC's Python layer every received message is copied three times before the agent sees
it (slices into a bytearray, then into ``bytes``), and the sender's chunks twice more: measured
on the project's 2-core VM, a bare grpc.aio stream of 4 MiB messages costs the receiver about
0.95 CPU-seconds per GB, more than SHA-256 itself (0.74), which caps a replication near
0.7 GB/s. Here the kernel writes the bytes straight into the buffer the stored value will own,
and the sender hands the kernel the stored value itself: no copy in user space on either side.

It carries only what a Fetch already authorized. The requester asks Fetch for ``bulk``; the
source answers with the value's header and a ``BulkOffer`` (its port and a one-time 32-byte
ticket), the requester connects, sends the ticket and reads exactly the announced size. It then
verifies size and SHA-256 against the header as it would chunks, hashing what arrived in a
worker thread while more arrives (hashlib releases the GIL), each byte once. The source keeps
the key in use until the bytes are sent or the ticket lapses, as it would for a chunked Fetch.
Only plaintext agents offer it: with TLS, values keep travelling over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from amm.base.checksum import StreamingChecksum

log = logging.getLogger(__name__)

#: Length of a ticket in bytes.
TICKET_BYTES = 32
#: How long a connection may take to send its ticket, in seconds.
TICKET_TIMEOUT = 5.0
#: Bytes handed to the kernel per send, each within the idle timeout.
SEND_BYTES = 4 * 1024 * 1024
#: Bytes received before they are handed to the hashing thread (when it is free).
HASH_BYTES = 1024 * 1024

# ``PyBytes_FromStringAndSize(NULL, size)``: a bytes object whose data is not initialised.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
#: Where a ``bytes`` object's data starts (``ob_sval``), from the object's address.
_DATA_OFFSET = bytes.__basicsize__ - 1


class BulkError(Exception):
    """A bulk transfer that did not deliver the bytes announced."""


class Unreachable(BulkError):
    """The bulk port could not be connected to, or took no ticket."""


@dataclass(slots=True)
class _Offer:
    data: bytes
    #: Set when a connection presents the ticket.
    claimed: asyncio.Future[None]
    #: Set when every byte was handed to the kernel (or the transfer failed).
    done: asyncio.Future[None]


@dataclass(slots=True)
class Offer:
    """A value offered on the bulk port until ``sent`` or ``revoke``."""

    port: int
    ticket: bytes
    _server: BulkServer
    _offer: _Offer = field(repr=False)

    async def sent(self, claim_timeout: float) -> None:
        """Wait until the requester claimed the ticket within ``claim_timeout`` and took every
        byte (each ``SEND_BYTES`` within the server's idle timeout); ``BulkError`` otherwise."""
        try:
            await asyncio.wait_for(asyncio.shield(self._offer.claimed), claim_timeout)
        except TimeoutError:
            raise BulkError(f"the ticket was not claimed within {claim_timeout:g} s") from None
        except asyncio.CancelledError:
            if self._offer.claimed.cancelled():  # revoked, or the server closed
                raise BulkError("the offer was withdrawn") from None
            raise
        await self._offer.done

    def revoke(self) -> None:
        """Withdraw the ticket if it is still unclaimed."""
        self._server.revoke(self.ticket)


class BulkServer:
    """The bulk port of one agent: accepts connections, each claiming one offered value."""

    def __init__(self, listener: socket.socket, idle_timeout: float) -> None:
        self._listener = listener
        self._idle_timeout = idle_timeout
        self._offers: dict[bytes, _Offer] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self.port: int = listener.getsockname()[1]
        #: Values sent in full so far.
        self.sent = 0

    @classmethod
    async def start(cls, host: str, idle_timeout: float) -> BulkServer:
        """Listen on ``host`` (the host of the agent's gRPC listen address), any free port."""
        loop = asyncio.get_running_loop()
        host = host.strip("[]")
        infos = await loop.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        problems = []
        for family, kind, proto, _, address in infos:
            listener = socket.socket(family, kind, proto)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(address)
                listener.listen(128)
                listener.setblocking(False)
                break
            except OSError as err:
                listener.close()
                problems.append(f"{address[0]}: {err.strerror or err}")
        else:
            raise OSError(f"cannot listen on {host!r}: {'; '.join(problems) or 'no address'}")
        server = cls(listener, idle_timeout)
        server._accepting = asyncio.create_task(server._accept(), name="bulk port")
        return server

    def offer(self, data: bytes) -> Offer:
        """Offer ``data`` under a fresh ticket; call ``Offer.sent`` then ``Offer.revoke``."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        loop = asyncio.get_running_loop()
        entry = _Offer(data, loop.create_future(), loop.create_future())
        # A transfer that fails after its Fetch call ended has nobody to report to.
        entry.done.add_done_callback(_retrieve)
        self._offers[ticket] = entry
        return Offer(self.port, ticket, self, entry)

    def revoke(self, ticket: bytes) -> None:
        entry = self._offers.pop(ticket, None)
        if entry is not None:
            entry.claimed.cancel()
            entry.done.cancel()

    async def close(self) -> None:
        """Stop accepting, end transfers under way; idempotent."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for ticket in list(self._offers):
            self.revoke(ticket)
        self._listener.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(self._listener)
            except OSError as err:  # out of descriptors, say: keep serving
                log.warning("bulk port: cannot accept: %s", err)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._serve(connection), name="bulk transfer")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        entry: _Offer | None = None
        with connection:
            connection.setblocking(False)
            try:
                async with asyncio.timeout(TICKET_TIMEOUT):
                    ticket = await _read_exactly(connection, TICKET_BYTES)
                entry = self._offers.pop(ticket, None)
                if entry is None:
                    log.debug("bulk port: a connection sent an unknown ticket")
                    return
                entry.claimed.set_result(None)
                view = memoryview(entry.data)
                for start in range(0, len(view), SEND_BYTES):
                    async with asyncio.timeout(self._idle_timeout):
                        await loop.sock_sendall(connection, view[start : start + SEND_BYTES])
                self.sent += 1
                if not entry.done.done():
                    entry.done.set_result(None)
            except (OSError, TimeoutError, BulkError) as err:
                log.debug("bulk port: transfer ended early: %s", err)
                if entry is not None and not entry.done.done():
                    entry.done.set_exception(BulkError(f"the transfer ended early: {err}"))
            finally:
                if entry is not None and not entry.done.done():  # cancelled: the agent stops
                    entry.done.set_exception(BulkError("the agent is stopping"))


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _read_exactly(connection: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) < size:
        part = await loop.sock_recv(connection, size - len(received))
        if not part:
            raise BulkError("the connection closed before the ticket")
        received += part
    return bytes(received)


def fresh_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new, not yet initialised ``bytes`` of ``size`` and a writable view of its data.

    The receiver fills the value in place and hands the ``bytes`` over once the view is
    released; nothing else sees it before, which is what makes writing into it sound (CPython
    builds its own bytes so: ``PyBytes_FromStringAndSize(NULL, size)``, then fill). Unlike a
    zero-filled buffer (``io.BytesIO``, ``bytearray``), its memory is written once, by the
    kernel's copy. (Asking for huge pages, ``madvise(MADV_HUGEPAGE)``, cut the page faults 30
    times but cost more than twice the CPU on the project's VM, the kernel compacting memory to
    find them; populating ahead, ``MADV_POPULATE_WRITE``, gained nothing measurable.)
    """
    if size == 0:
        return b"", memoryview(bytearray())
    data: bytes = _new_bytes(None, size)
    address = id(data) + _DATA_OFFSET
    view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return data, view


def host_of(address: str) -> str:
    """The host of ``HOST:PORT`` (brackets of an IPv6 literal removed)."""
    return address.rsplit(":", 1)[0].strip("[]")


async def receive(
    host: str, port: int, ticket: bytes, size: int, idle_timeout: float
) -> tuple[bytes, str]:
    """Claim ``ticket`` on ``host:port`` and read ``size`` bytes: the value and its SHA-256.

    The kernel writes the bytes straight into the returned ``bytes`` (``fresh_bytes``), each
    received piece within ``idle_timeout``. Hashing runs in a
    worker thread over what arrived since it last started, while receiving goes on, so no byte
    is hashed twice and receiving never waits for it. ``BulkError`` when the connection ends
    early or stalls.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    digest = StreamingChecksum()
    data, view = fresh_bytes(size)
    with socket.socket(family, kind, proto) as connection:
        connection.setblocking(False)
        try:
            async with asyncio.timeout(idle_timeout):
                await loop.sock_connect(connection, address)
                await loop.sock_sendall(connection, ticket)
        except (OSError, TimeoutError) as err:
            raise Unreachable(f"cannot claim the value on port {port}: {err!r}") from None
        hashing: asyncio.Future[None] | None = None
        try:
            received = hashed = 0
            while received < size:
                try:
                    async with asyncio.timeout(idle_timeout):
                        count = await loop.sock_recv_into(connection, view[received:])
                except (OSError, TimeoutError) as err:
                    raise BulkError(f"{received} of {size} bytes received: {err!r}") from None
                if count == 0:
                    raise BulkError(f"the connection closed after {received} of {size} bytes")
                received += count
                if received - hashed >= HASH_BYTES and (hashing is None or hashing.done()):
                    if hashing is not None:
                        await hashing  # done: raises what the thread raised, if anything
                    hashing = loop.run_in_executor(None, _hash, digest, view, hashed, received)
                    hashed = received
            if hashing is not None:
                await hashing
                hashing = None
            if hashed < size:
                await loop.run_in_executor(None, _hash, digest, view, hashed, size)
        finally:
            if hashing is not None:
                # Let the thread finish with the buffer before it is released.
                await asyncio.wait([hashing])
            view.release()
    return data, digest.hexdigest()


def _hash(digest: StreamingChecksum, view: memoryview, start: int, end: int) -> None:
    with _slice(view, start, end) as part:
        digest.update(part)


@contextlib.contextmanager
def _slice(view: memoryview, start: int, end: int) -> Iterator[memoryview]:
    part = view[start:end]
    try:
        yield part
    finally:
        part.release()
