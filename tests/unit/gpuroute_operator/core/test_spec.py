"""ImageJob spec validation: every refusal names its field and its reason."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from gpuroute_operator.core.spec import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    MAX_INLINE_BYTES,
    MAX_PLACEMENT_NAMES,
    JobSpec,
    Placement,
    SpecError,
    StorageURI,
    parse_job_spec,
    parse_storage_uri,
)


def spec(**overrides: Any) -> dict[str, Any]:
    base = {"input": {"uri": "s3://bucket-a/in/x.png"}, "output": {"uri": "s3://bucket-a/out/x.png"},
            "steps": [{"op": "blur", "radius": 2}]}
    base.update(overrides)
    return base


def refusal(value: Any) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_job_spec(value)
    return caught.value


def test_defaults() -> None:
    parsed = parse_job_spec(spec())
    assert parsed.input_uri == StorageURI("s3", "bucket-a", "in/x.png")
    assert parsed.input_url is None and parsed.inline is None
    assert parsed.output == StorageURI("s3", "bucket-a", "out/x.png")
    assert (parsed.output_format, parsed.quality, parsed.priority) == ("png", 90, "batch")
    assert (parsed.timeout_s, parsed.max_attempts) == (DEFAULT_TIMEOUT_S, DEFAULT_MAX_ATTEMPTS) == (600, 3)
    assert parsed.placement == Placement((), (), (), "balanced")
    assert parsed.steps == ({"op": "blur", "radius": 2.0},)


def test_full_spec() -> None:
    parsed = parse_job_spec({
        "input": {"uri": "azure://acct1/photos/a/b.png"},
        "output": {"uri": "s3://results.example/team-a/out.webp", "format": "webp", "quality": 75},
        "steps": [{"op": "upscale", "method": "model", "model": "x4"}, {"op": "sharpen", "percent": 80}],
        "priority": "realtime",
        "timeoutSeconds": 30,
        "maxAttempts": 5,
        "placement": {"pools": ["gpu-a", "gpu-b"], "clouds": ["aws"], "regions": ["eu-west-1"],
                      "strategy": "fastest"},
    })
    assert parsed == JobSpec(
        input_uri=StorageURI("azure", "acct1/photos", "a/b.png"),
        input_url=None,
        inline=None,
        output=StorageURI("s3", "results.example", "team-a/out.webp"),
        output_format="webp",
        quality=75,
        steps=({"op": "upscale", "scale": None, "width": None, "height": None, "method": "model", "model": "x4"},
               {"op": "sharpen", "radius": 2.0, "percent": 80, "threshold": 3}),
        priority="realtime",
        timeout_s=30,
        max_attempts=5,
        placement=Placement(("gpu-a", "gpu-b"), ("aws",), ("eu-west-1",), "fastest"),
        cost_class="upscale(method=model,model=x4)>sharpen(radius=2)",
        input_pixels=None,
    )
    assert parsed.input_uri is not None and parsed.input_uri.uri == "azure://acct1/photos/a/b.png"


def test_https_input_is_kept_as_input_url() -> None:
    parsed = parse_job_spec(spec(input={"uri": "https://img.example.com/a.png?x=1"}))
    assert parsed.input_url == "https://img.example.com/a.png?x=1"
    assert parsed.input_uri is None and parsed.inline is None


def test_inline_input() -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    parsed = parse_job_spec(spec(input={"inline": base64.b64encode(data).decode()}))
    assert parsed.inline == data
    assert parsed.input_uri is None and parsed.input_url is None
    assert parsed.input_pixels is None  # not a readable header: the router uses the typical size


def test_inline_input_size_is_read_from_its_header() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 80)).save(buffer, format="JPEG")
    parsed = parse_job_spec(spec(input={"inline": base64.b64encode(buffer.getvalue()).decode()}))
    assert parsed.input_pixels == 120 * 80
    assert parse_job_spec(spec()).input_pixels is None  # a URI: unknown until the worker reads it


def test_inline_at_the_limit_is_accepted() -> None:
    data = b"\x01" * MAX_INLINE_BYTES
    assert MAX_INLINE_BYTES == 256 * 1024
    assert parse_job_spec(spec(input={"inline": base64.b64encode(data).decode()})).inline == data


def test_inline_over_the_limit_is_input_too_large() -> None:
    err = refusal(spec(input={"inline": base64.b64encode(b"x" * (MAX_INLINE_BYTES + 1)).decode()}))
    assert (err.field, err.reason) == ("spec.input.inline", "InputTooLarge")
    assert err.message == f"decodes to {MAX_INLINE_BYTES + 1} bytes, limit is {MAX_INLINE_BYTES}"


@pytest.mark.parametrize("value", [None, [], "spec"])
def test_spec_itself_required(value: Any) -> None:
    err = refusal(value)
    assert (err.field, err.message, err.reason) == ("spec", "is required", "InvalidSpec")


@pytest.mark.parametrize(("overrides", "field", "fragment"), [
    ({"input": None}, "spec.input", "is required: set `uri` or `inline`"),
    ({"input": "s3://bucket-a/x"}, "spec.input", "is required"),
    ({"input": {}}, "spec.input", "set exactly one of `uri` and `inline`"),
    ({"input": {"uri": "s3://bucket-a/x", "inline": "AAAA"}}, "spec.input", "set exactly one of `uri` and `inline`"),
    ({"input": {"inline": "not base64!"}}, "spec.input.inline", "is not valid base64"),
    ({"input": {"inline": "AAA"}}, "spec.input.inline", "is not valid base64"),
    ({"input": {"inline": 1234}}, "spec.input.inline", "must be a base64 string"),
    ({"input": {"inline": ""}}, "spec.input.inline", "is empty"),
    ({"input": {"uri": 5}}, "spec.input.uri", "must be a string"),
    ({"input": {"uri": "gs://bucket/x"}}, "spec.input.uri", "'gs://bucket/x' is not s3://bucket/key"),
    ({"input": {"uri": "http://img.example.com/a.png"}}, "spec.input.uri", "is not s3://bucket/key"),
    ({"input": {"uri": "s3://bucket-a"}}, "spec.input.uri", "is not s3://"),
    ({"input": {"uri": "s3://bucket-a/"}}, "spec.input.uri", "is not s3://"),
    ({"input": {"uri": "s3://ab/x"}}, "spec.input.uri", "is not s3://"),             # bucket too short
    ({"input": {"uri": "s3://" + "b" * 64 + "/x"}}, "spec.input.uri", "is not s3://"),  # bucket too long
    ({"input": {"uri": "s3://-bucket/x"}}, "spec.input.uri", "is not s3://"),
    ({"input": {"uri": "azure://acct1/photos"}}, "spec.input.uri", "is not s3://"),   # no blob
    ({"input": {"uri": "azure://ACCT1/photos/x"}}, "spec.input.uri", "is not s3://"),  # upper-case account
    ({"input": {"uri": "azure://ab/photos/x"}}, "spec.input.uri", "is not s3://"),     # account too short
    ({"input": {"uri": "azure://acct1/ph_otos/x"}}, "spec.input.uri", "is not s3://"),
    ({"output": None}, "spec.output.uri", "is required"),
    ({"output": {}}, "spec.output.uri", "is required"),
    ({"output": {"uri": 3}}, "spec.output.uri", "is required"),
    ({"output": {"uri": "s3://Bad_Bucket/x"}}, "spec.output.uri", "is not s3://bucket/key"),
    ({"output": {"uri": "https://example.com/out.png"}}, "spec.output.uri", "is not s3://bucket/key"),
    ({"output": {"uri": "s3://bucket-a/x", "format": "gif"}}, "spec.output.format",
     "must be one of png, jpeg, webp, avif; got 'gif'"),
    ({"output": {"uri": "s3://bucket-a/x", "format": "PNG"}}, "spec.output.format", "must be one of"),
    ({"output": {"uri": "s3://bucket-a/x", "quality": 0}}, "spec.output.quality",
     "must be an integer from 1 to 100, got 0"),
    ({"output": {"uri": "s3://bucket-a/x", "quality": 101}}, "spec.output.quality", "from 1 to 100, got 101"),
    ({"output": {"uri": "s3://bucket-a/x", "quality": 90.0}}, "spec.output.quality", "got 90.0"),
    ({"output": {"uri": "s3://bucket-a/x", "quality": True}}, "spec.output.quality", "got True"),
    ({"output": {"uri": "s3://bucket-a/x", "quality": "90"}}, "spec.output.quality", "got '90'"),
    ({"priority": "urgent"}, "spec.priority", "must be one of realtime, batch; got 'urgent'"),
    ({"timeoutSeconds": 0}, "spec.timeoutSeconds", "must be an integer from 1 to 86400, got 0"),
    ({"timeoutSeconds": 86401}, "spec.timeoutSeconds", "from 1 to 86400"),
    ({"timeoutSeconds": "60"}, "spec.timeoutSeconds", "got '60'"),
    ({"maxAttempts": 0}, "spec.maxAttempts", "must be an integer from 1 to 10, got 0"),
    ({"maxAttempts": 11}, "spec.maxAttempts", "from 1 to 10, got 11"),
    ({"maxAttempts": False}, "spec.maxAttempts", "got False"),
    ({"placement": "fast"}, "spec.placement", "must be an object"),
    ({"placement": {"regions": "eu"}}, "spec.placement.regions", "must be a list of non-empty strings"),
    ({"placement": {"pools": ["a", ""]}}, "spec.placement.pools", "must be a list of non-empty strings"),
    ({"placement": {"clouds": ["aws", 1]}}, "spec.placement.clouds", "must be a list of non-empty strings"),
    ({"placement": {"pools": [f"p{i}" for i in range(33)]}}, "spec.placement.pools",
     "must hold at most 32 names, got 33"),
    ({"placement": {"clouds": ["aws"] * 20_000}}, "spec.placement.clouds", "must hold at most 32 names, got 20000"),
    ({"placement": {"regions": ["eu-west-1", "r" * 64]}}, "spec.placement.regions",
     "[1] must be at most 63 characters, got 64"),
    ({"placement": {"pools": ["p" * 254]}}, "spec.placement.pools", "[0] must be at most 253 characters, got 254"),
    ({"placement": {"strategy": "random"}}, "spec.placement.strategy",
     "must be one of fastest, cheapest, balanced; got 'random'"),
    ({"steps": None}, "spec.steps", "must be a list of steps"),
    ({"steps": []}, "spec.steps", "must hold 1 to 16 steps, got 0"),
    ({"steps": [{"op": "blur", "radius": 99}]}, "spec.steps[0].radius", "must be at most 50, got 99"),
    ({"steps": [{"op": "blur"}, {"op": "warp"}]}, "spec.steps[1].op", "unknown op 'warp'"),
    ({"steps": [{"op": "blur"}, {"op": "denoise", "size": 4}]}, "spec.steps[1].size", "must be odd, got 4"),
])
def test_refusals_name_the_field(overrides: dict[str, Any], field: str, fragment: str) -> None:
    err = refusal(spec(**overrides))
    assert err.field == field
    assert err.reason == "InvalidSpec"
    assert fragment in err.message
    assert str(err) == f"{field}: {err.message}"


def test_first_bad_field_wins() -> None:
    # input is checked before output, output before steps.
    err = refusal({"input": {}, "output": {}, "steps": []})
    assert err.field == "spec.input"
    err = refusal(spec(output={}, steps=[]))
    assert err.field == "spec.output.uri"


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://bucket-a/k", StorageURI("s3", "bucket-a", "k")),
    ("s3://my.bucket.1/a/b/c.png", StorageURI("s3", "my.bucket.1", "a/b/c.png")),
    ("azure://account1/container-2/dir/blob.jpg", StorageURI("azure", "account1/container-2", "dir/blob.jpg")),
])
def test_parse_storage_uri(uri: str, expected: StorageURI) -> None:
    parsed = parse_storage_uri(uri, "f")
    assert parsed == expected
    assert parsed.uri == uri


def test_parse_storage_uri_error_names_the_given_field() -> None:
    with pytest.raises(SpecError) as caught:
        parse_storage_uri("nope", "spec.some.field")
    assert caught.value.field == "spec.some.field"
    assert caught.value.reason == "InvalidSpec"


def test_spec_error_is_a_value_error_with_custom_reason() -> None:
    err = SpecError("spec.x", "bad", "Custom")
    assert isinstance(err, ValueError)
    assert (err.field, err.message, err.reason, str(err)) == ("spec.x", "bad", "Custom", "spec.x: bad")


def test_placement_lists_at_their_limits_are_accepted() -> None:
    placement = {"pools": [f"{i:0253d}" for i in range(MAX_PLACEMENT_NAMES)],
                 "clouds": ["c" * 63] * MAX_PLACEMENT_NAMES, "regions": ["r" * 63] * MAX_PLACEMENT_NAMES}
    parsed = parse_job_spec(spec(placement=placement)).placement
    assert (len(parsed.pools), len(parsed.clouds), len(parsed.regions)) == (MAX_PLACEMENT_NAMES,) * 3
