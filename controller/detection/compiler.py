"""Compile a pySigma rule into one fast Python predicate.

pySigma parses the YAML, applies the value modifiers (``contains`` becomes wildcards,
``base64offset`` and ``windash`` become expansions, ``cidr`` a network, ``all`` an AND) and
resolves the condition into a tree of AND/OR/NOT over field/value leaves. This module walks
that tree once per rule and builds closures: literal values are lower-cased ahead of time,
``*``-only wildcards become ``startswith``/``endswith``/``in``/ordered ``find`` (no regex),
several values of one field collapse into a single set lookup or tuple ``startswith``, and AND
branches are ordered cheapest first.

A predicate takes two per-event dicts built by the engine: ``low`` (Sigma field → lower-cased
text) and ``raw`` (Sigma field → the value as the event holds it). Regular expressions run on
RE2 (linear time): command lines are attacker-controlled, so a badly written rule regex must
not be able to stall the controller with backtracking.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import re2  # type: ignore[import-untyped]
from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionItem,
    ConditionNOT,
    ConditionOR,
    ConditionValueExpression,
)
from sigma.modifiers import reverse_modifier_mapping
from sigma.rule import SigmaDetection, SigmaDetectionItem, SigmaRule
from sigma.types import (
    CompareOperators,
    Placeholder,
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaExists,
    SigmaExpansion,
    SigmaFieldReference,
    SigmaNull,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaRegularExpressionFlag,
    SigmaString,
    SpecialChars,
)

from controller.detection.fields import KEYWORD_FIELDS, UnknownField, as_text, getter_for

Pred = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
Guard = frozenset[tuple[str, str]]  # (Sigma field, lower-cased literal that must occur)
TextTest = Callable[[str], bool]

# Modifiers whose meaning this evaluator implements. The rest (timestamp parts, placeholder
# expansion, UTF-16 encodings that only make sense for Windows logs) are refused by name.
SUPPORTED_MODIFIERS = frozenset(
    {
        "all", "neq", "base64", "base64offset", "cased", "cidr", "contains", "startswith",
        "endswith", "exists", "fieldref", "gt", "gte", "lt", "lte", "re", "i", "ignorecase",
        "m", "multiline", "s", "dotall", "windash",
    }
)  # fmt: skip

_RE_FLAGS = {
    SigmaRegularExpressionFlag.IGNORECASE: "i",
    SigmaRegularExpressionFlag.MULTILINE: "m",
    SigmaRegularExpressionFlag.DOTALL: "s",
}

# Relative costs used to evaluate cheap AND branches first; only the order matters.
_COST_STR, _COST_CONTAINS, _COST_GLOB, _COST_NUM, _COST_CIDR, _COST_RE = 1, 2, 3, 2, 5, 6


class UnsupportedRule(ValueError):
    """The rule is valid Sigma but uses something this evaluator cannot honour."""


class UnsupportedModifier(UnsupportedRule):
    """A value modifier outside ``SUPPORTED_MODIFIERS``."""


@dataclass
class CompiledRule:
    """A rule's predicate plus the Sigma fields the engine must extract for it."""

    predicate: Pred
    fields: frozenset[str]
    getters: dict[str, Callable[[Mapping[str, Any]], Any]] = field(repr=False)
    # A necessary condition: the rule can only fire when one of these lower-cased needles
    # occurs in the lower-cased text of its field. ``None`` when no such set could be derived
    # (a NOT at the top, a regex, a number...): the rule then runs on every event of its action.
    guard: Guard | None = None


def check_modifiers(rule: SigmaRule) -> None:
    """Refuse modifiers outside ``SUPPORTED_MODIFIERS``, naming the detection and field."""
    for name, detection in rule.detection.detections.items():
        for item in _items(detection):
            for mod in item.modifiers:
                ident = reverse_modifier_mapping.get(mod.__name__, mod.__name__)
                if ident not in SUPPORTED_MODIFIERS:
                    raise UnsupportedModifier(
                        f"unsupported modifier '{ident}' on field '{item.field}' "
                        f"in detection '{name}'"
                    )


def _items(detection: SigmaDetection) -> Iterable[SigmaDetectionItem]:
    for item in detection.detection_items:
        if isinstance(item, SigmaDetection):
            yield from _items(item)
        else:
            yield item


def compile_rule(rule: SigmaRule) -> CompiledRule:
    """Build the predicate for ``rule``.

    Raises:
        UnsupportedRule: a modifier, value type or field the evaluator does not handle.
        sigma.exceptions.SigmaError: the condition does not parse or names no detection.
    """
    check_modifiers(rule)
    builder = _Builder()
    preds = []
    trees: list[Any] = []
    for condition in rule.detection.parsed_condition:
        tree = condition.parse()
        if tree is None:
            raise UnsupportedRule("the condition is empty after parsing")
        preds.append(builder.node(tree))
        trees.append(tree)
    predicate, _ = _or(preds)
    guard = _guard_any([_guard(t) for t in trees])
    return CompiledRule(predicate, frozenset(builder.getters), builder.getters, guard)


# -- pre-filter guards ------------------------------------------------------------------------
#
# A guard over-approximates a condition: whenever the condition is true, at least one
# (field, needle) pair of the guard holds, i.e. the needle is a substring of the field's
# lower-cased text. False positives only cost a predicate call; a false negative would lose
# a detection, so every case that is not clearly covered returns ``None`` (no guard).

_MIN_NEEDLE = 2  # shorter literals match nearly everything and only cost set size


def _guard(n: Any) -> Guard | None:
    if isinstance(n, ConditionAND):
        # Any operand's guard is necessary for the AND; take the most selective one.
        best: Guard | None = None
        for arg in n.args:
            g = _guard(arg)
            if g is not None and (best is None or _selectivity(g) > _selectivity(best)):
                best = g
        return best
    if isinstance(n, ConditionOR):
        return _guard_any([_guard(a) for a in n.args])
    if isinstance(n, ConditionFieldEqualsValueExpression):
        values = n.value.values if isinstance(n.value, SigmaExpansion) else [n.value]
        return _guard_any([_value_guard((n.field,), v) for v in values])
    if isinstance(n, ConditionValueExpression):
        values = n.value.values if isinstance(n.value, SigmaExpansion) else [n.value]
        return _guard_any([_value_guard(KEYWORD_FIELDS, v) for v in values])
    return None  # NOT, and anything else: no necessary literal


def _guard_any(guards: list[Guard | None]) -> Guard | None:
    if not guards or any(g is None for g in guards):
        return None
    return frozenset().union(*guards)  # type: ignore[arg-type]


def _selectivity(g: Guard) -> tuple[int, int]:
    """Longer shortest needle first, then fewer alternatives."""
    return min(len(needle) for _, needle in g), -len(g)


def _value_guard(fields: Iterable[str], value: Any) -> Guard | None:
    if isinstance(value, SigmaBool):
        needle = "true" if value.boolean else "false"
    elif isinstance(value, SigmaString) and not isinstance(value, SigmaCasedString):
        # Case-sensitive values are left unguarded: str.lower() is not always a per-character
        # map (final sigma), so containment in the raw text need not survive lower-casing.
        segments = [""]
        for part in value.s:
            if isinstance(part, str):
                segments[-1] += part.lower()
            elif isinstance(part, SpecialChars):
                segments.append("")
            else:  # a placeholder: compile_rule refuses these anyway
                return None
        needle = max(segments, key=len)
    else:
        return None  # regex, numbers, null, exists, CIDR, field references
    if len(needle) < _MIN_NEEDLE:
        return None
    return frozenset((f, needle) for f in fields)


class _Builder:
    def __init__(self) -> None:
        self.getters: dict[str, Callable[[Mapping[str, Any]], Any]] = {}

    def use(self, name: str) -> str:
        if name not in self.getters:
            try:
                self.getters[name] = getter_for(name)
            except UnknownField as e:
                raise UnsupportedRule(str(e)) from None
        return name

    def node(self, n: Any) -> tuple[Pred, int]:
        if isinstance(n, ConditionAND):
            return _and([self.node(a) for a in n.args])
        if isinstance(n, ConditionOR):
            return _or(self._or_args(n.args))
        if isinstance(n, ConditionNOT):
            inner, cost = self.node(n.args[0])
            return (lambda low, raw: not inner(low, raw)), cost
        if isinstance(n, ConditionFieldEqualsValueExpression):
            return self._or_args([n])[0]
        if isinstance(n, ConditionValueExpression):
            return self.keyword(n.value)
        if isinstance(n, ConditionItem):
            raise UnsupportedRule(f"unsupported condition element {type(n).__name__}")
        raise UnsupportedRule(f"unsupported condition element {type(n).__name__}")

    def _or_args(self, args: Iterable[Any]) -> list[tuple[Pred, int]]:
        """Compile OR operands, merging string and CIDR values of one field into one leaf."""
        texts: dict[tuple[str, bool], list[tuple[TextTest | _Plain, int]]] = {}
        cidrs: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        out: list[tuple[Pred, int]] = []
        for arg in args:
            if not isinstance(arg, ConditionFieldEqualsValueExpression):
                out.append(self.node(arg))
                continue
            fld = self.use(arg.field)
            values = arg.value.values if isinstance(arg.value, SigmaExpansion) else [arg.value]
            for value in values:
                if isinstance(value, SigmaCIDRExpression):
                    cidrs.setdefault(fld, []).append(value.network)
                    continue
                text = _text_test(value)
                if text is not None:
                    test, cased, cost = text
                    texts.setdefault((fld, cased), []).append((test, cost))
                else:
                    out.append(self.leaf(fld, value))
        for (fld, cased), tests in texts.items():
            out.append(_text_leaf(fld, cased, tests))
        for fld, nets in cidrs.items():
            out.append(_cidr_leaf(fld, nets))
        return out

    def leaf(self, fld: str, value: Any) -> tuple[Pred, int]:
        """Leaves that are not plain text: null, exists, numbers, comparisons, field refs."""
        if isinstance(value, SigmaNull):
            return (lambda low, raw: raw[fld] is None), _COST_STR
        if isinstance(value, SigmaExists):
            want = bool(value.exists)
            return (lambda low, raw: (raw[fld] is not None) is want), _COST_STR
        if isinstance(value, SigmaCompareExpression):
            return _compare_leaf(fld, value.number.number, _COMPARE[value.op]), _COST_NUM
        if isinstance(value, SigmaNumber):
            return _compare_leaf(fld, value.number, _equal), _COST_NUM
        if isinstance(value, SigmaFieldReference):
            return self.fieldref(fld, value), _COST_CONTAINS
        raise UnsupportedRule(f"unsupported value type {type(value).__name__} for field '{fld}'")

    def fieldref(self, fld: str, value: SigmaFieldReference) -> Pred:
        other = self.use(value.field)
        starts, ends = value.starts_with, value.ends_with

        def pred(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
            a, b = low[fld], low[other]
            if not isinstance(a, str) or not isinstance(b, str):
                return False
            if starts and ends:
                return b in a
            if starts:
                return a.startswith(b)
            if ends:
                return a.endswith(b)
            return a == b

        return pred

    def keyword(self, value: Any) -> tuple[Pred, int]:
        """A value without a field: it matches when any keyword field matches."""
        values = value.values if isinstance(value, SigmaExpansion) else [value]
        tests: list[tuple[TextTest | _Plain, int]] = []
        cased = False
        for v in values:
            # Keywords are a full-text search over a log line in Sigma; a keyword without
            # wildcards therefore matches as a substring of a field, not the whole field.
            if isinstance(v, SigmaString) and not v.contains_special():
                plain = "".join(str(p) for p in v.s)
                cased_kw = isinstance(v, SigmaCasedString)
                needle = plain if cased_kw else plain.lower()
                text: tuple[TextTest | _Plain, bool, int] | None = (
                    _Plain("in", needle),
                    cased_kw,
                    _COST_CONTAINS,
                )
            else:
                text = _text_test(v)
            if text is None:
                raise UnsupportedRule(f"unsupported keyword value type {type(v).__name__}")
            test, c, cost = text
            if tests and c != cased:
                raise UnsupportedRule("keyword list mixes case-sensitive and insensitive values")
            cased = c
            tests.append((test, cost))
        leaves = [_text_leaf(self.use(k), cased, tests) for k in KEYWORD_FIELDS]
        return _or(leaves)


# -- text values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plain:
    """A wildcard pattern simple enough for str methods: ``eq``, ``sw``, ``ew``, ``in``, ``any``."""

    kind: str
    text: str


def _text_test(value: Any) -> tuple[TextTest | _Plain, bool, int] | None:
    """(test, case_sensitive, cost) for values matched as text; ``None`` for other types."""
    if isinstance(value, SigmaRegularExpression):
        flags = "".join(sorted(_RE_FLAGS[f] for f in value.flags))
        pattern = (f"(?{flags})" if flags else "") + str(value.regexp)
        try:
            compiled = re2.compile(pattern)
        except re2.error as e:
            raise UnsupportedRule(f"regular expression {pattern!r} does not compile: {e}") from e
        # Text may hold lone surrogates (undecodable bytes); RE2 takes UTF-8 bytes, so they are
        # passed through rather than raising on every such event.
        return (lambda s: compiled.search(_utf8(s)) is not None), True, _COST_RE
    if isinstance(value, SigmaBool):
        return _Plain("eq", "true" if value.boolean else "false"), False, _COST_STR
    if isinstance(value, SigmaString):
        cased = isinstance(value, SigmaCasedString)
        test, cost = _string_test(value, cased)
        return test, cased, cost
    return None


def _string_test(value: SigmaString, cased: bool) -> tuple[TextTest | _Plain, int]:
    tokens: list[str | SpecialChars] = []
    for part in value.s:
        if isinstance(part, Placeholder):
            raise UnsupportedRule(f"placeholder %{part.name}% needs a pipeline that fills it")
        if isinstance(part, str):
            text = part if cased else part.lower()
            if tokens and isinstance(tokens[-1], str):
                tokens[-1] += text
            else:
                tokens.append(text)
        else:
            tokens.append(part)
    if SpecialChars.WILDCARD_SINGLE in tokens:
        return _glob_regex(tokens), _COST_RE
    segments: list[str] = [""]
    for tok in tokens:
        if tok is SpecialChars.WILDCARD_MULTI:
            segments.append("")
        else:
            segments[-1] += str(tok)
    if len(segments) == 1:
        return _Plain("eq", segments[0]), _COST_STR
    if all(not s for s in segments):
        return _Plain("any", ""), _COST_STR
    if len(segments) == 2:
        head, tail = segments
        if not tail:
            return _Plain("sw", head), _COST_STR
        if not head:
            return _Plain("ew", tail), _COST_STR
    inner = [s for s in segments[1:-1] if s]
    if not segments[0] and not segments[-1] and len(inner) == 1:
        return _Plain("in", inner[0]), _COST_CONTAINS
    return _glob(segments[0], inner, segments[-1]), _COST_GLOB


def _glob(head: str, middle: list[str], tail: str) -> TextTest:
    """``head*m1*m2*tail`` via ordered ``find``: exact when ``*`` is the only wildcard."""
    need = len(head) + len(tail)
    mids = tuple(middle)

    def test(s: str) -> bool:
        if len(s) < need or not s.startswith(head) or not s.endswith(tail):
            return False
        pos, end = len(head), len(s) - len(tail)
        for m in mids:
            i = s.find(m, pos, end)
            if i < 0:
                return False
            pos = i + len(m)
        return True

    return test


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _glob_regex(tokens: list[str | SpecialChars]) -> TextTest:
    parts = []
    for tok in tokens:
        if tok is SpecialChars.WILDCARD_MULTI:
            parts.append(".*")
        elif tok is SpecialChars.WILDCARD_SINGLE:
            parts.append(".")
        else:
            # Escape every non-alphanumeric as \x{..}: RE2 rejects some of re.escape's escapes.
            parts.append("".join(c if c.isalnum() else f"\\x{{{ord(c):x}}}" for c in str(tok)))
    compiled = re2.compile("(?s)" + "".join(parts))
    return lambda s: compiled.fullmatch(_utf8(s)) is not None


def _merge(tests: list[tuple[TextTest | _Plain, int]]) -> tuple[TextTest, int]:
    """One test for several OR-ed values of a field: a set, a tuple prefix/suffix, a loop."""
    eq: set[str] = set()
    sw: list[str] = []
    ew: list[str] = []
    sub: list[str] = []
    other: list[TextTest] = []
    cost = 0
    for test, c in tests:
        if isinstance(test, _Plain):
            if test.kind == "any":
                return (lambda s: True), _COST_STR
            {"eq": eq.add, "sw": sw.append, "ew": ew.append, "in": sub.append}[test.kind](test.text)
            cost = max(cost, c)
        else:
            other.append(test)
            cost += c
    checks: list[TextTest] = []
    if len(eq) == 1:
        (one,) = eq
        checks.append(lambda s: s == one)
    elif eq:
        frozen = frozenset(eq)
        checks.append(lambda s: s in frozen)
    if sw:
        prefixes = tuple(sw)
        checks.append(lambda s: s.startswith(prefixes))
    if ew:
        suffixes = tuple(ew)
        checks.append(lambda s: s.endswith(suffixes))
    if len(sub) == 1:
        (needle,) = sub
        checks.append(lambda s: needle in s)
    elif sub:
        needles = tuple(sub)

        def contains_any(s: str) -> bool:
            for n in needles:  # noqa: SIM110 - hot path, beats any()
                if n in s:
                    return True
            return False

        checks.append(contains_any)
    checks.extend(other)
    cost += _COST_CONTAINS if len(sub) > 1 else 0
    if len(checks) == 1:
        return checks[0], max(cost, _COST_STR)
    all_checks = tuple(checks)

    def any_check(s: str) -> bool:
        for check in all_checks:  # noqa: SIM110 - hot path, beats any()
            if check(s):
                return True
        return False

    return any_check, cost


def _text_leaf(
    fld: str, cased: bool, tests: list[tuple[TextTest | _Plain, int]]
) -> tuple[Pred, int]:
    if not cased:
        fast = _inline_leaf(fld, tests)
        if fast is not None:
            return fast
    test, cost = _merge(tests)
    if cased:

        def cased_pred(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
            s = as_text(raw[fld])
            if s is None:
                return False
            if isinstance(s, str):
                return test(s)
            return any(test(x) for x in s)

        return cased_pred, cost

    def pred(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
        s = low[fld]
        if s is None:
            return False
        if s.__class__ is str:
            return test(s)
        return any(test(x) for x in s)

    return pred, cost


def _inline_leaf(fld: str, tests: list[tuple[TextTest | _Plain, int]]) -> tuple[Pred, int] | None:
    """The hot cases (one kind of plain value on a field) with the str method inlined.

    This saves a Python call per leaf, which is most of a rule's cost; lists and missing
    values fall back to the general path.
    """
    kinds = {t.kind for t, _ in tests if isinstance(t, _Plain)}
    if len(kinds) != 1 or not all(isinstance(t, _Plain) for t, _ in tests):
        return None
    (kind,) = kinds
    values = tuple(t.text for t, _ in tests if isinstance(t, _Plain))
    general, _ = _merge(tests)

    def slow(s: Any) -> bool:
        return s is not None and any(general(x) for x in s)

    if kind == "sw":

        def sw(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
            s = low[fld]
            return s.startswith(values) if s.__class__ is str else slow(s)

        return sw, _COST_STR
    if kind == "ew":

        def ew(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
            s = low[fld]
            return s.endswith(values) if s.__class__ is str else slow(s)

        return ew, _COST_STR
    if kind == "eq":
        members = frozenset(values)

        def eq(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
            s = low[fld]
            return s in members if s.__class__ is str else slow(s)

        return eq, _COST_STR
    if kind == "in" and len(values) == 1:
        (needle,) = values

        def contains(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
            s = low[fld]
            return needle in s if s.__class__ is str else slow(s)

        return contains, _COST_CONTAINS
    if kind == "in":

        def contains_any(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
            s = low[fld]
            if s.__class__ is not str:
                return slow(s)
            for n in values:  # noqa: SIM110 - hot path, beats any()
                if n in s:
                    return True
            return False

        return contains_any, _COST_CONTAINS * 2
    return None


# -- other leaves -----------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return v
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _equal(a: float, b: float) -> bool:
    return a == b


_COMPARE: dict[CompareOperators, Callable[[float, float], bool]] = {
    CompareOperators.LT: lambda a, b: a < b,
    CompareOperators.LTE: lambda a, b: a <= b,
    CompareOperators.GT: lambda a, b: a > b,
    CompareOperators.GTE: lambda a, b: a >= b,
    CompareOperators.NEQ: lambda a, b: a != b,
}


def _compare_leaf(fld: str, number: float, cmp: Callable[[float, float], bool]) -> Pred:

    def pred(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
        v = raw[fld]
        if isinstance(v, list):
            return any((n := _number(x)) is not None and cmp(n, number) for x in v)
        n = _number(v)
        return n is not None and cmp(n, number)

    return pred


def _cidr_leaf(
    fld: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> tuple[Pred, int]:
    networks = tuple(nets)

    def inside(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        try:
            addr = ipaddress.ip_address(v.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return False
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; v4 ranges must still match.
        mapped = getattr(addr, "ipv4_mapped", None)
        for net in networks:  # noqa: SIM110 - hot path, beats any()
            if addr in net or (mapped is not None and mapped in net):
                return True
        return False

    def pred(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
        v = raw[fld]
        if isinstance(v, list):
            return any(inside(x) for x in v)
        return inside(v)

    return pred, _COST_CIDR


# -- boolean structure ------------------------------------------------------------------------


def _and(parts: list[tuple[Pred, int]]) -> tuple[Pred, int]:
    parts = sorted(parts, key=lambda p: p[1])  # cheapest first: most events fail early
    cost = sum(c for _, c in parts)
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        (a, _), (b, _) = parts
        return (lambda low, raw: a(low, raw) and b(low, raw)), cost
    preds = tuple(p for p, _ in parts)

    def pred(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
        for p in preds:  # noqa: SIM110 - hot path, beats any()
            if not p(low, raw):
                return False
        return True

    return pred, cost


def _or(parts: list[tuple[Pred, int]]) -> tuple[Pred, int]:
    parts = sorted(parts, key=lambda p: p[1])
    cost = sum(c for _, c in parts)
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        (a, _), (b, _) = parts
        return (lambda low, raw: a(low, raw) or b(low, raw)), cost
    preds = tuple(p for p, _ in parts)

    def pred(low: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
        for p in preds:  # noqa: SIM110 - hot path, beats any()
            if p(low, raw):
                return True
        return False

    return pred, cost
