"""The detection engine: load Sigma rules, dispatch events by action, report matches.

Loading never stops at a bad rule: each file and each rule inside it either loads or becomes
a ``RuleProblem`` naming the file, the rule and the reason. The compiled rule set is an
immutable snapshot swapped in one assignment, so ``match`` (called from ingest) needs no lock
while ``reload``, ``enable`` and ``disable`` run from the API.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import re2  # type: ignore[import-untyped]
import yaml
from sigma.collection import SigmaCollection
from sigma.correlations import SigmaCorrelationRule
from sigma.exceptions import SigmaError, SigmaRuleLocation
from sigma.rule import SigmaRule

from controller.detection.compiler import (
    CompiledRule,
    Pred,
    UnsupportedModifier,
    UnsupportedRule,
    compile_rule,
)
from controller.detection.fields import as_text, lower_text
from controller.detection.logsources import UnsupportedLogsource, actions_for

log = logging.getLogger(__name__)

BUILTIN_RULES = Path(__file__).resolve().parent.parent / "rules"
RULE_SUFFIXES = (".yml", ".yaml")
MAX_RULE_FILE_BYTES = 1 << 20  # a Sigma rule is a few KiB; anything huge is a mistake

# Sigma levels as a 0-100 number (ECS ``event.severity`` is numeric). A rule without a
# level is treated as medium: unknown importance should still reach an analyst's queue.
SEVERITY: dict[str, int] = {
    "informational": 10,
    "low": 25,
    "medium": 50,
    "high": 75,
    "critical": 100,
}
DEFAULT_LEVEL = "medium"


class ProblemKind(StrEnum):
    ERROR = "error"  # unreadable file, YAML error, invalid Sigma
    UNSUPPORTED_LOGSOURCE = "unsupported-logsource"
    UNSUPPORTED_MODIFIER = "unsupported-modifier"
    UNSUPPORTED = "unsupported"  # an unmapped field, value type or rule type
    DUPLICATE = "duplicate-id"


@dataclass(frozen=True)
class RuleProblem:
    """Why one rule (or a whole file, when ``rule`` is ``None``) did not load."""

    path: str
    rule: str | None
    kind: ProblemKind
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}: {self.rule!r}" if self.rule else self.path
        return f"{where}: {self.kind.value}: {self.reason}"


@dataclass(frozen=True)
class RuleInfo:
    """A loaded rule as the API shows it."""

    id: str
    title: str
    level: str
    severity: int
    tags: tuple[str, ...]
    description: str
    path: str
    category: str
    actions: frozenset[str]
    enabled: bool


@dataclass
class LoadReport:
    """What a ``load`` or ``reload`` did: every file read, every rule loaded or refused."""

    files: int = 0
    loaded: list[RuleInfo] = field(default_factory=list)
    problems: list[RuleProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} rules loaded from {self.files} files, "
            f"{len(self.problems)} problems"
        )


@dataclass(frozen=True, slots=True)
class Match:
    """One rule firing on one event. ``event`` is the event itself, not a copy."""

    rule_id: str
    title: str
    level: str
    severity: int
    tags: tuple[str, ...]
    event: Mapping[str, Any]
    description: str = ""


@dataclass(frozen=True, slots=True)
class _Rule:
    info: RuleInfo
    predicate: Pred
    compiled: CompiledRule


@dataclass(frozen=True, slots=True)
class _Filter:
    """Every guard needle on one field in one RE2 set: a single linear pass over the field's
    text says which needles occur, and so which guarded rules can fire at all."""

    field: str
    needles: Any  # re2.Set
    rules: tuple[tuple[int, ...], ...]  # needle index → indexes into _Bucket.rules


@dataclass(frozen=True, slots=True)
class _Bucket:
    """The enabled rules for one event action, the fields they read and their pre-filter."""

    rules: tuple[_Rule, ...]
    getters: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...]  # pre-filter fields
    rest: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...]  # read only on a candidate
    filters: tuple[_Filter, ...] = ()
    always: frozenset[int] = frozenset()  # rules without a guard: evaluated on every event


def _bucket(members: list[_Rule]) -> _Bucket:
    getters: dict[str, Callable[[Mapping[str, Any]], Any]] = {}
    by_field: dict[str, dict[str, list[int]]] = {}
    always: set[int] = set()
    for i, rule in enumerate(members):
        getters.update(rule.compiled.getters)
        guard = rule.compiled.guard
        if guard is None:
            always.add(i)
            continue
        for fld, needle in guard:
            by_field.setdefault(fld, {}).setdefault(needle, []).append(i)
    filters = []
    for fld, needles in sorted(by_field.items()):
        rset = re2.Set.SearchSet(re2.Options())
        table = []
        for needle, idx in needles.items():
            rset.Add(re2.escape(needle))
            table.append(tuple(idx))
        rset.Compile()
        filters.append(_Filter(fld, rset, tuple(table)))
    # Fields the pre-filter reads are extracted for every event, the others only when some
    # rule is a candidate (most events are benign and stop at the pre-filter).
    first = tuple(sorted((f, g) for f, g in getters.items() if f in by_field or always))
    rest = tuple(sorted((f, g) for f, g in getters.items() if not (f in by_field or always)))
    return _Bucket(tuple(members), first, rest, tuple(filters), frozenset(always))


@dataclass(frozen=True)
class RuleConfig:
    """What decides an engine's rule set: enough for another process to load the same one.

    ``generation`` grows with every load, reload, enable and disable.
    """

    generation: int
    dirs: tuple[str, ...]
    include_builtin: bool
    disabled: frozenset[str]


class DetectionEngine:
    """Sigma rules evaluated against ECS events.

    Args:
        include_builtin: also load the project's own rules from ``controller/rules``.
    """

    def __init__(self, *, include_builtin: bool = True) -> None:
        self.include_builtin = include_builtin
        self._dirs: tuple[Path, ...] = ()
        self._rules: dict[str, _Rule] = {}
        self._disabled: set[str] = set()
        self._index: dict[str, _Bucket] = {}
        self.generation = 0  # grows with every change of the rule set (see ``config``)
        self._write = threading.Lock()  # serialises load/enable/disable, never taken by match
        self.errors = 0  # predicates that raised (a bug, logged); the event still flows on
        # Rule predicates called after the pre-filter (approximate under concurrent match
        # calls: a statistic, not an invariant).
        self.evaluations = 0

    # -- loading --------------------------------------------------------------------------------

    def load(self, dirs: Iterable[str | Path] = (), *, disabled: Iterable[str] = ()) -> LoadReport:
        """Replace the rule set with the rules under ``dirs`` (and the built-in rules).

        Each entry may be a directory (searched recursively for ``*.yml``/``*.yaml``) or one
        rule file. Enabled/disabled state is kept for rule ids that are loaded again;
        ``disabled`` names more rule ids to load disabled.
        """
        self._dirs = tuple(Path(d) for d in dirs)
        with self._write:
            self._disabled |= set(disabled)
        return self.reload()

    def config(self) -> RuleConfig:
        """The directories and enabled state behind the current rule set, with its
        generation (how the detection worker process loads the same rules)."""
        with self._write:
            return RuleConfig(
                self.generation,
                tuple(str(d) for d in self._dirs),
                self.include_builtin,
                frozenset(self._disabled),
            )

    def reload(self) -> LoadReport:
        """Read the configured directories again and swap the new rule set in."""
        report = LoadReport()
        rules: dict[str, _Rule] = {}
        roots = ([BUILTIN_RULES] if self.include_builtin else []) + list(self._dirs)
        seen: set[Path] = set()
        for root in roots:
            for path in _rule_files(root, report):
                real = path.resolve()
                if real in seen:  # the built-in folder may also be named in configuration
                    continue
                seen.add(real)
                report.files += 1
                self._load_file(path, rules, report)
        with self._write:
            self._rules = rules
            self._disabled &= set(rules)
            report.loaded = [self._info(r) for r in rules.values()]
            self._rebuild()
        for problem in report.problems:
            log.warning("sigma rule not loaded: %s", problem)
        log.info("detection: %s", report.summary())
        return report

    def _load_file(self, path: Path, rules: dict[str, _Rule], report: LoadReport) -> None:
        name = str(path)

        def problem(rule: str | None, kind: ProblemKind, reason: str) -> None:
            report.problems.append(RuleProblem(name, rule, kind, reason))

        try:
            size = path.stat().st_size
            if size > MAX_RULE_FILE_BYTES:
                limit = MAX_RULE_FILE_BYTES
                problem(None, ProblemKind.ERROR, f"file is {size} bytes (limit {limit})")
                return
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problem(None, ProblemKind.ERROR, f"cannot read: {e}")
            return
        try:
            collection = SigmaCollection.from_yaml(
                text,
                collect_errors=True,
                source=SigmaRuleLocation(path),
                resolve_references=False,  # correlations are refused anyway
            )
        except yaml.YAMLError as e:
            problem(None, ProblemKind.ERROR, f"YAML error: {_one_line(e)}")
            return
        except Exception as e:  # pySigma raises many types on malformed input
            problem(None, ProblemKind.ERROR, f"not a Sigma rule file: {_one_line(e)}")
            return

        rule_errors = {id(e) for r in collection.rules for e in r.errors}
        for err in collection.errors:
            if id(err) not in rule_errors:
                problem(None, ProblemKind.ERROR, _one_line(err))

        for index, item in enumerate(collection.rules):
            title = getattr(item, "title", None) or f"document {index + 1}"
            if isinstance(item, SigmaCorrelationRule) or not isinstance(item, SigmaRule):
                problem(title, ProblemKind.UNSUPPORTED, f"{type(item).__name__} is not supported")
                continue
            if item.errors:
                problem(title, ProblemKind.ERROR, "; ".join(_one_line(e) for e in item.errors))
                continue
            try:
                rule = self._build(item, path, title)
            except UnsupportedLogsource as e:
                problem(title, ProblemKind.UNSUPPORTED_LOGSOURCE, str(e))
                continue
            except UnsupportedModifier as e:
                problem(title, ProblemKind.UNSUPPORTED_MODIFIER, str(e))
                continue
            except UnsupportedRule as e:
                problem(title, ProblemKind.UNSUPPORTED, str(e))
                continue
            except SigmaError as e:
                problem(title, ProblemKind.ERROR, _one_line(e))
                continue
            except Exception as e:  # one broken rule must not stop the rest
                problem(title, ProblemKind.ERROR, f"{type(e).__name__}: {_one_line(e)}")
                continue
            first = rules.get(rule.info.id)
            if first is not None:
                problem(
                    title,
                    ProblemKind.DUPLICATE,
                    f"rule id {rule.info.id} already loaded from {first.info.path}",
                )
                continue
            rules[rule.info.id] = rule

    @staticmethod
    def _build(item: SigmaRule, path: Path, title: str) -> _Rule:
        actions = actions_for(item.logsource)
        compiled = compile_rule(item)
        # Sigma ids are optional; a stable stand-in lets an unnamed rule be disabled by id.
        rule_id = str(item.id or uuid.uuid5(uuid.NAMESPACE_URL, f"{path}#{title}"))
        level = item.level.name.lower() if item.level else DEFAULT_LEVEL
        info = RuleInfo(
            id=rule_id,
            title=title,
            level=level,
            severity=SEVERITY.get(level, SEVERITY[DEFAULT_LEVEL]),
            tags=tuple(str(t) for t in item.tags),
            description=item.description or "",
            path=str(path),
            category=item.logsource.category or "",
            actions=frozenset(a.value for a in actions),
            enabled=True,
        )
        return _Rule(info, compiled.predicate, compiled)

    # -- state ----------------------------------------------------------------------------------

    def enable(self, rule_id: str) -> None:
        self._set_enabled(rule_id, True)

    def disable(self, rule_id: str) -> None:
        self._set_enabled(rule_id, False)

    def _set_enabled(self, rule_id: str, enabled: bool) -> None:
        with self._write:
            if rule_id not in self._rules:
                raise KeyError(f"no loaded rule with id {rule_id!r}")
            if enabled:
                self._disabled.discard(rule_id)
            else:
                self._disabled.add(rule_id)
            self._rebuild()

    @property
    def rules(self) -> list[RuleInfo]:
        return [self._info(r) for r in self._rules.values()]

    def _info(self, rule: _Rule) -> RuleInfo:
        enabled = rule.info.id not in self._disabled
        if enabled == rule.info.enabled:
            return rule.info
        return RuleInfo(**{**rule.info.__dict__, "enabled": enabled})

    def _rebuild(self) -> None:
        by_action: dict[str, list[_Rule]] = {}
        for rule in self._rules.values():
            if rule.info.id in self._disabled:
                continue
            for action in rule.info.actions:
                by_action.setdefault(action, []).append(rule)
        index = {action: _bucket(members) for action, members in by_action.items()}
        self._index = index  # one assignment: readers see the old or the new set, never half
        self.generation += 1

    # -- matching -------------------------------------------------------------------------------

    def match(self, event: Mapping[str, Any]) -> list[Match]:
        """The enabled rules for the event's ``event.action`` that fire on it.

        Raises:
            TypeError: ``event`` is not a mapping. An event without ``event.action`` (or
            with an action no rule covers) simply matches nothing.
        """
        # ``__class__ is dict`` first: the Mapping ABC check costs more than a rule here.
        if event.__class__ is not dict and not isinstance(event, Mapping):
            raise TypeError(f"event must be a mapping, not {type(event).__name__}")
        meta = event.get("event")
        action = meta.get("action") if meta.__class__ is dict or isinstance(meta, Mapping) else None
        bucket = self._index.get(action) if isinstance(action, str) else None
        if bucket is None:
            return []
        raw: dict[str, Any] = {}
        low: dict[str, Any] = {}
        _extract(event, bucket.getters, raw, low)
        # Pre-filter: only rules whose guard needle occurs (plus unguarded ones) are called.
        candidates = set(bucket.always)
        for flt in bucket.filters:
            s = low[flt.field]
            if s is None:
                continue
            if s.__class__ is not str:
                s = "\x00".join(s)  # a needle in one element is in the joined text too
            found = flt.needles.Match(s.encode("utf-8", "surrogatepass"))
            if found:
                table = flt.rules
                for n in found:
                    candidates.update(table[n])
        if not candidates:
            return []
        self.evaluations += len(candidates)
        if bucket.rest:
            _extract(event, bucket.rest, raw, low)
        out: list[Match] = []
        rules = bucket.rules
        for i in sorted(candidates):
            rule = rules[i]
            try:
                hit = rule.predicate(low, raw)
            except Exception:  # a predicate bug must not stop ingest; count it and go on
                self.errors += 1
                log.exception("sigma rule %s raised on an event", rule.info.id)
                continue
            if hit:
                info = rule.info
                out.append(
                    Match(info.id, info.title, info.level, info.severity, info.tags, event,
                          info.description)
                )  # fmt: skip
        return out

    def actions(self) -> dict[str, int]:
        """Enabled rule count per event action (what dispatch will test)."""
        return {a: len(b.rules) for a, b in self._index.items()}


def _extract(
    event: Mapping[str, Any],
    getters: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...],
    raw: dict[str, Any],
    low: dict[str, Any],
) -> None:
    for name, get in getters:
        v = get(event)
        raw[name] = v
        if v.__class__ is str:
            low[name] = v.lower()
        else:
            low[name] = lower_text(as_text(v))


def _rule_files(root: Path, report: LoadReport) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        report.problems.append(
            RuleProblem(str(root), None, ProblemKind.ERROR, "no such file or directory")
        )
        return []
    return sorted(p for p in root.rglob("*") if p.suffix in RULE_SUFFIXES and p.is_file())


def _one_line(e: BaseException | object) -> str:
    return " ".join(str(e).split())


__all__ = [
    "BUILTIN_RULES",
    "SEVERITY",
    "DetectionEngine",
    "LoadReport",
    "Match",
    "ProblemKind",
    "RuleConfig",
    "RuleInfo",
    "RuleProblem",
]
