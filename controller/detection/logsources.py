"""Which Sigma log sources this controller evaluates, and the event actions each one covers.

Only ``product: linux`` rules over the sensor's own telemetry apply. Rules for a ``service``
(auditd, syslog, sshd ...) read logs the sensor does not ship, so they are refused as
unsupported rather than silently never firing.
"""

from __future__ import annotations

from sigma.rule import SigmaLogSource

from backplane.schema import Action

CATEGORY_ACTIONS: dict[str, frozenset[Action]] = {
    "process_creation": frozenset({Action.EXEC}),
    "process_termination": frozenset({Action.EXIT}),
    # SigmaHQ's Linux file rules use file_event for "a file was written or created"; renames
    # land there too because the sensor reports a rename where an editor would write.
    "file_event": frozenset({Action.FILE_CREATE, Action.FILE_WRITE, Action.FILE_RENAME}),
    "file_create": frozenset({Action.FILE_CREATE}),
    "file_change": frozenset({Action.FILE_WRITE, Action.FILE_CHMOD, Action.FILE_CHOWN}),
    "file_delete": frozenset({Action.FILE_DELETE}),
    "file_rename": frozenset({Action.FILE_RENAME}),
    "file_access": frozenset({Action.FILE_OPEN}),
    "network_connection": frozenset({Action.CONNECT, Action.ACCEPT}),
}


class UnsupportedLogsource(ValueError):
    """The rule's log source is not one this controller receives."""


def actions_for(logsource: SigmaLogSource) -> frozenset[Action]:
    """The event actions a rule with ``logsource`` must see.

    Raises:
        UnsupportedLogsource: wrong product, a service, or an unknown category.
    """
    desc = ", ".join(
        f"{k}: {v}"
        for k, v in (
            ("product", logsource.product),
            ("category", logsource.category),
            ("service", logsource.service),
        )
        if v
    )
    if logsource.product != "linux":
        raise UnsupportedLogsource(f"logsource ({desc}) is not product linux")
    if logsource.service:
        raise UnsupportedLogsource(f"logsource ({desc}): services are not collected")
    actions = CATEGORY_ACTIONS.get(logsource.category or "")
    if actions is None:
        raise UnsupportedLogsource(
            f"logsource ({desc}): category not supported (supported: "
            f"{', '.join(sorted(CATEGORY_ACTIONS))})"
        )
    return actions
