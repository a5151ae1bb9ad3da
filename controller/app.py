"""The controller's Sanic application factory.

``create_app(config)`` builds the app and mounts one blueprint per area; the resources live
on ``app.ctx`` and are created in ``before_server_start``:

* ``config`` (``ControllerConfig``), ``pki`` (``PKIStore`` in ``<state>/pki``, created with
  its CA and server certificate on first start), ``store`` (``SQLiteStore``),
  ``detection`` (``DetectionEngine`` with the configured rule directories), ``live``
  (``LiveHub``), ``metrics``, ``hooks`` (``StoreHooks``), ``backplane``
  (``BackplaneServer``) and ``maintenance``.

The backplane server runs as tasks **on Sanic's own event loop**, which is why the controller
runs Sanic as a single process (``single_process=True``): the sensors' sessions, the store
hooks, the live hub and the websocket handlers then share one loop, and the hub can hand an
event to a websocket without any cross-process hop. Store calls block and always go through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import orjson
from sanic import Blueprint, Request, Sanic, Websocket
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from backplane.server import BackplaneServer, ServerConfig
from backplane.systemd import notify
from certs.store import PKIStore
from controller import auth, enroll_api, metrics
from controller.config import ControllerConfig
from controller.detection import DetectionEngine
from controller.errors import install_error_handlers
from controller.hooks import StoreHooks
from controller.live import FilterError, LiveHub, StreamFilter
from controller.maintenance import Intervals, Maintenance
from controller.metrics import Metrics
from controller.store import SQLiteStore

log = logging.getLogger(__name__)

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
_names = itertools.count(1)


def _optional(module: str) -> ModuleType | None:
    """Import a module another engineer owns, or None while it does not exist yet."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            return None
        raise  # the module exists but one of ITS imports is missing: a real error


def ensure_pki(config: ControllerConfig, pki: PKIStore | None = None) -> PKIStore:
    """The PKI in ``<state>/pki``, created (CA, server certificate, CRL) if missing."""
    pki = pki or PKIStore(config.pki_dir)
    if not pki.initialized:
        log.warning(
            "no PKI in %s: creating a CA and a server certificate for %s",
            config.pki_dir,
            ", ".join(config.server_names),
        )
        pki.init(list(config.server_names))
    return pki


def _make_state_dir(path: Path) -> None:
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    os.chmod(path, 0o700)  # holds the event store and the CA key


def create_app(config: ControllerConfig, *, intervals: Intervals | None = None) -> Sanic:
    """Build the controller app for ``config`` (resources start with the server)."""
    app = Sanic(f"edr_controller_{next(_names)}")
    app.config.REQUEST_MAX_SIZE = config.max_body
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.WEBSOCKET_MAX_SIZE = 64 * 1024  # clients send nothing but pings
    app.ctx.config = config
    # A PKIStore object is only paths; the files are created in before_server_start. The
    # enrollment blueprint needs the object now.
    app.ctx.pki = PKIStore(config.pki_dir)
    app.ctx.metrics = Metrics()
    app.ctx.live = LiveHub(queue_size=config.live_queue)

    install_error_handlers(app, max_body=config.max_body)  # every error as JSON

    app.blueprint(enroll_api.create_blueprint(app.ctx.pki))
    app.blueprint(metrics.create_blueprint())
    app.blueprint(_stream_blueprint())
    for bp in _area_blueprints():
        app.blueprint(bp)
    if (WEBUI_DIR / "index.html").is_file():
        app.static("/", WEBUI_DIR, index="index.html", name="webui")

    @app.before_server_start
    async def startup(app: Sanic, _loop: Any = None) -> None:
        await _start(app, config, intervals)

    @app.after_server_start
    async def ready(app: Sanic, _loop: Any = None) -> None:
        notify("READY=1", "STATUS=serving")  # Type=notify: up only once it listens

    @app.before_server_stop
    async def stopping(app: Sanic, _loop: Any = None) -> None:
        notify("STOPPING=1")

    @app.after_server_stop
    async def shutdown(app: Sanic, _loop: Any = None) -> None:
        await _stop(app)

    return app


def _area_blueprints() -> list[Blueprint]:
    """AUTH's, OPENAPI's and every API blueprint that exists (see the shared contract)."""
    out: list[Blueprint] = [auth.create_blueprint()]
    for name in ("controller.openapi",):
        mod = _optional(name)
        if mod is not None and hasattr(mod, "create_blueprint"):
            out.append(mod.create_blueprint())
    api = _optional("controller.api")
    for entry in getattr(api, "BLUEPRINTS", []) if api else []:
        if isinstance(entry, str):
            entry = importlib.import_module(f"controller.api.{entry}")
        if isinstance(entry, Blueprint):
            out.append(entry)
        elif isinstance(entry, ModuleType):
            out.append(entry.create_blueprint())
        elif callable(entry):
            out.append(entry())
        else:
            raise TypeError(f"controller.api.BLUEPRINTS: cannot mount {entry!r}")
    return out


async def _start(app: Sanic, config: ControllerConfig, intervals: Intervals | None) -> None:
    ctx = app.ctx
    await asyncio.to_thread(_make_state_dir, config.state_dir)
    await asyncio.to_thread(ensure_pki, config, ctx.pki)
    ctx.store = await asyncio.to_thread(SQLiteStore, config.db_path)
    ctx.detection = DetectionEngine()
    report = await asyncio.to_thread(ctx.detection.load, list(config.rule_dirs))
    ctx.rules_report = report  # the engine logged the summary and each problem
    ctx.hooks = StoreHooks(
        ctx.store,
        ctx.detection,
        ctx.live,
        pki=ctx.pki,
        metrics=ctx.metrics,
        detection_queue=config.detection_queue,
    )
    await ctx.hooks.start()
    pki: PKIStore = ctx.pki
    ctx.backplane = BackplaneServer(
        ServerConfig(
            config.backplane, pki.ca_path, pki.server_cert_path, pki.server_key_path, pki.crl_path
        ),
        ctx.hooks,
    )
    ctx.backplane_endpoint = await ctx.backplane.start()
    ctx.maintenance = Maintenance(
        ctx.store,
        live=ctx.live,
        pki=pki,
        backplane=ctx.backplane,
        retention_max_age=config.retention_max_age,
        retention_max_bytes=config.retention_max_bytes,
        intervals=intervals,
    )
    ctx.maintenance.start()
    if not await asyncio.to_thread(ctx.store.list_users):
        log.warning(
            "no users yet: create one with "
            "'edr-controller user add NAME --role admin --state-dir %s'",
            config.state_dir,
        )


async def _stop(app: Sanic) -> None:
    ctx = app.ctx
    # Order matters: no new batches, then detection drains, then the jobs, then the store.
    if getattr(ctx, "backplane", None) is not None:
        await ctx.backplane.stop()
    if getattr(ctx, "hooks", None) is not None:
        await ctx.hooks.stop()
    if getattr(ctx, "maintenance", None) is not None:
        await ctx.maintenance.stop()
    if getattr(ctx, "store", None) is not None:
        await asyncio.to_thread(ctx.store.close)


# -- the live stream ------------------------------------------------------------------------


async def authenticate_stream(request: Request) -> HTTPResponse | None:
    """Authenticate a stream request before the websocket upgrade; a response refuses it.

    Any role may watch (viewer and up): a session cookie or a Bearer API token, checked by
    ``controller.auth``. Failures are JSON 401/403 answers instead of an upgrade.
    """
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.host:
        # Browsers send cookies with cross-site websocket upgrades (no CORS check applies).
        return json_response({"error": "cross-origin stream request refused"}, status=403)
    principal = await auth.authenticate(request)  # raises ApiError 401 on bad credentials
    if principal is None:
        return json_response({"error": "authentication required"}, status=401)
    if auth.ROLE_RANK[principal.role] < auth.ROLE_RANK["viewer"]:  # pragma: no cover
        return json_response({"error": "this needs the viewer role"}, status=403)
    request.ctx.user = principal
    return None


def _stream_blueprint() -> Blueprint:
    bp = Blueprint("live_stream", url_prefix="/api/v1")

    @bp.on_request
    async def guard(request: Request) -> HTTPResponse | None:
        return await authenticate_stream(request)

    @bp.websocket("/stream")
    async def stream(request: Request, ws: Websocket) -> None:
        """Events, alerts, host and command changes as JSON text messages
        ``{"kind", "data"[, "missed"]}``, filtered by ``host``, ``kind``, ``severity``,
        ``text`` query parameters (comma-separated lists)."""
        args = request.args
        try:
            flt = StreamFilter.parse(
                args.get("host"), args.get("kind"), args.get("severity"), args.get("text")
            )
        except FilterError as e:
            await ws.send(orjson.dumps({"kind": "error", "error": str(e)}).decode())
            await ws.close(1008, "bad filter")
            return
        live: LiveHub = request.app.ctx.live
        try:
            sub = live.subscribe(flt)
        except OverflowError as e:
            await ws.send(orjson.dumps({"kind": "error", "error": str(e)}).decode())
            await ws.close(1013, "try again later")
            return
        with sub:
            await ws.send(
                orjson.dumps(
                    {
                        "kind": "hello",
                        "filter": {
                            "host": sorted(flt.hosts or ()),
                            "kind": sorted(flt.kinds or ()),
                            "severity": args.get("severity"),
                            "text": flt.text,
                        },
                    }
                ).decode()
            )
            while True:
                msg = await sub.next()
                await ws.send(orjson.dumps(msg, default=str).decode())

    return bp
