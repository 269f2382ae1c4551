"""Secure by default: no plaintext off loopback without --insecure."""

from __future__ import annotations

import pytest

from amm.base.security import SecurityError, check_listen, is_loopback


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:50051", "127.1.2.3:1", "[::1]:50051", "localhost:50051", "LOCALHOST:0"],
)
def test_loopback_addresses(address: str) -> None:
    assert is_loopback(address)
    check_listen(address, tls=False, insecure=False)


@pytest.mark.parametrize(
    "address",
    ["0.0.0.0:50051", "[::]:50051", ":50051", "10.0.0.7:50051", "amm.example:50051", "[fe80::1]:1"],
)
def test_other_addresses_need_tls_or_insecure(address: str) -> None:
    assert not is_loopback(address)
    with pytest.raises(SecurityError) as err:
        check_listen(address, tls=False, insecure=False)
    assert str(err.value) == (
        f"refusing to listen on {address} without TLS: pass --tls DIR, or --insecure to accept "
        "unauthenticated access"
    )
    check_listen(address, tls=True, insecure=False)
    check_listen(address, tls=False, insecure=True)
