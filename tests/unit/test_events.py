"""The event log keeps the newest events first, bounded, and logs each one."""

from __future__ import annotations

import logging

import pytest

from amm_service.decisions.events import MAX_KEYS_LISTED, EventLog


def test_newest_first_and_bounded() -> None:
    times = iter(range(10))
    log = EventLog(maxlen=3, clock=lambda: float(next(times)))
    for i in range(5):
        log.record("retired", f"event {i}", worker=f"w{i}")
    assert [e.message for e in log.recent()] == ["event 4", "event 3", "event 2"]
    assert log.recent(1)[0].at == 4.0
    assert len(log) == 3


def test_keys_are_listed_sorted_and_capped() -> None:
    log = EventLog()
    event = log.record("key-lost", "lost", keys=[f"k{i:04d}" for i in range(500, 0, -1)])
    assert len(event.keys) == MAX_KEYS_LISTED
    assert event.keys[0] == "k0001"


def test_losses_are_logged_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    log = EventLog()
    with caplog.at_level(logging.INFO, logger="amm_service.decisions.events"):
        log.record("key-lost", "3 keys lost", worker="w1")
        log.record("retired", "done", worker="w2")
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["key-lost w1: 3 keys lost"] == logging.WARNING
    assert levels["retired w2: done"] == logging.INFO
    assert [e.kind for e in log.of_kind("retired")] == ["retired"]
