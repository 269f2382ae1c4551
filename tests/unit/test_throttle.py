"""The throttle both servers' guards log through: one line per key and interval."""

from __future__ import annotations

from amm.base.throttle import Throttle, client_host


def test_one_event_per_key_per_interval_and_a_count_of_the_rest() -> None:
    now = [0.0]
    throttle = Throttle(interval=10, clock=lambda: now[0])
    assert throttle.admit("a") == 0
    assert [throttle.admit("a") for _ in range(3)] == [None, None, None]
    assert throttle.admit("b") == 0  # keys are counted apart
    now[0] = 10.0
    assert throttle.admit("a") == 3


def test_keys_remembered_are_bounded_least_recently_heard_of_first() -> None:
    throttle = Throttle(interval=10, clock=lambda: 0.0, max_keys=3)
    for n in range(3):
        throttle.admit(n)
    assert throttle.admit(0) is None  # heard of again: now the most recent
    throttle.admit(3)  # forgets 1, the least recently heard of
    assert throttle.admit(0) is None
    assert throttle.admit(1) == 0  # forgotten, so admitted again


def test_client_hosts() -> None:
    assert client_host("ipv4:127.0.0.1:45678") == "127.0.0.1"
    assert client_host("ipv6:[::1]:45678") == "[::1]"
    assert client_host("unix:/tmp/sock") == "unix:/tmp/sock"
