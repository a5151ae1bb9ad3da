"""The controller's store: every piece of controller data goes through one ``Store``.

``open_store`` gives the default SQLite implementation; the ``Store`` protocol and the records
and errors in ``controller.store.interface`` are what the rest of the controller depends on.
"""

from __future__ import annotations

import os

from controller.store.interface import (
    ALERT_TRANSITIONS,
    COMMAND_TRANSITIONS,
    Alert,
    AlertComment,
    AlertStatus,
    ApiToken,
    AuditEntry,
    Command,
    CommandStatus,
    Conflict,
    EventPage,
    Host,
    HostHello,
    InvalidInput,
    InvalidTransition,
    MetricsSample,
    NotFound,
    PolicyVersion,
    ProcessNode,
    ProcessTree,
    RetentionResult,
    Role,
    SchemaTooNew,
    Severity,
    Store,
    StoredEvent,
    StoreError,
    User,
)
from controller.store.sqlite import SQLiteStore


def open_store(path: str | os.PathLike[str], **options: object) -> Store:
    """Open the default (SQLite) store at ``path``; options go to ``SQLiteStore``."""
    return SQLiteStore(path, **options)  # type: ignore[arg-type]


__all__ = [
    "ALERT_TRANSITIONS",
    "COMMAND_TRANSITIONS",
    "Alert",
    "AlertComment",
    "AlertStatus",
    "ApiToken",
    "AuditEntry",
    "Command",
    "CommandStatus",
    "Conflict",
    "EventPage",
    "Host",
    "HostHello",
    "InvalidInput",
    "InvalidTransition",
    "MetricsSample",
    "NotFound",
    "PolicyVersion",
    "ProcessNode",
    "ProcessTree",
    "RetentionResult",
    "Role",
    "SQLiteStore",
    "SchemaTooNew",
    "Severity",
    "Store",
    "StoreError",
    "StoredEvent",
    "User",
    "open_store",
]
