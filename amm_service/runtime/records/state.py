"""The AMM's small persistent state, in an embedded SQLite file, so that a restarted AMM resumes.

What is kept and why:

1. The epoch, moved forward at every start: agents refuse directives from an older epoch, so a
   stale AMM (one replaced by a newer start) cannot act.
2. The running flag, once an operator chose it with Start or Stop: an AMM that was cycling
   before a restart cycles again after it, and one that was stopped stays stopped, whatever its
   ``start`` setting (which decides only until the first Start or Stop).
3. The workers it knew: a restarted AMM takes them back and drops nothing until they have
   reported (the start-up grace, ``amm_service.decisions.grace``).
4. The replication goals set with ``Replicate``: a goal is a promise kept across AMM restarts.
5. The retirements under way (and workers retired but not closed), so that a restarted AMM
   resumes them: see ``amm_service.runtime.workers.retirement``.
6. The lost keys, with who held them last, when and how they were lost, so that a lost key is
   still reported after a restart; and the names of the keys the cluster held, so that a
   restarted AMM can tell which of them no worker holds any more (lost while it was down):
   see ``amm_service.runtime.records.lost``.
7. The tombstones of forgotten keys, so that a restart in the middle of a race between a Forget
   and the copies under way does not let the key back:
   see ``amm_service.runtime.records.tombstones``.

The schema is versioned with ``PRAGMA user_version``; :data:`_MIGRATIONS` is the ordered list of
steps, step ``i`` taking version ``i`` to ``i + 1``. Add a step, never edit a released one.

Not covered: what is decided from this state. The API is synchronous because each call is a tiny
transaction; a store is not thread-safe and is used from the event loop thread only.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from amm.base.validation import MAX_ADOPTED_EPOCH, MAX_EPOCH

#: A fresh state's first epoch is drawn from 1 to this.
FIRST_EPOCHS = 2**40
#: Each later start moves the epoch by 1 to this: from ``MAX_ADOPTED_EPOCH``, 2^32 starts remain
#: before ``MAX_EPOCH``.
EPOCH_STEP = 2**20

MEMORY = ":memory:"
"""The path of a state that lives as long as its store (for tests and throw-away runs)."""

_APPLICATION_ID = 0x414D4D31
"""``PRAGMA application_id`` marking a SQLite file as ours ("AMM1")."""

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE service ("
        " id INTEGER PRIMARY KEY CHECK (id = 1),"
        " epoch INTEGER NOT NULL DEFAULT 0,"
        " running INTEGER NOT NULL DEFAULT 0)",
        "INSERT INTO service (id) VALUES (1)",
        "CREATE TABLE workers ("
        " address TEXT PRIMARY KEY,"
        " name TEXT NOT NULL,"
        " first_seen REAL NOT NULL,"
        " last_seen REAL NOT NULL)",
    ),
    ("CREATE TABLE goals (key TEXT PRIMARY KEY, n INTEGER NULL CHECK (n IS NULL OR n >= 2))",),
    (
        "CREATE TABLE retirements ("
        " worker TEXT PRIMARY KEY,"
        " close INTEGER NOT NULL,"
        " started_at REAL NOT NULL,"
        " deadline REAL,"
        " reason TEXT NOT NULL,"
        " retired INTEGER NOT NULL DEFAULT 0)",
    ),
    (
        "CREATE TABLE keys (key TEXT PRIMARY KEY) WITHOUT ROWID",
        "CREATE TABLE lost ("
        " key TEXT PRIMARY KEY,"
        " worker TEXT NOT NULL,"
        " at REAL NOT NULL,"
        " reason TEXT NOT NULL)",
    ),
    (
        # Whether `running` records an operator's Start or Stop (which then wins over the start
        # setting at every later start) or nothing yet. A flag set before this column existed
        # counts as chosen: an AMM with it set started whatever its settings said.
        "ALTER TABLE service ADD COLUMN running_chosen INTEGER NOT NULL DEFAULT 0",
        "UPDATE service SET running_chosen = running",
    ),
    (
        # The tombstones of forgotten keys (see ``runtime.records.tombstones``), and the last id
        # given to one: ids never repeat, so an agent can tell a new Forget of a key from an old
        # one.
        "CREATE TABLE tombstones ("
        " key TEXT PRIMARY KEY,"
        " id INTEGER NOT NULL,"
        " at REAL NOT NULL,"
        " put_again INTEGER NOT NULL DEFAULT 0)",
        "ALTER TABLE service ADD COLUMN last_tombstone INTEGER NOT NULL DEFAULT 0",
    ),
)


class StateError(Exception):
    """The state file cannot be opened, read or written; the message names the path."""


@dataclass(frozen=True, slots=True)
class RetirementRecord:
    """A retirement under way (``retired`` False) or a worker retired and not closed; times are
    Unix seconds, ``deadline`` None for no limit."""

    worker: str
    close: bool
    started_at: float
    deadline: float | None
    reason: str
    retired: bool = False


@dataclass(frozen=True, slots=True)
class LostRecord:
    """A key lost: the worker that held its last copy ("" when not known), when it was found lost
    (Unix seconds) and how."""

    key: str
    worker: str
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class TombstoneRecord:
    """A key forgotten at ``at`` (Unix seconds) by the Forget numbered ``id``; ``put_again``
    once it was put again since (``at`` is then when that was seen)."""

    key: str
    id: int
    at: float
    put_again: bool = False


@dataclass(frozen=True, slots=True)
class KnownWorker:
    """A worker the AMM has seen; times are Unix seconds."""

    address: str
    name: str
    first_seen: float
    last_seen: float


class StateStore:
    """The AMM's persistent state in the SQLite file at ``path`` (or ``:memory:``).

    ``clock`` gives the Unix time stamped on known workers; tests pass a fake one.
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        draw: Callable[[int], int] = secrets.randbelow,
    ) -> None:
        self.path = path
        self._clock = clock
        #: ``draw(n)`` is a random integer from 0 to n - 1: how far each new epoch jumps.
        self._draw = draw
        self._db: sqlite3.Connection | None = None
        try:
            if path != MEMORY:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._open(self._db)
        except StateError:
            self.close()
            raise
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StateError(
                f"cannot open the AMM state {path!r}: {exc}; repair it, or move it aside to start "
                "afresh (a fresh AMM moves its epoch past the one its agents report)"
            ) from exc

    def _open(self, db: sqlite3.Connection) -> None:
        """Check that the file is ours (or empty), enable WAL, then migrate to the latest schema."""
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
        (version,) = db.execute("PRAGMA user_version").fetchone()
        (tables,) = db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if app_id != _APPLICATION_ID and (app_id != 0 or version != 0 or tables != 0):
            raise StateError(
                f"{self.path!r} is a SQLite database of another application, not an AMM state; "
                "point state_path (AMM_STATE) at another file"
            )
        if version > len(_MIGRATIONS):
            raise StateError(
                f"the AMM state {self.path!r} has schema version {version}, newer than this amm "
                f"knows ({len(_MIGRATIONS)}); upgrade amm"
            )
        if self.path != MEMORY:
            db.execute("PRAGMA journal_mode=WAL")
            # With WAL, a commit survives a crash of the AMM without a sync per write; only a
            # power loss can take back the last ones. A sync per registration (1.5 ms) made a
            # thousand agents joining at once wait on the disk.
            db.execute("PRAGMA synchronous=NORMAL")
        for step in range(version, len(_MIGRATIONS)):
            with self._transaction() as tx:
                if tx.execute("PRAGMA user_version").fetchone()[0] != step:
                    continue  # another process migrated it meanwhile
                for statement in _MIGRATIONS[step]:
                    tx.execute(statement)
                tx.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                tx.execute(f"PRAGMA user_version = {step + 1}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements as one, holding the write lock from the start."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"the AMM state {self.path!r} is closed")
        return self._db

    def _run(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """One statement (atomic on its own in autocommit mode); SQLite errors become StateError."""
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"the AMM state {self.path!r} failed: {exc}") from exc

    def begin_epoch(self) -> int:
        """Move the epoch forward and return it. Call once at each start.

        Not by one: a fresh state begins at a random epoch from 1 to ``FIRST_EPOCHS``, and each
        later start adds a random step from 1 to ``EPOCH_STEP``. Two fresh AMMs, or two started
        from copies of one state file, would otherwise run under the same epoch, and agents take
        directives of their current epoch from either (issue 10); now that takes odds of 1 in
        2^40 (fresh) or 2^20 (copies), and directive ids differ anyway (``EpochFence.new_id``).

        Never beyond ``MAX_EPOCH``: a state whose epoch is within a step of it (only a
        hand-edited file, or one that adopted an epoch near ``MAX_ADOPTED_EPOCH`` and then
        restarted 2^32 times, gets there) is a ``StateError`` that says what to do.
        """
        current = self.epoch
        if current > MAX_EPOCH - EPOCH_STEP:
            raise StateError(
                f"the AMM state {self.path!r} holds epoch {current}, too near the largest "
                f"epoch ({MAX_EPOCH}): no new epoch can begin. Move it aside to start afresh "
                "(a fresh AMM moves its epoch past the one its agents report)"
            )
        step = 1 + (self._draw(FIRST_EPOCHS) if current == 0 else self._draw(EPOCH_STEP))
        rows = self._run("UPDATE service SET epoch = epoch + ? RETURNING epoch", step)
        return int(rows[0][0])

    def raise_epoch(self, above: int) -> int:
        """Move the epoch past ``above`` (if it is not already) and return it.

        For an AMM that finds its agents have seen a newer epoch than its own before it acted:
        its state was reset or it is new, and the most recently started AMM is the one in charge.
        ``above`` is at most ``MAX_ADOPTED_EPOCH`` (callers refuse more), which keeps 2^32
        restarts (of at most ``EPOCH_STEP`` each) in hand below ``MAX_EPOCH``.
        """
        if not 0 <= above <= MAX_ADOPTED_EPOCH:
            raise ValueError(f"an epoch to move past is 0 to {MAX_ADOPTED_EPOCH}, not {above}")
        rows = self._run("UPDATE service SET epoch = MAX(epoch, ?) RETURNING epoch", int(above) + 1)
        return int(rows[0][0])

    @property
    def epoch(self) -> int:
        """The current epoch; 0 until the first :meth:`begin_epoch`."""
        return int(self._run("SELECT epoch FROM service")[0][0])

    @property
    def running(self) -> bool:
        """Whether the AMM was cycling by an operator's choice (False when none was made)."""
        return bool(self._run("SELECT running FROM service")[0][0])

    @property
    def running_choice(self) -> bool | None:
        """The operator's last Start (True) or Stop (False), restored at start; None when
        neither was ever recorded, and the ``start`` setting decides."""
        running, chosen = self._run("SELECT running, running_chosen FROM service")[0]
        return bool(running) if chosen else None

    def set_running(self, running: bool) -> None:
        """Persist an operator's Start or Stop."""
        self._run("UPDATE service SET running = ?, running_chosen = 1", int(running))

    def remember_worker(self, address: str, name: str) -> None:
        """Record that ``address`` was seen now (first sighting or again; the name may change)."""
        now = self._clock()
        self._run(
            "INSERT INTO workers (address, name, first_seen, last_seen) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (address)"
            " DO UPDATE SET name = excluded.name, last_seen = excluded.last_seen",
            address,
            name,
            now,
            now,
        )

    def forget_worker(self, address: str) -> None:
        """Drop ``address`` from the known workers; unknown addresses are ignored."""
        self._run("DELETE FROM workers WHERE address = ?", address)

    def known_workers(self) -> list[KnownWorker]:
        """The remembered workers, ordered by address."""
        rows = self._run(
            "SELECT address, name, first_seen, last_seen FROM workers ORDER BY address"
        )
        return [KnownWorker(*row) for row in rows]

    def set_goals(self, keys: Iterable[str], n: int | None) -> None:
        """Set the replication goal of ``keys`` to ``n`` copies (None: every worker), in one
        transaction; n must be at least 2 (a goal of 1 is no goal: :meth:`remove_goals`)."""
        if n is not None and n < 2:
            raise ValueError(f"a stored goal is at least 2 copies, not {n}")
        rows = [(key, n) for key in keys]
        self._many(
            "INSERT INTO goals (key, n) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET n = excluded.n",
            rows,
        )

    def remove_goals(self, keys: Iterable[str]) -> None:
        """Remove the goals of ``keys``, in one transaction; keys without one are ignored."""
        self._many("DELETE FROM goals WHERE key = ?", [(key,) for key in keys])

    def goals(self) -> dict[str, int | None]:
        """Every replication goal: key -> copies (None: every worker)."""
        return {
            str(key): None if n is None else int(n)
            for key, n in self._run("SELECT key, n FROM goals")
        }

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """One statement over many rows, all or nothing; SQLite errors become StateError."""
        if not rows:
            return
        try:
            with self._transaction() as tx:
                tx.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StateError(f"the AMM state {self.path!r} failed: {exc}") from exc

    def bury(self, keys: Sequence[str], at: float) -> list[TombstoneRecord]:
        """Record a tombstone for each key (replacing an earlier one), each under a new id, in
        one transaction; returns them in the order of ``keys``."""
        if not keys:
            return []
        try:
            with self._transaction() as tx:
                (last,) = tx.execute(
                    "UPDATE service SET last_tombstone = last_tombstone + ?"
                    " RETURNING last_tombstone",
                    (len(keys),),
                ).fetchone()
                records = [
                    TombstoneRecord(key, int(last) - len(keys) + 1 + i, at)
                    for i, key in enumerate(keys)
                ]
                tx.executemany(
                    "INSERT OR REPLACE INTO tombstones (key, id, at, put_again)"
                    " VALUES (?, ?, ?, 0)",
                    [(r.key, r.id, r.at) for r in records],
                )
        except sqlite3.Error as exc:
            raise StateError(f"the AMM state {self.path!r} failed: {exc}") from exc
        return records

    def mark_put_again(self, key: str, at: float) -> None:
        """Record that ``key`` was put again after its Forget."""
        self._run("UPDATE tombstones SET put_again = 1, at = ? WHERE key = ?", at, key)

    def unbury(self, keys: Iterable[str]) -> None:
        """Drop the tombstones of ``keys`` (expired), in one transaction."""
        self._many("DELETE FROM tombstones WHERE key = ?", [(key,) for key in keys])

    def tombstones(self) -> list[TombstoneRecord]:
        """Every tombstone, oldest first."""
        rows = self._run("SELECT key, id, at, put_again FROM tombstones ORDER BY at, id")
        return [TombstoneRecord(str(k), int(i), float(a), bool(p)) for k, i, a, p in rows]

    def save_retirement(self, record: RetirementRecord) -> None:
        """Record a retirement (replacing any earlier one of the same worker)."""
        self._run(
            "INSERT OR REPLACE INTO retirements"
            " (worker, close, started_at, deadline, reason, retired) VALUES (?, ?, ?, ?, ?, ?)",
            record.worker,
            int(record.close),
            record.started_at,
            record.deadline,
            record.reason,
            int(record.retired),
        )

    def forget_retirement(self, worker: str) -> None:
        """Drop the retirement of ``worker`` (abandoned, or the worker left); unknown: ignored."""
        self._run("DELETE FROM retirements WHERE worker = ?", worker)

    def retirements(self) -> list[RetirementRecord]:
        """The recorded retirements, ordered by worker."""
        rows = self._run(
            "SELECT worker, close, started_at, deadline, reason, retired FROM retirements"
            " ORDER BY worker"
        )
        return [RetirementRecord(w, bool(c), s, d, r, bool(done)) for w, c, s, d, r, done in rows]

    def add_keys(self, keys: Iterable[str]) -> None:
        """Record that the cluster holds ``keys`` (already recorded ones are left as they are)."""
        self._many("INSERT OR IGNORE INTO keys (key) VALUES (?)", [(key,) for key in keys])

    def remove_keys(self, keys: Iterable[str]) -> None:
        """Record that no worker holds ``keys`` any more; unrecorded keys are ignored."""
        self._many("DELETE FROM keys WHERE key = ?", [(key,) for key in keys])

    def held_keys(self) -> set[str]:
        """Every key recorded as held by the cluster."""
        return {str(key) for (key,) in self._run("SELECT key FROM keys")}

    def save_lost(self, records: Iterable[LostRecord]) -> None:
        """Record lost keys (replacing earlier records of the same keys), in one transaction."""
        self._many(
            "INSERT OR REPLACE INTO lost (key, worker, at, reason) VALUES (?, ?, ?, ?)",
            [(r.key, r.worker, r.at, r.reason) for r in records],
        )

    def forget_lost(self, keys: Iterable[str]) -> None:
        """Drop the records of ``keys`` (found again, or forgotten); unknown keys are ignored."""
        self._many("DELETE FROM lost WHERE key = ?", [(key,) for key in keys])

    def lost(self) -> list[LostRecord]:
        """Every lost key, ordered by key."""
        rows = self._run("SELECT key, worker, at, reason FROM lost ORDER BY key")
        return [LostRecord(str(k), str(w), float(at), str(r)) for k, w, at, r in rows]

    def close(self) -> None:
        """Close the file; idempotent."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
