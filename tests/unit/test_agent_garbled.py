"""What an agent salvages of a Directives message that does not decode (``garbled``)."""

from __future__ import annotations

from amm.v1 import agent_pb2, types_pb2
from worker_agent.garbled import Garbled, decode_directives


def field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


BAD_KEY = field(4, b"\xff\xfe")  # Directive.key, not UTF-8


def test_a_message_that_decodes_is_the_message() -> None:
    request = agent_pb2.DirectivesRequest(directive=types_pb2.Directive(id="d", key="k"))
    assert decode_directives(request.SerializeToString()) == request


def test_each_directive_of_a_batch_is_judged_on_its_own() -> None:
    good = types_pb2.Directive(id="good", key="k")
    raw = field(2, field(1, b"bad") + BAD_KEY) + field(2, good.SerializeToString())
    salvaged = decode_directives(raw)
    assert isinstance(salvaged, Garbled)
    assert (salvaged.batch, salvaged.fatal) == (True, "")
    assert salvaged.directives == (good,)
    assert [directive_id for directive_id, _ in salvaged.refused] == ["bad"]
    assert "UTF-8" in salvaged.refused[0][1]


def test_the_last_of_a_repeated_single_directive_counts_as_protobuf_reads_it() -> None:
    raw = field(1, field(1, b"first")) + field(1, field(1, b"last") + BAD_KEY)
    salvaged = decode_directives(raw)
    assert isinstance(salvaged, Garbled)
    assert salvaged.batch is False
    assert [directive_id for directive_id, _ in salvaged.refused] == ["last"]


def test_what_names_no_directive_ends_the_stream() -> None:
    cases = {
        "no id": field(1, BAD_KEY),
        "an id that is not UTF-8": field(1, field(1, b"\xff") + BAD_KEY),
        "a truncated field": b"\x12\x10abc",
        "an unknown wire type": b"\x0f",
    }
    for what, raw in cases.items():
        salvaged = decode_directives(raw)
        assert isinstance(salvaged, Garbled), what
        assert salvaged.fatal, what
        assert not salvaged.directives, what
