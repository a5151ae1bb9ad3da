"""``edr-controller``: run the controller and manage its users.

    edr-controller serve [--config F] [--state-dir D]
    edr-controller user add NAME --role admin|responder|viewer [--state-dir D]
    edr-controller user list [--state-dir D]

Exit codes: 0 success, 1 operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from controller.config import ConfigError, ControllerConfig, load_config

log = logging.getLogger("controller")

ROLES = ("admin", "responder", "viewer")


class CliError(Exception):
    """A failure to report as one line and exit 1."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edr-controller", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration file")
    common.add_argument("--state-dir", type=Path, help="state directory (overrides config)")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the controller")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    user = sub.add_parser("user", help="manage console users")
    usub = user.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", parents=[common], help="create a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    usub.add_parser("list", parents=[common], help="list users")
    return p


def _config(args: argparse.Namespace) -> ControllerConfig:
    return load_config(args.config, state_dir=args.state_dir)


def _read_password(stdin: TextIO) -> str:
    """One line from a pipe, or typed twice at a terminal."""
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != first:
            raise CliError("the passwords do not match")
        pw = first
    else:
        pw = stdin.readline().rstrip("\r\n")
    from controller.auth import validate_password

    try:
        return validate_password(pw)
    except ValueError as e:
        raise CliError(str(e)) from None


def _hash_password(pw: str) -> str:
    from controller.auth import hash_password  # the AUTH area owns hashing (argon2id)

    return hash_password(pw)


def _open_store(cfg: ControllerConfig) -> Any:
    from controller.store import SQLiteStore  # keeps `--help` fast

    old = os.umask(0o077)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    return SQLiteStore(cfg.db_path)


def cmd_user_add(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> int:
    from controller.store import Conflict, InvalidInput

    cfg = _config(args)
    pw = _read_password(stdin)
    store = _open_store(cfg)
    try:
        try:
            store.create_user(args.name, _hash_password(pw), args.role)
        except Conflict:
            raise CliError(f"user {args.name!r} already exists") from None
        except InvalidInput as e:
            raise CliError(str(e)) from None
        store.append_audit("cli", "user.create", args.name, "cli", {"role": args.role})
    finally:
        store.close()
    print(f"user {args.name} created with role {args.role}", file=out)
    return 0


def cmd_user_list(args: argparse.Namespace, out: TextIO) -> int:
    cfg = _config(args)
    store = _open_store(cfg)
    try:
        users = store.list_users()
    finally:
        store.close()
    print(f"{'USER':<24} {'ROLE':<10} {'STATE':<9} CREATED", file=out)
    for u in users:
        created = datetime.fromtimestamp(u.created_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        state = "disabled" if u.disabled else "active"
        print(f"{u.username:<24} {u.role.value:<10} {state:<9} {created}", file=out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from controller.app import create_app, ensure_pki

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = _config(args)
    # The server certificate must exist before Sanic binds its TLS socket.
    old = os.umask(0o077)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    pki = ensure_pki(cfg)
    app = create_app(cfg)
    log.info(
        "controller: console https://%s:%d/  backplane %s  state %s",
        cfg.http_host,
        cfg.http_port,
        cfg.backplane,
        cfg.state_dir,
    )
    # Single process: the backplane shares Sanic's loop (see controller.app).
    app.run(
        host=cfg.http_host,
        port=cfg.http_port,
        ssl={"cert": str(pki.server_cert_path), "key": str(pki.server_key_path)},
        single_process=True,
        access_log=False,
        motd=False,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.user_command == "add":
            return cmd_user_add(args, sys.stdin, sys.stdout)
        return cmd_user_list(args, sys.stdout)
    except ConfigError as e:
        print(f"edr-controller: configuration error: {e}", file=sys.stderr)
        return 2
    except CliError as e:
        print(f"edr-controller: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as e:  # store or PKI trouble: one line, details in the log at debug
        log.debug("failed", exc_info=True)
        print(f"edr-controller: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
