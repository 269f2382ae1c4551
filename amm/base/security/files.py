"""Files that change under a running server, and writing them so that a reader never sees half.

Rotation without a restart means re-reading certificates, the token file and the revocation list
when they change. A stat per use is cheap (microseconds) and needs no watcher thread, so each
reader keeps the file's stamp (inode, size, mtime in ns) and parses again when it differs: ``mv``,
an editor's save and ``os.replace`` all change it. Writers replace files atomically, so a reader
sees either the old content or the new one.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
Stamp = tuple[int, int, int]

log = logging.getLogger(__name__)


def stamp(path: Path) -> Stamp | None:
    """What changes when the file does; None when it does not exist."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def write_atomic(
    path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None
) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename; ``mode`` (and ``owner``,
    uid and gid) from the start, so a private key is never readable by others, nor unreadable by
    the server meant to reload it, not even for a moment."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str, mode: int = 0o600) -> None:
    """Append one line, creating the file with ``mode``; atomic (the whole file is rewritten), so
    a server reloading it never parses a partial line."""
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    current = path.stat().st_mode & 0o777 if path.exists() else mode
    write_atomic(path, old + line.encode() + b"\n", current)


class WatchedFile(Generic[T]):
    """The parsed content of a file, parsed again whenever the file changes.

    A missing file parses as ``parse("")``. When the new content cannot be parsed (``ValueError``)
    or read, the error is logged once and the last good value stays: a typo while editing the
    token file must not lock everybody out, nor let anyone in. Thread-safe: gRPC may ask from its
    own threads.
    """

    def __init__(self, path: Path, parse: Callable[[str], T]) -> None:
        self.path = path
        self._parse = parse
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self._value: T = parse("")
        self._loaded = False

    def current(self) -> T:
        try:
            now = stamp(self.path)
        except OSError as err:
            log.warning("cannot stat %s: %s; keeping what was read before", self.path, err)
            return self._value
        with self._lock:
            if self._loaded and now == self._stamp:
                return self._value
            try:
                text = "" if now is None else self.path.read_text()
                value = self._parse(text)
            except (OSError, ValueError, UnicodeDecodeError) as err:
                log.error("cannot load %s: %s; keeping what was read before", self.path, err)
                self._stamp, self._loaded = now, True
                return self._value
            self._value, self._stamp, self._loaded = value, now, True
            return value
