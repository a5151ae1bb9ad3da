"""The controller's side of the detection worker process (``controller.detection.worker``).

``DetectionProcess.start()`` spawns ``python -m controller.detection.worker`` with pipes (not
a fork of the controller, which has threads); ``configure`` hands it a rule set,
``evaluate`` one round of stored events, ``close`` ends it. A worker that dies, answers
garbage or answers out of turn raises ``WorkerFailed`` (and is killed if still running):
whatever it was asked is then unanswered, and the caller decides what to evaluate again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.detection.engine import RuleConfig
from controller.detection.worker import HEADER, ProtocolError, frame_length, pack, unpack

log = logging.getLogger(__name__)

# The folder holding the ``controller`` package: the worker imports this very code.
_ROOT = str(Path(__file__).resolve().parents[2])
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20  # a round is megabytes: fewer wake-ups than with the 64 KiB default


class WorkerFailed(Exception):
    """The worker died or broke the protocol; the request in flight has no answer."""


@dataclass(frozen=True, slots=True)
class AlertHit:
    """One rule firing in the worker (see the worker's module docstring)."""

    rule_id: str
    title: str
    level: str
    host_id: str
    event_id: int | None
    doc: str
    chain: str  # JSON list of process nodes
    pending: str | None
    seen: tuple[str, ...]
    stub: str | None  # JSON object or None


@dataclass(frozen=True, slots=True)
class Result:
    alerts: list[AlertHit]
    errors: int
    evaluations: int


def default_argv() -> list[str]:
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return [
        sys.executable,
        "-m",
        "controller.detection.worker",
        "--log-level",
        str(level),
        "--parent",
        str(os.getpid()),
    ]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _alert(raw: Any) -> AlertHit:
    if not isinstance(raw, list) or len(raw) != 10:
        raise ProtocolError("an alert is a list of 10 items")
    rule_id, title, level, host_id, event_id, doc, chain, pending, seen, stub = raw
    if not all(isinstance(v, str) for v in (rule_id, title, level, host_id, doc, chain)):
        raise ProtocolError("alert fields of the wrong type")
    if (
        not (event_id is None or isinstance(event_id, int))
        or not isinstance(seen, list)
        or not (pending is None or isinstance(pending, str))
        or not (stub is None or isinstance(stub, str))
    ):
        raise ProtocolError("alert fields of the wrong type")
    return AlertHit(
        rule_id,
        title,
        level,
        host_id,
        event_id,
        doc,
        chain,
        pending,
        tuple(str(s) for s in seen),
        stub,
    )


class DetectionProcess:
    """One running worker. Requests go one at a time (each waits for its answer)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._lock = asyncio.Lock()
        self.generation = -1  # of the rule set it has loaded (none yet)
        self.rules_loaded = 0
        self.broken: str | None = None  # why it stopped being usable

    @classmethod
    async def start(cls, argv: Sequence[str] | None = None) -> DetectionProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            *(argv or default_argv()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C is the controller's to handle
        )
        worker = cls(proc)
        pipe = worker._stdin.transport.get_extra_info("pipe")
        if pipe is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)
        log.info("detection worker started (pid %d)", proc.pid)
        return worker

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def alive(self) -> bool:
        return self.broken is None and self._proc.returncode is None

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    async def close(self, timeout: float = 10.0) -> int | None:
        """End of input tells the worker to exit; killed if it has not within ``timeout``."""
        self.broken = self.broken or "closed"
        with contextlib.suppress(OSError, RuntimeError):
            self._stdin.close()
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            log.error(
                "detection worker %d did not exit within %.0f s; killing it", self.pid, timeout
            )
            self.kill()
            return await self._proc.wait()

    async def configure(self, config: RuleConfig) -> None:
        """Load ``config``'s rule set in the worker (waits until it is loaded)."""
        msg = [
            "rules",
            config.generation,
            list(config.dirs),
            config.include_builtin,
            sorted(config.disabled),
        ]
        reply = await self._request(msg, "rules")
        if len(reply) != 4 or reply[1] != config.generation or not isinstance(reply[2], int):
            raise self._fail(f"bad answer to a rule set: {reply[:4]!r}")
        self.generation = config.generation
        self.rules_loaded = reply[2]

    async def evaluate(self, rnd: int, units: list[tuple[str, int, Sequence[str]]]) -> Result:
        """Match one round: ``units`` are (host, id of the first event or 0, JSON docs)."""
        reply = await self._request(["eval", rnd, units], "done")
        try:
            if len(reply) != 5 or reply[1] != rnd:
                raise ProtocolError(f"answer for round {reply[1:2]!r}, expected {rnd}")
            _, _, raw, errors, evaluations = reply
            if (
                not isinstance(raw, list)
                or not isinstance(errors, int)
                or not isinstance(evaluations, int)
            ):
                raise ProtocolError("malformed result")
            return Result([_alert(a) for a in raw], errors, evaluations)
        except ProtocolError as e:
            raise self._fail(str(e)) from None

    async def _request(self, msg: list[Any], answer: str) -> list[Any]:
        async with self._lock:
            if not self.alive:
                raise WorkerFailed(
                    f"detection worker {self.pid} is not usable: "
                    f"{self.broken or describe_exit(self.returncode)}"
                )
            try:
                self._stdin.write(pack(msg))
                await self._stdin.drain()
                n = frame_length(await self._stdout.readexactly(HEADER.size))
                reply = unpack(await self._stdout.readexactly(n))
            except (OSError, asyncio.IncompleteReadError, RuntimeError) as e:
                raise await self._died(e) from None
            except ProtocolError as e:
                raise self._fail(str(e)) from None
            if reply[0] != answer:
                what = reply[1] if reply[0] == "error" and len(reply) > 1 else reply[0]
                raise self._fail(f"answered {what!r} to {msg[0]!r}")
            return reply

    async def _died(self, exc: BaseException) -> WorkerFailed:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), 2.0)
        if self._proc.returncode is None:  # pipe trouble but still running: do not trust it
            return self._fail(f"pipe failed: {exc!r}")
        self.broken = describe_exit(self._proc.returncode)
        return WorkerFailed(f"detection worker {self.pid} died ({self.broken})")

    def _fail(self, why: str) -> WorkerFailed:
        self.broken = why
        self.kill()
        return WorkerFailed(f"detection worker {self.pid}: {why}")
