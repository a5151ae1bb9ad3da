"""``edr-sensor``: run the sensor, probe what this host supports, dump the BPF source.

Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or configuration, 3 a forced capture
tier cannot run here.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from backplane.schema import Family, Tier
from backplane.systemd import notify
from sensor import __version__
from sensor.capture import CaptureContext, Source
from sensor.config import MODES, ConfigError, SensorConfig, load
from sensor.hashing import ExecutableHasher
from sensor.host import host_fields
from sensor.pipeline import EventPipeline, NdjsonSink, Sink, TeeSink
from sensor.process_table import ProcessTable
from sensor.runner import TIER_ORDER, CaptureRunner, ModeUnavailable, availability
from sensor.uplink import Uplink, UplinkError

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG, EXIT_TIER = 0, 1, 2, 3

log = logging.getLogger("edr.sensor")


def _families(text: str) -> frozenset[Family]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {f.value for f in Family}
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown family {', '.join(bad) or '(none)'}: choose from {', '.join(sorted(known))}"
        )
    return frozenset(Family(n) for n in names)


def _add_capture_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument(
        "--mode", choices=MODES, help="force a capture tier for every family (default: auto)"
    )
    p.add_argument("--families", type=_families, help="comma-separated: process,file,network")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edr-sensor", description="EDR sensor for Linux hosts")
    parser.add_argument("--version", action="version", version=f"edr-sensor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="capture events and stream them")
    _add_capture_args(run)
    run.add_argument(
        "--output",
        help="NDJSON destination: '-' for stdout or a file path (default: stdout, unless "
        "--controller is given)",
    )
    run.add_argument(
        "--controller",
        metavar="HOST[:PORT]",
        help="stream events to this controller's backplane (mutual TLS; enroll first)",
    )
    run.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/edr/sensor)")
    run.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="PATH",
        help="a path the fallback tier watches with inotify (repeatable)",
    )
    run.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PREFIX",
        help="a path prefix never reported (repeatable)",
    )
    run.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PREFIX",
        help="report only paths under these prefixes (repeatable)",
    )
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument(
        "--stats-interval",
        type=float,
        default=0.0,
        help="print counters to stderr every N seconds (0: only at exit)",
    )
    run.add_argument("--stats-file", type=Path, help="write final counters as JSON here on exit")

    probe = sub.add_parser(
        "probe", help="which capture tiers can run here, per family, and why not"
    )
    probe.add_argument("--json", action="store_true", help="machine-readable output")

    dump = sub.add_parser("dump-bpf", help="print the exact BPF C source and compiler flags")
    _add_capture_args(dump)

    unisolate = sub.add_parser(
        "unisolate",
        help="remove every network block and the isolation this sensor applied",
    )
    unisolate.add_argument(
        "--local", action="store_true", required=True,
        help="act here at the console, without the controller",
    )  # fmt: skip
    unisolate.add_argument(
        "--state-dir", type=Path, help="state directory (default /var/lib/edr/sensor)"
    )
    unisolate.add_argument("--config", type=Path, help="TOML configuration file")

    try:
        from sensor import enroll
    except ImportError:
        pass
    else:
        enroll_parser = sub.add_parser("enroll", help="enroll this host with a controller")
        enroll.add_arguments(enroll_parser)
        enroll_parser.set_defaults(handler=enroll.main)
    return parser


def _config_from_args(args: argparse.Namespace) -> SensorConfig:
    config = load(args.config)
    if args.mode:
        config.set_mode(args.mode)
    if args.families:
        config.families = args.families
    filters = config.filters
    for attr, flag in (
        ("watch_paths", "watch"),
        ("exclude_prefixes", "exclude"),
        ("include_prefixes", "include"),
    ):
        values = getattr(args, flag, [])
        for value in values:
            if not value.startswith("/"):
                raise ConfigError(f"--{flag} {value!r}: expected an absolute path")
        if values:
            merged = values if attr != "exclude_prefixes" else [*getattr(filters, attr), *values]
            setattr(filters, attr, tuple(merged))
    if getattr(args, "state_dir", None):
        config.state_dir = args.state_dir
    return config


def cmd_probe(args: argparse.Namespace) -> int:
    report = availability(Family)
    if args.json:
        print(
            json.dumps(
                {f.value: {t.value: r for t, r in tiers.items()} for f, tiers in report.items()},
                indent=2,
            )
        )
        return EXIT_OK
    for fam, tiers in report.items():
        chosen = next((t for t in TIER_ORDER if tiers[t] is None), None)
        print(f"{fam.value}: {'uses ' + chosen.value if chosen else 'NO TIER AVAILABLE'}")
        for tier in TIER_ORDER:
            reason = tiers[tier]
            print(
                f"  {tier.value:<10} {'available' if reason is None else 'unavailable: ' + reason}"
            )
    return EXIT_OK


def cmd_dump_bpf(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    mode = args.mode or "tracepoint"
    if mode not in (Tier.KPROBE, Tier.TRACEPOINT):
        raise ConfigError(f"--mode {mode}: only the kprobe and tracepoint tiers have BPF programs")
    from sensor.ebpf import bpf_source_text

    text, cflags = bpf_source_text(config.families, Tier(mode))
    print(f"// cflags: {' '.join(cflags)}")
    print(text)
    return EXIT_OK


# The capture path makes a few dozen short-lived containers per event and no reference cycles.
# With the collector's default young-generation threshold (700 allocations) its passes cost
# about 2 us per spawn of an exec storm (the sensor's per-thread CPU around a two-worker
# storm, bench/README.md: 15.6/16.4 -> 13.7/14.4 us/spawn); cycles, where there are any, are
# still collected, less often.
GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Fewer collector passes while capturing; start-up objects (BCC, the seeded table) frozen."""
    gc.collect()
    gc.freeze()  # out of every later pass: they live as long as the sensor
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _open_output(target: str) -> NdjsonSink:
    if target == "-":
        return NdjsonSink(sys.stdout)
    try:
        stream = open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed by the sink
    except OSError as exc:
        raise ConfigError(f"--output {target}: cannot open: {exc.strerror}") from None
    return NdjsonSink(stream, close_stream=True)


def cmd_run(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    controller = args.controller or config.controller  # flag, else TOML / EDR_SENSOR_CONTROLLER
    host = host_fields(config.state_dir)
    selection_box: dict[Family, Tier] = {}
    runner_box: list[CaptureRunner] = []
    uplink: Uplink | None = None
    sinks: list[Sink] = []
    table = ProcessTable(host["id"])
    responder, enforcer = _response(config.state_dir, host, table, controller)
    if controller:
        try:
            uplink = Uplink(
                config.state_dir,
                controller,
                host,
                tiers=lambda: {f.value: t.value for f, t in selection_box.items()},
                counters=lambda: runner_box[0].counters() if runner_box else {},
                responder=responder.handle if responder else None,
                on_policy_applied=enforcer.set_policy if enforcer else None,
            )
            if enforcer is not None:
                enforcer.set_policy(uplink.policy_version, uplink.policy)
        except UplinkError as exc:
            raise ConfigError(str(exc)) from None
        sinks.append(uplink.sink())
    if args.output or uplink is None:
        sinks.append(_open_output(args.output or "-"))
    sink = sinks[0] if len(sinks) == 1 else TeeSink(sinks)
    seeded = table.seed_from_proc()
    pipeline = EventPipeline(
        sink, table, hasher=ExecutableHasher(config.hash_max_bytes), maxsize=config.queue_size,
        inspector=enforcer,
    )  # fmt: skip
    ctx = CaptureContext(
        host=host,
        table=table,
        emit=pipeline.emit,
        filters=config.filters,
        ignored_pids={os.getpid()},
        poll_interval=config.poll_interval,
        lines=pipeline.takes_lines,
    )
    stop = threading.Event()
    failure: list[str] = []

    def source_exited(src: Source, error: BaseException | None) -> None:
        failure.append(f"capture source {src.name} stopped: {error or 'returned early'}")
        stop.set()

    runner = CaptureRunner(ctx, config.modes, config.families, on_source_exit=source_exited)
    runner_box.append(runner)
    try:
        selection = runner.open()
    except ModeUnavailable as exc:
        runner.stop()
        sink.close()
        if uplink is not None:
            uplink.stop()
        print(f"edr-sensor: {exc}", file=sys.stderr)
        return EXIT_TIER
    selection_box.update(selection.tiers)
    for fam, passed in selection.passed_over.items():
        for tier, reason in passed.items():
            log.warning("%s: %s tier not used: %s", fam.value, tier.value, reason)
    log.info(
        "capturing %s (seeded %d processes)",
        ", ".join(f"{f.value}={t.value}" for f, t in sorted(selection.tiers.items())),
        seeded,
    )
    notify("READY=1", "STATUS=capturing")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()
    _tune_gc()
    pipeline.start()
    runner.start()
    if responder is not None:
        responder.start()  # re-applies saved blocks and isolation
    if uplink is not None:
        uplink.start()
    deadline = started + args.duration if args.duration else None
    next_stats = started + args.stats_interval if args.stats_interval else None
    try:
        while not stop.wait(0.2):
            now = time.monotonic()
            if pipeline.failed:
                failure.append(pipeline.failed)
                break
            if deadline is not None and now >= deadline:
                break
            if uplink is not None:
                uplink.tick()
            if next_stats is not None and now >= next_stats:
                next_stats = now + args.stats_interval
                _print_stats(_stats(selection.tiers, runner, pipeline, started))
    finally:
        notify("STOPPING=1")
        runner.stop()
        pipeline.close()
        if responder is not None:
            responder.stop()
        uplink_counters = uplink.counters() if uplink is not None else None
        if uplink is not None:
            uplink.stop()
    stats = _stats(selection.tiers, runner, pipeline, started)
    if uplink_counters is not None:
        stats["uplink"] = uplink_counters
    _print_stats(stats)
    if args.stats_file:
        args.stats_file.write_text(json.dumps(stats, indent=2) + "\n")
    if failure:
        print(f"edr-sensor: {failure[0]}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _response(
    state_dir: Path, host: dict[str, Any], table: ProcessTable, controller: str | None
) -> tuple[Any, Any]:
    """The Responder and the policy Enforcer; (None, None) where they cannot work (not root)."""
    from sensor.enforce import Enforcer
    from sensor.response import Responder
    from sensor.response.netfilter import resolve
    from sensor.uplink import parse_controller

    if os.geteuid() != 0:
        log.warning("not root: response actions and policy enforcement are off")
        return None, None
    name = ""
    if controller:
        try:
            name = parse_controller(controller)[1]
        except UplinkError:
            name = ""  # reported by the uplink itself
    addresses = resolve(name) if name else []
    try:
        responder = Responder(state_dir, table.entity_id, controller=addresses)
    except OSError as exc:
        log.warning("response actions are off: %s", exc)
        return None, None
    policy: tuple[int, dict[str, Any]] = (-1, {})
    try:
        saved = json.loads((state_dir / "policy.json").read_text())
        policy = (int(saved["version"]), dict(saved["document"]))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable policy: %s", exc)
    return responder, Enforcer(responder, host, policy)


def cmd_unisolate(args: argparse.Namespace) -> int:
    """Delete the sensor's nftables table and forget its blocks and isolation, in one step."""
    from sensor.response import ActionFailed, Firewall

    config = load(args.config)
    state_dir = args.state_dir or config.state_dir
    try:
        out = Firewall(state_dir / "network.json").remove_all()
    except ActionFailed as exc:
        print(f"edr-sensor: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(
        f"edr-sensor: removed {len(out['removed_blocks'])} block(s)"
        f"{' and the isolation' if out['was_isolated'] else ''}; the table inet edr is gone"
    )
    return EXIT_OK


def _stats(
    tiers: dict[Family, Tier], runner: CaptureRunner, pipeline: EventPipeline, started: float
) -> dict[str, Any]:
    usage = os.times()
    return {
        "tiers": {f.value: t.value for f, t in sorted(tiers.items())},
        "sources": runner.counters(),
        "dropped": runner.dropped(),
        **pipeline.counters(),
        "cpu_seconds": round(usage.user + usage.system, 3),
        "uptime_seconds": round(time.monotonic() - started, 3),
    }


def _print_stats(stats: dict[str, Any]) -> None:
    print(
        f"edr-sensor stats: {json.dumps(stats, separators=(',', ':'))}", file=sys.stderr, flush=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="edr-sensor: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    handlers = {
        "run": cmd_run, "probe": cmd_probe, "dump-bpf": cmd_dump_bpf, "unisolate": cmd_unisolate,
    }  # fmt: skip
    handler = getattr(args, "handler", None) or handlers[args.command]
    try:
        return int(handler(args))
    except ConfigError as exc:
        print(f"edr-sensor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
