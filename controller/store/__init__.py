"""The controller's store: every piece of controller data goes through one ``Store``.

``open_store`` gives the default SQLite implementation; the ``Store`` protocol and the records
and errors in ``controller.store.interface`` are what the rest of the controller depends on.

Wiring in the controller (all calls block: run them in an executor thread):

* backplane: ``upsert_host`` on HELLO (host id from the client certificate), then
  ``ingest_batch`` per batch and ack only after it returns (``False`` = duplicate, ack too),
  ``record_heartbeat``, ``pending_commands``/``mark_sent``/``record_result``, and
  ``requeue_unacknowledged`` when a sensor's connection drops.
* one background maintenance thread: loop ``index_pending(processes=False)`` (full text;
  sleep ~1 s when it returns 0) with ``fold_processes()`` (process ancestry) in larger
  batches, ``checkpoint()``, and every few minutes
  ``expire_commands()`` and ``apply_retention(max_age, max_bytes)``.
"""

from __future__ import annotations

import os

from controller.store.interface import (
    ALERT_TRANSITIONS,
    COMMAND_TRANSITIONS,
    Alert,
    AlertComment,
    AlertDraft,
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
    Session,
    Severity,
    Store,
    StoredBatch,
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
    "AlertDraft",
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
    "Session",
    "Severity",
    "Store",
    "StoreError",
    "StoredBatch",
    "StoredEvent",
    "User",
    "open_store",
]
