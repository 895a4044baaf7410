"""The gpuroute wire protocol, shared by the operator (ROUTER) and workers (DEALER).

Every message is a multipart ZeroMQ message of two or three frames:

    [kind][header][payload?]

`kind` is one of the Kind bytes below, `header` is a msgpack map, `payload` carries
raw bytes (an inline input image) and is present only where a kind allows it. The
ROUTER side additionally sees the peer's routing id as the first frame.

The conversation follows the ZeroMQ guide's Paranoid Pirate / Majordomo patterns:
the worker sends READY, both sides send HEARTBEAT every HEARTBEAT_INTERVAL_S, each
side treats the other as gone after HEARTBEAT_LIVENESS silent intervals, and a worker
that loses the operator re-creates its socket with exponential backoff. A message
that does not parse raises ProtocolError, which the caller counts and drops.

This module imports neither kopf nor torch.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

HEARTBEAT_INTERVAL_S = 1.0
"""Seconds between heartbeats, both directions."""
HEARTBEAT_LIVENESS = 3
"""Silent heartbeat intervals after which a peer is considered gone."""
RECONNECT_INITIAL_S = 0.25
"""First reconnect delay of a worker that lost the operator."""
RECONNECT_MAX_S = 8.0
"""Ceiling of the worker's exponential reconnect backoff."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""ZMQ_MAXMSGSIZE on every socket: larger frames drop the connection."""
MAX_HEADER_BYTES = 1024 * 1024
"""A header larger than this is malformed: headers are small metadata maps."""


CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
"""Output formats a JOB may ask for, with the Content-Type the upload carries."""


class Kind(bytes, enum.Enum):
    READY = b"READY"
    HEARTBEAT = b"HEARTBEAT"
    JOB = b"JOB"
    ACCEPTED = b"ACCEPTED"
    PROGRESS = b"PROGRESS"
    RESULT = b"RESULT"
    ERROR = b"ERROR"
    CANCEL = b"CANCEL"
    DISCONNECT = b"DISCONNECT"


_PAYLOAD_KINDS = frozenset({Kind.JOB})


class ErrorCode(str, enum.Enum):
    """Why a job failed on a worker; only invalid_input is permanent."""

    INVALID_INPUT = "invalid_input"
    OOM = "oom"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"

    @property
    def retryable(self) -> bool:
        return self in (ErrorCode.OOM, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE)


class ProtocolError(ValueError):
    """A message that does not follow this protocol; dropped and counted, never fatal."""


@dataclass(frozen=True)
class Message:
    """A decoded protocol message."""

    kind: Kind
    """What the message is."""
    header: Mapping[str, Any] = field(default_factory=dict)
    """The msgpack header, already decoded."""
    payload: bytes | None = None
    """Raw bytes carried by JOB messages with inline input."""


def job_id(uid: str, attempt: int) -> str:
    """Identity of one attempt of an ImageJob: the uid plus the attempt number."""
    return f"{uid}/{attempt}"


def encode(kind: Kind, header: Mapping[str, Any] | None = None, payload: bytes | None = None) -> list[bytes]:
    """Frames for one message (without the ROUTER's routing id)."""
    if payload is not None and kind not in _PAYLOAD_KINDS:
        raise ProtocolError(f"{kind.name} carries no payload")
    frames = [kind.value, msgpack.packb(dict(header or {}), use_bin_type=True)]
    if payload is not None:
        frames.append(payload)
    return frames


_REQUIRED: Mapping[Kind, tuple[str, ...]] = {
    Kind.READY: ("version", "pool", "worker", "capacity"),
    Kind.JOB: ("job", "steps", "input", "output"),
    Kind.ACCEPTED: ("job",),
    Kind.PROGRESS: ("job", "stage"),
    Kind.RESULT: ("job", "timing", "output"),
    Kind.ERROR: ("job", "code", "message"),
    Kind.CANCEL: ("job",),
}


def decode(frames: Sequence[bytes]) -> Message:
    """Parse frames (without routing id) into a Message or raise ProtocolError."""
    if len(frames) not in (2, 3):
        raise ProtocolError(f"expected 2 or 3 frames, got {len(frames)}")
    try:
        kind = Kind(bytes(frames[0]))
    except ValueError as exc:
        raise ProtocolError(f"unknown message kind {bytes(frames[0])[:32]!r}") from exc
    raw_header = bytes(frames[1])
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{kind.name} header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"{kind.name} header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"{kind.name} header must be a map, got {type(header).__name__}")
    missing = [key for key in _REQUIRED.get(kind, ()) if key not in header]
    if missing:
        raise ProtocolError(f"{kind.name} header lacks {', '.join(missing)}")
    payload = bytes(frames[2]) if len(frames) == 3 else None
    if payload is not None and kind not in _PAYLOAD_KINDS:
        raise ProtocolError(f"{kind.name} must not carry a payload")
    if kind is Kind.READY and header["version"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header['version']!r} unsupported (this side speaks {PROTOCOL_VERSION})")
    if kind is Kind.ERROR:
        try:
            ErrorCode(header["code"])
        except ValueError as exc:
            raise ProtocolError(f"unknown error code {header['code']!r}") from exc
    return Message(kind, header, payload)
