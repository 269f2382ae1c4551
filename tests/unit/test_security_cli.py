"""``amm certs``: the verbs through ``amm.cli.main``, as a person would type them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from amm import cli
from amm.base.security import Identity, Revocations, Role, TokenFile
from amm.base.security.certs import certificate_identity, load_certificate


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["certs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_init_issue_token_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = tmp_path / "certs"
    code, out, err = run(capsys, "init", str(certs), "--san", "10.0.0.5,amm.example")
    assert (code, err) == (0, "")
    assert "the cluster CA" in out
    for name in ("amm", "agent", "operator", "reader"):
        assert f"{certs / name}.pem" in out

    code, out, _ = run(
        capsys, "issue", str(certs), "--role", "agent", "--name", "w7", "--san", "10.0.0.7"
    )
    assert code == 0
    assert "agent 'w7'" in out
    assert certificate_identity(load_certificate(certs / "w7.pem")) == Identity(Role.AGENT, "w7")

    code, out, err = run(capsys, "token", str(certs), "--role", "operator", "--name", "ci")
    assert code == 0
    token = out.strip()
    assert out == token + "\n", "only the token on stdout, for T=$(amm certs token ...)"
    assert "only time it is shown" in err
    assert token not in (certs / "tokens").read_text()
    assert TokenFile(certs / "tokens").verify(token) == Identity(Role.OPERATOR, "ci", "token")

    code, out, _ = run(capsys, "revoke", str(certs), "--name", "w7")
    assert code == 0
    assert Revocations(certs / "revoked").reason(Identity(Role.AGENT, "w7")) is not None
    code, _, _ = run(capsys, "revoke", str(certs), "--serial", "0A:BC")
    assert code == 0
    assert (certs / "revoked").read_text() == "w7\nserial:abc\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["init", "{d}"], "already holds a CA"),
        (["issue", "{d}", "--role", "reader", "--name", "Bad"], "invalid identity name 'Bad'"),
        (["issue", "{d}", "--role", "reader", "--name", "agent"], "names are unique"),
        (["issue", "{d}/nowhere", "--role", "agent", "--name", "w1"], "does not exist"),
        (["token", "{d}/nowhere", "--role", "reader", "--name", "x"], "is it a certs folder"),
        (["revoke", "{d}", "--serial", "xyz"], "invalid serial"),
        (["init", "{d}/new", "--san", "a b"], "invalid SAN"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(["certs", "init", str(tmp_path)]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, *(a.format(d=tmp_path) for a in argv))
    assert code == 1
    assert err.startswith("error: ")
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_tokens_only_for_reader_and_operator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["certs", "token", "d", "--role", "agent", "--name", "x"])
    assert exit_.value.code == 2
    parsed = cli.build_parser().parse_args(
        ["certs", "issue", "d", "--role", "agent", "--name", "w", "--san", "a", "--san", "b"]
    )
    assert (parsed.command, parsed.certs_command, parsed.san, parsed.days) == (
        "certs",
        "issue",
        ["a", "b"],
        365,
    )


def test_publish_copies_what_the_servers_need_and_never_the_ca_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs, servers, clients = tmp_path / "certs", tmp_path / "servers", tmp_path / "clients"
    assert cli.main(["certs", "init", str(certs)]) == 0
    assert cli.main(["certs", "issue", str(certs), "--role", "agent", "--name", "w7"]) == 0
    assert cli.main(["certs", "revoke", str(certs), "--name", "w9"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "publish", str(certs), str(servers))
    assert code == 0
    assert "for amm, agent" in out
    names = {"amm", "agent", "w7"}
    assert {p.name for p in servers.iterdir()} == {
        "ca.pem",
        "revoked",
        *(f"{n}.pem" for n in names),
        *(f"{n}-key.pem" for n in names),
    }
    assert stat.S_IMODE((servers / "w7-key.pem").stat().st_mode) == 0o600
    assert (servers / "amm-key.pem").read_bytes() == (certs / "amm-key.pem").read_bytes()
    code, _, _ = run(
        capsys,
        "publish",
        str(certs),
        str(clients),
        "--role",
        "operator",
        "--owner",
        f"{os.getuid()}:{os.getgid()}",
    )
    assert code == 0
    assert {p.name for p in clients.iterdir()} == {
        "ca.pem",
        "revoked",
        "operator.pem",
        "operator-key.pem",
    }
    code, _, err = run(capsys, "publish", str(tmp_path / "none"), str(clients))
    assert code == 1
    assert "is it a certs folder" in err
