"""The controller's data-access contract: records, errors and the ``Store`` protocol.

Everything the controller persists goes through one object that satisfies ``Store``. The
SQLite implementation (``controller.store.sqlite``) is the default; a PostgreSQL one for
several controllers sharing state only has to satisfy the same protocol and pass the same
tests. Calls are blocking: the async controller runs them in a thread pool.

Times are POSIX seconds (``float``) everywhere in this interface; every method that depends
on "now" takes an optional ``now`` so tests can control time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

# -- errors -------------------------------------------------------------------------------


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class NotFound(StoreError, LookupError):
    """An id that names nothing: ``kind`` says what was looked up, ``key`` with what."""

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key


class InvalidInput(StoreError, ValueError):
    """Arguments the store refuses; nothing was written."""


class InvalidTransition(StoreError):
    """A lifecycle change that is not allowed from the current state; nothing was written."""

    def __init__(self, kind: str, key: object, current: str, wanted: str) -> None:
        super().__init__(f"{kind} {key!r}: cannot go from {current!r} to {wanted!r}")
        self.kind = kind
        self.key = key
        self.current = current
        self.wanted = wanted


class Conflict(StoreError):
    """A uniqueness clash, e.g. an idempotency key reused for a different command."""


class SchemaTooNew(StoreError):
    """The database was written by newer code; opening it could corrupt it."""


# -- enumerations -------------------------------------------------------------------------


class CommandStatus(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


# Which command states may follow which. ``sent → queued`` re-queues a command whose
# delivery was never acknowledged (the sensor's connection dropped).
COMMAND_TRANSITIONS: dict[CommandStatus, frozenset[CommandStatus]] = {
    CommandStatus.QUEUED: frozenset({CommandStatus.SENT, CommandStatus.EXPIRED}),
    CommandStatus.SENT: frozenset(
        {
            CommandStatus.QUEUED,
            CommandStatus.ACKNOWLEDGED,
            CommandStatus.SUCCEEDED,
            CommandStatus.FAILED,
            CommandStatus.EXPIRED,
        }
    ),
    CommandStatus.ACKNOWLEDGED: frozenset({CommandStatus.SUCCEEDED, CommandStatus.FAILED}),
    CommandStatus.SUCCEEDED: frozenset(),
    CommandStatus.FAILED: frozenset(),
    CommandStatus.EXPIRED: frozenset(),
}


class AlertStatus(StrEnum):
    NEW = "new"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    FALSE_POSITIVE = "false_positive"


# Closed alerts can be reopened (back to acknowledged), never silently back to "new".
ALERT_TRANSITIONS: dict[AlertStatus, frozenset[AlertStatus]] = {
    AlertStatus.NEW: frozenset(
        {AlertStatus.ACKNOWLEDGED, AlertStatus.RESOLVED, AlertStatus.FALSE_POSITIVE}
    ),
    AlertStatus.ACKNOWLEDGED: frozenset({AlertStatus.RESOLVED, AlertStatus.FALSE_POSITIVE}),
    AlertStatus.RESOLVED: frozenset({AlertStatus.ACKNOWLEDGED}),
    AlertStatus.FALSE_POSITIVE: frozenset({AlertStatus.ACKNOWLEDGED}),
}


class Severity(StrEnum):
    INFORMATIONAL = "informational"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Role(StrEnum):
    ADMIN = "admin"
    RESPONDER = "responder"
    VIEWER = "viewer"


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """Where a committed batch landed: its events have ids ``first_event_id`` onwards,
    one per event in batch order (``count`` of them). ``docs`` are the events as stored
    (JSON text, batch order), so detection gets them without serialising again."""

    batch_id: int
    first_event_id: int
    count: int
    docs: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class AlertDraft:
    """One alert to create with ``create_alerts`` (the arguments of ``create_alert``)."""

    rule_id: str
    rule_name: str
    severity: Severity | str
    host_id: str
    event: Mapping[str, Any]
    event_id: int | None = None
    ancestry: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    host_id: str
    ts: float
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[StoredEvent]
    next_cursor: str | None  # pass back as ``cursor`` for the next (older) page


@dataclass(frozen=True, slots=True)
class ProcessNode:
    entity_id: str
    pid: int | None
    parent_entity_id: str | None
    ppid: int | None
    executable: str | None
    command_line: str | None
    user: str | None
    start: float | None  # first fork/exec seen
    exit: float | None
    exit_code: int | None


@dataclass(frozen=True, slots=True)
class ProcessTree:
    process: ProcessNode
    ancestors: list[ProcessNode]  # parent first, then grandparent, ...
    children: list[ProcessNode]


@dataclass(frozen=True, slots=True)
class RetentionResult:
    events_deleted: int
    bytes_deleted: int
    oldest_remaining: float | None
    processes_deleted: int


@dataclass(frozen=True, slots=True)
class HostHello:
    """What a sensor says about itself in HELLO (identity comes from its certificate)."""

    hostname: str
    os: str
    kernel: str
    sensor_version: str
    tiers: Mapping[str, str]  # family → tier, e.g. {"process": "tracepoint"}


@dataclass(frozen=True, slots=True)
class Host:
    host_id: str
    hostname: str
    os: str
    kernel: str
    sensor_version: str
    tiers: dict[str, str]
    first_seen: float
    last_seen: float
    online: bool
    metrics: dict[str, Any]
    drops: dict[str, int]
    outbox_depth: int
    events_dropped: int  # sum of the ``dropped`` counts reported with batches
    isolated: bool
    isolation_changed_at: float | None
    policy_version: int | None
    policy_applied_at: float | None


@dataclass(frozen=True, slots=True)
class MetricsSample:
    ts: float
    metrics: dict[str, Any]
    drops: dict[str, int]
    outbox_depth: int


@dataclass(frozen=True, slots=True)
class Command:
    id: int
    host_id: str
    action: str
    args: dict[str, Any]
    requested_by: str
    idempotency_key: str
    status: CommandStatus
    created_at: float
    expires_at: float
    sent_at: float | None
    acknowledged_at: float | None
    finished_at: float | None
    output: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    version: int
    document: dict[str, Any]
    author: str
    created_at: float
    comment: str


@dataclass(frozen=True, slots=True)
class AlertComment:
    id: int
    alert_id: int
    author: str
    ts: float
    text: str


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    created_at: float
    updated_at: float
    rule_id: str
    rule_name: str
    severity: Severity
    host_id: str
    event_id: int | None
    event: dict[str, Any]  # a copy: retention may delete the stored event
    ancestry: list[dict[str, Any]]
    status: AlertStatus
    assignee: str | None
    comments: list[AlertComment] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: str
    role: Role
    disabled: bool
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: int
    name: str
    token_hash: str
    role: Role
    owner: str | None
    created_at: float
    last_used: float | None
    revoked: bool


@dataclass(frozen=True, slots=True)
class Session:
    """A login session; ``id_hash`` is a hash of the cookie value, never the value itself."""

    id_hash: str
    username: str
    csrf_token: str
    created_at: float
    last_seen: float
    expires_at: float
    source: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    source: str  # where from: an IP address, "backplane", "cli"


# -- the contract -------------------------------------------------------------------------


@runtime_checkable
class Store(Protocol):
    """All controller data access. Implementations must be safe to call from many threads."""

    def close(self) -> None: ...

    # events
    def ingest_batch(
        self, host_id: str, seq: int, events: Sequence[Mapping[str, Any]], dropped: int = 0
    ) -> bool:
        """Store one batch atomically; ``False`` (and nothing written) for a duplicate."""
        ...

    def store_batch(
        self, host_id: str, seq: int, events: Sequence[Mapping[str, Any]], dropped: int = 0
    ) -> StoredBatch | None:
        """``ingest_batch`` that says where the events landed; ``None`` for a duplicate."""
        ...

    def detection_watermark(self) -> int:
        """The highest event id detection has evaluated (see ``create_alerts``)."""
        ...

    def events_after(
        self, event_id: int, limit: int = 10_000
    ) -> list[tuple[int, str, dict[str, Any]]]:
        """Up to ``limit`` stored events with ids above ``event_id``, oldest first, as
        ``(id, host_id, document)``: what detection replays after a restart."""
        ...

    def event_docs_after(self, event_id: int, limit: int = 10_000) -> list[tuple[int, str, str]]:
        """``events_after`` with each document as the stored JSON text, not decoded."""
        ...

    def last_event_id(self) -> int:
        """The highest stored event id (0 when there is none)."""
        ...

    def index_pending(self, max_rows: int = 20_000, *, processes: bool = True) -> int:
        """Index up to ``max_rows`` not-yet-searchable events for full text and (unless
        ``processes`` is false) fold up to ``max_rows`` events into the process table;
        returns how many events either job looked at."""
        ...

    def fold_processes(self, max_rows: int = 50_000) -> int:
        """Fold up to ``max_rows`` events into the process table only; returns how many."""
        ...

    def search_events(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        host_id: str | None = None,
        action: str | None = None,
        category: str | None = None,
        pid: int | None = None,
        entity_id: str | None = None,
        executable: str | None = None,
        path: str | None = None,
        ip: str | None = None,
        port: int | None = None,
        text: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> EventPage: ...

    def get_event(self, event_id: int) -> StoredEvent: ...

    def process_tree(
        self, host_id: str, entity_id: str, *, children: bool = True
    ) -> ProcessTree: ...

    def apply_retention(
        self,
        max_age: float | None = None,
        max_bytes: int | None = None,
        *,
        now: float | None = None,
    ) -> RetentionResult: ...

    # hosts
    def upsert_host(self, host_id: str, hello: HostHello, *, now: float | None = None) -> Host: ...

    def record_heartbeat(
        self,
        host_id: str,
        metrics: Mapping[str, Any],
        drops: Mapping[str, int],
        outbox_depth: int,
        *,
        now: float | None = None,
    ) -> None: ...

    def get_host(self, host_id: str, *, now: float | None = None) -> Host: ...

    def list_hosts(self, *, now: float | None = None) -> list[Host]: ...

    def metrics_history(
        self, host_id: str, *, since: float | None = None, limit: int = 1000
    ) -> list[MetricsSample]: ...

    def set_isolation(self, host_id: str, isolated: bool, *, now: float | None = None) -> Host: ...

    # commands
    def queue_command(
        self,
        host_id: str,
        action: str,
        args: Mapping[str, Any],
        requested_by: str,
        idempotency_key: str,
        ttl: float,
        *,
        now: float | None = None,
    ) -> Command: ...

    def get_command(self, command_id: int) -> Command: ...

    def pending_commands(self, host_id: str, *, now: float | None = None) -> list[Command]: ...

    def mark_sent(self, command_id: int, *, now: float | None = None) -> Command: ...

    def mark_acknowledged(self, command_id: int, *, now: float | None = None) -> Command: ...

    def requeue_unacknowledged(self, host_id: str) -> int: ...

    def record_result(
        self,
        command_id: int,
        succeeded: bool,
        output: Mapping[str, Any],
        *,
        now: float | None = None,
    ) -> Command: ...

    def expire_commands(self, now: float | None = None) -> list[Command]: ...

    def command_history(self, host_id: str, *, limit: int = 100) -> list[Command]: ...

    # policy
    def put_policy(
        self,
        document: Mapping[str, Any],
        author: str,
        comment: str = "",
        *,
        now: float | None = None,
    ) -> PolicyVersion: ...

    def current_policy(self) -> PolicyVersion | None: ...

    def get_policy(self, version: int) -> PolicyVersion: ...

    def policy_history(self, *, limit: int = 100) -> list[PolicyVersion]: ...

    def policy_applied(self, host_id: str, version: int, *, now: float | None = None) -> None: ...

    # alerts
    def create_alert(
        self,
        *,
        rule_id: str,
        rule_name: str,
        severity: Severity | str,
        host_id: str,
        event: Mapping[str, Any],
        event_id: int | None = None,
        ancestry: Sequence[Mapping[str, Any]] = (),
        now: float | None = None,
    ) -> Alert: ...

    def create_alerts(
        self,
        drafts: Sequence[AlertDraft],
        *,
        evaluated_through: int | None = None,
        now: float | None = None,
    ) -> list[Alert]:
        """Create every alert in one transaction and, in the same transaction, raise the
        detection watermark to ``evaluated_through`` (never lowers it). All or nothing:
        one invalid draft raises ``InvalidInput`` and writes nothing."""
        ...

    def get_alert(self, alert_id: int) -> Alert: ...

    def list_alerts(
        self,
        *,
        status: AlertStatus | str | None = None,
        severity: Severity | str | None = None,
        host_id: str | None = None,
        rule_id: str | None = None,
        assignee: str | None = None,
        since: float | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[Alert]: ...

    def triage_alert(
        self,
        alert_id: int,
        *,
        status: AlertStatus | str | None = None,
        assignee: str | None = None,
        unassign: bool = False,
        now: float | None = None,
    ) -> Alert: ...

    def add_alert_comment(
        self, alert_id: int, author: str, text: str, *, now: float | None = None
    ) -> AlertComment: ...

    # users and API tokens (storage only: hashing and checking belong to the API)
    def create_user(
        self, username: str, password_hash: str, role: Role | str, *, now: float | None = None
    ) -> User: ...

    def get_user(self, username: str) -> User: ...

    def list_users(self) -> list[User]: ...

    def update_user(
        self,
        username: str,
        *,
        password_hash: str | None = None,
        role: Role | str | None = None,
        disabled: bool | None = None,
        now: float | None = None,
    ) -> User: ...

    def create_api_token(
        self,
        name: str,
        token_hash: str,
        role: Role | str,
        owner: str | None = None,
        *,
        now: float | None = None,
    ) -> ApiToken: ...

    def find_api_token(self, token_hash: str) -> ApiToken: ...

    def list_api_tokens(self) -> list[ApiToken]: ...

    def touch_api_token(self, token_id: int, *, now: float | None = None) -> None: ...

    def revoke_api_token(self, token_id: int) -> ApiToken: ...

    # login sessions (keyed by a hash of the session id; expiry policy belongs to the API)
    def create_session(
        self,
        id_hash: str,
        username: str,
        csrf_token: str,
        expires_at: float,
        source: str,
        *,
        now: float | None = None,
    ) -> Session: ...

    def get_session(self, id_hash: str) -> Session: ...

    def touch_session(self, id_hash: str, *, now: float | None = None) -> None: ...

    def delete_session(self, id_hash: str) -> bool: ...

    def delete_user_sessions(self, username: str, *, keep: str | None = None) -> int: ...

    def purge_sessions(self, *, idle_before: float, now: float | None = None) -> int: ...

    # audit (append-only: there is deliberately no update or delete)
    def append_audit(
        self,
        actor: str,
        action: str,
        target: str,
        source: str,
        detail: Mapping[str, Any] | None = None,
        *,
        now: float | None = None,
    ) -> AuditEntry: ...

    def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditEntry]: ...
