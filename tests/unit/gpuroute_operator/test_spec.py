"""ImageJob spec validation: every refusal names its field."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from gpuroute_operator.spec import MAX_INLINE_BYTES, SpecError, parse_job_spec


def spec(**overrides: Any) -> dict[str, Any]:
    base = {"input": {"uri": "s3://bucket-a/in/x.png"}, "output": {"uri": "s3://bucket-a/out/x.png"},
            "steps": [{"op": "blur", "radius": 2}]}
    base.update(overrides)
    return base


def test_full_spec_with_defaults() -> None:
    parsed = parse_job_spec(spec())
    assert parsed.input_uri is not None and parsed.input_uri.uri == "s3://bucket-a/in/x.png"
    assert (parsed.output_format, parsed.quality, parsed.priority) == ("png", 90, "batch")
    assert (parsed.timeout_s, parsed.max_attempts, parsed.placement.strategy) == (600, 3, "balanced")
    assert parsed.steps == ({"op": "blur", "radius": 2.0},)


def test_azure_https_and_inline_inputs() -> None:
    azure = parse_job_spec(spec(input={"uri": "azure://acct1/photos/a/b.png"}))
    assert azure.input_uri is not None and (azure.input_uri.scheme, azure.input_uri.container) == ("azure", "acct1/photos")
    assert parse_job_spec(spec(input={"uri": "https://img.example.com/a.png"})).input_url == "https://img.example.com/a.png"
    inline = parse_job_spec(spec(input={"inline": base64.b64encode(b"\x89PNG data").decode()}))
    assert inline.inline == b"\x89PNG data"


@pytest.mark.parametrize(("overrides", "field", "reason"), [
    ({"input": None}, "spec.input", "InvalidSpec"),
    ({"input": {"uri": "s3://bucket-a/x", "inline": "AAAA"}}, "spec.input", "InvalidSpec"),
    ({"input": {"inline": "not base64!"}}, "spec.input.inline", "InvalidSpec"),
    ({"input": {"inline": base64.b64encode(b"x" * (MAX_INLINE_BYTES + 1)).decode()}}, "spec.input.inline", "InputTooLarge"),
    ({"input": {"uri": "gs://bucket/x"}}, "spec.input.uri", "InvalidSpec"),
    ({"output": {"uri": "s3://Bad_Bucket/x"}}, "spec.output.uri", "InvalidSpec"),
    ({"output": {"uri": "s3://bucket-a/x", "format": "gif"}}, "spec.output.format", "InvalidSpec"),
    ({"output": {"uri": "s3://bucket-a/x", "quality": 0}}, "spec.output.quality", "InvalidSpec"),
    ({"priority": "urgent"}, "spec.priority", "InvalidSpec"),
    ({"timeoutSeconds": 0}, "spec.timeoutSeconds", "InvalidSpec"),
    ({"maxAttempts": 11}, "spec.maxAttempts", "InvalidSpec"),
    ({"placement": {"regions": "eu"}}, "spec.placement.regions", "InvalidSpec"),
    ({"placement": {"strategy": "random"}}, "spec.placement.strategy", "InvalidSpec"),
    ({"steps": []}, "spec.steps", "InvalidSpec"),
    ({"steps": [{"op": "blur", "radius": 99}]}, "spec.steps[0].radius", "InvalidSpec"),
    ({"steps": [{"op": "blur"}, {"op": "warp"}]}, "spec.steps[1].op", "InvalidSpec"),
])
def test_refusals_name_the_field(overrides: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_job_spec(spec(**overrides))
    assert caught.value.field == field
    assert caught.value.reason == reason
    assert str(caught.value).startswith(f"{field}: ")
