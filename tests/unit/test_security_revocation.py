"""The revocation list: names and serials, re-read when it changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from amm.base.security import Identity, Revocations, Role, SecurityError, revoke
from amm.base.security.revocation import parse_revoked, parse_serial

W7 = Identity(Role.AGENT, "w7")


def test_names_and_serials(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    revocations = Revocations(path)
    assert revocations.reason(W7, 0xABC) is None
    assert revoke(path, name="w7") == "w7"
    assert revocations.reason(W7) == "identity 'w7' is revoked"
    assert revocations.reason(Identity(Role.OPERATOR, "w7", via="token")) is not None
    assert revoke(path, serial=0xABC) == "serial:abc"
    w8 = Identity(Role.AGENT, "w8")
    assert revocations.reason(w8, 0xABC) == "certificate serial abc is revoked"
    assert revocations.reason(w8, 0xABD) is None
    assert revocations.reason(w8) is None


def test_serials_as_tools_print_them() -> None:
    assert parse_serial("0A:BC") == parse_serial("serial=0ABC") == parse_serial("0xabc") == 0xABC
    with pytest.raises(SecurityError, match="hex"):
        parse_serial("xyz")


def test_unparseable_lines_are_skipped() -> None:
    found = parse_revoked("# lost laptop\nops\nNot A Name\nserial:zz\nserial:0A:bc # old w7\n")
    assert found.names == {"ops"}
    assert found.serials == {0xABC}


def test_revoke_takes_one_of_name_or_serial(tmp_path: Path) -> None:
    with pytest.raises(SecurityError):
        revoke(tmp_path / "revoked")
    with pytest.raises(SecurityError):
        revoke(tmp_path / "revoked", name="a", serial=1)
