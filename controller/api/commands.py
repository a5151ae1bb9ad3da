"""Commands: queue a response action for a host, with strict validation and idempotency.

``POST /api/v1/hosts/<host_id>/commands``  responder: ``{action, args?, ttl?}``; header
                                           ``Idempotency-Key`` makes a retried request
                                           return the first command instead of a second one
``GET  /api/v1/hosts/<host_id>/commands``  a host's history (``status``, ``limit``)
``GET  /api/v1/commands``                  fleet-wide history (``host``, ``status``, ``limit``)
``GET  /api/v1/commands/<id>``             one command with its state and result
``POST /api/v1/commands/<id>/retry``       responder: re-queue a failed or expired command as
                                           a new one linked by ``retry_of`` (once per command)

Arguments per action (anything else is refused with a message naming the field):

* kill, kill-tree, suspend, resume: ``pid`` (integer ≥ 2: 0 and 1 are never a target),
  optional ``entity_id`` (the sensor refuses if the pid now belongs to another process)
* quarantine, restore, delete-file: ``path``, absolute, normalised, no NUL, ≤ 4096 bytes
* block-ip: ``address``, an IPv4/IPv6 address or CIDR network (not a /0: use isolate)
* block-port: ``port`` 1-65535, ``protocol`` tcp (default) or udp
* block-domain: ``domain``, an RFC 1123 host name
* unblock: ``command_id`` of an earlier block on the same host, or ``kind`` (block-ip,
  block-port, block-domain) plus that action's arguments
* isolate, unisolate: no arguments

Idempotency keys are scoped to the requesting user; the same key with a different action or
arguments is a 409. A command whose TTL passes before the sensor takes it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from controller.api import inputs
from controller.api.hosts import check_host_id
from controller.auth import audit, require
from controller.errors import ApiError
from controller.store import Command, CommandStatus, NotFound

DEFAULT_TTL = 3600.0
MAX_TTL = 7 * 24 * 3600.0
PID_MAX = 4_194_304  # PID_MAX_LIMIT on 64-bit Linux
PATH_MAX = 4096
NAME_MAX = 255
MAX_KEY = 128
_ENTITY_ID = re.compile(r"[A-Za-z0-9_\-=+/.:]{1,256}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_KEY = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, as HTTP header tokens allow

Args = dict[str, Any]


class InvalidArgs(ValueError):
    """Arguments refused for an action; the message says which and why."""


def _only(
    args: Mapping[str, Any], action: str, allowed: tuple[str, ...], required: tuple[str, ...]
) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        can = ", ".join(allowed) if allowed else "no arguments"
        raise InvalidArgs(f"{action}: unknown argument(s) {', '.join(unknown)} (takes {can})")
    missing = [name for name in required if name not in args]
    if missing:
        raise InvalidArgs(f"{action}: missing argument(s) {', '.join(missing)}")


def _pid_args(action: str, args: Mapping[str, Any]) -> Args:
    _only(args, action, ("pid", "entity_id"), ("pid",))
    pid = args["pid"]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise InvalidArgs(f"{action}: pid must be an integer, not {inputs.json_type(pid)}")
    if pid in (0, 1):
        raise InvalidArgs(f"{action}: pid {pid} is never a valid target")
    if not 2 <= pid <= PID_MAX:
        raise InvalidArgs(f"{action}: pid must be from 2 to {PID_MAX}, not {pid}")
    out: Args = {"pid": pid}
    if "entity_id" in args:
        entity = args["entity_id"]
        if not isinstance(entity, str) or not _ENTITY_ID.fullmatch(entity):
            raise InvalidArgs(
                f"{action}: entity_id must be 1 to 256 characters of [A-Za-z0-9_-=+/.:]"
            )
        out["entity_id"] = entity
    return out


def check_file_path(action: str, value: Any) -> str:
    """An absolute path naming a file, returned normalised."""
    if not isinstance(value, str):
        raise InvalidArgs(f"{action}: path must be a string, not {inputs.json_type(value)}")
    if "\x00" in value:
        raise InvalidArgs(f"{action}: path must not contain NUL")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgs(f"{action}: path is not valid Unicode text") from None
    if size > PATH_MAX:
        raise InvalidArgs(f"{action}: path is {size} bytes; the limit is {PATH_MAX}")
    if not value.startswith("/"):
        raise InvalidArgs(f"{action}: path must be absolute, not {value!r}")
    normal = "/" + posixpath.normpath(value).lstrip("/")
    if normal == "/":
        raise InvalidArgs(f"{action}: path must name a file, not the root directory")
    for part in normal.split("/"):
        if len(part.encode("utf-8")) > NAME_MAX:
            raise InvalidArgs(f"{action}: a path component is longer than {NAME_MAX} bytes")
    return normal


def _path_args(action: str, args: Mapping[str, Any]) -> Args:
    _only(args, action, ("path",), ("path",))
    return {"path": check_file_path(action, args["path"])}


def _ip_args(action: str, args: Mapping[str, Any]) -> Args:
    _only(args, action, ("address",), ("address",))
    value = args["address"]
    if not isinstance(value, str) or not value or len(value) > 64:
        raise InvalidArgs(f"{action}: address must be an IP address or CIDR network string")
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        loose = None
        with contextlib.suppress(ValueError):
            loose = ipaddress.ip_network(value, strict=False)
        if loose is not None:
            raise InvalidArgs(
                f"{action}: {value!r} has host bits set; the network is {loose}"
            ) from None
        raise InvalidArgs(
            f"{action}: {value!r} is not an IP address or CIDR network ({e})"
        ) from None
    if network.prefixlen == 0:
        raise InvalidArgs(f"{action}: {value!r} would block every address; use isolate instead")
    single = network.num_addresses == 1 and "/" not in value
    return {"address": str(network.network_address) if single else str(network)}


def _port_args(action: str, args: Mapping[str, Any]) -> Args:
    _only(args, action, ("port", "protocol"), ("port",))
    port = args["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidArgs(f"{action}: port must be an integer from 1 to 65535, not {port!r}")
    protocol = args.get("protocol", "tcp")
    if protocol not in ("tcp", "udp"):
        raise InvalidArgs(f"{action}: protocol must be tcp or udp, not {protocol!r}")
    return {"port": port, "protocol": protocol}


def check_domain(action: str, value: Any) -> str:
    """An RFC 1123 host name, lower-cased and without a trailing dot."""
    if not isinstance(value, str):
        raise InvalidArgs(f"{action}: domain must be a string, not {inputs.json_type(value)}")
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        raise InvalidArgs(f"{action}: domain must be 1 to 253 characters, not {len(name)}")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise InvalidArgs(
                f"{action}: {value!r} is not an RFC 1123 host name (label {label!r}: 1-63 of "
                "a-z, 0-9 and '-', not starting or ending with '-')"
            )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise InvalidArgs(f"{action}: {value!r} is an IP address; use block-ip")


def _domain_args(action: str, args: Mapping[str, Any]) -> Args:
    _only(args, action, ("domain",), ("domain",))
    return {"domain": check_domain(action, args["domain"])}


def _no_args(action: str, args: Mapping[str, Any]) -> Args:
    _only(args, action, (), ())
    return {}


BLOCKS: dict[str, Callable[[str, Mapping[str, Any]], Args]] = {
    "block-ip": _ip_args,
    "block-port": _port_args,
    "block-domain": _domain_args,
}

VALIDATORS: dict[str, Callable[[str, Mapping[str, Any]], Args]] = {
    "kill": _pid_args,
    "kill-tree": _pid_args,
    "suspend": _pid_args,
    "resume": _pid_args,
    "quarantine": _path_args,
    "restore": _path_args,
    "delete-file": _path_args,
    **BLOCKS,
    "unblock": _no_args,  # resolved by ``resolve_unblock``: it may need the store
    "isolate": _no_args,
    "unisolate": _no_args,
}
ACTIONS = tuple(VALIDATORS)


def validate(action: Any, args: Any) -> tuple[str, Args]:
    """Check an action and its arguments (``unblock`` only for shape); return them normalised.

    Raises:
        InvalidArgs: with a message naming the problem.
    """
    if not isinstance(action, str) or action not in VALIDATORS:
        raise InvalidArgs(f"unknown action {action!r}; known actions: {', '.join(ACTIONS)}")
    if not isinstance(args, Mapping):
        raise InvalidArgs(f"{action}: args must be an object, not {inputs.json_type(args)}")
    if action == "unblock":
        if "command_id" in args:
            _only(args, action, ("command_id",), ("command_id",))
            cid = args["command_id"]
            if isinstance(cid, bool) or not isinstance(cid, int) or cid < 1:
                raise InvalidArgs("unblock: command_id must be a positive integer")
            return action, {"command_id": cid}
        kind = args.get("kind")
        if kind not in BLOCKS:
            raise InvalidArgs(
                f"unblock: give command_id, or kind ({', '.join(BLOCKS)}) with that block's "
                "arguments"
            )
        rest = {k: v for k, v in args.items() if k != "kind"}
        return action, {"kind": kind, **BLOCKS[kind](f"unblock {kind}", rest)}
    return action, VALIDATORS[action](action, args)


def command_json(command: Command) -> dict[str, Any]:
    """A command as the API shows it; the (user-scoped) idempotency key stays internal."""
    doc: dict[str, Any] = inputs.to_json(command)
    key = doc.pop("idempotency_key", "")
    doc["retry_of"] = int(key.split(":", 1)[1]) if key.startswith("retry:") else None
    return doc


def _ttl(body: Mapping[str, Any], default: float) -> float:
    ttl = body.get("ttl", default)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL:
        raise ApiError(400, f"ttl must be a number of seconds from 1 to {int(MAX_TTL)}")
    return float(ttl)


def _default_ttl(request: Request) -> float:
    config = getattr(request.app.ctx, "config", None)
    value = getattr(config, "command_ttl", None)
    return float(value) if isinstance(value, int | float) and value > 0 else DEFAULT_TTL


def _statuses(request: Request) -> str | None:
    return inputs.query_choice(request, "status", [s.value for s in CommandStatus])


def create_blueprint() -> Blueprint:
    bp = Blueprint("api_commands", url_prefix="/api/v1")

    async def resolve_unblock(request: Request, host_id: str, args: Args) -> Args:
        """Turn ``{command_id}`` into the block it undoes (same host, a block action)."""
        if "command_id" not in args:
            return args
        store = inputs.ctx_store(request)
        cid = args["command_id"]
        try:
            earlier: Command = await asyncio.to_thread(store.get_command, cid)
        except NotFound:
            raise ApiError(400, f"unblock: command {cid} does not exist") from None
        if earlier.host_id != host_id or earlier.action not in BLOCKS:
            raise ApiError(400, f"unblock: command {cid} is not a block on host {host_id}")
        return {"kind": earlier.action, **earlier.args, "command_id": cid}

    async def enqueue(
        request: Request, host_id: str, action: str, args: Args, key: str, ttl: float
    ) -> tuple[Command, bool]:
        store = inputs.ctx_store(request)
        now = time.time()
        command: Command = await inputs.call(
            store.queue_command, host_id, action, args, request.ctx.user.username, key, ttl,
            now=now,
        )  # fmt: skip
        created = command.created_at == now
        if created:
            await audit(
                request, "command.queue", f"host:{host_id}",
                {"command_id": command.id, "action": action, "args": args},
            )  # fmt: skip
            backplane = getattr(request.app.ctx, "backplane", None)
            if backplane is not None:
                backplane.notify_command(host_id)
            inputs.publish(request, "command", command_json(command))
        return command, created

    @bp.post("/hosts/<host_id:str>/commands")
    @require("responder")
    async def queue(request: Request, host_id: str) -> HTTPResponse:
        inputs.check_query(request, ())
        check_host_id(host_id)
        body = inputs.json_object(request)
        inputs.check_fields(body, ("action", "args", "ttl"), ("action",))
        try:
            action, args = validate(body["action"], body.get("args", {}))
        except InvalidArgs as e:
            extra: dict[str, Any] = (
                {"actions": list(ACTIONS)} if str(e).startswith("unknown action") else {}
            )
            raise ApiError(400, str(e), **extra) from None
        ttl = _ttl(body, _default_ttl(request))
        header = request.headers.get("idempotency-key")
        if header is not None and not _KEY.fullmatch(header):
            raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters")
        # Keys are per user: two analysts picking the same key must not see each other's command.
        # Hashed so any username and key length fit the store's key column.
        scoped = f"{request.ctx.user.username}\n{header}".encode()
        key = f"key:{hashlib.sha256(scoped).hexdigest()}" if header else f"auto:{uuid.uuid4()}"
        store = inputs.ctx_store(request)
        await inputs.call(store.get_host, host_id)  # 404 for an unknown host, before anything
        if action == "unblock":
            args = await resolve_unblock(request, host_id, args)
        command, created = await enqueue(request, host_id, action, args, key, ttl)
        headers = {} if created else {"Idempotent-Replay": "true"}
        return json(command_json(command), status=201 if created else 200, headers=headers)

    @bp.get("/hosts/<host_id:str>/commands")
    @require("viewer")
    async def host_history(request: Request, host_id: str) -> HTTPResponse:
        inputs.check_query(request, ("status", "limit"))
        status = _statuses(request)
        limit = inputs.query_limit(request)
        store = inputs.ctx_store(request)
        await inputs.call(store.get_host, check_host_id(host_id))
        commands = await inputs.call(
            store.command_history, host_id, limit=10_000 if status else limit
        )
        if status:
            commands = [c for c in commands if c.status == status][:limit]
        return json({"commands": [command_json(c) for c in commands]})

    @bp.get("/commands")
    @require("viewer")
    async def fleet_history(request: Request) -> HTTPResponse:
        inputs.check_query(request, ("host", "status", "limit"))
        host = inputs.query_str(request, "host", max_len=256)
        status = _statuses(request)
        limit = inputs.query_limit(request)
        store = inputs.ctx_store(request)
        fetch = 10_000 if status else limit

        def gather() -> list[Command]:
            # The store keeps history per host; merging the hosts' newest pages gives the
            # fleet's newest commands.
            ids = [host] if host else [h.host_id for h in store.list_hosts()]
            merged: list[Command] = []
            for host_id in ids:
                merged += store.command_history(host_id, limit=fetch)
            return merged

        commands = await inputs.call(gather)
        if status:
            commands = [c for c in commands if c.status == status]
        commands.sort(key=lambda c: c.id, reverse=True)
        return json({"commands": [command_json(c) for c in commands[:limit]]})

    @bp.get("/commands/<command_id:int>")
    @require("viewer")
    async def get_command(request: Request, command_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        store = inputs.ctx_store(request)
        return json(command_json(await inputs.call(store.get_command, command_id)))

    @bp.post("/commands/<command_id:int>/retry")
    @require("responder")
    async def retry(request: Request, command_id: int) -> HTTPResponse:
        inputs.check_query(request, ())
        body = inputs.json_object(request) if inputs.has_body(request) else {}
        inputs.check_fields(body, ("ttl",))
        ttl = _ttl(body, _default_ttl(request))
        store = inputs.ctx_store(request)
        original: Command = await inputs.call(store.get_command, command_id)
        if original.status not in (CommandStatus.FAILED, CommandStatus.EXPIRED):
            raise ApiError(
                409,
                f"command {command_id} is {original.status.value}; only failed or expired "
                "commands can be retried",
                current=original.status.value,
            )
        # One retry per command: retrying the same command again returns that retry.
        command, created = await enqueue(
            request, original.host_id, original.action, original.args, f"retry:{command_id}", ttl
        )
        headers = {} if created else {"Idempotent-Replay": "true"}
        return json(command_json(command), status=201 if created else 200, headers=headers)

    return bp
