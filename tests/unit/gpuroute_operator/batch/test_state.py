"""Batch state (pure): counts, manifest lines, progress, ETA, resume; batch spec parsing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpuroute.protocol import ErrorCode, ItemAnswer, OutputInfo, StageTiming
from gpuroute_operator.batch.state import (
    MAX_FAILURES,
    BatchState,
    ItemOutcome,
    group_cell,
    group_spec,
    group_uid,
    results_uri,
)
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.spec import SpecError, StorageURI, is_batch, item_output, parse_batch_spec

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
    (_spec(output={"prefix": "s3://photos/"}), "spec.input.prefix"),
    (_spec(input={"prefix": "s3://photos/in/"}, output={"prefix": "s3://photos/in/"}), "spec.output.prefix"),
    (_spec(input={"list": "s3://photos/out/list.txt"}), "spec.input.list"),
    (_spec(itemTimeoutSeconds=0), "spec.itemTimeoutSeconds"),
    (_spec(steps=[{"op": "nope"}]), "spec.steps[0].op"),
])
def test_parse_batch_spec_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_batch_spec(spec)
    assert info.value.field == field, info.value


def test_group_uid_is_stable_wire_safe_and_names_its_members() -> None:
    batch_uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    uid = group_uid(batch_uid, ["s3://photos/in/a b.jpg", "s3://photos/in/c.jpg"])
    assert uid == group_uid(batch_uid, ["s3://photos/in/a b.jpg", "s3://photos/in/c.jpg"])
    assert uid != group_uid(batch_uid, ["s3://photos/in/a b.jpg"])  # what is left of a cell is another group
    assert uid != group_uid(batch_uid, ["s3://photos/in/c.jpg", "s3://photos/in/a b.jpg"])
    # Items run again after a retryable failure form a group of their own, never the finished one.
    retried = group_uid(batch_uid, ["s3://photos/in/a b.jpg"], retry=1)
    assert retried != group_uid(batch_uid, ["s3://photos/in/a b.jpg"])
    assert retried != group_uid(batch_uid, ["s3://photos/in/a b.jpg"], retry=2)
    import re
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", uid)


def test_group_cells_are_fixed_runs_of_the_listing() -> None:
    assert [group_cell(p, 16) for p in (0, 15, 16, 31, 32)] == [0, 0, 1, 1, 2]
    assert group_cell(7, 0) == 7  # a size below 1 means one item per group


def test_counts_progress_and_failures() -> None:
    state = BatchState(0.0, "s3://photos/out/_gpuroute/b.results.jsonl")
    state.listed = 5
    state.track("g0", Phase.QUEUED, 2)
    state.track("g1", Phase.QUEUED, 1)
    state.track("g0", Phase.DISPATCHED, 2)
    assert (state.running, state.queued) == (2, 3)
    state.track("g0", Phase.PROCESSING, 2)
    assert state.running == 2
    state.untrack("g0")
    state.record(_ok("0.jpg"))
    state.record(_bad("1.jpg"))
    status = state.status(10.0)
    assert status["items"] == {"total": 5, "succeeded": 1, "failed": 1, "running": 0, "queued": 3, "listingComplete": False}
    assert status["progress"] == "2/5+" and status["percent"] == 40.0
    assert status["failures"] == [{"input": "s3://photos/in/1.jpg", "reason": "InvalidInput", "message": "not an image"}]
    assert status["results"].endswith(".results.jsonl")
    for i in range(MAX_FAILURES + 5):
        state.record(_bad(f"x{i}.jpg"))
    assert len(state.status(11.0)["failures"]) == MAX_FAILURES


def test_rate_and_eta_from_the_clock() -> None:
    state = BatchState(0.0, "r")
    state.listed, state.listing_complete = 100, True
    state.status(0.0)
    for i in range(20):
        state.record(_ok(f"{i}.jpg"))
    status = state.status(10.0)
    assert status["itemsPerSecond"] == 2.0
    assert status["estimatedCompletionAt"] == "1970-01-01T00:00:50.000Z"  # 80 left at 2/s
    assert status["progress"] == "20/100"


def test_complete_and_ending() -> None:
    state = BatchState(0.0, "r")
    state.listed, state.listing_complete = 2, True
    state.track("a", Phase.QUEUED)
    state.record(_ok("a.jpg"))
    assert not state.complete  # its group is still out
    state.untrack("a")
    state.record(_ok("b.jpg"))
    assert state.complete and state.ending()[0] is Phase.COMPLETED
    assert state.status(1.0)["percent"] == 100.0
    state.record(_bad("c.jpg"))
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
    assert len(state.done) == 2 and "s3://photos/in/a.jpg" in state.done and "s3://photos/in/b.jpg" in state.done
    assert "s3://photos/in/c.jpg" not in state.done
    # A resumed run's rate counts only what it finishes itself.
    state.status(0.0)
    assert state.status(5.0)["itemsPerSecond"] == 0.0


def test_outcomes_from_an_item_group() -> None:
    batch = parse_batch_spec(_spec(itemTimeoutSeconds=30))
    items = [(StorageURI("s3", "photos", f"in/{n}.jpg"), StorageURI("s3", "photos", f"out/{n}.webp")) for n in "ab"]
    job = Job("b-1", "ns", "batch", 1, group_spec(batch, items, 60), 0.0, batch="b")
    assert job.spec.items == tuple(items) and job.spec.item_timeout_s == 30 and job.spec.timeout_s == 60
    job.phase, job.attempts, job.pool, job.worker = Phase.COMPLETED, 1, "p", "w"
    job.dispatched_at, job.completed_at = 0.5, 2.0
    info = OutputInfo(7, 2, 2, "cd" * 32, "webp")
    done = ItemAnswer(info, StageTiming(download_ms=3.0, gpu_ms=1.0))
    outcome = ItemOutcome.from_answer(job, done, items[0][0].uri, items[0][1].uri, attempts=1)
    assert outcome.ok and outcome.size == 7 and outcome.worker == "p/w" and outcome.sha256 == "cd" * 32
    assert outcome.timing["totalMs"] == 2000.0 and outcome.timing["queueMs"] == 500.0
    assert outcome.timing["downloadMs"] == 3.0
    bad = ItemAnswer(code=ErrorCode.INVALID_INPUT, message="not an image")
    failed = ItemOutcome.from_answer(job, bad, items[1][0].uri, items[1][1].uri, attempts=1)
    assert not failed.ok and failed.reason == "InvalidInput" and failed.error == "not an image"
    exhausted = ItemOutcome.from_answer(job, ItemAnswer(code=ErrorCode.OOM, message="oom"), items[1][0].uri,
                                        items[1][1].uri, attempts=3, reason="MaxAttemptsExceeded", error="3 tries")
    assert (exhausted.ok, exhausted.reason, exhausted.attempts) == (False, "MaxAttemptsExceeded", 3)
    # The whole group failed (no answers): every item carries the group's reason.
    job.phase, job.reason, job.message = Phase.FAILED, "Timeout", "not completed within timeoutSeconds=60"
    whole = ItemOutcome.from_answer(job, None, items[0][0].uri, items[0][1].uri, attempts=2)
    assert (whole.ok, whole.reason, whole.error) == (False, "Timeout", job.message)
    assert results_uri(batch.output_prefix, "batch").uri == "s3://photos/out/_gpuroute/batch.results.jsonl"


def test_an_input_under_the_output_prefix_is_refused_naming_both_fields() -> None:
    with pytest.raises(SpecError) as info:
        parse_batch_spec(_spec(input={"prefix": "s3://photos/out/in/"}))
    assert info.value.field == "spec.input.prefix" and "spec.output.prefix s3://photos/out/" in str(info.value)
    with pytest.raises(SpecError) as info:
        parse_batch_spec(_spec(input={"list": "s3://photos/out/all.txt"}))
    assert info.value.field == "spec.input.list" and "spec.output.prefix" in str(info.value)
    # Siblings and other buckets are fine.
    parse_batch_spec(_spec(input={"prefix": "s3://photos/outer/"}))
    parse_batch_spec(_spec(input={"list": "s3://other/out/all.txt"}))


def test_max_items_defaults_and_bounds() -> None:
    assert parse_batch_spec(_spec()).max_items == 1_000_000
    assert parse_batch_spec(_spec(input={"prefix": "s3://photos/in/", "maxItems": 5})).max_items == 5
    for bad in (0, 10_000_001, "5", True):
        with pytest.raises(SpecError) as info:
            parse_batch_spec(_spec(input={"prefix": "s3://photos/in/", "maxItems": bad}))
        assert info.value.field == "spec.input.maxItems"


def test_a_journal_line_with_fields_of_the_wrong_type_does_not_stop_the_resume() -> None:
    state = BatchState(0.0, "r")
    line = json.dumps({"input": "s3://photos/in/a.jpg", "status": "succeeded", "size": "big", "attempts": [1]})
    assert state.resume([line]) == 1 and state.succeeded == 1
