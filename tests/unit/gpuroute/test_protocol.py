"""The wire protocol: round trips, and every way a message can be malformed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from gpuroute import protocol
from gpuroute.protocol import (
    AttemptId,
    ErrorCode,
    Kind,
    Message,
    ProtocolError,
    Result,
    decode,
    encode,
    job_id,
)

# One valid header per kind: exactly the required keys plus a little extra.
VALID_HEADERS: dict[Kind, dict[str, Any]] = {
    Kind.READY: {"version": protocol.PROTOCOL_VERSION, "pool": "p", "worker": "w", "capacity": 4,
                 "models": ["x4"], "device": "cuda:0", "jobs": ["uid/2"]},
    Kind.HEARTBEAT: {},
    Kind.JOB: {"job": "uid/1", "steps": [{"op": "invert"}], "input": {"inline": True},
               "output": {"url": "https://s3/x", "format": "png", "headers": {"Content-Type": "image/png"}}},
    Kind.ACCEPTED: {"job": "uid/1"},
    Kind.PROGRESS: {"job": "uid/1", "stage": "decode"},
    Kind.RESULT: {"job": "uid/1", "timing": {"downloadMs": 12.5, "gpuMs": 3.0},
                  "output": {"bytes": 10, "width": 8, "height": 4, "sha256": "ab" * 32, "format": "png"}},
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
    assert (message.kind, dict(message.header), message.payload) == (kind, header, None)
    # The typed body encodes back to an equivalent message.
    assert decode(encode(message.body)).body == message.body


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


def test_attempt_ids_are_typed_and_well_formed() -> None:
    assert AttemptId.parse("0b1c-uid/3") == AttemptId("0b1c-uid", 3)
    assert str(AttemptId("u", 2)) == "u/2"
    for bad in ("u", "u/0", "u/-1", "u/x", "/1", "u/1/2", "u u/1", 7, None, "u/1001", "ü/1"):
        with pytest.raises(ProtocolError):
            AttemptId.parse(bad)


def test_encode_without_header_is_empty_map() -> None:
    frames = encode(Kind.HEARTBEAT)
    assert frames == [b"HEARTBEAT", msgpack.packb({})]
    assert decode(frames) == Message(Kind.HEARTBEAT, {}, None, protocol.Heartbeat())


def test_decode_accepts_bytes_like_frames() -> None:
    frames = encode(Kind.CANCEL, {"job": "u/3"})
    message = decode([bytearray(frames[0]), memoryview(frames[1])])
    assert message.kind is Kind.CANCEL and message.header == {"job": "u/3"}
    assert message.body == protocol.Cancel(AttemptId("u", 3))


def test_error_code_enum_value_in_header() -> None:
    message = decode(encode(Kind.ERROR, {"job": "j/1", "code": ErrorCode.TIMEOUT, "message": "late"}))
    assert message.body.code is ErrorCode.TIMEOUT
    assert message.header["code"] == "timeout"
    assert ErrorCode(message.header["code"]) is ErrorCode.TIMEOUT


@pytest.mark.parametrize(("code", "retryable"), [
    (ErrorCode.INVALID_INPUT, False),
    (ErrorCode.OOM, True),
    (ErrorCode.TIMEOUT, True),
    (ErrorCode.UNAVAILABLE, True),
    (ErrorCode.CANCELLED, False),
    (ErrorCode.EXPIRED, True),
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


def _result(**timing: Any) -> dict[str, Any]:
    return {**VALID_HEADERS[Kind.RESULT], "timing": timing}


def _with(kind: Kind, **changes: Any) -> dict[str, Any]:
    return {**VALID_HEADERS[kind], **changes}


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
    ([b"RESULT", _packed({"job": "j/1"})], "timing: expected a map"),
    ([b"READY", _packed({"version": 1})], "pool: expected a string"),
    ([b"JOB", _packed({"job": "j/1", "steps": [{}], "input": {"inline": True}})], "output: expected a map"),
    ([b"ACCEPTED", _packed({})], "job: expected 'uid/attempt'"),
    ([b"ACCEPTED", _packed({"job": 5})], "job: expected 'uid/attempt'"),
    ([b"PROGRESS", _packed({"job": "j/1"})], "stage: expected a string"),
    ([b"ERROR", _packed({"job": "j/1", "code": "oom"})], "message: expected a string"),
    ([b"CANCEL", _packed({"jobs": "j/1"})], "job: expected"),
    ([b"HEARTBEAT", _packed({}), b"payload"], "HEARTBEAT must not carry a payload"),
    ([b"RESULT", _packed(VALID_HEADERS[Kind.RESULT]), b""], "RESULT must not carry a payload"),
    ([b"READY", _packed({"version": 99, "pool": "p", "worker": "w", "capacity": 1})],
     "protocol version 99 unsupported"),
    ([b"READY", _packed({"version": 0, "pool": "p", "worker": "w", "capacity": 1})], "protocol version 0"),
    ([b"READY", _packed({"version": "1", "pool": "p", "worker": "w", "capacity": 1})], "protocol version '1'"),
    ([b"READY", _packed(_with(Kind.READY, capacity="4"))], "capacity: expected an integer"),
    ([b"READY", _packed(_with(Kind.READY, capacity=0))], "capacity: expected an integer"),
    ([b"READY", _packed(_with(Kind.READY, capacity=True))], "capacity: expected an integer"),
    ([b"READY", _packed(_with(Kind.READY, jobs=["nope"]))], "job: expected 'uid/attempt'"),
    ([b"READY", _packed(_with(Kind.READY, pool=""))], "pool: expected a string"),
    ([b"ERROR", _packed({"job": "j/1", "code": "meltdown", "message": "m"})], "unknown error code 'meltdown'"),
    ([b"ERROR", _packed({"job": "j/1", "code": "OOM", "message": "m"})], "unknown error code 'OOM'"),
    ([b"ERROR", _packed({"job": "j/1", "code": None, "message": "m"})], "unknown error code None"),
    ([b"RESULT", _packed(_result(gpuMs=float("nan")))], "timing.gpuMs: expected a finite number"),
    ([b"RESULT", _packed(_result(gpuMs=float("inf")))], "timing.gpuMs"),
    ([b"RESULT", _packed(_result(downloadMs=-1.0))], "timing.downloadMs"),
    ([b"RESULT", _packed(_result(uploadMs=1e12))], "timing.uploadMs"),
    ([b"RESULT", _packed(_result(encodeMs="3"))], "timing.encodeMs"),
    ([b"RESULT", _packed(_result(decodeMs=True))], "timing.decodeMs"),
    ([b"RESULT", _packed({**VALID_HEADERS[Kind.RESULT], "timing": []})], "timing: expected a map"),
    ([b"RESULT", _packed({**VALID_HEADERS[Kind.RESULT], "output": {**VALID_HEADERS[Kind.RESULT]["output"],
                                                                    "sha256": "forged"}})], "output.sha256"),
    ([b"RESULT", _packed({**VALID_HEADERS[Kind.RESULT], "output": {**VALID_HEADERS[Kind.RESULT]["output"],
                                                                    "width": -8}})], "width: expected an integer"),
    ([b"RESULT", _packed({**VALID_HEADERS[Kind.RESULT], "output": {**VALID_HEADERS[Kind.RESULT]["output"],
                                                                    "bytes": 0}})], "bytes: expected an integer"),
    ([b"RESULT", _packed({**VALID_HEADERS[Kind.RESULT], "cached": "yes"})], "cached: expected true or false"),
    ([b"JOB", _packed(_with(Kind.JOB, steps=[]))], "steps: expected a list of 1 to 64 maps"),
    ([b"JOB", _packed(_with(Kind.JOB, output={"url": "u", "format": "bmp"}))], "output.format"),
    ([b"HEARTBEAT", _packed({"ping": "now"})], "ping: expected a finite number"),
    ([b"HEARTBEAT", b"\x00" * (protocol.MAX_HEADER_BYTES_BY_KIND[Kind.HEARTBEAT] + 1)], "exceeds"),
    ([b"JOB", _packed(VALID_HEADERS[Kind.JOB]), b"x" * (protocol.MAX_INLINE_PAYLOAD_BYTES + 1)], "payload of"),
])
def test_malformed_messages_raise_protocol_error(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(frames)
    assert fragment in str(caught.value)


def test_oversized_header_is_refused_even_if_valid_msgpack() -> None:
    limit = protocol.MAX_HEADER_BYTES_BY_KIND[Kind.JOB]
    big = _packed({**VALID_HEADERS[Kind.JOB], "pad": "x" * limit})
    with pytest.raises(ProtocolError, match=f"exceeds {limit}"):
        decode([b"JOB", big])


def test_header_at_the_limit_is_accepted() -> None:
    limit = protocol.MAX_HEADER_BYTES_BY_KIND[Kind.JOB]
    pad = "x" * (limit - 256)
    raw = _packed({**VALID_HEADERS[Kind.JOB], "pad": pad})
    assert len(raw) <= limit
    assert decode([b"JOB", raw]).header["pad"] == pad


def test_sizes_are_checked_from_lengths_alone() -> None:
    class Huge:
        """A frame that refuses to be copied: only its length may be read."""

        def __len__(self) -> int:
            return 1 << 30

        def __bytes__(self) -> bytes:
            raise AssertionError("copied an oversized frame")

    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.check_sizes([b"HEARTBEAT", Huge()])


def test_long_error_messages_are_cut_not_refused() -> None:
    message = decode(encode(Kind.ERROR, {"job": "j/1", "code": "oom", "message": "x" * 50_000}))
    assert len(message.body.message) == protocol.MAX_TEXT


def test_result_worker_ms_adds_the_stages() -> None:
    body: Result = decode(encode(Kind.RESULT, _result(downloadMs=1, decodeMs=2, gpuMs=3, encodeMs=4, uploadMs=5,
                                                      executorWaitMs=6))).body
    assert body.timing.worker_ms == 21.0


def test_routing_id_is_bound_to_the_key() -> None:
    assert protocol.routing_id_for("k" * 40, "w1") == b"k" * 40 + b"/w1"
    assert len(protocol.routing_id_for("k" * 40, "w" * 400)) == 255


def test_constants() -> None:
    assert protocol.PROTOCOL_VERSION == 1
    assert protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS == 3.0
    assert protocol.RECONNECT_INITIAL_S < protocol.RECONNECT_MAX_S
    assert protocol.MAX_HEADER_BYTES < protocol.MAX_MESSAGE_BYTES
    assert all(limit <= protocol.MAX_MESSAGE_BYTES for limit in protocol.MAX_HEADER_BYTES_BY_KIND.values())
    assert protocol.CONTENT_TYPES == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                                      "avif": "image/avif"}


# ---- item groups: many batch items in one JOB, one answer each in one RESULT ----------------

GROUP_JOB: dict[str, Any] = {
    "job": "grp/1", "steps": [{"op": "invert"}], "timeoutS": 60.0, "itemTimeoutS": 10.0,
    "output": {"format": "webp", "quality": 80, "background": "#000000"},
    "items": [{"input": "https://s3/in/a?sig=1", "output": "https://s3/out/a?sig=2", "headers": {"Content-Type": "image/webp"}},
              {"input": "https://s3/in/b?sig=3", "output": "https://s3/out/b?sig=4", "headers": {}}],
}
GROUP_RESULT: dict[str, Any] = {
    "job": "grp/1", "timing": {}, "device": "cpu",
    "items": [{"output": {"bytes": 10, "width": 8, "height": 4, "sha256": "ab" * 32, "format": "webp"},
               "timing": {"downloadMs": 2.0, "gpuMs": 1.5}, "input": {"width": 8, "height": 4}},
              {"code": "invalid_input", "message": "not an image"}],
}


def test_group_job_round_trips_with_its_items() -> None:
    body = decode(encode(Kind.JOB, GROUP_JOB)).body
    assert isinstance(body, protocol.JobRequest)
    assert [i.input_url for i in body.items] == ["https://s3/in/a?sig=1", "https://s3/in/b?sig=3"]
    assert body.items[0].output_headers == {"Content-Type": "image/webp"} and body.item_timeout_s == 10.0
    assert body.output.format == "webp" and body.output.quality == 80 and body.output.options == {"background": "#000000"}
    again = decode(encode(body)).body
    assert again == body and "input" not in decode(encode(body)).header


def test_group_result_answers_each_item_in_order() -> None:
    body = decode(encode(Kind.RESULT, GROUP_RESULT)).body
    assert isinstance(body, protocol.Result) and body.output is None
    ok, bad = body.items
    assert ok.ok and ok.output is not None and ok.output.format == "webp" and ok.timing.worker_ms == 3.5
    assert (ok.input_width, ok.input_height) == (8, 4)
    assert not bad.ok and bad.code is ErrorCode.INVALID_INPUT and bad.message == "not an image"
    assert decode(encode(body)).body == body


def test_group_item_messages_are_cut_so_64_answers_fit_a_result() -> None:
    answers = [{"code": "timeout", "message": "x" * 50_000}] * protocol.MAX_GROUP_ITEMS
    header = {"job": "grp/1", "timing": {}, "items": answers}
    with pytest.raises(ProtocolError, match="exceeds"):  # a worker must cut them itself
        decode(encode(Kind.RESULT, header))
    cut = {"job": "grp/1", "timing": {}, "items": [{"code": "timeout", "message": "x" * protocol.MAX_ITEM_TEXT}]
           * protocol.MAX_GROUP_ITEMS}
    body = decode(encode(Kind.RESULT, cut)).body
    assert len(body.items) == protocol.MAX_GROUP_ITEMS


@pytest.mark.parametrize(("change", "fragment"), [
    ({"items": []}, "items: expected a list of 1 to"),
    ({"items": [GROUP_JOB["items"][0]] * (protocol.MAX_GROUP_ITEMS + 1)}, "items: expected a list of 1 to"),
    ({"items": ["https://s3/in/a"]}, "items: expected maps"),
    ({"items": [{"input": "https://s3/in/a"}]}, "output: expected a string"),
    ({"items": [{"input": "", "output": "https://s3/out/a"}]}, "input: expected a string"),
    ({"items": [{"input": "https://a", "output": "https://b", "headers": {"a": 1}}]}, "items.headers"),
    ({"itemTimeoutS": float("nan")}, "itemTimeoutS"),
])
def test_malformed_group_jobs_are_refused(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(encode(Kind.JOB, {**GROUP_JOB, **change}))
    assert fragment in str(caught.value)


@pytest.mark.parametrize(("items", "fragment"), [
    ([], "items: expected a list of 1 to"),
    ([{"code": "bogus", "message": "x"}], "unknown error code"),
    ([{"code": "oom"}], "items.message"),
    ([{"output": {"bytes": 1, "width": 1, "height": 1, "sha256": "zz", "format": "png"}, "timing": {}}], "sha256"),
    ([{"output": {"bytes": 1, "width": 1, "height": 1, "sha256": "ab" * 32, "format": "png"},
       "timing": {"gpuMs": float("inf")}}], "timing.gpuMs"),
    (["ok"], "items: expected maps"),
])
def test_malformed_group_results_are_refused(items: list[Any], fragment: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(encode(Kind.RESULT, {"job": "grp/1", "timing": {}, "items": items}))
    assert fragment in str(caught.value)
