"""Sigma detection for the controller: load rules, match ECS events, build alerts.

engine = DetectionEngine()
report = engine.load(["/etc/edr/rules"])      # plus controller/rules/
for m in engine.match(event):
    alert = build_alert(m, host=host, ancestry=chain)
"""

from controller.detection.alerts import build_alert
from controller.detection.engine import (
    BUILTIN_RULES,
    SEVERITY,
    DetectionEngine,
    LoadReport,
    Match,
    ProblemKind,
    RuleConfig,
    RuleInfo,
    RuleProblem,
)

__all__ = [
    "BUILTIN_RULES",
    "SEVERITY",
    "DetectionEngine",
    "LoadReport",
    "Match",
    "ProblemKind",
    "RuleConfig",
    "RuleInfo",
    "RuleProblem",
    "build_alert",
]
