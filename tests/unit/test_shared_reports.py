"""The reports of full snapshots read at once are shared key by key (``poller.SharedReports``)."""

from __future__ import annotations

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from amm.v1 import agent_pb2, types_pb2
from amm_service.runtime.links.poller import SharedReports


def _decoded(pinned: bool = False) -> RepeatedCompositeFieldContainer[types_pb2.KeyInfo]:
    """An answer's keys, as the poller reads them: every string a new object."""
    answer = agent_pb2.PollResponse(
        keys=[
            types_pb2.KeyInfo(key=f"k{i}", size=1, checksum="c" * 64, pinned=pinned)
            for i in range(3)
        ]
    )
    return answer.keys


def test_reports_alike_from_two_snapshots_are_one_object() -> None:
    shared = SharedReports()
    with shared.reading(), shared.reading():
        first = shared.read(_decoded())
        second = shared.read(_decoded())
    assert all(a is b for a, b in zip(first, second, strict=True))


def test_a_report_unlike_the_first_is_kept_as_it_is() -> None:
    shared = SharedReports()
    with shared.reading():
        first = shared.read(_decoded())
        pinned = shared.read(_decoded(pinned=True))
    assert all(p.pinned for p in pinned)
    assert not any(a is b for a, b in zip(first, pinned, strict=True))


def test_nothing_is_kept_once_no_snapshot_is_read() -> None:
    shared = SharedReports()
    with shared.reading():
        first = shared.read(_decoded())
    with shared.reading():
        again = shared.read(_decoded())
    outside = shared.read(_decoded())
    assert not any(a is b for a, b in zip(first, again, strict=True))
    assert outside == first
