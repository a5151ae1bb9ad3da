"""The controller's REST resources under ``/api/v1``, one blueprint per area.

``controller.app`` mounts ``module.create_blueprint()`` for every module in ``BLUEPRINTS``.
Handlers authenticate through ``controller.auth.require`` and record every state change with
``controller.auth.audit``; they read ``app.ctx.store``, ``app.ctx.pki``, ``app.ctx.detection``
and ``app.ctx.backplane`` (and ``app.ctx.live`` / ``app.ctx.rules_report`` when present).
"""

from __future__ import annotations

from types import ModuleType

from controller.api import alerts, commands, enrollment, events, hosts, policy, rules

BLUEPRINTS: list[ModuleType] = [hosts, events, alerts, commands, policy, rules, enrollment]

__all__ = ["BLUEPRINTS"]
