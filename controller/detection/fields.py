"""Sigma field names resolved onto the ECS event schema.

The mapping itself is ``backplane.schema.SIGMA_FIELDS`` (one table shared by the project);
this module only turns a Sigma field name into a getter and says how a raw event value reads
as Sigma text. Dotted names (``process.name``) are accepted as ECS paths directly so a rule
can use a field the table does not name yet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from backplane.schema import SIGMA_FIELDS, get_path

Getter = Callable[[Mapping[str, Any]], Any]

# Sigma's ``Initiated`` is a boolean string; the schema records the direction instead.
_DIRECTION_TO_INITIATED = {"egress": "true", "ingress": "false"}

# Fields searched by keyword detections (values without a field name): the text an analyst
# would grep for in an exec, file or network event.
KEYWORD_FIELDS: tuple[str, ...] = (
    "CommandLine",
    "Image",
    "ParentCommandLine",
    "ParentImage",
    "TargetFilename",
    "SourceFilename",
    "DestinationHostname",
)


class UnknownField(ValueError):
    """A rule names a field that neither the Sigma table nor ECS dotted syntax resolves."""


def getter_for(field: str) -> Getter:
    """The function that reads ``field`` (a Sigma name or an ECS dotted path) from an event.

    Raises:
        UnknownField: the name is not in ``SIGMA_FIELDS`` and is not a dotted path.
    """
    path = SIGMA_FIELDS.get(field)
    if path is None:
        if "." not in field or not all(field.split(".")):
            raise UnknownField(
                f"field '{field}' is not mapped to the event schema (known: "
                f"{', '.join(sorted(SIGMA_FIELDS))}, or an ECS dotted path)"
            )
        path = field
    if field == "Initiated":

        def initiated(event: Mapping[str, Any]) -> Any:
            return _DIRECTION_TO_INITIATED.get(get_path(event, "network.direction"))

        return initiated

    parts = tuple(path.split("."))

    def get(event: Mapping[str, Any]) -> Any:
        # Hot path (every field of every event): plain dicts, as decoded from the wire, are
        # walked with dict.get; any other mapping takes the general lookup from there.
        node: Any = event
        for i, part in enumerate(parts):
            if node.__class__ is not dict:
                return get_path(node, ".".join(parts[i:])) if isinstance(node, Mapping) else None
            node = node.get(part)
            if node is None:
                return None
        return node

    return get


def as_text(value: Any) -> str | tuple[str, ...] | None:
    """How a raw event value reads when a Sigma string is matched against it.

    Lists (``process.args``) become tuples so that a value matches when any element does;
    booleans read as Sigma writes them (``true``/``false``); missing stays ``None``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        out = tuple(t for t in (as_text(v) for v in value) if isinstance(t, str))
        return out
    return str(value)


def lower_text(text: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    if text is None or isinstance(text, str):
        return text.lower() if text is not None else None
    return tuple(t.lower() for t in text)
