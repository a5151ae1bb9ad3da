"""Loading (and refusing) rule files, dispatch by action, enable/disable/reload."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from backplane.schema import Action
from controller.detection import DetectionEngine, ProblemKind

GOOD = """
title: Good Rule
id: 11111111-1111-4111-8111-111111111111
level: low
tags: [attack.execution]
logsource: {product: linux, category: process_creation}
detection:
  sel: {Image|endswith: '/good'}
  condition: sel
"""

BROKEN = {
    "yaml_error.yml": (
        "title: Broken YAML\nlogsource: [\n  bad: {\n",
        None,
        ProblemKind.ERROR,
        "YAML",
    ),
    "unknown_modifier.yml": (
        """
title: Unknown Modifier Rule
logsource: {product: linux, category: process_creation}
detection:
  sel: {CommandLine|frobnicate: x}
  condition: sel
""",
        "Unknown Modifier Rule",
        ProblemKind.ERROR,
        "frobnicate",
    ),
    "unsupported_modifier.yml": (
        """
title: Timestamp Modifier Rule
logsource: {product: linux, category: process_creation}
detection:
  sel: {ProcessId|hour: 3}
  condition: sel
""",
        "Timestamp Modifier Rule",
        ProblemKind.UNSUPPORTED_MODIFIER,
        "'hour'",
    ),
    "windows.yml": (
        """
title: Windows Rule
logsource: {product: windows, category: process_creation}
detection:
  sel: {Image|endswith: '\\\\cmd.exe'}
  condition: sel
""",
        "Windows Rule",
        ProblemKind.UNSUPPORTED_LOGSOURCE,
        "not product linux",
    ),
    "auditd.yml": (
        """
title: Auditd Rule
logsource: {product: linux, service: auditd}
detection:
  sel: {type: EXECVE}
  condition: sel
""",
        "Auditd Rule",
        ProblemKind.UNSUPPORTED_LOGSOURCE,
        "services are not collected",
    ),
    "dns.yml": (
        """
title: DNS Rule
logsource: {product: linux, category: dns_query}
detection:
  sel: {QueryName|endswith: '.onion'}
  condition: sel
""",
        "DNS Rule",
        ProblemKind.UNSUPPORTED_LOGSOURCE,
        "category not supported",
    ),
    "unknown_field.yml": (
        """
title: Unknown Field Rule
logsource: {product: linux, category: process_creation}
detection:
  sel: {OriginalFileName: 'x.exe'}
  condition: sel
""",
        "Unknown Field Rule",
        ProblemKind.UNSUPPORTED,
        "OriginalFileName",
    ),
    "bad_condition.yml": (
        """
title: Bad Condition Rule
logsource: {product: linux, category: process_creation}
detection:
  sel: {Image: x}
  condition: sel and nowhere
""",
        "Bad Condition Rule",
        ProblemKind.ERROR,
        "nowhere",
    ),
    "bad_regex.yml": (
        """
title: Bad Regex Rule
logsource: {product: linux, category: process_creation}
detection:
  sel: {CommandLine|re: '(['}
  condition: sel
""",
        "Bad Regex Rule",
        ProblemKind.ERROR,
        "invalid",
    ),
    "bad_cidr.yml": (
        """
title: Bad CIDR Rule
logsource: {product: linux, category: network_connection}
detection:
  sel: {DestinationIp|cidr: '10.0.0.0/33'}
  condition: sel
""",
        "Bad CIDR Rule",
        ProblemKind.ERROR,
        "CIDR",
    ),
    "not_a_rule.yml": ("- just\n- a list\n", None, ProblemKind.ERROR, "not a Sigma rule file"),
    "duplicate.yml": (
        GOOD.replace("Good Rule", "Copy Of Good"),
        "Copy Of Good",
        ProblemKind.DUPLICATE,
        "already loaded",
    ),
    "correlation.yml": (
        """
title: Correlation Rule
name: corr
correlation:
  type: event_count
  rules: [11111111-1111-4111-8111-111111111111]
  group-by: [User]
  timespan: 5m
  condition: {gte: 10}
""",
        "Correlation Rule",
        ProblemKind.UNSUPPORTED,
        "SigmaCorrelationRule",
    ),
}


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    (d / "nested").mkdir(parents=True)
    (d / "a_good.yml").write_text(GOOD)
    (d / "nested" / "second.yaml").write_text(
        GOOD.replace("1111-4111-8111-111111111111", "2222-4222-8222-222222222222")
        .replace("Good Rule", "Second Rule")
        .replace("/good", "/second")
    )
    (d / "README.txt").write_text("not a rule, ignored by suffix")
    return d


def test_each_broken_rule_is_reported_by_file_and_name_while_others_load(rules_dir):
    for name, (text, *_rest) in BROKEN.items():
        (rules_dir / name).write_text(text)
    (rules_dir / "binary.yml").write_bytes(b"title: \xff\xfe\n")
    (rules_dir / "huge.yml").write_text("# " + "x" * (1 << 20))
    engine = DetectionEngine(include_builtin=False)
    report = engine.load([rules_dir, rules_dir / "missing-dir"])

    assert {r.title for r in report.loaded} == {"Good Rule", "Second Rule"}
    by_file = {Path(p.path).name: p for p in report.problems}
    for name, (_text, title, kind, reason) in BROKEN.items():
        problem = by_file[name]
        assert problem.rule == title, name
        assert problem.kind is kind, (name, problem)
        assert reason in problem.reason, (name, problem.reason)
        assert name in str(problem)
    assert "cannot read" in by_file["binary.yml"].reason
    assert "limit" in by_file["huge.yml"].reason
    assert "no such file" in by_file["missing-dir"].reason
    assert report.files == len(BROKEN) + 4
    assert not report.ok
    assert engine.match(_exec(Path("/usr/bin/good")))  # the good rules work regardless


def test_multi_document_file_loads_each_rule(tmp_path):
    second = GOOD.replace("1111-4111-8111-111111111111", "3333-4333-8333-333333333333")
    second = second.replace("Good Rule", "Other").replace("/good", "/other")
    broken = "title: Broken\nlogsource: {product: windows}\ndetection: {s: {a: b}, condition: s}\n"
    (tmp_path / "multi.yml").write_text(GOOD + "---\n" + second + "---\n" + broken)
    engine = DetectionEngine(include_builtin=False)
    report = engine.load([tmp_path])
    assert sorted(r.title for r in report.loaded) == ["Good Rule", "Other"]
    assert [(p.rule, p.kind) for p in report.problems] == [
        ("Broken", ProblemKind.UNSUPPORTED_LOGSOURCE)
    ]


def _exec(image: Path, action: str = "exec") -> dict:
    return {
        "event": {"action": action, "category": ["process"]},
        "host": {"id": "h1", "name": "n1"},
        "process": {"executable": str(image), "command_line": str(image)},
    }


def test_dispatch_only_tests_rules_of_the_event_action(rules_dir):
    engine = DetectionEngine(include_builtin=False)
    engine.load([rules_dir])
    assert engine.actions() == {"exec": 2}
    hit = engine.match(_exec(Path("/x/good")))
    assert [(m.title, m.level, m.severity, m.tags) for m in hit] == [
        ("Good Rule", "low", 25, ("attack.execution",))
    ]
    assert hit[0].event["process"]["executable"] == "/x/good"
    # Same fields, other actions: a process_creation rule must not see them.
    for action in ("exit", "write", "connect", "nonsense"):
        assert engine.match(_exec(Path("/x/good"), action)) == []


def test_malformed_events(rules_dir):
    engine = DetectionEngine(include_builtin=False)
    engine.load([rules_dir])
    with pytest.raises(TypeError, match="mapping"):
        engine.match(["not", "an", "event"])  # type: ignore[arg-type]
    assert engine.match({}) == []
    assert engine.match({"event": "exec"}) == []
    assert engine.match({"event": {"action": 7}}) == []
    # Fields of unexpected types read as text or not at all, never raise.
    odd = _exec(Path("/x/good"))
    odd["process"]["executable"] = {"nested": "dict"}
    assert engine.match(odd) == []
    odd["process"]["executable"] = ["/x/good"]
    assert len(engine.match(odd)) == 1
    assert engine.errors == 0


def test_disable_enable_and_reload_keep_state(rules_dir):
    engine = DetectionEngine(include_builtin=False)
    engine.load([rules_dir])
    good = "11111111-1111-4111-8111-111111111111"
    engine.disable(good)
    assert engine.match(_exec(Path("/good"))) == []
    assert {r.id: r.enabled for r in engine.rules}[good] is False
    report = engine.reload()
    assert {r.id: r.enabled for r in report.loaded}[good] is False
    assert engine.match(_exec(Path("/good"))) == []
    engine.enable(good)
    assert len(engine.match(_exec(Path("/good")))) == 1
    with pytest.raises(KeyError, match="no loaded rule"):
        engine.disable("no-such-id")

    # Reload picks up edits, additions and removals.
    (rules_dir / "a_good.yml").write_text(GOOD.replace("/good", "/better"))
    (rules_dir / "nested" / "second.yaml").unlink()
    report = engine.reload()
    assert [r.title for r in report.loaded] == ["Good Rule"]
    assert engine.match(_exec(Path("/good"))) == []
    assert len(engine.match(_exec(Path("/better")))) == 1


def test_builtin_rules_load_with_configured_dirs(rules_dir):
    engine = DetectionEngine()
    report = engine.load([rules_dir])
    assert report.ok, [str(p) for p in report.problems]
    titles = {r.title for r in report.loaded}
    assert {"Good Rule", "Second Rule"} <= titles
    assert len(titles) >= 12
    # Naming the built-in folder again does not load its rules twice.
    again = DetectionEngine().load([engine.rules[0].path.rsplit("/", 1)[0]])
    assert again.ok, [str(p) for p in again.problems]


def test_rule_without_id_gets_a_stable_one(tmp_path):
    (tmp_path / "r.yml").write_text(GOOD.replace("id: 11111111-1111-4111-8111-111111111111\n", ""))
    a = DetectionEngine(include_builtin=False).load([tmp_path]).loaded[0].id
    b = DetectionEngine(include_builtin=False).load([tmp_path]).loaded[0].id
    assert a == b


@pytest.mark.timeout(60)
def test_match_during_reload_and_toggle(rules_dir):
    """Readers never see a half-built rule set while another thread reloads and toggles."""
    engine = DetectionEngine(include_builtin=False)
    engine.load([rules_dir])
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                engine.reload()
                engine.disable("11111111-2222-4222-8222-222222222222")
                engine.enable("11111111-2222-4222-8222-222222222222")
        except BaseException as e:  # surfaced below
            failures.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3000):
            hits = engine.match(_exec(Path("/good")))
            assert [m.title for m in hits] == ["Good Rule"]
    finally:
        stop.set()
        t.join(30)
    assert not failures


def test_file_and_network_categories_dispatch(tmp_path):
    rule = """
title: {title}
id: {id}
logsource: {{product: linux, category: {cat}}}
detection:
  sel: {{TargetFilename|startswith: '/etc/'}}
  condition: sel
"""
    cats = ["file_event", "file_create", "file_delete", "file_rename", "file_change", "file_access"]
    for i, cat in enumerate(cats):
        (tmp_path / f"{cat}.yml").write_text(
            rule.format(title=cat, id=f"44444444-4444-4444-8444-{i:012d}", cat=cat)
        )
    engine = DetectionEngine(include_builtin=False)
    assert engine.load([tmp_path]).ok
    expect = {
        Action.FILE_CREATE: {"file_event", "file_create"},
        Action.FILE_WRITE: {"file_event", "file_change"},
        Action.FILE_RENAME: {"file_event", "file_rename"},
        Action.FILE_DELETE: {"file_delete"},
        Action.FILE_OPEN: {"file_access"},
        Action.FILE_CHMOD: {"file_change"},
        Action.EXEC: set(),
    }
    for action, titles in expect.items():
        event = {"event": {"action": action.value}, "file": {"path": "/etc/passwd"}}
        assert {m.title for m in engine.match(event)} == titles, action
        event["file"]["path"] = "/home/etc/passwd"
        assert engine.match(event) == []


def test_config_describes_the_rule_set_and_its_generation(rules_dir):
    """What the detection worker process loads: same directories, same disabled rules."""
    engine = DetectionEngine(include_builtin=False)
    good = "11111111-1111-4111-8111-111111111111"
    engine.load([rules_dir], disabled=[good])
    config = engine.config()
    assert config.dirs == (str(rules_dir),) and config.include_builtin is False
    assert config.disabled == {good}
    assert engine.match(_exec(Path("/good"))) == []
    twin = DetectionEngine(include_builtin=config.include_builtin)
    twin.load(config.dirs, disabled=config.disabled)
    assert {(r.id, r.enabled) for r in twin.rules} == {(r.id, r.enabled) for r in engine.rules}
    before = config.generation
    engine.enable(good)
    assert engine.config().generation > before and engine.config().disabled == frozenset()
    after_enable = engine.config().generation
    engine.reload()
    assert engine.config().generation > after_enable
