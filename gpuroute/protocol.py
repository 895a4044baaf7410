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
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from gpuroute.fields import int_in

PROTOCOL_VERSION = 1

HEARTBEAT_INTERVAL_S = 1.0
"""Seconds between heartbeats, both directions."""
HEARTBEAT_LIVENESS = 3
"""Silent heartbeat intervals after which a peer is considered gone."""
RECONNECT_INITIAL_S = 0.25
"""First reconnect delay of a worker that lost the operator."""
RECONNECT_MAX_S = 8.0
"""Ceiling of the worker's exponential reconnect backoff."""
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
"""ZMQ_MAXMSGSIZE on every socket: libzmq drops the connection on a larger frame before reading it
(the largest legitimate frame is a JOB header, at most MAX_HEADER_BYTES)."""
MAX_HEADER_BYTES = 1024 * 1024
"""A header larger than this is malformed: headers are small metadata maps."""
MAX_STAGE_MS = 24 * 3600 * 1000.0
"""Largest stage time a RESULT may report (a day); anything above is a lie or a bug."""
MAX_ATTEMPT = 1000
"""Largest attempt number in a job id (maxAttempts is far smaller)."""
MAX_TEXT = 4096
"""Longest free-text field (error messages, reasons) kept from a peer."""
MAX_GROUP_ITEMS = 64
"""Most batch items one JOB may carry (an item group, see JobRequest.items)."""
MAX_ITEM_TEXT = 1024
"""Longest error message kept per item of a group RESULT (64 of them fit in its header)."""


CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}
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
    EXPIRED = "expired"
    """Trusted storage refused a presigned URL (403: expired, or signed with rotated
    credentials): the operator signs again and re-sends once without spending an attempt."""

    @property
    def retryable(self) -> bool:
        return self in (ErrorCode.OOM, ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE, ErrorCode.EXPIRED)


class ProtocolError(ValueError):
    """A message that does not follow this protocol; dropped and counted, never fatal."""


# ---- field checks: every value from a socket is checked for type and range ----------

def _text(header: Mapping[str, Any], key: str, *, max_len: int = 253, required: bool = True,
          default: str = "") -> str:
    value = header.get(key)
    if value is None and not required:
        return default
    if not isinstance(value, str) or (required and not value) or len(value) > max_len:
        raise ProtocolError(f"{key}: expected a string of 1 to {max_len} characters, got {_show(value)}")
    return value


def _int(header: Mapping[str, Any], key: str, *, low: int, high: int, required: bool = True, default: int = 0) -> int:
    value = header.get(key)
    if value is None and not required:
        return default
    if not int_in(value, low, high):
        raise ProtocolError(f"{key}: expected an integer in [{low}, {high}], got {_show(value)}")
    return value


def _ms(header: Mapping[str, Any], key: str) -> float:
    value = header.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= MAX_STAGE_MS:
        raise ProtocolError(f"timing.{key}: expected a finite number of ms in [0, {MAX_STAGE_MS:g}], got {_show(value)}")
    return float(value)


def _optional_float(header: Mapping[str, Any], key: str) -> float | None:
    value = header.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{key}: expected a finite number, got {_show(value)}")
    return float(value)


def _bool(header: Mapping[str, Any], key: str) -> bool:
    value = header.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key}: expected true or false, got {_show(value)}")
    return value


def _map(header: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = header.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"{key}: expected a map, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    return repr(value)[:64]


_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")


@dataclass(frozen=True, order=True)
class AttemptId:
    """One attempt of one ImageJob: its uid plus the attempt number (from 1)."""

    uid: str
    """metadata.uid of the ImageJob."""
    attempt: int
    """1 for the first dispatch, counting up."""

    def __str__(self) -> str:
        return f"{self.uid}/{self.attempt}"

    @classmethod
    def parse(cls, value: Any) -> AttemptId:
        """A well-formed `uid/attempt` string, or ProtocolError."""
        if not isinstance(value, str) or value.count("/") != 1:
            raise ProtocolError(f"job: expected 'uid/attempt', got {_show(value)}")
        uid, _, number = value.partition("/")
        if not _UID.fullmatch(uid) or not number.isdigit() or not 1 <= int(number) <= MAX_ATTEMPT:
            raise ProtocolError(f"job: expected 'uid/attempt' with attempt 1-{MAX_ATTEMPT}, got {_show(value)}")
        return cls(uid, int(number))


def routing_id_for(public_key: str, worker: str, nonce: str = "") -> bytes:
    """The routing id a worker uses: its own Z85 public key, '/', then a secret nonce and '/'
    when given, then its id (at most 255 bytes in all; the worker id is what is cut).

    The operator refuses a connection whose routing id does not start with the key ZAP
    admitted it with, so no key can occupy another key's ids. The nonce (random, made once
    per worker process, sent only inside the CURVE handshake) makes the id unguessable:
    once a worker's TCP connection drops, nobody else can connect under its id and
    receive the jobs meant for it. ZAP cannot refuse such a squat itself: libzmq's ZAP
    request carries the server socket's own routing id, not the peer's.
    """
    prefix = f"{public_key}/{nonce}/" if nonce else f"{public_key}/"
    return (prefix + worker).encode()[:255]


def routing_nonce() -> str:
    """A fresh secret for routing_id_for: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def job_id(uid: str, attempt: int) -> str:
    """Identity of one attempt of an ImageJob: the uid plus the attempt number."""
    return str(AttemptId(uid, attempt))


def _attempt(header: Mapping[str, Any]) -> AttemptId:
    return AttemptId.parse(header.get("job"))


# ---- typed bodies, one per kind --------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    """A worker announces itself: first message on every connection."""

    pool: str
    """The pool the worker believes it is in; must match the pool its key was admitted for."""
    worker: str
    """Worker id (the pod name)."""
    capacity: int
    """Jobs the worker accepts at once."""
    device: str = ""
    """What computes: a GPU name or 'cpu'."""
    models: tuple[str, ...] = ()
    """Super-resolution models the worker serves."""
    jobs: tuple[AttemptId, ...] = ()
    """Attempts the worker still runs, or whose answer it is about to send again: they hold slots."""
    answered: tuple[AttemptId, ...] = ()
    """Attempts whose answers the worker keeps in its result cache (no slot): after an operator
    restart a job whose result was lost with the old leader is answered from there."""


    def to_header(self) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "pool": self.pool, "worker": self.worker, "capacity": self.capacity,
                "device": self.device, "models": list(self.models), "jobs": [str(j) for j in self.jobs],
                "answered": [str(j) for j in self.answered]}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Ready:
        if header.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {_show(header.get('version'))} unsupported "
                                f"(this side speaks {PROTOCOL_VERSION})")
        models = header.get("models") or []
        jobs = header.get("jobs") or []
        answered = header.get("answered") or []
        if not isinstance(models, list) or len(models) > 256 or not all(isinstance(m, str) and 0 < len(m) <= 253 for m in models):
            raise ProtocolError(f"models: expected a list of names, got {_show(models)}")
        if not isinstance(jobs, list) or len(jobs) > 4096:
            raise ProtocolError(f"jobs: expected a list of at most 4096 job ids, got {_show(jobs)}")
        if not isinstance(answered, list) or len(answered) > 4096:
            raise ProtocolError(f"answered: expected a list of at most 4096 job ids, got {_show(answered)}")
        return cls(pool=_text(header, "pool"), worker=_text(header, "worker"),
                   capacity=_int(header, "capacity", low=1, high=4096),
                   device=_text(header, "device", required=False),
                   models=tuple(models), jobs=tuple(AttemptId.parse(j) for j in jobs),
                   answered=tuple(AttemptId.parse(j) for j in answered))


@dataclass(frozen=True)
class Heartbeat:
    """Liveness, both ways; the operator's `ping` comes back as the worker's `pong` (RTT)."""

    ping: float | None = None
    """Operator's monotonic clock when sent."""
    pong: float | None = None
    """The ping being answered."""
    rtt_ms: float | None = None
    """The operator's measured RTT to this worker, for the worker's own metrics."""

    def to_header(self) -> dict[str, Any]:
        return {k: v for k, v in (("ping", self.ping), ("pong", self.pong), ("rttMs", self.rtt_ms)) if v is not None}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Heartbeat:
        return cls(_optional_float(header, "ping"), _optional_float(header, "pong"), _optional_float(header, "rttMs"))


@dataclass(frozen=True)
class InputSource:
    """Where a job's input comes from: a URL, or the JOB's payload."""

    url: str | None = None
    """Presigned storage URL, or the user's https URL; None for inline input."""
    untrusted: bool = False
    """A user-supplied https URL: the worker applies the SSRF guard."""

    def to_header(self) -> dict[str, Any]:
        return {"url": self.url, "untrusted": self.untrusted} if self.url else {"inline": True}


@dataclass(frozen=True)
class OutputTarget:
    """Where and how a job's output is written."""

    url: str
    """Presigned PUT URL."""
    format: str
    """png, jpeg or webp."""
    quality: int = 90
    """Encoder quality for lossy formats."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Headers the upload must carry (part of the signature)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Encoder options from spec.output beyond format and quality (e.g. background, keepMetadata)."""

    def to_header(self) -> dict[str, Any]:
        return {**dict(self.options), "url": self.url, "format": self.format, "quality": self.quality,
                "headers": dict(self.headers)}


@dataclass(frozen=True)
class ItemTarget:
    """One item of an item group: where its input is read and its output written."""

    input_url: str
    """Presigned GET URL of the input (trusted storage: batches read only granted buckets)."""
    output_url: str
    """Presigned PUT URL of the output."""
    output_headers: Mapping[str, str] = field(default_factory=dict)
    """Headers the upload must carry (part of the signature)."""

    def to_header(self) -> dict[str, Any]:
        return {"input": self.input_url, "output": self.output_url, "headers": dict(self.output_headers)}

    @classmethod
    def from_header(cls, header: Any) -> ItemTarget:
        if not isinstance(header, dict):
            raise ProtocolError(f"items: expected maps, got {_show(header)}")
        return cls(_text(header, "input", max_len=16384), _text(header, "output", max_len=16384),
                   _headers(header.get("headers"), "items.headers"))


def _headers(value: Any, key: str) -> dict[str, str]:
    value = value or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ProtocolError(f"{key}: expected a map of strings")
    return value


@dataclass(frozen=True)
class JobRequest:
    """One attempt of a job, operator to worker.

    A job is one image (input and output), or an item group: up to MAX_GROUP_ITEMS items of
    a batch that share steps and output format, each with its own URLs (`items`). A group is
    one attempt and gets one RESULT whose `items` answer every item, in order (or one ERROR
    for the whole group): the per-message costs of both sides are paid once per group.
    """

    job: AttemptId
    """The attempt."""
    steps: tuple[Mapping[str, Any], ...]
    """The pipeline, as in spec.steps."""
    input: InputSource
    """The input (unused by an item group)."""
    output: OutputTarget
    """The output (for an item group: format, quality and options; its url is empty)."""
    timeout_s: float
    """Seconds left before the job's deadline."""
    items: tuple[ItemTarget, ...] = ()
    """An item group's items; empty for a single-image job."""
    item_timeout_s: float = 0.0
    """An item group's per-item timeout on the worker (0: only timeout_s bounds it)."""

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"job": str(self.job), "steps": [dict(s) for s in self.steps],
                                  "output": self.output.to_header(), "timeoutS": self.timeout_s}
        if self.items:
            header["output"].pop("url")
            header["output"].pop("headers")
            header["items"] = [item.to_header() for item in self.items]
            header["itemTimeoutS"] = self.item_timeout_s
        else:
            header["input"] = self.input.to_header()
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> JobRequest:
        steps = header.get("steps")
        if not isinstance(steps, list) or not 1 <= len(steps) <= 64 or not all(isinstance(s, dict) for s in steps):
            raise ProtocolError(f"steps: expected a list of 1 to 64 maps, got {_show(steps)}")
        output = _map(header, "output")
        raw_items = header.get("items")
        items: tuple[ItemTarget, ...] = ()
        if raw_items is not None:
            if not isinstance(raw_items, list) or not 1 <= len(raw_items) <= MAX_GROUP_ITEMS:
                raise ProtocolError(f"items: expected a list of 1 to {MAX_GROUP_ITEMS} items, got {_show(raw_items)}")
            items = tuple(ItemTarget.from_header(item) for item in raw_items)
            source = InputSource()
            url = ""
        else:
            source_header = _map(header, "input")
            source_url = source_header.get("url")
            if source_url is not None and not (isinstance(source_url, str) and 0 < len(source_url) <= 16384):
                raise ProtocolError(f"input.url: expected a URL string, got {_show(source_url)}")
            if source_url is None and source_header.get("inline") is not True:
                raise ProtocolError("input: neither url nor inline")
            source = InputSource(source_url, _bool(source_header, "untrusted"))
            url = _text(output, "url", max_len=16384)
        fmt = _text(output, "format")
        if fmt not in CONTENT_TYPES:
            raise ProtocolError(f"output.format: expected one of {sorted(CONTENT_TYPES)}, got {_show(fmt)}")
        headers = _headers(output.get("headers"), "output.headers")
        timeout = _optional_float(header, "timeoutS")
        item_timeout = _optional_float(header, "itemTimeoutS")
        options = {k: v for k, v in output.items() if k not in ("url", "format", "quality", "headers")}
        return cls(job=_attempt(header), steps=tuple(steps), input=source,
                   output=OutputTarget(url, fmt, _int(output, "quality", low=1, high=100, required=False, default=90),
                                       headers, options),
                   timeout_s=timeout if timeout is not None and timeout > 0 else 600.0,
                   items=items, item_timeout_s=item_timeout if item_timeout is not None and item_timeout > 0 else 0.0)


@dataclass(frozen=True)
class Accepted:
    """The worker started (or is already running) an attempt."""

    job: AttemptId
    """The attempt."""

    def to_header(self) -> dict[str, Any]:
        return {"job": str(self.job)}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Accepted:
        return cls(_attempt(header))


@dataclass(frozen=True)
class Progress:
    """A stage of an attempt began (liveness only)."""

    job: AttemptId
    """The attempt."""
    stage: str
    """download, decode, compute, encode or upload."""

    def to_header(self) -> dict[str, Any]:
        return {"job": str(self.job), "stage": self.stage}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Progress:
        return cls(_attempt(header), _text(header, "stage", max_len=32))


STAGES = ("downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs")
"""The worker's stages, in order, as reported in a RESULT's timing."""


@dataclass(frozen=True)
class StageTiming:
    """Where a worker's time went, in ms; every value finite, >= 0 and bounded."""

    download_ms: float = 0.0
    """Reading the input from storage."""
    decode_ms: float = 0.0
    """Decoding the image."""
    gpu_ms: float = 0.0
    """Computing the pipeline on the device."""
    encode_ms: float = 0.0
    """Encoding the output."""
    upload_ms: float = 0.0
    """Writing the output to storage."""
    executor_wait_ms: float = 0.0
    """Waiting for the device (batch forming, other batches)."""

    @property
    def worker_ms(self) -> float:
        return (self.download_ms + self.decode_ms + self.executor_wait_ms + self.gpu_ms + self.encode_ms
                + self.upload_ms)

    def stages(self) -> dict[str, float]:
        return dict(zip(STAGES, (self.download_ms, self.decode_ms, self.gpu_ms, self.encode_ms, self.upload_ms),
                        strict=True))

    def to_header(self) -> dict[str, float]:
        return {**self.stages(), "executorWaitMs": self.executor_wait_ms}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> StageTiming:
        return cls(*(_ms(header, key) for key in (*STAGES, "executorWaitMs")))


_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class OutputInfo:
    """What the worker wrote."""

    bytes: int
    """Encoded size."""
    width: int
    """Pixels."""
    height: int
    """Pixels."""
    sha256: str
    """Hex digest of the encoded bytes."""
    format: str
    """png, jpeg or webp."""

    def to_header(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "width": self.width, "height": self.height, "sha256": self.sha256,
                "format": self.format}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> OutputInfo:
        digest = _text(header, "sha256", max_len=64)
        if not _SHA256.fullmatch(digest):
            raise ProtocolError(f"output.sha256: expected 64 lowercase hex digits, got {_show(digest)}")
        fmt = _text(header, "format", max_len=16)
        if fmt not in CONTENT_TYPES:
            raise ProtocolError(f"output.format: expected one of {sorted(CONTENT_TYPES)}, got {_show(fmt)}")
        return cls(_int(header, "bytes", low=1, high=MAX_MESSAGE_BYTES * 64),
                   _int(header, "width", low=1, high=1 << 20), _int(header, "height", low=1, high=1 << 20),
                   digest, fmt)


def _input_size(header: Mapping[str, Any], *, prefix: str = "") -> tuple[int, int]:
    """The input's width and height a worker reports (0, 0 when it does not)."""
    source = header.get("input") or {}
    if not isinstance(source, dict):
        raise ProtocolError(f"{prefix}input: expected a map, got {_show(source)}")
    return (_int(source, "width", low=1, high=1 << 20, required=False),
            _int(source, "height", low=1, high=1 << 20, required=False))


def _failure(header: Mapping[str, Any], max_len: int, *, prefix: str = "") -> tuple[ErrorCode, str]:
    """A failure's code and message. A long message is cut, not refused: refusing it would leave
    the job waiting for its timeout."""
    try:
        code = ErrorCode(header.get("code"))
    except ValueError as exc:
        raise ProtocolError(f"{prefix}code: unknown error code {_show(header.get('code'))}") from exc
    message = header.get("message")
    if not isinstance(message, str):
        raise ProtocolError(f"{prefix}message: expected a string, got {_show(message)}")
    return code, message[:max_len]


@dataclass(frozen=True)
class ItemAnswer:
    """What became of one item of an item group: its output, or why it failed."""

    output: OutputInfo | None = None
    """What was written; None when the item failed."""
    timing: StageTiming = field(default_factory=StageTiming)
    """Where the worker's time went for this item."""
    input_width: int = 0
    """Input pixels across (0: not reported)."""
    input_height: int = 0
    """Input pixels down."""
    code: ErrorCode | None = None
    """Why the item failed (None: it succeeded); retryable codes may succeed in another group."""
    message: str = ""
    """The failure, for the results manifest."""

    @property
    def ok(self) -> bool:
        return self.output is not None

    def to_header(self) -> dict[str, Any]:
        if self.output is None:
            return {"code": (self.code or ErrorCode.UNAVAILABLE).value, "message": self.message}
        header: dict[str, Any] = {"output": self.output.to_header(), "timing": self.timing.to_header()}
        if self.input_width and self.input_height:
            header["input"] = {"width": self.input_width, "height": self.input_height}
        return header

    @classmethod
    def from_header(cls, header: Any) -> ItemAnswer:
        if not isinstance(header, dict):
            raise ProtocolError(f"items: expected maps, got {_show(header)}")
        if "output" not in header:
            code, message = _failure(header, MAX_ITEM_TEXT, prefix="items.")
            return cls(code=code, message=message)
        return cls(OutputInfo.from_header(_map(header, "output")), StageTiming.from_header(_map(header, "timing")),
                   *_input_size(header, prefix="items."))


@dataclass(frozen=True)
class Result:
    """An attempt succeeded; its output is in storage (for an item group: every item is
    answered in `items`, in the order sent, and some may have failed)."""

    job: AttemptId
    """The attempt."""
    timing: StageTiming
    """Where the worker's time went."""
    output: OutputInfo | None
    """What was written (None for an item group: see `items`)."""
    input_width: int = 0
    """Input pixels across (0: not reported); the operator learns pool speed per megapixel."""
    input_height: int = 0
    """Input pixels down."""
    device: str = ""
    """What computed it."""
    cached: bool = False
    """Answered from the worker's result cache, not computed again."""
    items: tuple[ItemAnswer, ...] = ()
    """An item group's answers, one per item sent, in order (then `output` is None)."""

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"job": str(self.job), "timing": self.timing.to_header(), "device": self.device}
        if self.items:
            header["items"] = [item.to_header() for item in self.items]
        elif self.output is not None:
            header["output"] = self.output.to_header()
        if self.input_width and self.input_height:
            header["input"] = {"width": self.input_width, "height": self.input_height}
        if self.cached:
            header["cached"] = True
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Result:
        width, height = _input_size(header)
        timing = StageTiming.from_header(_map(header, "timing"))
        raw_items = header.get("items")
        items: tuple[ItemAnswer, ...] = ()
        output: OutputInfo | None = None
        if raw_items is not None:
            if not isinstance(raw_items, list) or not 1 <= len(raw_items) <= MAX_GROUP_ITEMS:
                raise ProtocolError(f"items: expected a list of 1 to {MAX_GROUP_ITEMS} answers, got {_show(raw_items)}")
            items = tuple(ItemAnswer.from_header(item) for item in raw_items)
        else:
            output = OutputInfo.from_header(_map(header, "output"))
        return cls(_attempt(header), timing, output, width, height, _text(header, "device", required=False),
                   _bool(header, "cached"), items)


@dataclass(frozen=True)
class Error:
    """An attempt failed; `code` says whether another attempt may succeed."""

    job: AttemptId
    """The attempt."""
    code: ErrorCode
    """Why."""
    message: str
    """For the user (shown in status)."""
    rejected: bool = False
    """Refused before it started (worker full): not an attempt."""

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"job": str(self.job), "code": self.code.value, "message": self.message}
        if self.rejected:
            header["rejected"] = True
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Error:
        code, message = _failure(header, MAX_TEXT)
        return cls(_attempt(header), code, message, _bool(header, "rejected"))


@dataclass(frozen=True)
class Cancel:
    """Stop an attempt; nothing is written for it afterwards."""

    job: AttemptId
    """The attempt."""

    def to_header(self) -> dict[str, Any]:
        return {"job": str(self.job)}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Cancel:
        return cls(_attempt(header))


@dataclass(frozen=True)
class Disconnect:
    """Either side ends the session (shutdown, refused, revoked)."""

    reason: str = ""
    """Why, for logs."""

    def to_header(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Disconnect:
        return cls(_text(header, "reason", max_len=MAX_TEXT, required=False))


Body = Ready | Heartbeat | JobRequest | Accepted | Progress | Result | Error | Cancel | Disconnect

BODY_TYPES: Mapping[Kind, Any] = {
    Kind.READY: Ready, Kind.HEARTBEAT: Heartbeat, Kind.JOB: JobRequest, Kind.ACCEPTED: Accepted,
    Kind.PROGRESS: Progress, Kind.RESULT: Result, Kind.ERROR: Error, Kind.CANCEL: Cancel, Kind.DISCONNECT: Disconnect,
}
KIND_OF: Mapping[type, Kind] = {body: kind for kind, body in BODY_TYPES.items()}

MAX_HEADER_BYTES_BY_KIND: Mapping[Kind, int] = {
    Kind.READY: 256 * 1024, Kind.HEARTBEAT: 1024, Kind.JOB: MAX_HEADER_BYTES, Kind.ACCEPTED: 1024,
    Kind.PROGRESS: 1024, Kind.RESULT: 128 * 1024, Kind.ERROR: 64 * 1024, Kind.CANCEL: 1024, Kind.DISCONNECT: 16 * 1024,
}
"""Largest header each kind may carry: a heartbeat is tiny, a JOB carries its pipeline and URLs."""
MAX_INLINE_PAYLOAD_BYTES = 512 * 1024
"""A JOB's inline payload (spec.input.inline is at most 256 KiB decoded)."""


@dataclass(frozen=True)
class Message:
    """A decoded, validated protocol message."""

    kind: Kind
    """What the message is."""
    header: Mapping[str, Any] = field(default_factory=dict)
    """The msgpack header, already decoded and validated."""
    payload: bytes | None = None
    """Raw bytes carried by JOB messages with inline input."""
    body: Any = None
    """The typed body (Ready, Result, ...) parsed from the header."""


def encode(kind: Kind | Body, header: Mapping[str, Any] | None = None, payload: bytes | None = None) -> list[bytes]:
    """Frames for one message (without the ROUTER's routing id): a typed body, or a kind and header."""
    if not isinstance(kind, Kind):
        body = kind
        kind, header = KIND_OF[type(body)], body.to_header()
    if payload is not None and kind not in _PAYLOAD_KINDS:
        raise ProtocolError(f"{kind.name} carries no payload")
    frames = [kind.value, msgpack.packb(dict(header or {}), use_bin_type=True)]
    if payload is not None:
        frames.append(payload)
    return frames


def check_sizes(frames: Sequence[Any]) -> None:
    """Refuse oversized frames by length alone, before anything is copied or parsed."""
    if len(frames) not in (2, 3):
        raise ProtocolError(f"expected 2 or 3 frames, got {len(frames)}")
    kind = _kind(frames[0])
    limit = MAX_HEADER_BYTES_BY_KIND[kind]
    if len(frames[1]) > limit:
        raise ProtocolError(f"{kind.name} header of {len(frames[1])} bytes exceeds {limit}")
    if len(frames) == 3:
        if kind not in _PAYLOAD_KINDS:
            raise ProtocolError(f"{kind.name} must not carry a payload")
        if len(frames[2]) > MAX_INLINE_PAYLOAD_BYTES:
            raise ProtocolError(f"{kind.name} payload of {len(frames[2])} bytes exceeds {MAX_INLINE_PAYLOAD_BYTES}")


def _kind(frame: Any) -> Kind:
    raw = bytes(frame[:16]) if len(frame) > 16 else bytes(frame)
    try:
        return Kind(raw)
    except ValueError as exc:
        raise ProtocolError(f"unknown message kind {raw[:16]!r}") from exc


def decode(frames: Sequence[Any]) -> Message:
    """Parse frames (without routing id) into a validated Message or raise ProtocolError."""
    check_sizes(frames)
    kind = _kind(frames[0])
    raw_header = bytes(frames[1])
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"{kind.name} header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"{kind.name} header must be a map, got {type(header).__name__}")
    try:
        body = BODY_TYPES[kind].from_header(header)
    except ProtocolError as exc:
        raise ProtocolError(f"{kind.name}: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"{kind.name}: malformed header: {exc}") from exc
    payload = bytes(frames[2]) if len(frames) == 3 else None
    return Message(kind, header, payload, body)
