"""HTTPS for the servers the project runs itself (the dashboard, the metrics), following a
certificate rotation as the gRPC ports do (``credentials.ServerCertificates``).

An ``asyncio`` server, and ``http.server``'s wrapped socket, take one ``ssl.SSLContext`` for
their whole life. The context of ``ReloadingServerContext`` (or one given to ``follow``) has an
``sni_callback``, which OpenSSL calls at every handshake
(whether or not the client names a server): it stats the CA, certificate and key files and, when
one changed, builds a new context from them and moves the connection to it (``SSLObject.context``,
Python's documented way to switch certificates), so new connections present the new certificate
and trust the new CA, and connections already open keep theirs. A change that cannot be used (a
file missing mid-rotation, a certificate whose key is not written yet, garbage) keeps the previous
context, is logged once, and is tried again when the files change again.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

from amm.base.security.errors import SecurityError
from amm.base.security.files import Stamp, stamp

log = logging.getLogger(__name__)


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2 or later, presenting ``cert``, requiring a client certificate issued by ``ca``;
    ``SecurityError`` when the files cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError, ValueError) as err:
        raise SecurityError(f"unusable TLS files {cert}: {err}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class ReloadingServerContext:
    """``context`` for the server; ``current()`` the context of the files as they are now.

    Thread-safe: the callback runs in the handshakes, on the server's event loop or threads.
    """

    def __init__(self, ca: Path, cert: Path, key: Path) -> None:
        self._paths = (ca, cert, key)
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._current = server_context(ca, cert, key)
        self._failed: tuple[Stamp | None, ...] | None = None
        #: The context to serve with; each handshake moves to ``current()``.
        self.context = self._current
        self.follow(self.context)

    def follow(self, context: ssl.SSLContext) -> None:
        """Move each handshake of a server that serves with ``context`` (made elsewhere, with
        the same files and a required client certificate) to ``current()``."""
        context.sni_callback = self._handshake

    def _stamps(self) -> tuple[Stamp | None, ...]:
        return tuple(stamp(p) for p in self._paths)

    def current(self) -> ssl.SSLContext:
        """The context of the files now: rebuilt when one changed, the previous one when the
        change cannot be used (yet)."""
        try:
            now = self._stamps()
        except OSError:
            return self._current
        with self._lock:
            return self._reload(now)

    def _reload(self, now: tuple[Stamp | None, ...]) -> ssl.SSLContext:
        if now == self._stamp or now == self._failed:
            return self._current
        try:
            context = server_context(*self._paths)
        except SecurityError as err:
            self._failed = now
            log.error("TLS files changed but are not usable yet (%s); keeping the old ones", err)
            return self._current
        self._stamp, self._failed, self._current = now, None, context
        log.info("TLS files changed: new connections use %s", self._paths[1])
        return context

    def _handshake(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        chosen = self.current()
        if connection.context is not chosen:
            connection.context = chosen
