"""How undecodable requests are reported (``amm.base.guard``): one line per client per interval."""

from __future__ import annotations

import logging

import pytest

from amm.base.guard import Complaints


def test_a_client_is_logged_once_per_interval_with_what_it_sent_meanwhile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    complaints = Complaints(logging.getLogger("guard-test"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "guard-test"):
        for _ in range(400):
            complaints.note("ipv4:10.0.0.1:5000", "Poll request", "bad UTF-8")
        complaints.note("ipv6:[::1]:6000", "Poll request", "bad UTF-8")
        now[0] = 10.5
        complaints.note("ipv4:10.0.0.1:5001", "Put request", "truncated")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "undecodable Poll request from 10.0.0.1: bad UTF-8",
        "undecodable Poll request from [::1]: bad UTF-8",
        "undecodable Put request from 10.0.0.1: truncated (399 more from it since the last such "
        "line)",
    ]
