"""Authentication, authorization and audit for the controller API: the only place for them.

* Passwords are hashed with argon2id (``hash_password``/``verify_password``); a stored hash
  made with older parameters is replaced on the next successful login.
* Analysts log in for a session: a random 256-bit id in a ``__Host-`` cookie (HttpOnly,
  Secure, SameSite=Strict). The server keeps only its SHA-256, with an absolute expiry and
  an idle timeout, in the store. Each session has a CSRF token that every state-changing
  request must echo in ``X-CSRF-Token``.
* Automation uses API tokens (``Authorization: Bearer ...``), stored as SHA-256 hashes: the
  secret is shown once, at creation. Bearer requests need no CSRF token: a browser never
  attaches them on its own.
* Roles are ordered viewer < responder < admin; ``require(role)`` guards a handler.
* ``audit()`` appends who did what, to what, from where, to the append-only audit log.

Login failures are limited per username and per source address (``LoginLimiter``); unknown
users cost the same argon2 verification as known ones, so timing does not tell them apart.
Several controller worker processes each keep their own limiter: the effective limit is
per process (the store holds no failure counters).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from controller.errors import ApiError, Field, json_body
from controller.store.interface import ApiToken, AuditEntry, NotFound, Role, Session, User

log = logging.getLogger(__name__)

ROLE_RANK: dict[str, int] = {Role.VIEWER: 0, Role.RESPONDER: 1, Role.ADMIN: 2}
ROLES: tuple[str, ...] = ("viewer", "responder", "admin")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

COOKIE_NAME = "edr_session"  # sent as "__Host-edr_session"
COOKIE_FULL_NAME = "__Host-" + COOKIE_NAME
CSRF_HEADER = "X-CSRF-Token"
TOKEN_PREFIX = "edr_"  # noqa: S105 -- a public prefix so leaked tokens are recognisable by secret scanners

MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # argon2 takes any length; a bound keeps one request cheap
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# secrets.token_urlsafe(32): 43 characters of the URL-safe base64 alphabet.
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_SECRET_KEYS = ("password", "token", "secret", "csrf", "cookie", "authorization")


# -- passwords ----------------------------------------------------------------------------

_default_hasher = PasswordHasher()  # argon2id, RFC 9106 "low memory" profile (64 MiB, t=3)


def validate_password(password: object) -> str:
    """Return ``password`` if acceptable, else raise ``ValueError`` saying why."""
    if not isinstance(password, str):
        raise ValueError("password must be a string")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"password must have at most {MAX_PASSWORD} characters")
    return password


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """An argon2id hash of ``password`` (PHC string with salt and parameters)."""
    return (hasher or _default_hasher).hash(password)


def verify_password(
    stored_hash: str, password: str, hasher: PasswordHasher | None = None
) -> tuple[bool, str | None]:
    """Check ``password`` against ``stored_hash`` (argon2 compares in constant time).

    Returns:
        ``(matches, new_hash)``: ``new_hash`` is a fresh hash when the password matched but
        the stored one was made with other parameters than ``hasher``'s; store it.
    """
    h = hasher or _default_hasher
    try:
        h.verify(stored_hash, password)
    except VerifyMismatchError:
        return False, None
    except (InvalidHashError, VerificationError):
        log.warning("a stored password hash is not a valid argon2 hash")
        return False, None
    if h.check_needs_rehash(stored_hash):
        return True, h.hash(password)
    return True, None


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- settings and per-app state -----------------------------------------------------------


@dataclass
class AuthSettings:
    """Tunables of authentication. ``clock`` and ``hasher`` are injectable for tests."""

    session_ttl: float = 12 * 3600.0
    idle_timeout: float = 30 * 60.0
    max_failures: int = 5
    failure_window: float = 300.0
    clock: Callable[[], float] = time.time
    hasher: PasswordHasher = field(default_factory=lambda: _default_hasher)
    # Writing last_seen on every request would make every read a write; once a minute
    # (or a tenth of the idle timeout, if shorter) keeps the idle timeout accurate enough.
    touch_interval: float = 60.0


class LoginLimiter:
    """Sliding-window failure counter: at most ``max_failures`` per key per ``window``.

    Keys are bounded (least recently failed dropped first) so a flood of made-up usernames
    cannot exhaust memory.
    """

    def __init__(self, max_failures: int, window: float, max_keys: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _live(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may try again, or ``None`` if it may now."""
        times = self._live(key, now)
        if times is None or len(times) < self.max_failures:
            return None
        return max(times[-self.max_failures] + self.window - now, 0.001)

    def fail(self, key: str, now: float) -> None:
        times = self._live(key, now) or deque()
        times.append(now)
        # Only the newest max_failures matter for the decision.
        while len(times) > self.max_failures:
            times.popleft()
        self._failures[key] = times
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)


class AuthState:
    """What authentication keeps per app (``app.ctx.auth``)."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.limiter = LoginLimiter(settings.max_failures, settings.failure_window)
        # Verified against when the user is unknown or disabled, so those answers take as
        # long as a wrong password for a real user.
        self.dummy_hash = settings.hasher.hash(secrets.token_urlsafe(16))
        # Serialises user changes in this process so two requests cannot both demote
        # "one of two" admins and leave none.
        self.user_lock = asyncio.Lock()

    def touch_interval(self) -> float:
        return min(self.settings.touch_interval, self.settings.idle_timeout / 10)


def auth_state(app: Sanic) -> AuthState:
    """The app's ``AuthState``, created from ``app.ctx.auth_settings`` (or defaults)."""
    state: AuthState | None = getattr(app.ctx, "auth", None)
    if state is None:
        settings = getattr(app.ctx, "auth_settings", None) or AuthSettings()
        state = AuthState(settings)
        app.ctx.auth = state
    return state


# -- principals and require() -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``via`` is "session" or "token"."""

    username: str
    role: str
    via: str


def remote_address(request: Request) -> str:
    """Where a request came from (the peer, or the forwarded client if Sanic trusts a proxy)."""
    addr = request.remote_addr or request.ip or ""
    return addr[:256] or "unknown"


def _store(request: Request) -> Any:
    return request.app.ctx.store


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": 'Bearer realm="edr"'})


async def _from_token(request: Request, header: str, state: AuthState) -> Principal:
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise _unauthorized("Authorization must be 'Bearer <api token>'")
    if len(secret) > 256 or not secret.isascii():
        raise _unauthorized("invalid or revoked API token")
    store = _store(request)
    try:
        token: ApiToken = await asyncio.to_thread(store.find_api_token, _sha256(secret))
    except NotFound:
        raise _unauthorized("invalid or revoked API token") from None
    if token.revoked:
        raise _unauthorized("invalid or revoked API token")
    if token.owner is not None:
        try:
            owner: User = await asyncio.to_thread(store.get_user, token.owner)
        except NotFound:
            raise _unauthorized("invalid or revoked API token") from None
        if owner.disabled:
            raise _unauthorized("invalid or revoked API token")
    now = state.settings.clock()
    if token.last_used is None or now - token.last_used >= state.touch_interval():
        await asyncio.to_thread(store.touch_api_token, token.id, now=now)
    request.ctx.api_token = token
    return Principal(f"token:{token.id}:{token.name}"[:256], token.role.value, "token")


def session_cookie(request: Request) -> str | None:
    """The ``__Host-`` session cookie only: a plain ``edr_session`` cookie could have been
    planted by a sibling host, so the lenient lookup of ``request.cookies.get`` is avoided."""
    values = dict.get(request.cookies, COOKIE_FULL_NAME)
    if not values:
        return None
    return values[0]


async def _from_session(request: Request, sid: str, state: AuthState) -> Principal:
    if not _SESSION_ID_RE.fullmatch(sid):
        raise _unauthorized("session expired or invalid: log in again")
    store = _store(request)
    id_hash = _sha256(sid)
    try:
        session: Session = await asyncio.to_thread(store.get_session, id_hash)
    except NotFound:
        raise _unauthorized("session expired or invalid: log in again") from None
    now = state.settings.clock()
    if now >= session.expires_at or now - session.last_seen >= state.settings.idle_timeout:
        await asyncio.to_thread(store.delete_session, id_hash)
        raise _unauthorized("session expired or invalid: log in again")
    try:
        user: User = await asyncio.to_thread(store.get_user, session.username)
    except NotFound:
        user = None  # type: ignore[assignment]
    if user is None or user.disabled:
        await asyncio.to_thread(store.delete_session, id_hash)
        raise _unauthorized("session expired or invalid: log in again")
    if request.method in UNSAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
            raise ApiError(403, f"missing or wrong {CSRF_HEADER} header")
    if now - session.last_seen >= state.touch_interval():
        await asyncio.to_thread(store.touch_session, id_hash, now=now)
    request.ctx.session = session
    return Principal(user.username, user.role.value, "session")


async def authenticate(request: Request) -> Principal | None:
    """The caller, or ``None`` when the request carries no credentials at all.

    Raises:
        ApiError: 401 for bad credentials, 403 for a missing or wrong CSRF token.
    """
    state = auth_state(request.app)
    header = request.headers.get("authorization")
    if header is not None:
        return await _from_token(request, header, state)
    sid = session_cookie(request)
    if sid is not None:
        return await _from_session(request, sid, state)
    return None


_H = TypeVar("_H", bound=Callable[..., Awaitable[HTTPResponse]])


def require(role: str) -> Callable[[_H], _H]:
    """Guard a handler: the caller must be authenticated with at least ``role``.

    Sets ``request.ctx.user`` to the ``Principal``. Errors are JSON: 401 without valid
    credentials, 403 for a missing CSRF token (cookie sessions, state-changing methods) or
    too low a role.
    """
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    needed = ROLE_RANK[role]

    def decorate(handler: _H) -> _H:
        @functools.wraps(handler)
        async def guarded(request: Request, *args: Any, **kwargs: Any) -> HTTPResponse:
            principal = await authenticate(request)
            if principal is None:
                raise _unauthorized("authentication required")
            request.ctx.user = principal
            if ROLE_RANK[principal.role] < needed:
                raise ApiError(403, f"this needs the {role} role")
            return await handler(request, *args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate


# -- audit --------------------------------------------------------------------------------


def _scrub(value: Any) -> Any:
    """Replace values under secret-looking keys, so no caller can audit a secret by mistake."""
    if isinstance(value, Mapping):
        return {
            str(k): "[redacted]" if any(s in str(k).lower() for s in _SECRET_KEYS) else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


async def audit(
    request: Request,
    action: str,
    target: str = "",
    details: dict[str, Any] | None = None,
    *,
    actor: str | None = None,
) -> AuditEntry:
    """Append an audit entry: who (``request.ctx.user``, or ``actor``), what, when, from where.

    Values under keys that look like secrets (password, token, ...) are redacted.
    """
    if actor is None:
        principal: Principal | None = getattr(request.ctx, "user", None)
        actor = principal.username if principal is not None else "anonymous"
    return await asyncio.to_thread(
        _store(request).append_audit,
        actor,
        action,
        target,
        remote_address(request),
        _scrub(details or {}),
        now=auth_state(request.app).settings.clock(),
    )


# -- JSON views ---------------------------------------------------------------------------


def user_view(user: User) -> dict[str, Any]:
    return {
        "username": user.username,
        "role": user.role.value,
        "disabled": user.disabled,
        "created_at": user.created_at,
        "updated_at": user.updated_at,
    }


def token_view(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role.value,
        "owner": token.owner,
        "created_at": token.created_at,
        "last_used": token.last_used,
        "revoked": token.revoked,
    }


def audit_view(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "ts": entry.ts,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "details": entry.detail,
        "source": entry.source,
    }


# -- request bodies -----------------------------------------------------------------------

_LOGIN = {
    "username": Field(str, min_len=1, max_len=64),
    "password": Field(str, min_len=1, max_len=MAX_PASSWORD),
}
_NEW_USER = {
    "username": Field(str, min_len=1, max_len=64),
    "password": Field(str, max_len=MAX_PASSWORD),
    "role": Field(str, choices=ROLES),
}
_PATCH_USER = {
    "role": Field(str, required=False, choices=ROLES),
    "disabled": Field(bool, required=False),
}
_RESET_PASSWORD = {"password": Field(str, max_len=MAX_PASSWORD)}
_OWN_PASSWORD = {
    "current_password": Field(str, min_len=1, max_len=MAX_PASSWORD),
    "new_password": Field(str, max_len=MAX_PASSWORD),
}
_NEW_TOKEN = {
    "name": Field(str, min_len=1, max_len=128),
    "role": Field(str, choices=ROLES),
}


def _check_username(username: str) -> str:
    if not USERNAME_RE.fullmatch(username):
        raise ApiError(
            400,
            "username must be 1-64 characters: letters, digits and . _ @ - "
            "(starting with a letter or digit)",
            field="username",
        )
    return username


def _checked_password(password: str, name: str) -> str:
    try:
        return validate_password(password)
    except ValueError as e:
        raise ApiError(400, str(e).replace("password", name, 1), field=name) from None


def _query_int(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer", field=name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be from {lo} to {hi}", field=name)
    return value


# -- the blueprint ------------------------------------------------------------------------


def create_blueprint(settings: AuthSettings | None = None) -> Blueprint:
    """Routes for ``/api/v1/auth/*``, ``/api/v1/users*``, ``/api/v1/api-tokens*`` and
    ``/api/v1/audit``.

    Args:
        settings: authentication tunables; when given they become the app's (set before the
            server starts), otherwise ``app.ctx.auth_settings`` or the defaults apply.
    """
    bp = Blueprint("auth", url_prefix="/api/v1")

    if settings is not None:

        @bp.listener("before_server_start")
        async def _configure(app: Sanic) -> None:
            app.ctx.auth_settings = settings
            app.ctx.auth = AuthState(settings)

    # -- sessions -----------------------------------------------------------------------

    @bp.post("/auth/login")
    async def login(request: Request) -> HTTPResponse:
        state = auth_state(request.app)
        s = state.settings
        body = await json_body(request, _LOGIN)
        username: str = body["username"]
        password: str = body["password"]
        source = remote_address(request)
        now = s.clock()
        user_key, addr_key = f"user:{username.lower()}", f"addr:{source}"
        waits = [w for k in (user_key, addr_key) if (w := state.limiter.retry_after(k, now))]
        if waits:
            retry = math.ceil(max(waits))
            log.warning("login throttled from %s", source)
            raise ApiError(
                429,
                "too many failed logins: try again later",
                headers={"Retry-After": str(retry)},
                retry_after=retry,
            )
        store = _store(request)
        user: User | None = None
        if USERNAME_RE.fullmatch(username):
            try:
                user = await asyncio.to_thread(store.get_user, username)
            except NotFound:
                user = None
        stored = user.password_hash if user is not None else state.dummy_hash
        ok, new_hash = await asyncio.to_thread(verify_password, stored, password, s.hasher)
        if user is None or user.disabled or not ok:
            state.limiter.fail(user_key, now)
            state.limiter.fail(addr_key, now)
            reason = (
                "unknown user"
                if user is None
                else "disabled"
                if user.disabled
                else ("wrong password")
            )
            # An unknown "username" may be a password typed in the wrong box: not recorded.
            await audit(
                request,
                "auth.login_failed",
                user.username if user is not None else "<unknown user>",
                {"reason": reason},
                actor="anonymous",
            )
            raise _unauthorized("invalid username or password")
        state.limiter.reset(user_key)
        if new_hash is not None:
            await asyncio.to_thread(store.update_user, user.username, password_hash=new_hash)
        sid = secrets.token_urlsafe(32)  # 256 bits
        csrf = secrets.token_urlsafe(32)
        await asyncio.to_thread(store.purge_sessions, idle_before=now - s.idle_timeout, now=now)
        await asyncio.to_thread(
            store.create_session,
            _sha256(sid),
            user.username,
            csrf,
            now + s.session_ttl,
            source,
            now=now,
        )
        request.ctx.user = Principal(user.username, user.role.value, "session")
        await audit(request, "auth.login", user.username)
        response = json_response(
            {"username": user.username, "role": user.role.value, "csrf_token": csrf}
        )
        response.add_cookie(
            COOKIE_NAME,
            sid,
            path="/",
            max_age=int(s.session_ttl),
            secure=True,
            httponly=True,
            samesite="Strict",
            host_prefix=True,
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.post("/auth/logout")
    @require("viewer")
    async def logout(request: Request) -> HTTPResponse:
        session: Session | None = getattr(request.ctx, "session", None)
        if session is None:
            raise ApiError(400, "logout ends a session: API tokens are revoked instead")
        await asyncio.to_thread(_store(request).delete_session, session.id_hash)
        await audit(request, "auth.logout", request.ctx.user.username)
        response = json_response({"logged_out": True})
        response.delete_cookie(COOKIE_NAME, path="/", host_prefix=True)
        return response

    def _me(request: Request) -> dict[str, Any]:
        principal: Principal = request.ctx.user
        session: Session | None = getattr(request.ctx, "session", None)
        return {
            "username": principal.username,
            "role": principal.role,
            "via": principal.via,
            "csrf_token": session.csrf_token if session is not None else None,
            "expires_at": session.expires_at if session is not None else None,
        }

    @bp.get("/auth/me")
    @require("viewer")
    async def me(request: Request) -> HTTPResponse:
        response = json_response(_me(request))
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.get("/auth/session")
    async def current_session(request: Request) -> HTTPResponse:
        """Like /auth/me, but "not logged in" is an answer (200), not an error."""
        try:
            principal = await authenticate(request)
        except ApiError as exc:
            if exc.status != 401:
                raise
            principal = None
        if principal is None:
            body: dict[str, Any] = {"authenticated": False}
        else:
            request.ctx.user = principal
            body = {"authenticated": True, **_me(request)}
        response = json_response(body)
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.get("/auth/csrf")
    @require("viewer")
    async def csrf(request: Request) -> HTTPResponse:
        response = json_response({"csrf_token": _me(request)["csrf_token"]})
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.post("/auth/password")
    @require("viewer")
    async def change_own_password(request: Request) -> HTTPResponse:
        state = auth_state(request.app)
        session: Session | None = getattr(request.ctx, "session", None)
        if session is None:
            raise ApiError(400, "API tokens have no password: log in to change yours")
        body = await json_body(request, _OWN_PASSWORD)
        new = _checked_password(body["new_password"], "new_password")
        store = _store(request)
        now = state.settings.clock()
        key = f"user:{session.username.lower()}"
        if (wait := state.limiter.retry_after(key, now)) is not None:
            retry = math.ceil(wait)
            raise ApiError(
                429,
                "too many failed attempts: try again later",
                headers={"Retry-After": str(retry)},
                retry_after=retry,
            )
        user: User = await asyncio.to_thread(store.get_user, session.username)
        ok, _ = await asyncio.to_thread(
            verify_password, user.password_hash, body["current_password"], state.settings.hasher
        )
        if not ok:
            state.limiter.fail(key, now)
            await audit(request, "user.password_change_failed", user.username)
            raise ApiError(403, "current password is wrong", field="current_password")
        new_hash = await asyncio.to_thread(hash_password, new, state.settings.hasher)
        await asyncio.to_thread(store.update_user, user.username, password_hash=new_hash)
        # Other sessions may belong to whoever knew the old password.
        ended = await asyncio.to_thread(
            store.delete_user_sessions, user.username, keep=session.id_hash
        )
        await audit(request, "user.password_changed", user.username, {"sessions_ended": ended})
        return json_response({"changed": True, "sessions_ended": ended})

    # -- users --------------------------------------------------------------------------

    @bp.get("/users")
    @require("admin")
    async def list_users(request: Request) -> HTTPResponse:
        users = await asyncio.to_thread(_store(request).list_users)
        return json_response({"users": [user_view(u) for u in users]})

    @bp.post("/users")
    @require("admin")
    async def create_user(request: Request) -> HTTPResponse:
        state = auth_state(request.app)
        body = await json_body(request, _NEW_USER)
        username = _check_username(body["username"])
        password = _checked_password(body["password"], "password")
        password_hash = await asyncio.to_thread(hash_password, password, state.settings.hasher)
        user = await asyncio.to_thread(
            _store(request).create_user,
            username,
            password_hash,
            body["role"],
            now=state.settings.clock(),
        )
        await audit(request, "user.create", username, {"role": user.role.value})
        return json_response(user_view(user), status=201)

    @bp.get("/users/<username:str>")
    @require("admin")
    async def get_user(request: Request, username: str) -> HTTPResponse:
        user = await asyncio.to_thread(_store(request).get_user, username)
        return json_response(user_view(user))

    async def _other_enabled_admins(store: Any, username: str) -> int:
        users: list[User] = await asyncio.to_thread(store.list_users)
        return sum(
            1 for u in users if u.role is Role.ADMIN and not u.disabled and u.username != username
        )

    @bp.patch("/users/<username:str>")
    @require("admin")
    async def update_user(request: Request, username: str) -> HTTPResponse:
        state = auth_state(request.app)
        body = await json_body(request, _PATCH_USER)
        if not body:
            raise ApiError(400, "give role and/or disabled")
        store = _store(request)
        async with state.user_lock:
            user: User = await asyncio.to_thread(store.get_user, username)
            demote = "role" in body and body["role"] != Role.ADMIN
            disable = body.get("disabled") is True
            if (
                user.role is Role.ADMIN
                and not user.disabled
                and (demote or disable)
                and await _other_enabled_admins(store, username) == 0
            ):
                raise ApiError(409, "cannot demote or disable the last admin")
            updated: User = await asyncio.to_thread(
                store.update_user,
                username,
                role=body.get("role"),
                disabled=body.get("disabled"),
                now=state.settings.clock(),
            )
        ended = 0
        if disable or (demote and user.role is not updated.role):
            # A session's role is read per request, but a disabled user must be out at once.
            ended = await asyncio.to_thread(store.delete_user_sessions, username)
        changes = {k: body[k] for k in ("role", "disabled") if k in body}
        await audit(
            request,
            "user.update",
            username,
            {
                **changes,
                "previous_role": user.role.value,
                "was_disabled": user.disabled,
                "sessions_ended": ended,
            },
        )
        return json_response(user_view(updated))

    @bp.post("/users/<username:str>/password")
    @require("admin")
    async def reset_password(request: Request, username: str) -> HTTPResponse:
        state = auth_state(request.app)
        body = await json_body(request, _RESET_PASSWORD)
        password = _checked_password(body["password"], "password")
        store = _store(request)
        await asyncio.to_thread(store.get_user, username)  # 404 before the costly hash
        password_hash = await asyncio.to_thread(hash_password, password, state.settings.hasher)
        updated = await asyncio.to_thread(
            store.update_user,
            username,
            password_hash=password_hash,
            now=state.settings.clock(),
        )
        ended = await asyncio.to_thread(store.delete_user_sessions, username)
        await audit(request, "user.password_reset", username, {"sessions_ended": ended})
        return json_response(user_view(updated))

    # -- API tokens ---------------------------------------------------------------------

    @bp.get("/api-tokens")
    @require("admin")
    async def list_tokens(request: Request) -> HTTPResponse:
        tokens = await asyncio.to_thread(_store(request).list_api_tokens)
        return json_response({"tokens": [token_view(t) for t in tokens]})

    @bp.post("/api-tokens")
    @require("admin")
    async def create_token(request: Request) -> HTTPResponse:
        state = auth_state(request.app)
        body = await json_body(request, _NEW_TOKEN)
        principal: Principal = request.ctx.user
        # A token made by a token has no user to own it; one made in a session belongs to
        # that user and stops working if the user is disabled.
        owner = principal.username if principal.via == "session" else None
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = await asyncio.to_thread(
            _store(request).create_api_token,
            body["name"],
            _sha256(secret),
            body["role"],
            owner,
            now=state.settings.clock(),
        )
        await audit(
            request,
            "api_token.create",
            str(token.id),
            {"name": token.name, "role": token.role.value},
        )
        response = json_response({**token_view(token), "token": secret}, status=201)
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.delete("/api-tokens/<token_id:int>")
    @require("admin")
    async def revoke_token(request: Request, token_id: int) -> HTTPResponse:
        token = await asyncio.to_thread(_store(request).revoke_api_token, token_id)
        await audit(request, "api_token.revoke", str(token.id), {"name": token.name})
        return json_response(token_view(token))

    # -- audit log ----------------------------------------------------------------------

    @bp.get("/audit")
    @require("admin")
    async def list_audit(request: Request) -> HTTPResponse:
        limit = _query_int(request, "limit", 100, 1, 1000)
        before_id = _query_int(request, "before_id", None, 0, 2**63 - 1)
        since: float | None = None
        if (raw := request.args.get("since")) is not None:
            try:
                since = float(raw)
            except ValueError:
                raise ApiError(400, "since must be a number (POSIX seconds)") from None
            if since != since or since in (float("inf"), float("-inf")):
                raise ApiError(400, "since must be a finite number (POSIX seconds)")
        filters = {k: request.args.get(k) for k in ("actor", "action")}
        for name, value in filters.items():
            if value is not None and not 1 <= len(value) <= 256:
                raise ApiError(400, f"{name} must have 1 to 256 characters", field=name)
        entries: list[AuditEntry] = await asyncio.to_thread(
            _store(request).list_audit,
            actor=filters["actor"],
            action=filters["action"],
            since=since,
            limit=limit,
            before_id=before_id,
        )
        next_before = entries[-1].id if limit is not None and len(entries) == limit else None
        return json_response(
            {"entries": [audit_view(e) for e in entries], "next_before_id": next_before}
        )

    return bp
