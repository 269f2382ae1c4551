"""Directives messages that do not decode: every directive whose id can be read gets an answer.

An undecodable ``DirectivesRequest`` (a string that is not UTF-8, a truncated field) used to end
its stream with OK and no outcome at all, leaving the sender to time its directives out. The
contract answers directives by id, so such a message is taken apart field by field:

1. directives that decode run as usual;
2. those that do not, but whose id reads as UTF-8, are refused INVALID with the decoder's error;
3. when the message cannot be taken apart, or a directive's id cannot be read, nothing could name
   what is refused: the stream ends with INVALID_ARGUMENT.

Only field numbers and wire types are read by hand here; protobuf decodes everything it can.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from amm.v1 import agent_pb2, types_pb2

#: ``DirectivesRequest`` fields: ``directive = 1``, ``batch = 2``, ``drops = 3``;
#: ``Directive.id = 1``; ``DropColumns.ids = 2``.
_DIRECTIVE, _BATCH, _DROPS, _ID, _COLUMN_IDS = 1, 2, 3, 1, 2
_LENGTH_DELIMITED = 2


@dataclass(frozen=True, slots=True)
class Garbled:
    """What could be read of an undecodable ``DirectivesRequest``."""

    #: The directives that decode.
    directives: tuple[types_pb2.Directive, ...]
    #: ``(id, why)`` of each directive that does not.
    refused: tuple[tuple[str, str], ...]
    #: Whether the message was a batch (its outcomes are answered as one).
    batch: bool
    #: The decoder's error, for the log.
    error: str
    #: Set when the stream must end with INVALID_ARGUMENT: why.
    fatal: str = ""
    #: The drops in columns (``DirectivesRequest.drops``), when they decode.
    drops: agent_pb2.DropColumns | None = None

    def request(self) -> agent_pb2.DirectivesRequest:
        """The batch of what decodes, as a message of its own."""
        salvaged = agent_pb2.DirectivesRequest(batch=self.directives)
        if self.drops is not None:
            salvaged.drops.CopyFrom(self.drops)
        return salvaged


def decode_directives(raw: bytes) -> agent_pb2.DirectivesRequest | Garbled:
    """The message, or what could be salvaged of it."""
    try:
        return agent_pb2.DirectivesRequest.FromString(raw)
    except DecodeError as err:
        return salvage(raw, str(err))


def salvage(raw: bytes, error: str) -> Garbled:
    """Take an undecodable ``DirectivesRequest`` apart (see the module docstring)."""
    try:
        fields = _fields(raw)
    except ValueError as err:
        return Garbled((), (), False, error, f"undecodable Directives message: {err}")
    batch = [value for number, wire, value in fields if number == _BATCH and wire == 2]
    parts = (
        batch
        or [value for number, wire, value in fields if number == _DIRECTIVE and wire == 2][-1:]
    )  # a repeated non-repeated field: the last one counts, as protobuf reads it
    good: list[types_pb2.Directive] = []
    refused: list[tuple[str, str]] = []
    for part in parts:
        assert isinstance(part, bytes)
        try:
            good.append(types_pb2.Directive.FromString(part))
            continue
        except DecodeError as err:
            why = str(err)
        directive_id = _readable_id(part)
        if directive_id is None:
            return Garbled(
                (),
                (),
                bool(batch),
                error,
                f"undecodable directive without a readable id: {why}",
            )
        refused.append((directive_id, why))
    columns = [value for number, wire, value in fields if number == _DROPS and wire == 2]
    if not columns:
        return Garbled(tuple(good), tuple(refused), bool(batch), error)
    # Occurrences of a message field merge, as their bytes joined do.
    joined = b"".join(part for part in columns if isinstance(part, bytes))
    try:
        drops = agent_pb2.DropColumns.FromString(joined)
    except DecodeError as err:
        ids = _readable_column_ids(joined)
        if ids is None:
            return Garbled(
                (), (), True, error, f"undecodable drop columns without readable ids: {err}"
            )
        return Garbled(tuple(good), (*refused, *((i, str(err)) for i in ids)), True, error)
    return Garbled(tuple(good), tuple(refused), True, error, drops=drops)


def _readable_column_ids(raw: bytes) -> list[str] | None:
    """The ids of undecodable ``DropColumns``, when every one reads as non-empty UTF-8."""
    try:
        fields = _fields(raw)
    except ValueError:
        return None
    ids: list[str] = []
    for number, wire, value in fields:
        if number != _COLUMN_IDS or wire != _LENGTH_DELIMITED or not isinstance(value, bytes):
            continue
        try:
            text = value.decode()
        except UnicodeDecodeError:
            return None
        if not text:
            return None
        ids.append(text)
    return ids


def _readable_id(raw: bytes) -> str | None:
    """The id of an undecodable ``Directive``, when it reads as UTF-8."""
    try:
        fields = _fields(raw)
    except ValueError:
        return None
    ids = [value for number, wire, value in fields if number == _ID and wire == 2]
    if not ids:
        return None
    try:
        text = ids[-1].decode() if isinstance(ids[-1], bytes) else None
    except UnicodeDecodeError:
        return None
    return text or None


def _fields(raw: bytes) -> list[tuple[int, int, bytes | int]]:
    """``(field number, wire type, value)`` of each field of a serialized message."""
    fields: list[tuple[int, int, bytes | int]] = []
    at, end = 0, len(raw)
    while at < end:
        tag, at = _varint(raw, at)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        value: bytes | int
        if wire == 0:
            value, at = _varint(raw, at)
        elif wire == 1:
            value, at = raw[at : at + 8], at + 8
        elif wire == _LENGTH_DELIMITED:
            length, at = _varint(raw, at)
            value, at = raw[at : at + length], at + length
        elif wire == 5:
            value, at = raw[at : at + 4], at + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if at > end:
            raise ValueError("truncated field")
        fields.append((number, wire, value))
    return fields


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
