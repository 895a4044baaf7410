"""The wire protocol: round trips, and every way a message can be malformed."""

from __future__ import annotations

import msgpack
import pytest

from gpuroute import protocol
from gpuroute.protocol import ErrorCode, Kind, ProtocolError, decode, encode


def test_round_trip_with_payload() -> None:
    header = {"job": "uid/1", "steps": [{"op": "invert"}], "input": {"inline": True}, "output": {"url": "u"}}
    message = decode(encode(Kind.JOB, header, b"\x89PNG"))
    assert (message.kind, dict(message.header), message.payload) == (Kind.JOB, header, b"\x89PNG")


def test_ready_and_error() -> None:
    ready = {"version": protocol.PROTOCOL_VERSION, "pool": "p", "worker": "w", "capacity": 4}
    assert decode(encode(Kind.READY, ready)).header["pool"] == "p"
    error = decode(encode(Kind.ERROR, {"job": "j/1", "code": "oom", "message": "x"}))
    assert ErrorCode(error.header["code"]).retryable
    assert not ErrorCode.INVALID_INPUT.retryable and not ErrorCode.CANCELLED.retryable


@pytest.mark.parametrize(("frames", "fragment"), [
    ([b"JOB"], "expected 2 or 3 frames"),
    ([b"JOB", b"", b"", b""], "expected 2 or 3 frames"),
    ([b"BOGUS", msgpack.packb({})], "unknown message kind"),
    ([b"HEARTBEAT", b"\xc1"], "not valid msgpack"),
    ([b"HEARTBEAT", msgpack.packb([1, 2])], "must be a map"),
    ([b"RESULT", msgpack.packb({"job": "j"})], "lacks timing, output"),
    ([b"HEARTBEAT", msgpack.packb({}), b"payload"], "must not carry a payload"),
    ([b"READY", msgpack.packb({"version": 99, "pool": "p", "worker": "w", "capacity": 1})], "protocol version 99"),
    ([b"ERROR", msgpack.packb({"job": "j", "code": "meltdown", "message": "m"})], "unknown error code"),
    ([b"HEARTBEAT", b"\x00" * (protocol.MAX_HEADER_BYTES + 1)], "exceeds"),
])
def test_malformed_messages_raise_protocol_error(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        decode(frames)


def test_payload_only_on_jobs() -> None:
    with pytest.raises(ProtocolError):
        encode(Kind.RESULT, {}, b"x")
