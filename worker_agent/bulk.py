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
second thread while more arrives (hashlib releases the GIL), each byte once. The source keeps
the key in use until the bytes are sent or the ticket lapses, as it would for a chunked Fetch.
Only plaintext agents offer it: with TLS, values keep travelling over gRPC.

Both ends move a value of ``THREAD_BYTES`` or more in threads of their own (``_in_thread``): on
loopback the data is nearly always there to read, and ``loop.sock_recv_into`` returns at once
when it is, without yielding, so one receive used to hold the agent's loop for its whole value
(polls and HoldsKeys went unanswered for 1.5-2.5 s during a 1 GiB replication, and the values
bound for one agent arrived one after the other). ``recv_into`` and ``sendall`` release the GIL
for the kernel's copy; the loop only learns that a transfer ended. Cancelling a transfer shuts
its socket down, which ends the thread's blocked call at once, and waits for the thread before
the buffer is let go.

A source serves several receivers and clients at once, so its sending threads are capped
(``max_senders``, ``AgentConfig.max_bulk_senders``): more large transfers wait for a sender in
the order they claimed their tickets, each within the idle timeout (its receiver waits no longer
for a first byte), and one cancelled while it waits leaves the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from amm.base.checksum import StreamingChecksum
from worker_agent import huge_pages

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Length of a ticket in bytes.
TICKET_BYTES = 32
#: How long a connection may take to send its ticket, in seconds.
TICKET_TIMEOUT = 5.0
#: Bytes handed to the kernel per send, each within the idle timeout.
SEND_BYTES = 4 * 1024 * 1024
#: Bytes received before they are handed to the hashing thread (when it is free).
HASH_BYTES = 1024 * 1024
#: Values at least this large move in threads of their own (``_in_thread``); smaller ones on
#: the event loop, which a send or receive of them holds for a millisecond at most, so that
#: thousands of small transfers at once do not make thousands of threads.
THREAD_BYTES = 1024 * 1024
#: Values at least this large are hashed in a second thread while they arrive; smaller ones by
#: the receiving thread once they are in (a thread would cost more than it overlaps).
PIPELINE_BYTES = 4 * HASH_BYTES
#: Values at least this large are given huge pages when the kernel has them to spare
#: (``worker_agent.huge_pages``).
HUGE_PAGE_BYTES = 4 * 1024 * 1024
#: Sending threads of one bulk port at most, by default (``BulkServer``).
MAX_SENDERS = 4

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
    """The bulk port of one agent: accepts connections, each claiming one offered value.

    At most ``max_senders`` values of ``THREAD_BYTES`` or more are sent at once, each in a
    thread: unbounded, every receiver and client reading from this agent at once had a thread
    of its own, all sharing the same CPUs and link. The others wait their turn, first come
    first served (``asyncio.Semaphore`` is fair), each within the idle timeout."""

    def __init__(
        self, listener: socket.socket, idle_timeout: float, max_senders: int = MAX_SENDERS
    ) -> None:
        if max_senders < 1:
            raise ValueError(f"max_senders must be >= 1, got {max_senders}")
        self._listener = listener
        self._idle_timeout = idle_timeout
        self._senders = asyncio.Semaphore(max_senders)
        self._offers: dict[bytes, _Offer] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self.port: int = listener.getsockname()[1]
        #: Values sent in full so far.
        self.sent = 0
        #: Sending threads running now, and the most that ran at once.
        self.sending = 0
        self.most_sending = 0
        #: Large transfers waiting for a sending thread.
        self.waiting = 0

    @classmethod
    async def start(
        cls, host: str, idle_timeout: float, max_senders: int = MAX_SENDERS
    ) -> BulkServer:
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
        try:
            server = cls(listener, idle_timeout, max_senders)
        except ValueError:
            listener.close()
            raise
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
                if len(entry.data) < THREAD_BYTES:
                    async with asyncio.timeout(self._idle_timeout):
                        await loop.sock_sendall(connection, entry.data)
                else:
                    await self._send_in_thread(connection, entry.data)
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

    async def _send_in_thread(self, connection: socket.socket, data: bytes) -> None:
        """Send ``data`` in a thread once one of the ``max_senders`` is free, waiting for it
        within the idle timeout (``TimeoutError``)."""
        self.waiting += 1
        try:
            async with asyncio.timeout(self._idle_timeout):
                await self._senders.acquire()
        finally:
            self.waiting -= 1
        self.sending += 1
        self.most_sending = max(self.most_sending, self.sending)
        try:
            # Each send call within the idle timeout (``socket.sendall``: the timeout bounds
            # the whole call), in a thread: the loop stays free meanwhile.
            connection.settimeout(self._idle_timeout)
            sending = functools.partial(_send_all, connection, data)
            await _in_thread(sending, connection, "bulk send")
        finally:
            self.sending -= 1
            self._senders.release()


def _send_all(connection: socket.socket, data: bytes) -> None:
    """Hand ``data`` to the kernel, ``SEND_BYTES`` per call (each within the socket's timeout);
    runs in a thread."""
    with memoryview(data) as view:
        for start in range(0, len(view), SEND_BYTES):
            with view[start : start + SEND_BYTES] as part:
                connection.sendall(part)


async def _in_thread(work: Callable[[], T], connection: socket.socket, name: str) -> T:
    """``work`` (blocking calls on ``connection``) run in a thread of its own, awaited.

    A cancelled caller shuts the socket down, which ends the thread's blocked ``recv_into`` or
    ``sendall`` at once, and still waits for the thread to return: it may be writing into a
    buffer the caller is about to let go. The thread is a daemon: a process that exits does not
    wait for a peer that stopped reading.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = work()
        except BaseException as err:  # handed to the loop, raised there
            outcome: tuple[T | None, BaseException | None] = (None, err)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


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
    kernel's copy. From ``HUGE_PAGE_BYTES`` on, that memory is asked to be backed by huge pages
    while the kernel has them to spare (``worker_agent.huge_pages``): a 64 MiB value then costs
    32 page faults rather than 16,384. (Populating ahead, ``MADV_POPULATE_WRITE``, saved less,
    and nothing on top of huge pages.)
    """
    if size == 0:
        return b"", memoryview(bytearray())
    data: bytes = _new_bytes(None, size)
    address = id(data) + _DATA_OFFSET
    if size >= HUGE_PAGE_BYTES:
        huge_pages.advise(address, size)
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
    received piece within ``idle_timeout``; from ``THREAD_BYTES`` on in a thread of its own
    (``_in_thread``), so the event loop answers calls meanwhile. A large value is hashed in a
    second thread over what arrived since it last started, while receiving goes on, so no byte
    is hashed twice and receiving never waits for it. ``BulkError`` when the connection ends
    early or stalls.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    digest = StreamingChecksum()
    with socket.socket(family, kind, proto) as connection:
        connection.setblocking(False)
        try:
            async with asyncio.timeout(idle_timeout):
                await loop.sock_connect(connection, address)
                await loop.sock_sendall(connection, ticket)
        except (OSError, TimeoutError) as err:
            raise Unreachable(f"cannot claim the value on port {port}: {err!r}") from None
        if size < THREAD_BYTES:
            data, view = fresh_bytes(size)
            with view:
                await _receive_on_loop(connection, view, size, idle_timeout)
                digest.update(view)
        else:
            connection.settimeout(idle_timeout)  # each recv_into within it
            receiving = functools.partial(_receive_value, connection, size, digest)
            data = await _in_thread(receiving, connection, "bulk receive")
    return data, digest.hexdigest()


async def _receive_on_loop(
    connection: socket.socket, view: memoryview, size: int, idle_timeout: float
) -> None:
    """Fill ``view`` (a small value) from ``connection`` on the event loop."""
    loop = asyncio.get_running_loop()
    received = 0
    while received < size:
        try:
            async with asyncio.timeout(idle_timeout):
                count = await loop.sock_recv_into(connection, view[received:])
        except (OSError, TimeoutError) as err:
            raise BulkError(f"{received} of {size} bytes received: {err!r}") from None
        if count == 0:
            raise BulkError(f"the connection closed after {received} of {size} bytes")
        received += count


def _receive_value(connection: socket.socket, size: int, digest: StreamingChecksum) -> bytes:
    """A new value of ``size`` filled from ``connection`` and hashed into ``digest``; runs in a
    thread. Its memory is mapped here too (``fresh_bytes``), not on the event loop: mapping it,
    reading how many huge pages are free and advising are system calls on the process's memory
    map (which every change to it takes in turn), none of which the loop needs to wait for."""
    data, view = fresh_bytes(size)
    with view:
        _receive_into(connection, view, size, digest)
    return data


def _receive_into(
    connection: socket.socket, view: memoryview, size: int, digest: StreamingChecksum
) -> None:
    """Fill ``view[:size]`` from ``connection`` and hash it into ``digest``; runs in a thread.

    From ``PIPELINE_BYTES`` on, a ``_Hasher`` thread hashes what arrived while more arrives, and
    has finished with the buffer when this returns, whatever happened.
    """
    hasher = _Hasher(digest, view) if size >= PIPELINE_BYTES else None
    received = told = 0
    whole = False
    try:
        while received < size:
            try:
                with view[received:size] as rest:
                    count = connection.recv_into(rest)
            except OSError as err:  # TimeoutError included: nothing within the idle timeout
                raise BulkError(f"{received} of {size} bytes received: {err!r}") from None
            if count == 0:
                raise BulkError(f"the connection closed after {received} of {size} bytes")
            received += count
            if hasher is not None and received - told >= HASH_BYTES:
                hasher.advance(received)
                told = received
        whole = True
        if hasher is None:
            with view[:size] as value:
                digest.update(value)
    finally:
        if hasher is not None:
            hasher.finish(received, abandon=not whole)


class _Hasher:
    """Hashes ``view`` in order, in a thread of its own, as far as it was told bytes arrived.

    ``finish`` hashes the rest up to the size given, or nothing more when the receive failed
    (``abandon``), and joins the thread: it is done with the buffer once that returns.
    """

    __slots__ = (
        "_abandon",
        "_arrived",
        "_digest",
        "_done",
        "_error",
        "_thread",
        "_view",
        "_woken",
    )

    def __init__(self, digest: StreamingChecksum, view: memoryview) -> None:
        self._digest = digest
        self._view = view
        self._woken = threading.Condition()
        self._arrived = 0
        self._done = False
        self._abandon = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bulk hash", daemon=True)
        self._thread.start()

    def advance(self, arrived: int) -> None:
        """Bytes up to ``arrived`` are in the buffer."""
        with self._woken:
            self._arrived = arrived
            self._woken.notify()

    def finish(self, arrived: int, *, abandon: bool = False) -> None:
        """Hash up to ``arrived`` (nothing more if ``abandon``), then end the thread; raises
        what hashing raised."""
        with self._woken:
            self._arrived = arrived
            self._done = True
            self._abandon = abandon
            self._woken.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        hashed = 0
        try:
            while True:
                with self._woken:
                    while self._arrived - hashed < HASH_BYTES and not self._done:
                        self._woken.wait()
                    end, done = self._arrived, self._done
                    if self._abandon:
                        return
                if end > hashed:
                    with _slice(self._view, hashed, end) as part:
                        self._digest.update(part)
                    hashed = end
                elif done:
                    return
        except BaseException as err:  # raised by ``finish``, in the receiving thread
            self._error = err


@contextlib.contextmanager
def _slice(view: memoryview, start: int, end: int) -> Iterator[memoryview]:
    part = view[start:end]
    try:
        yield part
    finally:
        part.release()
