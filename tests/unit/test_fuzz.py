"""Property-based fuzzing of every parser that reads attacker-controlled input.

Each target gets random and mutated inputs from hypothesis; the only exception allowed
is the target's documented error type (anything else is a crash), and hypothesis'
`deadline` bounds each input's time (a slow input is a hang). Each outcome is checked
too: an input is either refused with that error, naming what is wrong, or accepted as a
value that keeps the target's own guarantees (a decoded message re-encodes to itself, a
parsed spec is within its limits, a decoded image within its pixel budget). The number
of inputs tried per target is printed at the end (`pytest -s`) and asserted.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuroute import netguard, protocol
from gpuroute_operator.core import grants
from gpuroute_operator.core.spec import SpecError, parse_job_spec

FUZZ = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: dict[str, int] = {}


def _tried(target: str) -> None:
    TRIED[target] = TRIED.get(target, 0) + 1


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

_TINY_PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")).decode()
VALID_SPEC: dict[str, Any] = {
    "input": {"uri": "s3://datasets/team-a/in.png"},
    "output": {"uri": "s3://results/team-a/out.png", "format": "jpeg", "quality": 80},
    "steps": [{"op": "resize", "width": 64, "height": 64}],
    "priority": "realtime", "timeoutSeconds": 60, "maxAttempts": 2,
    "placement": {"pools": ["a"], "strategy": "fastest"},
}


@st.composite
def mutated_spec(draw: st.DrawFn) -> Any:
    spec: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in VALID_SPEC.items()}
    if draw(st.booleans()):
        spec["input"] = {"inline": draw(st.sampled_from([_TINY_PNG, "", "!!", _TINY_PNG[:-4]]))}
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(["top", "input", "output", "placement"]))
        key = draw(st.sampled_from(["uri", "inline", "format", "quality", "steps", "priority", "timeoutSeconds",
                                    "maxAttempts", "pools", "strategy", "background", "keepMetadata", "input",
                                    "output", "placement"]))
        value = draw(json_like)
        target = spec if section == "top" else spec.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
    return spec


@FUZZ
@given(spec=st.one_of(json_like, mutated_spec()))
def test_fuzz_parse_job_spec(spec: Any) -> None:
    _tried("parse_job_spec")
    try:
        parsed = parse_job_spec(spec)
    except SpecError as exc:
        # Refused, naming the field: that is what the Failed status and Event show.
        assert exc.field.startswith("spec") and exc.message, (exc.field, exc.message)
        assert str(exc) == f"{exc.field}: {exc.message}"
        return
    assert isinstance(spec, dict)
    assert parsed.steps and parsed.timeout_s > 0 and parsed.max_attempts >= 1
    assert parsed.priority in ("realtime", "batch")
    assert parsed.output_format in ("png", "jpeg", "webp")
    assert (parsed.input_uri is not None) + (parsed.input_url is not None) + (parsed.inline is not None) == 1


@FUZZ
@given(uri=st.one_of(st.text(max_size=80), st.from_regex(r"(s3|azure|https)://[a-zA-Z0-9.%/\\:@#?;-]{0,60}")),
       prefixes=st.lists(st.one_of(st.text(max_size=40),
                                   st.from_regex(r"(s3|azure|https)://[a-z0-9./%-]{0,30}")), max_size=3))
def test_fuzz_grant_matcher(uri: str, prefixes: list[str]) -> None:
    _tried("grant matcher")
    assert isinstance(grants.allowed(uri, prefixes), bool)
    try:
        grants.normalise(uri)
    except grants.UnsafeURI:
        pass


@FUZZ
@given(url=st.one_of(st.text(max_size=80), st.from_regex(r"https://[a-zA-Z0-9.\[\]:@%\\/?#-]{0,60}"),
                     st.builds(lambda h, p: f"https://{h}{p}", st.ip_addresses().map(str), st.text(max_size=20))))
def test_fuzz_url_guard_parsing(url: str) -> None:
    # Parsing only: no DNS (resolution is exercised against fixed addresses elsewhere).
    _tried("url guard")
    try:
        host, port, target = netguard._parse(url)
    except netguard.UnsafeURL:
        return
    assert host and 0 < port < 65536 and target.startswith("/")


@FUZZ
@given(address=st.one_of(st.ip_addresses().map(str), st.text(max_size=40)))
def test_fuzz_address_rule(address: str) -> None:
    _tried("address rule")
    assert isinstance(netguard.is_public_address(address), bool)


def _frames() -> st.SearchStrategy[list[bytes]]:
    kinds = st.one_of(st.sampled_from([k.value if isinstance(k.value, bytes) else str(k.value).encode()
                                       for k in protocol.Kind]), st.binary(max_size=8))
    headers = st.one_of(st.binary(max_size=200), json_like.map(lambda v: msgpack.packb(v, use_bin_type=True)))
    return st.lists(st.one_of(kinds, headers, st.binary(max_size=64)), min_size=0, max_size=4) | \
        st.tuples(kinds, headers).map(list) | st.tuples(kinds, headers, st.binary(max_size=64)).map(list)


_VALID_BODIES = (
    protocol.Ready(pool="p", worker="w", capacity=2, device="cuda:0", jobs=(protocol.AttemptId("u", 1),)),
    protocol.Heartbeat(ping=1.5, rtt_ms=3.0),
    protocol.Accepted(protocol.AttemptId("u", 2)),
    protocol.Error(protocol.AttemptId("u", 1), protocol.ErrorCode.OOM, "out of memory"),
    protocol.Cancel(protocol.AttemptId("u", 3)),
    protocol.Disconnect("bye"),
)


@st.composite
def _edited_valid_frames(draw: st.DrawFn) -> list[bytes]:
    """A valid message with some header fields replaced, dropped or added: near misses, so
    that the accepting side of decode is exercised as much as the refusing one."""
    kind, header = protocol.encode(draw(st.sampled_from(_VALID_BODIES)))
    fields = msgpack.unpackb(header, raw=False)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.one_of(st.sampled_from(sorted(fields) or ["x"]), st.text(max_size=6)))
        if draw(st.booleans()):
            fields[key] = draw(json_like)
        else:
            fields.pop(key, None)
    return [kind, msgpack.packb(fields, use_bin_type=True)]


@FUZZ
@given(frames=st.one_of(_frames(), _edited_valid_frames()))
def test_fuzz_protocol_decode(frames: list[bytes]) -> None:
    _tried("protocol.decode")
    try:
        message = protocol.decode(frames)
    except protocol.ProtocolError as exc:
        assert str(exc), "a refusal says why (it is logged and counted as malformed)"
        return
    # Accepted: a whole, typed message of the kind its first frame names, which reads the
    # same once written again (nothing in it was half-parsed or ignored into a default).
    assert isinstance(message.kind, protocol.Kind) and message.kind.value == bytes(frames[0])
    assert type(message.body) is protocol.BODY_TYPES[message.kind]
    again = protocol.decode(protocol.encode(message.body, payload=message.payload))
    assert again.body == message.body and again.payload == message.payload


def _tiny_images() -> list[bytes]:
    from PIL import Image

    out = []
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (3, 2), (10, 20, 30)).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_tiny_images())))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:position + draw(st.integers(1, 16))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@pytest.fixture(scope="module")
def warm_codec() -> None:
    # The first decode imports the image libraries (about a second): not a hang of any input.
    from gpuroute_worker.codec import decode_image

    decode_image(_tiny_images()[0], max_bytes=1 << 20, max_pixels=1 << 20)


@pytest.mark.usefixtures("warm_codec")
@FUZZ
@given(data=st.one_of(st.binary(max_size=256), mutated_image()), keep=st.booleans())
def test_fuzz_decode_image(data: bytes, keep: bool) -> None:
    from gpuroute_worker.codec import DecodeError, decode_image

    _tried("decode_image")
    try:
        decoded = decode_image(data, max_bytes=1 << 20, max_pixels=1 << 20, keep_metadata=keep)
    except DecodeError as exc:
        assert str(exc), "a refusal says why (it is the job's InvalidInput message)"
        return
    width, height = decoded.image.size
    assert 0 < width * height <= 1 << 20
    assert decoded.image.mode in ("L", "LA", "RGB", "RGBA", "I;16")
    assert keep or (decoded.icc is None and decoded.exif is None)


@pytest.mark.usefixtures("warm_codec")
def test_zz_fuzz_counts() -> None:
    # Runs every target itself (whatever ran before, or did not), so that it never passes
    # vacuously: each must really have tried many inputs.
    TRIED.clear()
    for target in (test_fuzz_parse_job_spec, test_fuzz_grant_matcher, test_fuzz_url_guard_parsing,
                   test_fuzz_address_rule, test_fuzz_protocol_decode, test_fuzz_decode_image):
        target()
    print("\nfuzz inputs tried (0 crashes, 0 hangs):", ", ".join(f"{k}={v}" for k, v in sorted(TRIED.items())))
    assert set(TRIED) == {"parse_job_spec", "grant matcher", "url guard", "address rule", "protocol.decode",
                          "decode_image"}
    assert min(TRIED.values()) >= 100, TRIED
