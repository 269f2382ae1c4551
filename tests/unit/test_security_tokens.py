"""Bearer tokens: minted once, stored as hashes, verified against a file that may change."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from amm.base.security import Identity, Role, SecurityError, TokenFile, mint_token
from amm.base.security.files import write_atomic
from amm.base.security.tokens import digest, parse_tokens


def test_a_minted_token_verifies_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    ci = mint_token(path, Role.OPERATOR, "ci")
    dash = mint_token(path, Role.READER, "dash")
    assert ci != dash
    assert len(ci) >= 43  # 256 random bits
    text = path.read_text()
    assert ci not in text
    assert dash not in text
    assert text.splitlines() == [
        f"operator ci sha256:{digest(ci).hex()}",
        f"reader dash sha256:{digest(dash).hex()}",
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tokens = TokenFile(path)
    assert tokens.verify(ci) == Identity(Role.OPERATOR, "ci", via="token")
    assert tokens.verify(dash) == Identity(Role.READER, "dash", via="token")
    assert tokens.verify(ci[:-1]) is None
    assert tokens.verify("") is None


def test_a_missing_token_file_grants_nothing(tmp_path: Path) -> None:
    assert TokenFile(tmp_path / "tokens").verify("anything") is None


def test_changes_to_the_file_are_seen_at_the_next_verify(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    tokens = TokenFile(path)
    first = mint_token(path, Role.READER, "a")
    assert tokens.verify(first) is not None
    second = mint_token(path, Role.OPERATOR, "b")
    assert tokens.verify(second) == Identity(Role.OPERATOR, "b", via="token")
    kept = [line for line in path.read_text().splitlines() if not line.startswith("reader a ")]
    write_atomic(path, ("\n".join(kept) + "\n").encode(), 0o600)
    assert tokens.verify(first) is None
    assert tokens.verify(second) is not None


def test_tokens_are_for_people_and_scripts_not_machines(tmp_path: Path) -> None:
    for role in (Role.AGENT, Role.AMM):
        with pytest.raises(SecurityError, match="use certificates"):
            mint_token(tmp_path / "tokens", role, "x")
    assert not (tmp_path / "tokens").exists()


def test_bad_lines_are_skipped_by_number_and_never_echoed(caplog: pytest.LogCaptureFixture) -> None:
    good = "0" * 64
    text = "\n".join(
        [
            "# a comment",
            f"operator ci sha256:{good}  # trailing comment",
            "operator only-two-fields",
            f"agent w7 sha256:{good}",  # machines carry certificates
            f"reader Bad sha256:{good}",
            "reader x md5:secretish",
            f"admin y sha256:{good}",
            "",
        ]
    )
    with caplog.at_level(logging.WARNING):
        entries = parse_tokens(text, "tokens")
    assert [e.identity for e in entries] == [Identity(Role.OPERATOR, "ci", via="token")]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"tokens line {n} ignored" for n in (3, 4, 5, 6, 7)
    ]
    assert "secretish" not in caplog.text
