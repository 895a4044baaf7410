"""spec.output.background and spec.output.keepMetadata: defaults and validation."""

from __future__ import annotations

from typing import Any

import pytest

from gpuroute_operator.core.spec import SpecError, parse_job_spec


def _spec(**output: Any) -> dict[str, Any]:
    return {"input": {"uri": "s3://bucket-a/in.png"}, "output": {"uri": "s3://bucket-a/out.jpg", **output},
            "steps": [{"op": "invert"}]}


def test_defaults_are_white_and_no_metadata() -> None:
    parsed = parse_job_spec(_spec())
    assert (parsed.background, parsed.keep_metadata) == ("#ffffff", False)


def test_values_are_parsed() -> None:
    parsed = parse_job_spec(_spec(format="jpeg", background="#10A0ff", keepMetadata=True))
    assert (parsed.background, parsed.keep_metadata) == ("#10a0ff", True)


@pytest.mark.parametrize(("output", "field"), [
    ({"background": "white"}, "spec.output.background"),
    ({"background": "#ffffff00"}, "spec.output.background"),
    ({"background": 16777215}, "spec.output.background"),
    ({"keepMetadata": "yes"}, "spec.output.keepMetadata"),
    ({"keepMetadata": 1}, "spec.output.keepMetadata"),
])
def test_bad_values_name_their_field(output: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_job_spec(_spec(**output))
    assert caught.value.field == field
