"""``ReloadingServerContext``: the dashboard's TLS context follows a rotation of its files, and
keeps the last usable one while a change cannot be used."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from amm.base.security import Role, Security, SecurityError
from amm.base.security.server_tls import ReloadingServerContext


def test_a_context_is_rebuilt_when_the_files_change_and_only_then(tmp_path: Path) -> None:
    certs = Security.temporary(tmp_path)
    amm = certs.as_identity("amm")
    assert amm.cert is not None
    assert amm.key is not None
    contexts = ReloadingServerContext(certs.ca, amm.cert, amm.key)
    first = contexts.current()
    assert first is contexts.context
    assert first.verify_mode is ssl.CERT_REQUIRED
    assert contexts.current() is first, "unchanged files: the same context"

    certs.issue(Role.AMM, "amm")
    second = contexts.current()
    assert second is not first
    assert contexts.current() is second


def test_a_change_that_cannot_be_used_keeps_the_last_good_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = Security.temporary(tmp_path)
    amm = certs.as_identity("amm")
    assert amm.cert is not None
    assert amm.key is not None
    contexts = ReloadingServerContext(certs.ca, amm.cert, amm.key)
    good = contexts.current()
    pem = amm.cert.read_bytes()
    amm.cert.write_bytes(b"not a certificate")
    assert contexts.current() is good
    assert "not usable yet" in caplog.text
    amm.cert.write_bytes(pem + b"\n")  # written again (as a rotation does): usable
    assert contexts.current() is not good


def test_unusable_files_at_start_are_a_security_error(tmp_path: Path) -> None:
    certs = Security.temporary(tmp_path)
    reader = certs.as_identity("reader")
    amm = certs.as_identity("amm")
    assert reader.cert is not None
    assert amm.key is not None
    with pytest.raises(SecurityError, match="unusable TLS files"):
        ReloadingServerContext(certs.ca, reader.cert, amm.key)  # a key of another certificate
