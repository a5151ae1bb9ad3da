"""The two ways a response action can fail: refused by a safety rule, or failed while acting."""

from __future__ import annotations

from typing import Any


class ActionRefused(Exception):
    """A safety rule forbids the action; nothing on the host was changed."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.details = details


class ActionFailed(Exception):
    """The action was allowed but could not be carried out; the message says why."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.details = details
