"""``amm certs``: make and manage the cluster CA, identities, tokens and revocations on disk.

``init`` makes a CA and the default identities (amm, a shared agent, operator, reader); ``issue``
adds or re-issues one (rotation: servers pick the new files up at their next handshake);
``token`` mints a bearer token, printed once on stdout (so ``T=$(amm certs token ...)`` works)
with only its hash kept; ``revoke`` stops a name or a certificate serial at its next call;
``publish`` copies what the servers (or clients) of some roles need, and never the CA's key, into
another folder, such as the volume that docker-compose.yml mounts into the AMM and the agents. The
work is done by ``amm.base.security``; this module is the command line around it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from amm.base.security import Identity, Role, SecurityError, init_directory, mint_token, revoke
from amm.base.security.certs import (
    CA_CERT,
    CA_KEY,
    LEAF_DAYS,
    CertificateAuthority,
    Issued,
    publish,
)
from amm.base.security.revocation import REVOKED_FILE, parse_serial
from amm.base.security.tokens import TOKENS_FILE

ROLES = [role.value for role in Role]


def _sans(values: Sequence[str] | None) -> list[str]:
    """``--san a --san b,c`` as ``[a, b, c]``."""
    return [s.strip() for value in values or () for s in value.split(",") if s.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``certs`` verbs, on ``amm``'s ``certs`` subparser."""
    verbs = parser.add_subparsers(dest="certs_command", metavar="VERB", required=True)

    def folder(p: argparse.ArgumentParser) -> None:
        p.add_argument("directory", type=Path, metavar="DIR", help="the certs folder")

    def validity(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--san",
            action="append",
            metavar="HOST",
            help="another DNS name or IP the server is reached at (amm, agent; repeatable)",
        )
        p.add_argument("--days", type=int, default=LEAF_DAYS, help="validity in days (%(default)s)")

    init = verbs.add_parser(
        "init", help="a new cluster CA plus identities amm, agent, operator and reader"
    )
    folder(init)
    validity(init)
    issue = verbs.add_parser("issue", help="issue (or re-issue, to rotate) one identity")
    folder(issue)
    issue.add_argument("--role", required=True, choices=ROLES)
    issue.add_argument("--name", required=True, help="unique in the cluster, e.g. w7")
    validity(issue)
    token = verbs.add_parser(
        "token", help="mint a bearer token (printed once; only its hash is kept in DIR/tokens)"
    )
    folder(token)
    token.add_argument("--role", required=True, choices=["reader", "operator"])
    token.add_argument("--name", required=True, help="who holds it, e.g. ci")
    revoke_verb = verbs.add_parser(
        "revoke", help="refuse a name or one certificate from its next call on (DIR/revoked)"
    )
    folder(revoke_verb)
    which = revoke_verb.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", help="every certificate and token of this name")
    which.add_argument("--serial", metavar="HEX", help="one certificate, by its serial")
    publish_verb = verbs.add_parser(
        "publish",
        help="copy what servers (or clients) of some roles need into DEST, never the CA's key",
    )
    folder(publish_verb)
    publish_verb.add_argument("dest", type=Path, metavar="DEST", help="where to copy them")
    publish_verb.add_argument(
        "--role",
        action="append",
        choices=ROLES,
        help="copy the identities of this role (repeatable; default: amm and agent)",
    )
    publish_verb.add_argument(
        "--owner", type=_owner, metavar="UID:GID", help="give the copies to this owner"
    )


def _owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise argparse.ArgumentTypeError(f"expected UID:GID in numbers, got {text!r}")
    return int(uid), int(gid)


def _describe(issued: Issued) -> str:
    return (
        f"{issued.identity!s:<22} {issued.cert}  {issued.key}  "
        f"serial {issued.serial:x}, until {issued.not_after:%Y-%m-%d}"
    )


def run_command(args: argparse.Namespace) -> int:
    """Carry out one ``amm certs`` verb; errors print ``error: ...`` and return 1."""
    try:
        return _run(args)
    except (SecurityError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    verb = args.certs_command
    if verb in ("token", "revoke", "publish") and not (directory / CA_CERT).is_file():
        raise SecurityError(f"{directory} holds no {CA_CERT}: is it a certs folder?")
    if verb == "init":
        issued = init_directory(directory, sans=_sans(args.san), days=args.days)
        print(f"{directory / CA_CERT}: the cluster CA; give it to every server and client")
        print(f"{directory / CA_KEY}: its key; keep it where certificates are issued, only there")
        for one in issued:
            print(_describe(one))
    elif verb == "issue":
        ca = CertificateAuthority(directory)
        identity = Identity(Role.parse(args.role), args.name)
        print(_describe(ca.issue(identity, sans=_sans(args.san), days=args.days)))
    elif verb == "token":
        secret = mint_token(directory / TOKENS_FILE, Role.parse(args.role), args.name)
        print(secret)
        print(
            f"new {args.role} token for {args.name!r}; its hash is in {directory / TOKENS_FILE}. "
            "This is the only time it is shown.",
            file=sys.stderr,
        )
    elif verb == "revoke":
        serial = parse_serial(args.serial) if args.serial is not None else None
        line = revoke(directory / REVOKED_FILE, name=args.name, serial=serial)
        print(
            f"revoked {line} in {directory / REVOKED_FILE}: servers reading it refuse it from "
            "its next call on (copy the file to servers that do not share this folder)"
        )
    elif verb == "publish":
        roles = [Role.parse(r) for r in args.role or ("amm", "agent")]
        written = publish(directory, args.dest, roles, owner=args.owner)
        print(f"{len(written)} files for {', '.join(r.value for r in roles)} in {args.dest}")
    return 0
