"""The agent's local integrity rules: may this directive or request take effect, here and now?

Each rule is a synchronous function of the store, the agent's conditions and ``now`` that returns
``Accept`` or ``Refuse(reason, message)``; it never mutates anything. The AMM plans no loss of the
last replica, and the agent refuses anyway: these rules are the second line and are never optional.

The refusal reasons mirror ``amm.v1.RefusalReason`` by name; converting to and from protobuf happens
at the gRPC edge (``servicer``).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

from amm.base.validation import MAX_EPOCH, bad_addresses, epoch_problem, is_address
from worker_agent.store import MAX_KEY_BYTES, Key, Store, Value

#: ``str.translate`` deleting the lowercase hexadecimal digits: what is left of a text is what
#: is not one. (Stripping them, as before, cost a microsecond per checksum, a regular
#: expression half that; deleting them, in CPython's ASCII fast path, about 0.1 us.)
_NOT_HEX = str.maketrans("", "", "0123456789abcdef")


def is_checksum(text: str) -> bool:
    """Lowercase hexadecimal SHA-256, as the contract spells every checksum (judged for every
    key of every batch of drops and promises)."""
    return len(text) == 64 and not text.translate(_NOT_HEX)


def all_checksums(texts: Collection[str]) -> bool:
    """Whether each of ``texts`` is a checksum (``is_checksum``), in two C-level passes for
    all of them: a batch of drops or promises names thousands."""
    return set(map(len, texts)) <= {64} and not "".join(texts).translate(_NOT_HEX)


def is_peer_address(text: str) -> bool:
    """``HOST:PORT`` with a port from 1, the only form of address an agent dials for a peer
    (``amm.base.validation``, the rules the AMM applies to registrations)."""
    return is_address(text)


class Reason(enum.Enum):
    """Why a directive or a request was refused or failed (``amm.v1.RefusalReason``)."""

    # By identity, as they compare: Enum hashes the member's name in Python, and every outcome
    # of a batch of thousands is counted by (op, status, reason).
    __hash__ = object.__hash__

    STALE_EPOCH = 1
    INVALID = 2
    PINNED = 3
    IN_USE = 4
    NO_CONFIRMED_HOLDER = 5
    KEEP_PROMISED = 6
    PAUSED = 7
    MEMORY_LIMIT = 8
    SOURCE_UNAVAILABLE = 9
    CHECKSUM_MISMATCH = 10
    NOT_HELD = 11
    DROPPING = 12
    CLOSING = 13
    UNCONFIRMED_EPOCH = 14
    UNKNOWN_PEER = 15
    FORGOTTEN = 16


class Op(enum.Enum):
    """What a directive asks for; UNSPECIFIED stands for anything this agent does not know."""

    # By identity, as they compare: Enum hashes the member's name in Python, and every outcome
    # of a batch of thousands is counted by (op, status, reason).
    __hash__ = object.__hash__

    UNSPECIFIED = 0
    REPLICATE = 1
    DROP = 2


class Directive(NamedTuple):
    """An order from the AMM (``amm.v1.Directive``); a NamedTuple, as a batch brings thousands."""

    id: str
    epoch: int
    op: Op
    key: Key
    size: int = 0
    checksum: str = ""
    sources: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Conditions:
    """The agent-wide facts the rules depend on, sampled by the caller."""

    newest_epoch: int = 0
    #: The agent has an AMM, which alone moves its epoch (``confirm``): a directive of a newer
    #: epoch than ``newest_epoch`` was not issued by it.
    confirms_epochs: bool = False
    paused: bool = False
    closing: bool = False
    #: Draining before a shutdown: it still serves and drops what it holds, but takes nothing
    #: new and promises nothing (it is about to leave).
    draining: bool = False
    memory_limit: int = 0
    max_value_bytes: int = 1 << 30


@dataclass(frozen=True, slots=True)
class Accept:
    """Go ahead; ``noop`` when the desired state already holds (idempotent directives)."""

    noop: bool = False
    message: str = ""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not: ``reason`` for machines, ``message`` for people."""

    reason: Reason
    message: str


Verdict = Accept | Refuse

#: The plain go-ahead, made once: judged for every key of a batch of thousands (it is frozen).
GO = Accept()


def judge(store: Store, directive: Directive, cond: Conditions, now: float) -> Verdict:
    """The first look at a directive, before anything is marked or fetched."""
    refused = validate(directive) or judge_epoch(directive, cond)
    if refused is not None:
        return refused
    if directive.op is Op.DROP:
        return judge_drop(store, directive, cond, now)
    return judge_replicate(store, directive, cond, now=now)


def validate(directive: Directive) -> Refuse | None:
    """Is the directive well formed? Judged before anything else, its epoch included: nothing in
    a malformed directive is trusted, so its epoch does not count as the newest seen."""
    if not directive.id or not directive.key:
        return Refuse(Reason.INVALID, "a directive needs an id and a key")
    epoch = epoch_problem("the directive's epoch", directive.epoch)
    if epoch is not None:
        return Refuse(Reason.INVALID, epoch)
    if len(directive.key.encode()) > MAX_KEY_BYTES:
        return Refuse(Reason.INVALID, f"the key exceeds {MAX_KEY_BYTES} bytes of UTF-8")
    if directive.op is Op.UNSPECIFIED:
        return Refuse(Reason.INVALID, "unknown directive op")
    if directive.op is Op.REPLICATE:
        # Without the checksum nothing could verify the data, nor its size: the memory limit
        # would be judged on a size the source never has to match.
        if not is_checksum(directive.checksum):
            return Refuse(
                Reason.INVALID, "a REPLICATE needs the value's checksum (64 lowercase hex digits)"
            )
        if not directive.sources:
            return Refuse(Reason.INVALID, "the directive names no source")
    else:
        if not directive.holders:
            return Refuse(Reason.INVALID, "a DROP names the other holders; this one names none")
        if directive.checksum and not is_checksum(directive.checksum):
            return Refuse(Reason.INVALID, "a checksum is 64 lowercase hexadecimal digits")
    bad = bad_addresses((*directive.sources, *directive.holders))
    return Refuse(Reason.INVALID, bad) if bad is not None else None


def current_drop(
    directive: Directive,
    cond: Conditions,
    peers_checked: dict[tuple[str, ...], bool],
    held: Mapping[Key, Value] | None = None,
) -> bool:
    """Whether ``directive`` is a DROP that ``validate`` and ``judge_epoch`` both let through.

    The same rules, judged for every directive of a batch of thousands: the usual drop in a few
    comparisons, its holders' addresses checked once per tuple named (``peers_checked``, kept
    by the caller for the batch: a batch names few), its checksum taken as well formed when it
    is the one stored under the key (``held``, a store's ``held``: each stored checksum was
    computed here); anything unusual is judged by the two functions themselves."""
    epoch, key, holders = directive.epoch, directive.key, directive.holders
    digest = directive.checksum
    if (
        directive.op is Op.DROP
        and directive.id
        and key
        and holders
        and not directive.sources
        and 0 <= epoch <= MAX_EPOCH
        and len(key) * 4 <= MAX_KEY_BYTES
        and (
            not digest
            or (
                held is not None
                and (value := held.get(key)) is not None
                and value.checksum == digest
            )
            or is_checksum(digest)
        )
        and cond.newest_epoch <= epoch
        and (epoch == cond.newest_epoch or not cond.confirms_epochs)
    ):
        good = peers_checked.get(holders)
        if good is None:
            good = peers_checked[holders] = bad_addresses(holders) is None
        if good:
            return True
    return (
        directive.op is Op.DROP
        and validate(directive) is None
        and judge_epoch(directive, cond) is None
    )


_IDS, _EPOCHS, _OPS, _KEYS = (attrgetter(f) for f in ("id", "epoch", "op", "key"))
_CHECKSUMS, _SOURCES, _HOLDERS = (attrgetter(f) for f in ("checksum", "sources", "holders"))


def current_drops(
    directives: Sequence[Directive],
    cond: Conditions,
    peers_checked: dict[tuple[str, ...], bool],
) -> bool:
    """Whether every one of ``directives`` is a ``current_drop``: the same rules, judged for the
    whole of a part of a batch in a few C-level passes over its fields (a call of
    ``current_drop`` each cost about a microsecond). False when any is not, or when it cannot
    tell so cheaply (a drop without a checksum): the caller then judges each."""
    if not directives:
        return True
    keys: list[str] = list(map(_KEYS, directives))
    digests: list[str] = list(map(_CHECKSUMS, directives))
    if not (
        set(map(_OPS, directives)) == {Op.DROP}
        and all(map(_IDS, directives))
        and all(keys)
        and max(map(len, keys)) * 4 <= MAX_KEY_BYTES
        and not any(map(_SOURCES, directives))
        and all_checksums(digests)
    ):
        return False
    newest = cond.newest_epoch
    for epoch in set(map(_EPOCHS, directives)):
        if not (0 <= epoch <= MAX_EPOCH and newest <= epoch) or (
            epoch != newest and cond.confirms_epochs
        ):
            return False
    for holders in set(map(_HOLDERS, directives)):
        if not holders:
            return False
        good = peers_checked.get(holders)
        if good is None:
            good = peers_checked[holders] = bad_addresses(holders) is None
        if not good:
            return False
    return True


def judge_epoch(directive: Directive, cond: Conditions) -> Refuse | None:
    """Directives from an AMM epoch older than the newest confirmed come from a superseded AMM;
    with an AMM to confirm epochs, a newer one than it confirmed was not issued by it."""
    if directive.epoch < cond.newest_epoch:
        return Refuse(
            Reason.STALE_EPOCH,
            f"directive epoch {directive.epoch} is older than epoch {cond.newest_epoch}",
        )
    if cond.confirms_epochs and directive.epoch > cond.newest_epoch:
        return Refuse(
            Reason.UNCONFIRMED_EPOCH,
            f"directive epoch {directive.epoch} is newer than epoch {cond.newest_epoch}, the "
            "one this agent's AMM confirms: its AMM did not issue it",
        )
    return None


def judge_drop(store: Store, directive: Directive, cond: Conditions, now: float) -> Verdict:
    """May the local replica be dropped, once a holder promises to keep the key?"""
    key = directive.key
    if cond.closing:
        return Refuse(Reason.CLOSING, "the agent is shutting down")
    held = store.get(key)
    if held is None:
        return Accept(noop=True, message="not held")
    if directive.checksum and directive.checksum != held.checksum:
        return Refuse(
            Reason.NOT_HELD,
            f"holds other content under {key!r} (checksum {held.checksum[:12]}, "
            f"directive expects {directive.checksum[:12]})",
        )
    if store.is_dropping(key):
        return Refuse(Reason.DROPPING, f"already dropping {key!r}")
    blocked = _local_blockers(store, key, now)
    return blocked if blocked is not None else GO


def judge_drop_commit(store: Store, key: Key, checksum: str, now: float) -> Verdict:
    """The last look, after a holder promised: readers, pins or leases may have appeared since.

    The caller marked the key DROPPING itself, so that is no obstacle here; the caller removes the
    key in the same synchronous step as this call.
    """
    held = store.get(key)
    if held is None:
        return Accept(noop=True, message="not held")
    if held.checksum != checksum:
        return Refuse(Reason.NOT_HELD, f"the content under {key!r} changed while dropping")
    blocked = _local_blockers(store, key, now)
    return blocked if blocked is not None else GO


def judge_replicate(
    store: Store,
    directive: Directive,
    cond: Conditions,
    *,
    received: int | None = None,
    now: float | None = None,
    since: int | None = None,
) -> Verdict:
    """May a replica be fetched and kept? Asked again once the data arrived, with the size
    ``received``: memory is judged on what arrived as well as on what the AMM announced.

    Never a copy of a key forgotten cluster-wide and not put again since (judged at ``now``),
    nor, once the data arrived, one whose transfer began (at tombstone generation ``since``)
    before the key was forgotten: a Forget must not be undone by a copy that was under way."""
    key = directive.key
    held = store.get(key)
    if held is not None:
        if directive.checksum != held.checksum:
            return Refuse(
                Reason.INVALID,
                f"holds other content under {key!r} (checksum {held.checksum[:12]}, "
                f"directive expects {directive.checksum[:12]}); keys are immutable",
            )
        return Accept(noop=True, message="already held")
    if now is not None and (
        store.forgotten(key, now) if since is None else store.doomed(key, since, now)
    ):
        return Refuse(
            Reason.FORGOTTEN,
            f"{key!r} was forgotten cluster-wide"
            + (" while it was being copied" if since is not None else "")
            + "; it is copied again once it is put again",
        )
    if cond.closing or cond.draining:
        return Refuse(Reason.CLOSING, "the agent is shutting down")
    if cond.paused:
        return Refuse(Reason.PAUSED, "the worker is paused (memory above its pause threshold)")
    return _fits(store, max(directive.size, received or 0), cond)


def judge_keep(store: Store, key: Key, checksum: str, cond: Conditions) -> Verdict:
    """May this agent promise a peer to keep ``key``? Refusing while dropping it here is what makes
    two concurrent drops of the last two replicas safe: each refuses the other."""
    if cond.closing or cond.draining:
        return Refuse(Reason.CLOSING, "the agent is shutting down")
    held = store.get(key)
    if held is None:
        return Refuse(Reason.NOT_HELD, f"does not hold {key!r}")
    if checksum and checksum != held.checksum:
        return Refuse(Reason.NOT_HELD, f"holds other content under {key!r}")
    if store.is_dropping(key):
        return Refuse(Reason.DROPPING, f"is dropping {key!r} itself")
    return GO


def judge_delete(store: Store, key: Key, now: float, *, forget: bool = False) -> Verdict:
    """May a user delete the local replica? Same protections as a drop, minus the holders.

    A cluster-wide forget deletes every replica anyway, so promises to peers do not bind it.
    Nor do reads in progress: each streams its own immutable bytes, which removing the key does
    not touch, and a reader that stopped reading must not keep a forgotten key alive. Pins do
    bind it: a pin is a reader's explicit claim on the key.
    """
    if key not in store:
        return Accept(noop=True, message="not held")
    blocked = _local_blockers(store, key, now, promises=not forget, readers=not forget)
    return blocked if blocked is not None else GO


def judge_put(store: Store, key: Key, size: int, cond: Conditions) -> Verdict:
    """May a value of ``size`` bytes be stored under ``key``? (Content is compared later.)"""
    too_big = _too_big(size, cond)
    if too_big is not None:
        return too_big
    if key in store:
        return Accept(noop=True, message="already held")
    return _fits(store, size, cond)


def _too_big(size: int, cond: Conditions) -> Refuse | None:
    if size > cond.max_value_bytes:
        return Refuse(
            Reason.MEMORY_LIMIT,
            f"value of {size} bytes exceeds the largest accepted ({cond.max_value_bytes} bytes)",
        )
    return None


def _fits(store: Store, size: int, cond: Conditions) -> Verdict:
    too_big = _too_big(size, cond)
    if too_big is not None:
        return too_big
    in_flight = store.in_flight_bytes
    if cond.memory_limit and store.total_bytes + in_flight + size > cond.memory_limit:
        return Refuse(
            Reason.MEMORY_LIMIT,
            f"{size} more bytes would exceed the memory limit: {store.total_bytes} of "
            f"{cond.memory_limit} bytes managed"
            + (f", {in_flight} more being received or served" if in_flight else ""),
        )
    return GO


def _local_blockers(
    store: Store, key: Key, now: float, *, promises: bool = True, readers: bool = True
) -> Refuse | None:
    """What protects a held key from removal: local pins, streaming reads, promises to peers."""
    pins = store.pins(key)
    if pins:
        return Refuse(Reason.PINNED, f"{key!r} is pinned ({pins} pin{'s' if pins > 1 else ''})")
    streams = store.in_use(key) if readers else 0
    if streams:
        return Refuse(Reason.IN_USE, f"{key!r} is being read or sent ({streams} streams)")
    expires = store.promised_until(key, now) if promises else None
    if expires is not None:
        return Refuse(
            Reason.KEEP_PROMISED,
            f"promised a peer to keep {key!r} for {expires - now:.1f} s more",
        )
    return None
