"""The operator's Job record: phases, rendered status, and RFC 3339 parsing."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from gpuroute_operator.core.jobs import Job, failed_status
from gpuroute_operator.core.phases import Phase, TransitionError
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import parse_job_spec
from gpuroute_operator.core.timestamps import parse_rfc3339

QUEUED_AT = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_job(**spec_overrides: Any) -> Job:
    spec = {"input": {"uri": "s3://bucket-a/in.png"}, "output": {"uri": "s3://bucket-a/out.png"},
            "steps": [{"op": "invert"}], "timeoutSeconds": 120, "priority": "realtime"}
    spec.update(spec_overrides)
    return Job(uid="uid-1", namespace="team-a", name="job-1", generation=2, spec=parse_job_spec(spec),
               queued_at=QUEUED_AT)


def _is_recent_rfc3339(value: str) -> bool:
    parsed = parse_rfc3339(value)
    return value.endswith("Z") and parsed is not None and abs(parsed - dt.datetime.now(dt.UTC).timestamp()) < 60


def test_properties() -> None:
    job = make_job()
    assert job.priority == "realtime"
    assert job.deadline == QUEUED_AT + 120
    assert job.ref == ObjectRef("ImageJob", "job-1", "team-a", "uid-1")
    assert str(job.current_attempt) == "uid-1/1"   # before the first dispatch: the one to come
    job.attempts = 3
    assert str(job.current_attempt) == "uid-1/3"
    assert job.phase is Phase.QUEUED


def test_fresh_status() -> None:
    status = make_job().status()
    assert status == {
        "phase": "Queued", "reason": "", "message": "", "attempts": 0, "pool": "", "worker": "", "gpu": "",
        "decision": "", "timing": {"queuedAt": "2026-01-01T00:00:00.000Z"}, "conditions": [],
        "observedGeneration": 2,
    }


def test_move_updates_phase_reason_and_conditions() -> None:
    job = make_job()
    job.move(Phase.DISPATCHED, at=QUEUED_AT + 1, reason="Dispatched", message="to gpu-a/w1")
    assert (job.phase, job.reason, job.message) == (Phase.DISPATCHED, "Dispatched", "to gpu-a/w1")
    by_type = {c["type"]: c for c in job.conditions}
    assert by_type["Dispatched"]["status"] == "True"
    assert by_type["Succeeded"]["status"] == "Unknown"
    assert all(c["observedGeneration"] == 2 for c in job.conditions)
    # The transition time is the clock the caller passes, never the wall clock read here.
    assert all(c["lastTransitionTime"] == "2026-01-01T00:00:01.000Z" for c in job.conditions)
    first_failed_time = by_type["Failed"]["lastTransitionTime"]

    job.move(Phase.PROCESSING, at=QUEUED_AT + 1)
    job.move(Phase.COMPLETED, at=QUEUED_AT + 1, reason="Succeeded", message="done")
    by_type = {c["type"]: c for c in job.conditions}
    assert by_type["Succeeded"]["status"] == "True"
    assert by_type["Succeeded"]["reason"] == "Succeeded"
    assert by_type["Failed"]["lastTransitionTime"] == first_failed_time  # never changed status
    assert job.status()["phase"] == "Completed"
    assert job.status()["conditions"] == job.conditions


def test_move_refuses_forbidden_transitions_and_leaves_the_job_alone() -> None:
    job = make_job()
    job.move(Phase.FAILED, at=QUEUED_AT + 1, reason="Timeout", message="late")
    before = (job.phase, job.reason, job.message, list(job.conditions))
    with pytest.raises(TransitionError, match="Failed cannot become Queued"):
        job.move(Phase.QUEUED, at=QUEUED_AT + 1, reason="Retry")
    assert (job.phase, job.reason, job.message, job.conditions) == before


def test_status_after_a_full_run() -> None:
    job = make_job()
    job.attempts = 2
    job.pool, job.worker, job.gpu = "gpu-a", "w1", "NVIDIA H100"
    job.decision = "pool gpu-a: est. 100 ms"
    job.dispatched_at = QUEUED_AT + 1.5
    job.started_at = QUEUED_AT + 1.625
    job.completed_at = QUEUED_AT + 2.0
    job.timing = {"totalMs": 500.0, "gpuMs": 12.5}
    job.output = {"uri": "s3://bucket-a/out.png", "width": 8, "height": 8}
    job.move(Phase.DISPATCHED, at=QUEUED_AT + 1)
    status = job.status()
    assert status["timing"] == {
        "queuedAt": "2026-01-01T00:00:00.000Z",
        "dispatchedAt": "2026-01-01T00:00:01.500Z",
        "startedAt": "2026-01-01T00:00:01.625Z",
        "completedAt": "2026-01-01T00:00:02.000Z",
        "totalMs": 500.0,
        "gpuMs": 12.5,
    }
    assert (status["pool"], status["worker"], status["gpu"], status["attempts"]) == ("gpu-a", "w1", "NVIDIA H100", 2)
    assert status["decision"] == "pool gpu-a: est. 100 ms"
    assert status["output"] == {"uri": "s3://bucket-a/out.png", "width": 8, "height": 8}
    assert status["phase"] == "Dispatched"


def test_extra_timing_overrides_rendered_times() -> None:
    job = make_job()
    job.timing = {"queuedAt": "custom"}
    assert job.status()["timing"] == {"queuedAt": "custom"}


def test_failed_status() -> None:
    status = failed_status(generation=4, reason="InvalidSpec", message="spec.steps: must be a list of steps",
                           queued_at=QUEUED_AT, now=QUEUED_AT + 1.5)
    assert status["phase"] == "Failed"
    assert (status["reason"], status["message"]) == ("InvalidSpec", "spec.steps: must be a list of steps")
    assert status["attempts"] == 0 and status["observedGeneration"] == 4
    timing = status["timing"]
    assert timing["queuedAt"] == "2026-01-01T00:00:00.000Z"
    assert timing["totalMs"] == 1500.0
    assert timing["completedAt"] == "2026-01-01T00:00:01.500Z"
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Failed"]["status"], by_type["Failed"]["reason"]) == ("True", "InvalidSpec")
    assert by_type["Failed"]["message"] == "spec.steps: must be a list of steps"
    assert by_type["Succeeded"]["status"] == "False"
    assert all(c["observedGeneration"] == 4 for c in status["conditions"])
    assert all(c["lastTransitionTime"] == timing["completedAt"] for c in status["conditions"])


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-01-01T00:00:00Z", QUEUED_AT),
    ("2026-01-01T00:00:00.000Z", QUEUED_AT),
    ("2026-01-01T00:00:01.500Z", QUEUED_AT + 1.5),
    ("2026-01-01T02:00:00+02:00", QUEUED_AT),
    ("2026-01-01T00:00:00+00:00", QUEUED_AT),
])
def test_parse_rfc3339(value: str, expected: float) -> None:
    assert parse_rfc3339(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [None, "", "yesterday", "2026-13-01T00:00:00Z", 1_767_225_600, 1.5, b"2026"])
def test_parse_rfc3339_garbage_is_none(value: Any) -> None:
    assert parse_rfc3339(value) is None


def test_rendered_times_parse_back() -> None:
    job = make_job()
    job.dispatched_at = QUEUED_AT + 0.25
    timing = job.status()["timing"]
    assert parse_rfc3339(timing["queuedAt"]) == pytest.approx(QUEUED_AT)
    assert parse_rfc3339(timing["dispatchedAt"]) == pytest.approx(QUEUED_AT + 0.25)
