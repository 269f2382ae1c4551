"""Directives waiting to be sent, kept in columns.

A big cycle hands the dispatcher 300,000 drops far faster than agents read them, and as
``Directive`` tuples with their id strings they cost about 216 bytes each while they wait (65 MiB
for 100k keys with three drops each). A ``DirectivePack`` keeps one message's worth in columns
(an id number under a shared prefix, op, key, size, checksum, peers, policy and reason: about 50
bytes each, the strings shared with the cluster state) and gives each ``Directive`` back, or the
fields the wire needs, when the message is built.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.ids import split_id
from amm_service.decisions.view import Key, WorkerId

_new_directive = tuple.__new__


class DirectivePack:
    """Directives in columns, in order; ``pack[i]`` builds the ``i``-th again (equal to the one
    put in). Ids are a ``prefix`` and a number each; one under another prefix or epoch, or with
    no number, is kept whole (rare: a pack is filled by one cycle of one AMM)."""

    __slots__ = (
        "_checksums",
        "_epochs",
        "_ids",
        "_keys",
        "_notes",
        "_ops",
        "_peers",
        "_seqs",
        "_sizes",
        "_workers",
        "epoch",
        "prefix",
    )

    def __init__(self, directives: Iterable[Directive] = ()) -> None:
        self.prefix: str | None = None
        self.epoch = 0
        self._seqs = array("q")
        self._ops = bytearray()
        """1 for DROP."""
        self._keys: list[Key] = []
        self._workers: list[WorkerId] = []
        self._sizes = array("q")
        self._checksums: list[str] = []
        self._peers: list[tuple[WorkerId, ...]] = []
        """``sources`` of a REPLICATE, ``holders`` of a DROP."""
        self._notes: list[tuple[str, str]] = []
        self._ids: dict[int, str] = {}
        """Whole ids of those with no number under ``prefix``, by position."""
        self._epochs: dict[int, int] = {}
        """Epochs that are not ``epoch``, by position."""
        self.extend(directives)

    def extend(self, directives: Iterable[Directive]) -> None:
        notes: dict[tuple[str, str], tuple[str, str]] = {}
        seqs, ops, keys, workers = self._seqs, self._ops, self._keys, self._workers
        sizes, checksums, peers, kept = self._sizes, self._checksums, self._peers, self._notes
        drop_op = Op.DROP
        for d in directives:
            at = len(seqs)
            if at == 0:
                self.epoch = d.epoch
            directive_id = d.id
            number = -1
            prefix = self.prefix
            if prefix is not None:
                if directive_id.startswith(prefix):  # nearly all: no split needed
                    digits = directive_id[len(prefix) :]
                    plain = digits.isascii() and digits.isdigit()
                    if plain and (digits[0] != "0" or digits == "0"):
                        number = int(digits)
            else:
                split = split_id(directive_id)
                if split is not None:
                    self.prefix, number = split
            seqs.append(number)
            if number < 0:
                self._ids[at] = directive_id
            if d.epoch != self.epoch:
                self._epochs[at] = d.epoch
            drop = d.op is drop_op
            ops.append(drop)
            keys.append(d.key)
            workers.append(d.worker)
            sizes.append(d.size)
            checksums.append(d.checksum)
            peers.append(d.holders if drop else d.sources)
            note = (d.policy, d.reason)
            kept.append(notes.setdefault(note, note))

    def __len__(self) -> int:
        return len(self._seqs)

    def __getitem__(self, i: int) -> Directive:
        if i < 0:
            i += len(self._seqs)
        drop = self._ops[i]
        peers = self._peers[i]
        policy, reason = self._notes[i]
        return _new_directive(
            Directive,
            (
                self.id(i),
                self._epochs.get(i, self.epoch) if self._epochs else self.epoch,
                Op.DROP if drop else Op.REPLICATE,
                self._keys[i],
                self._workers[i],
                self._sizes[i],
                self._checksums[i],
                () if drop else peers,
                peers if drop else (),
                policy,
                reason,
            ),
        )

    def __iter__(self) -> Iterator[Directive]:
        for i in range(len(self._seqs)):
            yield self[i]

    def id(self, i: int) -> str:
        seq = self._seqs[i]
        return self._ids[i] if seq < 0 else f"{self.prefix}{seq}"

    def ids(self) -> Iterator[str]:
        prefix, ids = self.prefix, self._ids
        for i, seq in enumerate(self._seqs):
            yield ids[i] if seq < 0 else f"{prefix}{seq}"

    def numbered(self) -> tuple[str | None, Iterator[int], list[str]]:
        """``(prefix, numbers, others)``: the ids as numbers under ``prefix``, and the others
        whole (what an ``IdSet`` takes without building the strings)."""
        return self.prefix, (seq for seq in self._seqs if seq >= 0), list(self._ids.values())

    def fields(
        self, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[str, int, bool, Key, int, str, tuple[WorkerId, ...], str, str]]:
        """``(id, epoch, drop, key, size, checksum, peers, policy, reason)`` of each directive
        from ``start`` to ``stop``: what the wire needs, without building ``Directive`` s."""
        stop = len(self._seqs) if stop is None else min(stop, len(self._seqs))
        prefix, ids, epoch, epochs = self.prefix, self._ids, self.epoch, self._epochs
        seqs, ops, keys, sizes = self._seqs, self._ops, self._keys, self._sizes
        checksums, peers, notes = self._checksums, self._peers, self._notes
        for i in range(start, stop):
            seq = seqs[i]
            policy, reason = notes[i]
            yield (
                ids[i] if seq < 0 else f"{prefix}{seq}",
                epochs.get(i, epoch) if epochs else epoch,
                bool(ops[i]),
                keys[i],
                sizes[i],
                checksums[i],
                peers[i],
                policy,
                reason,
            )
