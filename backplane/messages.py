"""The messages sensor and controller exchange inside TLS, and their framing.

Each message is a msgpack map ``{"k": <kind>, ...fields}`` prefixed by its length as a 4-byte
big-endian integer. Decoding is strict: an unknown kind, a missing or extra field, or a field
of the wrong type raises :class:`ProtocolError`; nothing else escapes the decoder. The frame
decoder refuses a length above its maximum before buffering it, so a peer cannot make us
allocate more than ``max_size`` bytes per session.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the session must close."""


# Field checkers. Each takes the decoded value and returns True if it has the right shape.
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_uint(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bytes(v: Any) -> bool:
    return isinstance(v, bytes)


def _is_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def _is_str_map(v: Any) -> bool:
    return _is_map(v) and all(isinstance(x, str) for x in v.values())


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_map_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_map(x) for x in v)


_CHECKS: dict[str, tuple[Any, str]] = {
    "int": (_is_int, "an integer"),
    "uint": (_is_uint, "a non-negative integer"),
    "str": (_is_str, "a string"),
    "bytes": (_is_bytes, "bytes"),
    "map": (_is_map, "a map with string keys"),
    "str_map": (_is_str_map, "a map of strings to strings"),
    "str_list": (_is_str_list, "a list of strings"),
    "map_list": (_is_map_list, "a list of maps with string keys"),
}

_REGISTRY: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class Message:
    """Base of every message kind; subclasses declare ``KIND`` and ``SPEC`` (field → check)."""

    KIND: ClassVar[str] = ""
    SPEC: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.KIND in _REGISTRY:
            raise TypeError(f"message kind {cls.KIND!r} registered twice")
        _REGISTRY[cls.KIND] = cls

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.KIND}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
        return out


@dataclass(frozen=True)
class Hello(Message):
    """First message from a sensor after the handshake."""

    KIND: ClassVar[str] = "hello"
    SPEC: ClassVar[dict[str, str]] = {
        "protocol": "uint",
        "sensor_version": "str",
        "hostname": "str",
        "os": "str",
        "kernel": "str",
        "tiers": "str_map",
        "capabilities": "str_list",
        "policy_version": "int",
    }
    protocol: int
    sensor_version: str
    hostname: str
    os: str
    kernel: str
    tiers: dict[str, str]
    capabilities: list[str]
    policy_version: int = -1  # the policy the sensor runs; -1 when it has none


@dataclass(frozen=True)
class Events(Message):
    KIND: ClassVar[str] = "events"
    SPEC: ClassVar[dict[str, str]] = {"seq": "uint", "events": "map_list", "dropped": "uint"}
    seq: int
    events: list[dict[str, Any]]
    dropped: int = 0  # events the outbox had to drop, reported once with this batch


@dataclass(frozen=True)
class Ack(Message):
    KIND: ClassVar[str] = "ack"
    SPEC: ClassVar[dict[str, str]] = {"seq": "uint"}
    seq: int


@dataclass(frozen=True)
class Heartbeat(Message):
    KIND: ClassVar[str] = "heartbeat"
    SPEC: ClassVar[dict[str, str]] = {
        "metrics": "map",
        "tiers": "str_map",
        "bpf": "map",
        "outbox_depth": "uint",
    }
    metrics: dict[str, Any] = field(default_factory=dict)
    tiers: dict[str, str] = field(default_factory=dict)
    bpf: dict[str, Any] = field(default_factory=dict)
    outbox_depth: int = 0


@dataclass(frozen=True)
class Command(Message):
    KIND: ClassVar[str] = "command"
    SPEC: ClassVar[dict[str, str]] = {"id": "str", "action": "str", "args": "map"}
    id: str
    action: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandResult(Message):
    KIND: ClassVar[str] = "command_result"
    SPEC: ClassVar[dict[str, str]] = {"id": "str", "status": "str", "output": "map"}
    id: str
    status: str  # "ok", "error", "refused"
    output: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy(Message):
    KIND: ClassVar[str] = "policy"
    SPEC: ClassVar[dict[str, str]] = {"version": "int", "document": "map"}
    version: int
    document: dict[str, Any]


@dataclass(frozen=True)
class PolicyAck(Message):
    KIND: ClassVar[str] = "policy_ack"
    SPEC: ClassVar[dict[str, str]] = {"version": "int"}
    version: int


@dataclass(frozen=True)
class RenewRequest(Message):
    KIND: ClassVar[str] = "renew_request"
    SPEC: ClassVar[dict[str, str]] = {"csr": "bytes"}
    csr: bytes


@dataclass(frozen=True)
class RenewResponse(Message):
    KIND: ClassVar[str] = "renew_response"
    SPEC: ClassVar[dict[str, str]] = {"certificate": "bytes"}
    certificate: bytes


@dataclass(frozen=True)
class Error(Message):
    KIND: ClassVar[str] = "error"
    SPEC: ClassVar[dict[str, str]] = {"code": "str", "message": "str"}
    code: str
    message: str


def encode(msg: Message, *, max_size: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """Length-prefixed msgpack of one message.

    Raises:
        ProtocolError: the encoded message is larger than ``max_size`` (the caller must split).
    """
    body = msgpack.packb(msg.to_wire(), use_bin_type=True)
    if len(body) > max_size:
        raise ProtocolError(
            f"{msg.KIND} message of {len(body)} bytes exceeds the {max_size}-byte limit"
        )
    return _LEN.pack(len(body)) + body


def _refuse_ext(code: int, data: bytes) -> Any:
    # Extension types (timestamps, custom objects) are not part of the protocol.
    raise ValueError(f"msgpack extension type {code}")


def decode_body(body: bytes) -> Message:
    """Decode one message body (without its length prefix), strictly."""
    try:
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"undecodable message body: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"message is a {type(obj).__name__}, not a map")
    kind = obj.get("k")
    if not isinstance(kind, str):
        raise ProtocolError("message has no kind")
    cls = _REGISTRY.get(kind)
    if cls is None or cls is Message:
        raise ProtocolError(f"unknown message kind {kind[:40]!r}")
    extra = set(obj) - set(cls.SPEC) - {"k"}
    if extra:
        raise ProtocolError(f"{kind} message has unknown fields {sorted(map(str, extra))[:5]}")
    values: dict[str, Any] = {}
    for name, check in cls.SPEC.items():
        if name not in obj:
            raise ProtocolError(f"{kind} message lacks field {name!r}")
        fn, what = _CHECKS[check]
        if not fn(obj[name]):
            raise ProtocolError(f"{kind}.{name} must be {what}, got {type(obj[name]).__name__}")
        values[name] = obj[name]
    return cls(**values)


class FrameDecoder:
    """Reassembles length-prefixed messages from a byte stream, within a size limit."""

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """Add stream bytes; return every message now complete.

        Raises:
            ProtocolError: an oversized length prefix or an invalid message. The decoder is
                then unusable, as is the session it belongs to.
        """
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buf)
            if length > self.max_size:
                raise ProtocolError(
                    f"message of {length} bytes announced, above the {self.max_size}-byte limit"
                )
            if len(self._buf) < _LEN.size + length:
                break
            body = bytes(self._buf[_LEN.size : _LEN.size + length])
            del self._buf[: _LEN.size + length]
            out.append(decode_body(body))
        return out
