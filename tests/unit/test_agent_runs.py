"""A repeated sub-message field built from, and read as, runs of alike bytes (``runs``): what the
real parser makes of the bytes joined, and what ``runs`` reads back, element for element."""

from __future__ import annotations

from amm.v1 import agent_pb2
from worker_agent.runs import framed, runs

ANSWERS = agent_pb2.PromiseKeepBatchResponse.ANSWERS_FIELD_NUMBER


def _kept(seconds: int) -> agent_pb2.PromiseKeepResponse:
    answer = agent_pb2.PromiseKeepResponse(kept=True)
    answer.lease.seconds = seconds
    return answer


def _joined(answers: list[agent_pb2.PromiseKeepResponse]) -> bytes:
    return b"".join(framed(ANSWERS, a.SerializeToString()) for a in answers)


def _expanded(data: bytes) -> list[agent_pb2.PromiseKeepResponse] | None:
    found = runs(data, ANSWERS)
    if found is None:
        return None
    return [agent_pb2.PromiseKeepResponse.FromString(e) for e, n in found for _ in range(n)]


def test_joined_elements_parse_as_the_messages_added_one_by_one() -> None:
    refused = agent_pb2.PromiseKeepResponse(kept=False, message="x" * 300)  # a 2-byte length
    answers = [_kept(5)] * 300 + [refused] * 3 + [_kept(6)] + [_kept(5)] * 2
    response = agent_pb2.PromiseKeepBatchResponse()
    response.MergeFromString(_joined(answers))
    assert response == agent_pb2.PromiseKeepBatchResponse(answers=answers)


def test_runs_read_back_every_element_in_order_whatever_the_run_lengths() -> None:
    refused = agent_pb2.PromiseKeepResponse(kept=False, message="not held")
    for lengths in ([1], [1, 1, 1], [7, 1, 2], [256, 255, 1, 1000], [3, 5, 3]):
        answers = [
            (_kept(n % 3) if i % 2 else refused) for i, n in enumerate(lengths) for _ in range(n)
        ]
        data = agent_pb2.PromiseKeepBatchResponse(answers=answers).SerializeToString()
        assert _expanded(data) == answers
        found = runs(data, ANSWERS)
        assert found is not None
        assert [n for _, n in found] == lengths


def test_runs_give_up_on_anything_but_the_field() -> None:
    assert runs(b"", ANSWERS) == []
    element = framed(ANSWERS, _kept(5).SerializeToString())
    assert runs(element[:-1], ANSWERS) is None, "cut short"
    assert runs(element + b"\x12\x00", ANSWERS) is None, "another field"
    assert runs(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", ANSWERS) is None, "varint"
    assert runs(b"\x0a", ANSWERS) is None, "no length"
