"""The wire protocol: round trips, and every way a message can be malformed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from gpuroute import protocol
from gpuroute.protocol import ErrorCode, Kind, Message, ProtocolError, decode, encode, job_id

# One valid header per kind: exactly the required keys plus a little extra.
VALID_HEADERS: dict[Kind, dict[str, Any]] = {
    Kind.READY: {"version": protocol.PROTOCOL_VERSION, "pool": "p", "worker": "w", "capacity": 4,
                 "models": ["x4"], "device": "cuda:0"},
    Kind.HEARTBEAT: {},
    Kind.JOB: {"job": "uid/1", "steps": [{"op": "invert"}], "input": {"inline": True},
               "output": {"url": "https://s3/x", "headers": {"Content-Type": "image/png"}}},
    Kind.ACCEPTED: {"job": "uid/1"},
    Kind.PROGRESS: {"job": "uid/1", "stage": "decode"},
    Kind.RESULT: {"job": "uid/1", "timing": {"totalMs": 12.5, "gpuMs": 3.0}, "output": {"width": 8, "height": 4}},
    Kind.ERROR: {"job": "uid/1", "code": "oom", "message": "CUDA out of memory"},
    Kind.CANCEL: {"job": "uid/1"},
    Kind.DISCONNECT: {"reason": "draining"},
}


def test_every_kind_has_a_case() -> None:
    assert set(VALID_HEADERS) == set(Kind)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_round_trip_each_kind(kind: Kind) -> None:
    header = VALID_HEADERS[kind]
    frames = encode(kind, header)
    assert len(frames) == 2
    assert frames[0] == kind.value
    message = decode(frames)
    assert message == Message(kind, header, None)
    assert dict(message.header) == header
    assert message.payload is None


def test_round_trip_with_payload() -> None:
    header = VALID_HEADERS[Kind.JOB]
    frames = encode(Kind.JOB, header, b"\x89PNG\r\n\x1a\n")
    assert len(frames) == 3 and frames[2] == b"\x89PNG\r\n\x1a\n"
    message = decode(frames)
    assert (message.kind, dict(message.header), message.payload) == (Kind.JOB, header, b"\x89PNG\r\n\x1a\n")


def test_empty_payload_is_still_a_payload() -> None:
    message = decode(encode(Kind.JOB, VALID_HEADERS[Kind.JOB], b""))
    assert message.payload == b""


def test_binary_header_values_survive() -> None:
    header = {"job": "j/2", "blob": b"\x00\xff\x10"}
    assert decode(encode(Kind.ACCEPTED, header)).header["blob"] == b"\x00\xff\x10"


def test_encode_without_header_is_empty_map() -> None:
    frames = encode(Kind.HEARTBEAT)
    assert frames == [b"HEARTBEAT", msgpack.packb({})]
    assert decode(frames) == Message(Kind.HEARTBEAT, {}, None)


def test_decode_accepts_bytes_like_frames() -> None:
    frames = encode(Kind.CANCEL, {"job": "u/3"})
    message = decode([bytearray(frames[0]), memoryview(frames[1])])
    assert message.kind is Kind.CANCEL and message.header == {"job": "u/3"}


def test_error_code_enum_value_in_header() -> None:
    message = decode(encode(Kind.ERROR, {"job": "j/1", "code": ErrorCode.TIMEOUT, "message": "late"}))
    assert message.header["code"] == "timeout"
    assert ErrorCode(message.header["code"]) is ErrorCode.TIMEOUT


@pytest.mark.parametrize(("code", "retryable"), [
    (ErrorCode.INVALID_INPUT, False),
    (ErrorCode.OOM, True),
    (ErrorCode.TIMEOUT, True),
    (ErrorCode.UNAVAILABLE, True),
    (ErrorCode.CANCELLED, False),
])
def test_error_code_retryable(code: ErrorCode, retryable: bool) -> None:
    assert code.retryable is retryable


def test_job_id() -> None:
    assert job_id("0b1c-uid", 3) == "0b1c-uid/3"


@pytest.mark.parametrize("kind", [k for k in Kind if k is not Kind.JOB], ids=lambda k: k.name)
def test_encode_refuses_payload_on_other_kinds(kind: Kind) -> None:
    with pytest.raises(ProtocolError, match=f"{kind.name} carries no payload"):
        encode(kind, VALID_HEADERS[kind], b"x")


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


def _packed(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


@pytest.mark.parametrize(("frames", "fragment"), [
    ([], "expected 2 or 3 frames, got 0"),
    ([b"JOB"], "expected 2 or 3 frames, got 1"),
    ([b"JOB", b"", b"", b""], "expected 2 or 3 frames, got 4"),
    ([b"BOGUS", _packed({})], "unknown message kind b'BOGUS'"),
    ([b"ready", _packed({})], "unknown message kind"),
    ([b"", _packed({})], "unknown message kind"),
    ([b"HEARTBEAT", b"\xc1"], "HEARTBEAT header is not valid msgpack"),
    ([b"HEARTBEAT", b""], "not valid msgpack"),
    ([b"HEARTBEAT", _packed({"a": 1}) + b"trailing"], "not valid msgpack"),
    ([b"HEARTBEAT", _packed({1: "int key"})], "not valid msgpack"),
    ([b"HEARTBEAT", _packed([1, 2])], "HEARTBEAT header must be a map, got list"),
    ([b"CANCEL", _packed("job")], "must be a map, got str"),
    ([b"ACCEPTED", _packed(None)], "must be a map, got NoneType"),
    ([b"RESULT", _packed({"job": "j"})], "RESULT header lacks timing, output"),
    ([b"READY", _packed({"version": 1})], "READY header lacks pool, worker, capacity"),
    ([b"JOB", _packed({"job": "j", "steps": [], "input": {}})], "JOB header lacks output"),
    ([b"ACCEPTED", _packed({})], "ACCEPTED header lacks job"),
    ([b"PROGRESS", _packed({"job": "j"})], "PROGRESS header lacks stage"),
    ([b"ERROR", _packed({"job": "j", "code": "oom"})], "ERROR header lacks message"),
    ([b"CANCEL", _packed({"jobs": "j"})], "CANCEL header lacks job"),
    ([b"HEARTBEAT", _packed({}), b"payload"], "HEARTBEAT must not carry a payload"),
    ([b"RESULT", _packed(VALID_HEADERS[Kind.RESULT]), b""], "RESULT must not carry a payload"),
    ([b"READY", _packed({"version": 99, "pool": "p", "worker": "w", "capacity": 1})],
     "protocol version 99 unsupported"),
    ([b"READY", _packed({"version": 0, "pool": "p", "worker": "w", "capacity": 1})], "protocol version 0"),
    ([b"READY", _packed({"version": "1", "pool": "p", "worker": "w", "capacity": 1})], "protocol version '1'"),
    ([b"ERROR", _packed({"job": "j", "code": "meltdown", "message": "m"})], "unknown error code 'meltdown'"),
    ([b"ERROR", _packed({"job": "j", "code": "OOM", "message": "m"})], "unknown error code 'OOM'"),
    ([b"ERROR", _packed({"job": "j", "code": None, "message": "m"})], "unknown error code None"),
    ([b"HEARTBEAT", b"\x00" * (protocol.MAX_HEADER_BYTES + 1)], "exceeds"),
])
def test_malformed_messages_raise_protocol_error(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(frames)
    assert fragment in str(caught.value)


def test_oversized_header_is_refused_even_if_valid_msgpack() -> None:
    big = _packed({"pad": "x" * protocol.MAX_HEADER_BYTES})
    assert len(big) > protocol.MAX_HEADER_BYTES
    with pytest.raises(ProtocolError, match=f"exceeds {protocol.MAX_HEADER_BYTES}"):
        decode([b"HEARTBEAT", big])


def test_header_at_the_limit_is_accepted() -> None:
    pad = "x" * (protocol.MAX_HEADER_BYTES - 64)
    raw = _packed({"pad": pad})
    assert len(raw) <= protocol.MAX_HEADER_BYTES
    assert decode([b"HEARTBEAT", raw]).header["pad"] == pad


def test_constants() -> None:
    assert protocol.PROTOCOL_VERSION == 1
    assert protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS == 3.0
    assert protocol.RECONNECT_INITIAL_S < protocol.RECONNECT_MAX_S
    assert protocol.MAX_HEADER_BYTES < protocol.MAX_MESSAGE_BYTES
    assert protocol.CONTENT_TYPES == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
