"""``edr-certs``: the admin's PKI tool.

    edr-certs init [--names N ...] [--force]      create the CA and the controller certificate
    edr-certs fingerprint                          the CA's SHA-256, for 'edr-sensor enroll'
    edr-certs token create --ttl 1h --uses 1       print a new enrollment token (shown once)
    edr-certs token list | token revoke ID
    edr-certs issue HOST --out DIR                 offline key + certificate for air-gapped hosts
    edr-certs list                                 issued certificates
    edr-certs revoke HOST                          revoke a host (id or hostname), rewrite the CRL
    edr-certs crl [--refresh]                      where the CRL is and what it holds

Every subcommand takes ``--state-dir`` (default ``$EDR_PKI_DIR`` or ``/var/lib/edr/pki``).
Errors are one line on stderr with exit code 1 (2 for usage errors, from argparse).
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from certs import tokens
from certs.enrollment import EnrollmentError
from certs.store import PKIError, PKIStore, default_state_dir, write_atomic

_DURATION_RE = re.compile(r"(\d+)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class CLIError(Exception):
    pass


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``30m``, ``1h``, ``7d``, ``2w`` → timedelta (argparse type)."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a positive number with s, m, h, d or w (e.g. 1h)"
        )
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _fmt(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# -- subcommands ---------------------------------------------------------------------------


def cmd_init(store: PKIStore, args: argparse.Namespace) -> int:
    names = args.names or [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    try:
        ca = store.init(names, force=args.force)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(f"CA created in {store.state_dir}")
    print(f"server certificate names: {', '.join(names)}")
    print(f"CA fingerprint (SHA-256): {ca.fingerprint_sha256}")
    return 0


def cmd_fingerprint(store: PKIStore, args: argparse.Namespace) -> int:
    print(store.load_ca().fingerprint_sha256)
    return 0


def cmd_token_create(store: PKIStore, args: argparse.Namespace) -> int:
    try:
        token = store.create_token(args.ttl, args.uses, comment=args.comment)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    expires = datetime.now(UTC) + args.ttl
    print(token)
    print(
        f"token {token.split('.')[0]}: {args.uses} use(s), expires {_fmt(expires)}; "
        "this secret is not stored and will not be shown again",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(store: PKIStore, args: argparse.Namespace) -> int:
    infos = store.list_tokens()
    if not infos:
        print("no tokens")
        return 0
    rows = [
        [
            t.id,
            t.status(),
            f"{t.uses_count}/{t.uses_allowed}",
            _fmt(t.created_at),
            _fmt(t.expires_at),
            t.comment,
        ]
        for t in infos
    ]
    print(_table(["ID", "STATUS", "USES", "CREATED", "EXPIRES", "COMMENT"], rows))
    return 0


def cmd_token_revoke(store: PKIStore, args: argparse.Namespace) -> int:
    try:
        store.revoke_token(args.id)
    except ValueError as exc:  # TokenError is a ValueError too
        raise CLIError(str(exc)) from None
    print(f"token {args.id} revoked")
    return 0


def cmd_issue(store: PKIStore, args: argparse.Namespace) -> int:
    out: Path = args.out
    store.load_ca()  # fail before creating anything if there is no CA
    if (out / "sensor.key").exists() and not args.force:
        raise CLIError(f"{out} already holds a sensor key; use --force to replace it")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create {out}: {exc.strerror}") from None
    try:
        host_id, cert_pem, key_pem = store.issue_offline(args.host)
    except (ValueError, EnrollmentError) as exc:
        raise CLIError(str(exc)) from None
    # The same layout 'edr-sensor enroll' writes, so DIR can be the sensor's state directory.
    write_atomic(out / "sensor.key", key_pem, 0o600)
    write_atomic(out / "sensor.pem", cert_pem, 0o644)
    write_atomic(out / "ca.pem", store.load_ca().cert_pem, 0o644)
    write_atomic(out / "host_id", host_id.encode() + b"\n", 0o644)
    print(
        f"issued host {host_id} ({args.host}) into {out}: sensor.key (keep secret), "
        "sensor.pem, ca.pem, host_id"
    )
    return 0


def cmd_list(store: PKIStore, args: argparse.Namespace) -> int:
    certs = store.certificates()
    if not certs:
        print("no certificates issued")
        return 0
    now = datetime.now(UTC)
    rows = [
        [
            c.host_id,
            c.hostname,
            c.effective_status(now),
            c.source,
            format(c.serial, "x"),
            _fmt(c.not_after),
            _fmt(c.revoked_at),
        ]
        for c in certs
    ]
    print(
        _table(["HOST ID", "HOSTNAME", "STATUS", "SOURCE", "SERIAL", "NOT AFTER", "REVOKED"], rows)
    )
    return 0


def cmd_revoke(store: PKIStore, args: argparse.Namespace) -> int:
    host_id = store.resolve_host(args.host)
    serials = store.revoke(host_id)
    if not serials:
        print(f"host {host_id} was already revoked; CRL rewritten at {store.crl_path}")
    else:
        print(f"revoked host {host_id}: {len(serials)} certificate(s); CRL {store.crl_path}")
    return 0


def cmd_crl(store: PKIStore, args: argparse.Namespace) -> int:
    store.load_ca()
    if args.refresh:
        store.write_crl()
    try:
        crl = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    except FileNotFoundError:
        raise CLIError(f"no CRL at {store.crl_path}; run 'edr-certs crl --refresh'") from None
    except ValueError:
        raise CLIError(
            f"{store.crl_path} is not a valid CRL; run 'edr-certs crl --refresh'"
        ) from None
    print(f"path:        {store.crl_path}")
    print(f"last update: {_fmt(crl.last_update_utc)}")
    print(f"next update: {_fmt(crl.next_update_utc)}")
    print(f"revoked:     {len(list(crl))}")
    if crl.next_update_utc is not None and crl.next_update_utc <= datetime.now(UTC):
        print(
            "warning: the CRL is past its next update; run 'edr-certs crl --refresh'",
            file=sys.stderr,
        )
    return 0


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edr-certs", description="EDR PKI administration")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="PKI state directory (default $EDR_PKI_DIR or /var/lib/edr/pki)",
    )
    # Subcommands accept --state-dir too; SUPPRESS keeps them from resetting a value given
    # before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", type=Path, default=argparse.SUPPRESS, help="PKI state directory"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create the CA and server certificate")
    p.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="controller DNS names / IP addresses for the server certificate "
        "(default: this hostname, localhost, 127.0.0.1, ::1)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (old files are kept in replaced-*/)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("fingerprint", parents=[common], help="print the CA's SHA-256")
    p.set_defaults(func=cmd_fingerprint)

    tok = sub.add_parser("token", parents=[common], help="enrollment tokens")
    tsub = tok.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("create", parents=[common], help="create a token (printed once)")
    p.add_argument(
        "--ttl",
        type=parse_duration,
        default=timedelta(hours=1),
        help="lifetime, e.g. 30m, 1h, 7d (default 1h, at most 30d)",
    )
    p.add_argument(
        "--uses", type=_positive_int, default=1, help="how many enrollments it allows (default 1)"
    )
    p.add_argument("--comment", default="", help="a note shown in 'token list'")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("list", parents=[common], help="list tokens (never their secrets)")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", parents=[common], help="revoke a token by id")
    p.add_argument("id", help="the 8-hex-digit token id (before the '.')")
    p.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser(
        "issue", parents=[common], help="issue a key and certificate offline (air-gapped hosts)"
    )
    p.add_argument("host", metavar="HOST", help="the host's name (recorded as its hostname)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for sensor.key, sensor.pem, ca.pem, host_id",
    )
    p.add_argument("--force", action="store_true", help="overwrite a key already in DIR")
    p.set_defaults(func=cmd_issue)

    p = sub.add_parser("list", parents=[common], help="list issued certificates")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("revoke", parents=[common], help="revoke a host and rewrite the CRL")
    p.add_argument("host", metavar="HOST", help="host id or (unique) hostname")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("crl", parents=[common], help="show the CRL's path and contents")
    p.add_argument("--refresh", action="store_true", help="regenerate it first")
    p.set_defaults(func=cmd_crl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = PKIStore(args.state_dir or default_state_dir())
    try:
        return args.func(store, args)
    except (CLIError, PKIError, tokens.TokenError) as exc:
        print(f"edr-certs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"edr-certs: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
