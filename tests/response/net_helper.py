"""Run one response action in the current network namespace; print the result as JSON.

The network tests start this with ``ip netns exec <host-ns>``, so the sensor's real nftables
code runs against a namespace the test made and never against the machine's own network.
Action ``start`` only builds the Responder and re-applies saved state, as a sensor restart does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from backplane.messages import Command  # noqa: E402
from sensor.process_table import ProcessTable  # noqa: E402
from sensor.response import Responder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("state_dir", type=Path)
    p.add_argument("action")
    p.add_argument("args", nargs="?", default="{}")
    p.add_argument("--controller", action="append", default=[])
    p.add_argument("--dns", action="append", default=[])
    opts = p.parse_args()
    responder = Responder(
        opts.state_dir, ProcessTable("net-test").entity_id, controller=opts.controller,
        dns_servers=opts.dns, domain_refresh=0,
    )  # fmt: skip
    responder.start()
    if opts.action == "start":
        print(json.dumps({"status": "ok", "state": responder.firewall.state}))
        return
    result = responder.handle(Command("net-1", opts.action, json.loads(opts.args)))
    print(json.dumps({"status": result.status, **result.output}))


if __name__ == "__main__":
    main()
