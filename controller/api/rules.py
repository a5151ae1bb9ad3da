"""Detection rules: list with load problems, enable/disable, reload, upload a Sigma rule.

``GET  /api/v1/rules``                     loaded rules (with ``enabled``) and the problems of
                                           the last load (files or rules that did not load)
``POST /api/v1/rules/<rule_id>/enable``    admin
``POST /api/v1/rules/<rule_id>/disable``   admin
``POST /api/v1/rules/reload``              admin: read the rule directories again
``POST /api/v1/rules``                     admin: upload one Sigma YAML file, either as the raw
                                           body (``Content-Type: application/yaml``) or JSON
                                           ``{yaml, filename?, overwrite?}``

An upload is loaded on its own first (a fresh engine over just that file): any problem, or no
rule at all, is a 400 listing each problem, and nothing is written. A rule id already loaded
from another file is a 409. Accepted files go to the first configured rule directory under a
safe name (``[A-Za-z0-9_-]``, ``.yml``), written atomically, then the engine reloads.

The last load report lives on ``app.ctx.rules_report`` (set it from ``engine.load(...)`` at
start-up); without one, the listing loads the configured directories into a scratch engine
once to find the problems.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from typing import Any, cast

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, json

from backplane.files import write_atomic
from controller.api import inputs
from controller.auth import audit, require
from controller.detection import DetectionEngine, LoadReport, RuleInfo, RuleProblem
from controller.errors import ApiError

MAX_RULE_BYTES = 256 * 1024  # Sigma rules are a few KiB
_FILENAME = re.compile(r"[A-Za-z0-9_-]{1,100}(\.ya?ml)?")
_UNSAFE = re.compile(r"[^a-z0-9]+")
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def rule_json(info: RuleInfo) -> dict[str, Any]:
    doc: dict[str, Any] = inputs.to_json(info)
    return doc


def problem_json(problem: RuleProblem) -> dict[str, Any]:
    return {
        "path": problem.path,
        "rule": problem.rule,
        "kind": problem.kind.value,
        "reason": problem.reason,
        "message": str(problem),
    }


def report_json(report: LoadReport) -> dict[str, Any]:
    return {
        "files": report.files,
        "loaded": len(report.loaded),
        "problems": [problem_json(p) for p in report.problems],
        "summary": report.summary(),
    }


def engine_of(app: Sanic) -> DetectionEngine:
    engine = getattr(app.ctx, "detection", None)
    if engine is None:
        raise ApiError(503, "detection is not running")
    return cast(DetectionEngine, engine)


def rule_dirs(app: Sanic) -> list[Path]:
    """The configured rule directories: the controller config's, else what the engine loaded."""
    config = getattr(app.ctx, "config", None)
    configured: Any = getattr(config, "rule_dirs", None)
    if configured is None:
        # The engine keeps the directories it was loaded with; there is no public accessor.
        configured = getattr(engine_of(app), "_dirs", ())
    return [Path(d) for d in configured]


def _scratch_report(engine: DetectionEngine, dirs: list[Path]) -> LoadReport:
    scratch = DetectionEngine(include_builtin=engine.include_builtin)
    return scratch.load(dirs)


async def last_report(app: Sanic) -> LoadReport:
    report = getattr(app.ctx, "rules_report", None)
    if report is None:
        report = await asyncio.to_thread(_scratch_report, engine_of(app), rule_dirs(app))
        app.ctx.rules_report = report
    return cast(LoadReport, report)


def safe_filename(requested: str | None, title: str) -> str:
    """``requested`` if it is a safe name (``.yml`` added), else one made from ``title``."""
    if requested is not None:
        if not _FILENAME.fullmatch(requested):
            raise ApiError(
                400,
                "filename must be 1 to 100 characters of A-Z, a-z, 0-9, '_' and '-', "
                "optionally ending in .yml or .yaml",
            )
        return requested if requested.endswith((".yml", ".yaml")) else requested + ".yml"
    stem = _UNSAFE.sub("_", title.lower()).strip("_")[:100] or "rule"
    return f"{stem}.yml"


def _check_upload(text: str) -> LoadReport:
    """Load ``text`` alone in a scratch engine: its report says whether it is a good rule."""
    with tempfile.TemporaryDirectory(prefix="edr-rule-") as tmp:
        path = Path(tmp) / "upload.yml"
        path.write_text(text, encoding="utf-8")
        return DetectionEngine(include_builtin=False).load([path])


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"), 0o644)


def create_blueprint() -> Blueprint:
    bp = Blueprint("api_rules", url_prefix="/api/v1")
    lock = asyncio.Lock()  # uploads and reloads one at a time (file names, report)

    @bp.get("/rules")
    @require("viewer")
    async def list_rules(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        engine = engine_of(request.app)
        report = await last_report(request.app)
        rules = sorted(engine.rules, key=lambda r: (r.title.lower(), r.id))
        return json(
            {
                "rules": [rule_json(r) for r in rules],
                "problems": [problem_json(p) for p in report.problems],
                "summary": report.summary(),
            }
        )

    async def set_enabled(request: Request, rule_id: str, enabled: bool) -> HTTPResponse:
        inputs.check_query(request, ())
        engine = engine_of(request.app)
        try:
            await asyncio.to_thread(engine.enable if enabled else engine.disable, rule_id)
        except KeyError:
            raise ApiError(404, f"rule {rule_id} not found") from None
        await audit(request, "rule.enable" if enabled else "rule.disable", f"rule:{rule_id}")
        info = next(r for r in engine.rules if r.id == rule_id)
        return json(rule_json(info))

    @bp.post("/rules/<rule_id:str>/enable")
    @require("admin")
    async def enable(request: Request, rule_id: str) -> HTTPResponse:
        return await set_enabled(request, rule_id, True)

    @bp.post("/rules/<rule_id:str>/disable")
    @require("admin")
    async def disable(request: Request, rule_id: str) -> HTTPResponse:
        return await set_enabled(request, rule_id, False)

    @bp.post("/rules/reload")
    @require("admin")
    async def reload(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        engine = engine_of(request.app)
        async with lock:
            report = await asyncio.to_thread(engine.reload)
            request.app.ctx.rules_report = report
        await audit(request, "rule.reload", "rules", {"summary": report.summary()})
        return json(report_json(report))

    @bp.post("/rules")
    @require("admin")
    async def upload(request: Request) -> HTTPResponse:
        inputs.check_query(request, ())
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        filename: str | None = None
        overwrite = False
        if content_type in YAML_TYPES:
            raw = inputs.raw_body(request, max_bytes=MAX_RULE_BYTES)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "the rule is not UTF-8 text") from None
        else:
            body = inputs.json_object(request, max_bytes=MAX_RULE_BYTES * 2)
            inputs.check_fields(body, ("yaml", "filename", "overwrite"), ("yaml",))
            text = inputs.text_field(body, "yaml", max_len=MAX_RULE_BYTES) or ""
            name = body.get("filename")
            if name is not None and not isinstance(name, str):
                raise ApiError(400, "filename must be a string")
            filename = name
            overwrite = body.get("overwrite", False)
            if not isinstance(overwrite, bool):
                raise ApiError(400, "overwrite must be true or false")
        if not text.strip():
            raise ApiError(400, "the rule is empty")
        if "\x00" in text:
            raise ApiError(400, "the rule must not contain NUL")
        check = await asyncio.to_thread(_check_upload, text)
        if check.problems or not check.loaded:
            problems = [
                {**problem_json(p), "path": "upload", "message": str(p).replace(p.path, "upload")}
                for p in check.problems
            ]
            reason = "; ".join(p["message"] for p in problems) or "the file holds no rule"
            raise ApiError(400, f"rule did not load: {reason}", problems=problems)
        engine = engine_of(request.app)
        dirs = [d for d in rule_dirs(request.app) if d.is_dir() or not d.exists()]
        if not dirs:
            raise ApiError(409, "no rule directory is configured to store uploaded rules in")
        target_dir = dirs[0]
        name = safe_filename(filename, check.loaded[0].title)
        async with lock:
            await asyncio.to_thread(target_dir.mkdir, parents=True, exist_ok=True)
            target = target_dir / name
            if target.exists() and not overwrite:
                raise ApiError(
                    409, f"{name} already exists in the rule directory; set overwrite to replace it"
                )
            here = target.resolve()
            for info in check.loaded:
                clash = next((r for r in engine.rules if r.id == info.id), None)
                if clash is not None and Path(clash.path).resolve() != here:
                    raise ApiError(
                        409, f"rule id {info.id} is already loaded from {Path(clash.path).name}"
                    )
            existed = target.exists()
            await asyncio.to_thread(_write_atomic, target, text)
            report = await asyncio.to_thread(engine.reload)
            request.app.ctx.rules_report = report
        await audit(
            request, "rule.upload", f"rule-file:{name}",
            {"rules": [i.id for i in check.loaded], "replaced": existed},
        )  # fmt: skip
        loaded_ids = {i.id for i in check.loaded}
        return json(
            {
                "filename": name,
                "rules": [rule_json(r) for r in engine.rules if r.id in loaded_ids],
                "report": report_json(report),
            },
            status=201,
        )

    return bp
