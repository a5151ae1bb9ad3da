"""Condition forms: and, or, not, parentheses, 1/all/any of pattern, them, lists of maps."""

from __future__ import annotations

import pytest

DETECTION = """
sel_a:
  Image|endswith: '/a'
sel_b:
  CommandLine|contains: ' -b'
other_c:
  User: 'carol'
"""


def run(load_rule, ev, condition: str, image: str, cmd: str, user: str) -> bool:
    engine = load_rule(DETECTION + f"condition: {condition}\n")
    return bool(engine.match(ev.exec(image, cmd, user=user)))


# (image, command line, user) → which of sel_a, sel_b, other_c hold
CASES = {
    "a": ("/bin/a", "a", "bob"),
    "b": ("/bin/x", "x -b", "bob"),
    "c": ("/bin/x", "x", "carol"),
    "ab": ("/bin/a", "a -b", "bob"),
    "ac": ("/bin/a", "a", "carol"),
    "bc": ("/bin/x", "x -b", "carol"),
    "abc": ("/bin/a", "a -b", "carol"),
    "": ("/bin/x", "x", "bob"),
}


@pytest.mark.parametrize(
    ("condition", "truth"),
    [
        ("sel_a and sel_b", lambda a, b, c: a and b),
        ("sel_a or sel_b", lambda a, b, c: a or b),
        ("not sel_a", lambda a, b, c: not a),
        ("sel_a and not sel_b", lambda a, b, c: a and not b),
        ("sel_a or sel_b and other_c", lambda a, b, c: a or (b and c)),  # and binds tighter
        ("(sel_a or sel_b) and other_c", lambda a, b, c: (a or b) and c),
        ("not (sel_a or other_c)", lambda a, b, c: not (a or c)),
        ("1 of sel_*", lambda a, b, c: a or b),
        ("any of sel_*", lambda a, b, c: a or b),
        ("all of sel_*", lambda a, b, c: a and b),
        ("1 of them", lambda a, b, c: a or b or c),
        ("all of them", lambda a, b, c: a and b and c),
        ("1 of sel_* and not other_c", lambda a, b, c: (a or b) and not c),
        ("all of sel_* or other_c", lambda a, b, c: (a and b) or c),
        ("not 1 of sel_*", lambda a, b, c: not (a or b)),
    ],
)
def test_condition_truth_table(load_rule, ev, condition, truth):
    for name, (image, cmd, user) in CASES.items():
        want = truth("a" in name, "b" in name, "c" in name)
        got = run(load_rule, ev, condition, image, cmd, user)
        assert got is want, f"{condition!r} on case {name!r}: got {got}"


def test_several_fields_in_one_map_are_and(load_rule, ev):
    e = load_rule("sel:\n  Image: '/bin/a'\n  User: 'carol'\ncondition: sel")
    assert e.match(ev.exec("/bin/a", user="carol"))
    assert not e.match(ev.exec("/bin/a", user="bob"))


def test_list_of_maps_is_or(load_rule, ev):
    e = load_rule(
        """
        sel:
          - Image: '/bin/a'
            User: 'carol'
          - CommandLine|contains: 'evil'
        condition: sel
        """
    )
    assert e.match(ev.exec("/bin/a", user="carol"))
    assert e.match(ev.exec("/bin/x", "x evil", user="bob"))
    assert not e.match(ev.exec("/bin/a", user="bob"))


def test_condition_list_is_or(load_rule, ev):
    e = load_rule(DETECTION + "condition:\n  - sel_a\n  - other_c\n")
    assert e.match(ev.exec("/bin/a", user="bob"))
    assert e.match(ev.exec("/bin/x", user="carol"))
    assert not e.match(ev.exec("/bin/x", "x -b", user="bob"))


def test_missing_field_never_matches_a_value(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|contains: 'x'\ncondition: sel")
    event = ev.exec("/bin/x", "x")
    del event["process"]["command_line"]
    assert not e.match(event)
    n = load_rule("sel:\n  CommandLine|contains: 'x'\ncondition: not sel")
    assert n.match(event)  # Sigma: "not" of an absent field's value holds
