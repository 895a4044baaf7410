"""Batch state (pure): counts, manifest lines, progress, ETA, resume; batch spec parsing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpuroute_operator.batch import MAX_FAILURES, BatchState, ItemOutcome, item_spec, item_uid, results_uri
from gpuroute_operator.jobs import Job
from gpuroute_operator.phases import Phase
from gpuroute_operator.spec import SpecError, StorageURI, is_batch, item_output, parse_batch_spec

STEPS = [{"op": "invert"}]


def _spec(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"input": {"prefix": "s3://photos/in/", "match": "*.jpg"},
                            "output": {"prefix": "s3://photos/out/", "format": "webp"}, "steps": STEPS}
    spec.update(extra)
    return spec


def _ok(name: str, at: float = 0.0) -> ItemOutcome:
    return ItemOutcome(input=f"s3://photos/in/{name}", output=f"s3://photos/out/{name}", ok=True, sha256="ab" * 32,
                       size=10, width=4, height=3, attempts=1, completed_at=at)


def _bad(name: str) -> ItemOutcome:
    return ItemOutcome(input=f"s3://photos/in/{name}", output="", ok=False, reason="InvalidInput", error="not an image")


def test_is_batch() -> None:
    assert is_batch(_spec())
    assert is_batch({"input": {"list": "s3://b/list.txt"}})
    assert not is_batch({"input": {"uri": "s3://b/x.png"}})
    assert not is_batch(None)


def test_parse_batch_spec_and_item_outputs() -> None:
    batch = parse_batch_spec(_spec(timeoutSeconds=3600, itemTimeoutSeconds=30, maxAttempts=2))
    assert batch.prefix == StorageURI("s3", "photos", "in/") and batch.match == "*.jpg"
    assert batch.timeout_s == 3600 and batch.item_timeout_s == 30
    assert batch.item.output_format == "webp" and batch.item.max_attempts == 2 and batch.item.timeout_s == 30
    assert item_output(batch, StorageURI("s3", "photos", "in/a/cat.jpg")).uri == "s3://photos/out/a/cat.webp"
    assert item_output(batch, StorageURI("s3", "photos", "in/noext")).uri == "s3://photos/out/noext.webp"
    assert item_output(batch, StorageURI("s3", "photos", "in/.hidden")).uri == "s3://photos/out/.hidden.webp"
    listed = parse_batch_spec({"input": {"list": "s3://photos/list.txt"}, "output": {"prefix": "s3://res/x/"},
                               "steps": STEPS, "timeoutSeconds": 20})
    assert listed.item_timeout_s == 20  # never longer than the batch
    assert item_output(listed, StorageURI("s3", "other", "deep/dir/p.jpeg")).uri == "s3://res/x/deep/dir/p.png"


@pytest.mark.parametrize(("spec", "field"), [
    (_spec(input={"prefix": "s3://photos/in"}), "spec.input.prefix"),
    (_spec(input={"prefix": "s3://photos/in/", "uri": "s3://photos/x.png"}), "spec.input"),
    (_spec(input={"list": "s3://photos/l.txt", "match": "*.png"}), "spec.input.match"),
    (_spec(input={"prefix": "s3://photos/in/", "match": "a/*.png"}), "spec.input.match"),
    (_spec(output={"uri": "s3://photos/out/x.png"}), "spec.output.prefix"),
    (_spec(output={"prefix": "s3://photos/in/sub/"}), "spec.output.prefix"),
    (_spec(itemTimeoutSeconds=0), "spec.itemTimeoutSeconds"),
    (_spec(steps=[{"op": "nope"}]), "spec.steps[0].op"),
])
def test_parse_batch_spec_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_batch_spec(spec)
    assert info.value.field == field, info.value


def test_item_uid_is_stable_and_wire_safe() -> None:
    uid = item_uid("0f8fad5b-d9cb-469f-a165-70867728950e", "s3://photos/in/a b.jpg")
    assert uid == item_uid("0f8fad5b-d9cb-469f-a165-70867728950e", "s3://photos/in/a b.jpg")
    assert uid != item_uid("0f8fad5b-d9cb-469f-a165-70867728950e", "s3://photos/in/a c.jpg")
    import re
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", uid)


def test_counts_progress_and_failures() -> None:
    state = BatchState(0.0, "s3://photos/out/_gpuroute/b.results.jsonl")
    state.listed = 5
    for i in range(3):
        state.track(f"u{i}", Phase.QUEUED)
    state.track("u0", Phase.DISPATCHED)
    state.track("u1", Phase.PROCESSING)
    assert (state.running, state.queued) == (2, 3)
    state.record("u0", _ok("0.jpg"))
    state.record("u1", _bad("1.jpg"))
    status = state.status(10.0)
    assert status["items"] == {"total": 5, "succeeded": 1, "failed": 1, "running": 0, "queued": 3, "listingComplete": False}
    assert status["progress"] == "2/5+" and status["percent"] == 40.0
    assert status["failures"] == [{"input": "s3://photos/in/1.jpg", "reason": "InvalidInput", "message": "not an image"}]
    assert status["results"].endswith(".results.jsonl")
    for i in range(MAX_FAILURES + 5):
        state.record("", _bad(f"x{i}.jpg"))
    assert len(state.status(11.0)["failures"]) == MAX_FAILURES


def test_rate_and_eta_from_the_clock() -> None:
    state = BatchState(0.0, "r")
    state.listed, state.listing_complete = 100, True
    state.status(0.0)
    for i in range(20):
        state.record("", _ok(f"{i}.jpg"))
    status = state.status(10.0)
    assert status["itemsPerSecond"] == 2.0
    assert status["estimatedCompletionAt"] == "1970-01-01T00:00:50.000Z"  # 80 left at 2/s
    assert status["progress"] == "20/100"


def test_complete_and_ending() -> None:
    state = BatchState(0.0, "r")
    state.listed, state.listing_complete = 2, True
    state.track("a", Phase.QUEUED)
    state.record("a", _ok("a.jpg"))
    assert not state.complete
    state.record("", _ok("b.jpg"))
    assert state.complete and state.ending()[0] is Phase.COMPLETED
    assert state.status(1.0)["percent"] == 100.0
    state.record("", _bad("c.jpg"))
    phase, reason, message = state.ending()
    assert (phase, reason) == (Phase.FAILED, "ItemsFailed") and message.startswith("1 of 2")


def test_manifest_lines_round_trip_and_resume_skips_finished() -> None:
    lines = [_ok("a.jpg", at=5.0).line(), _bad("b.jpg").line(), "", '{"torn', _ok("a.jpg").line()]
    row = json.loads(lines[0])
    assert row["status"] == "succeeded" and row["sha256"] == "ab" * 32 and row["size"] == 10
    assert row["completedAt"] == "1970-01-01T00:00:05.000Z" and row["output"] == "s3://photos/out/a.jpg"
    assert json.loads(lines[1])["error"] == "not an image" and json.loads(lines[1])["output"] is None
    state = BatchState(0.0, "r")
    assert state.resume(lines) == 2
    assert (state.succeeded, state.failed) == (1, 1)
    assert state.done == {"s3://photos/in/a.jpg", "s3://photos/in/b.jpg"}
    # A resumed run's rate counts only what it finishes itself.
    state.status(0.0)
    assert state.status(5.0)["itemsPerSecond"] == 0.0


def test_outcome_from_a_dispatcher_job() -> None:
    batch = parse_batch_spec(_spec())
    src, out = StorageURI("s3", "photos", "in/a.jpg"), StorageURI("s3", "photos", "out/a.webp")
    job = Job("b-1", "ns", "batch", 1, item_spec(batch, src, out, 30), 0.0, batch="b")
    assert job.spec.input_uri == src and job.spec.output == out and job.spec.timeout_s == 30
    job.phase, job.attempts, job.pool, job.worker, job.completed_at = Phase.COMPLETED, 1, "p", "w", 2.0
    job.output = {"uri": out.uri, "bytes": 7, "width": 2, "height": 2, "sha256": "cd" * 32}
    job.timing = {"totalMs": 12.0, "gpuMs": 1.0}
    outcome = ItemOutcome.from_job(job, src.uri, out.uri)
    assert outcome.ok and outcome.size == 7 and outcome.worker == "p/w" and outcome.timing["totalMs"] == 12.0
    assert results_uri(batch.output_prefix, "batch").uri == "s3://photos/out/_gpuroute/batch.results.jsonl"
