"""Admission (pure): single jobs and batches read metadata and status the same way."""

from __future__ import annotations

from typing import Any

import pytest

from gpuroute_operator.core import admission
from gpuroute_operator.core.admission import Admitted, BatchAdmitted, Ended, Refused
from gpuroute_operator.core.grants import StorageGrants

NOW = 1_800_000_000.0
GRANTS = StorageGrants(("s3://photos/in/",), ("s3://photos/out/",))
BATCH = {"input": {"prefix": "s3://photos/in/"}, "output": {"prefix": "s3://photos/out/"}, "steps": [{"op": "invert"}]}
SINGLE = {"input": {"uri": "s3://photos/in/a.png"}, "output": {"uri": "s3://photos/out/a.png"},
          "steps": [{"op": "invert"}]}


def _body(spec: dict[str, Any], *, generation: Any = 2, status: Any = None, cancel: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "j", "namespace": "team", "uid": "u-1", "generation": generation}
    if cancel:
        meta["annotations"] = {admission.CANCEL_ANNOTATION: "true"}
    body: dict[str, Any] = {"metadata": meta, "spec": spec}
    if status is not None:
        body["status"] = status
    return body


def test_a_batch_is_admitted_with_its_generation_and_first_queue_time() -> None:
    outcome = admission.admit_batch(_body(BATCH, status={"phase": "Processing",
                                                         "timing": {"queuedAt": "2027-01-15T07:00:00Z"}}), GRANTS, NOW)
    assert isinstance(outcome, BatchAdmitted)
    assert outcome.ref.name == "j" and outcome.generation == 2 and outcome.resumed and outcome.cancel is None
    assert outcome.queued_at == NOW - 3600 and outcome.spec.output_prefix.uri == "s3://photos/out/"
    fresh = admission.admit_batch(_body(BATCH, cancel=True), GRANTS, NOW)
    assert isinstance(fresh, BatchAdmitted) and not fresh.resumed and fresh.queued_at == NOW
    assert fresh.cancel is not None and admission.CANCEL_ANNOTATION in fresh.cancel


@pytest.mark.parametrize("generation", ["seven", [1], {"a": 1}, None])
@pytest.mark.parametrize("spec", [BATCH, SINGLE])
def test_a_bad_generation_reads_as_one_for_both_kinds(generation: Any, spec: dict[str, Any]) -> None:
    body = _body(spec, generation=generation)
    outcome = admission.admit_batch(body, GRANTS, NOW) if spec is BATCH else admission.admit(body, GRANTS, NOW)
    assert isinstance(outcome, BatchAdmitted | Admitted)
    assert (outcome.generation if isinstance(outcome, BatchAdmitted) else outcome.job.generation) == 1


@pytest.mark.parametrize("status", ["garbage", {"timing": "x", "phase": 3}, {"phase": "Processing", "timing": None}])
def test_a_malformed_status_does_not_stop_a_batch_admission(status: Any) -> None:
    assert isinstance(admission.admit_batch(_body(BATCH, status=status), GRANTS, NOW), BatchAdmitted)


def test_an_ended_batch_is_not_run_again() -> None:
    body = _body(BATCH, status={"phase": "Failed", "reason": "ItemsFailed", "message": "2 failed",
                                "timing": {"completedAt": "2027-01-15T08:00:00Z"}})
    assert admission.is_ended(body)
    outcome = admission.admit_batch(body, GRANTS, NOW)
    assert isinstance(outcome, Ended) and outcome.event.reason == "ItemsFailed" and outcome.event.warning
    assert not admission.is_ended(_body(BATCH, status={"phase": "Processing"}))


@pytest.mark.parametrize(("spec", "field", "reason"), [
    ({**BATCH, "input": {"prefix": "s3://photos/secret/"}}, "spec.input.prefix", "StorageNotGranted"),
    ({**BATCH, "input": {"list": "s3://photos/secret/list.txt"}}, "spec.input.list", "StorageNotGranted"),
    ({**BATCH, "output": {"prefix": "s3://photos/elsewhere/"}}, "spec.output.prefix", "StorageNotGranted"),
    ({**BATCH, "itemTimeoutSeconds": 0}, "spec.itemTimeoutSeconds", "InvalidSpec"),
])
def test_a_refused_batch_names_the_field(spec: dict[str, Any], field: str, reason: str) -> None:
    outcome = admission.admit_batch(_body(spec, generation="bad"), GRANTS, NOW)
    assert isinstance(outcome, Refused)
    assert outcome.status["phase"] == "Failed" and outcome.status["reason"] == reason
    assert outcome.status["observedGeneration"] == 1 and field in outcome.status["message"]
    assert outcome.event.reason == reason and outcome.event.warning
