"""The batch plan (pure): the item window, group cells, retries, grants per item, flush and status timing."""

from __future__ import annotations

import tracemalloc
from typing import Any

from gpuroute.protocol import ErrorCode, ItemAnswer, OutputInfo
from gpuroute_operator.batch.plan import BatchPlan, PlanConfig
from gpuroute_operator.batch.state import ItemOutcome, group_uid
from gpuroute_operator.core.grants import READ_ANNOTATION, WRITE_ANNOTATION, StorageGrants
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import SpecError, StorageURI, parse_batch_spec

REF = ObjectRef("ImageJob", "photos", "team", "uid-1")
GRANTS = StorageGrants(("s3://photos/in/",), ("s3://photos/out/",))
OK = ItemAnswer(OutputInfo(7, 2, 2, "cd" * 32, "png"))
SLOW = ItemAnswer(code=ErrorCode.TIMEOUT, message="past itemTimeoutSeconds")


def _plan(*, window: int = 8, group_items: int = 4, lookahead: int = 100, max_attempts: int = 2,
          grants: StorageGrants = GRANTS, **spec: Any) -> BatchPlan:
    batch = parse_batch_spec({"input": {"prefix": "s3://photos/in/"}, "output": {"prefix": "s3://photos/out/"},
                              "steps": [{"op": "invert"}], "maxAttempts": max_attempts, "timeoutSeconds": 100, **spec})
    return BatchPlan(REF, 3, batch, grants, 1000.0, PlanConfig(window=window, group_items=group_items,
                                                                lookahead=lookahead, status_period_s=3.0,
                                                                journal_period_s=1.0))


def _uris(*names: str) -> list[StorageURI | SpecError]:
    return [StorageURI("s3", "photos", f"in/{name}") for name in names]


def _names(job: Job) -> list[str]:
    return [source.key.removeprefix("in/") for source, _ in job.spec.items]


def _end(plan: BatchPlan, job: Job, answers: list[ItemAnswer], *, attempts: int = 1) -> bool:
    job.phase, job.attempts, job.item_answers, job.completed_at = Phase.COMPLETED, attempts, tuple(answers), 1001.0
    return plan.group_ended(job)


def test_groups_are_cut_from_fixed_cells_and_wait_for_a_whole_cell() -> None:
    plan = _plan()
    assert plan.wants_page()
    # Six items: cell 0 is whole, cell 1 (items 4, 5) may continue on the next page.
    assert plan.add_page(_uris(*(f"{i}.png" for i in range(6))))
    first = plan.next_group(1000.0)
    assert first is not None and _names(first) == ["0.png", "1.png", "2.png", "3.png"]
    assert first.uid == group_uid(REF.uid, [f"s3://photos/in/{i}.png" for i in range(4)])
    assert first.batch == REF.uid and first.generation == 3 and first.spec.timeout_s == 100
    assert [o.uri for _, o in first.spec.items] == [f"s3://photos/out/{i}.png" for i in range(4)]
    assert plan.next_group(1000.0) is None  # the rest of cell 1 is on the next page
    plan.add_page(_uris("6.png", "7.png", "8.png"))
    second = plan.next_group(1000.0)
    assert second is not None and _names(second) == ["4.png", "5.png", "6.png", "7.png"]
    assert plan.items_out == 8 and not plan.has_room()  # the window is full
    plan.listing_done()
    assert not plan.wants_page()


def test_the_window_refills_once_a_refill_is_free_and_the_group_timeout_is_the_deadlines() -> None:
    plan = _plan(window=64, group_items=4)  # a refill is 64 // 8 = 8 items
    plan.add_page(_uris(*(f"{i:03d}.png" for i in range(100))))
    plan.listing_done()
    jobs = []
    while plan.has_room() and (job := plan.next_group(1060.0)) is not None:
        jobs.append(job)
    assert len(jobs) == 16 and plan.items_out == 64
    assert jobs[0].spec.timeout_s == 40  # the batch's deadline, not items x itemTimeoutSeconds
    assert not _end(plan, jobs[0], [OK] * 4)  # 4 free: not worth waking the loop for
    assert _end(plan, jobs[1], [OK] * 4)  # 8 free
    assert plan.state.succeeded == 8 and len(plan.lines) == 8 and plan.has_room()
    assert not _end(plan, jobs[1], [OK] * 4)  # a group reported twice counts once
    assert plan.state.succeeded == 8


def test_a_retryable_item_runs_again_in_a_later_group_then_is_exhausted() -> None:
    plan = _plan(max_attempts=2)
    plan.add_page(_uris("a.png", "b.png", "c.png", "d.png"))
    plan.listing_done()
    job = plan.next_group(1000.0)
    assert job is not None
    _end(plan, job, [OK, SLOW, OK, OK])
    assert plan.state.succeeded == 3 and [i.source.key for i in plan.again] == ["in/b.png"]
    retry = plan.next_group(1001.0)
    assert retry is not None and _names(retry) == ["b.png"]
    assert retry.uid == group_uid(REF.uid, ["s3://photos/in/b.png"], 1) != job.uid
    _end(plan, retry, [SLOW])
    assert plan.state.failed == 1 and not plan.again and not plan.spent
    row = ItemOutcome.from_line(plan.lines[-1])
    assert row is not None and row.reason == "MaxAttemptsExceeded" and row.attempts == 2
    assert plan.state.complete and plan.state.ending()[1] == "ItemsFailed"


def test_a_cancelled_group_leaves_its_items_unfinished() -> None:
    plan = _plan()
    plan.add_page(_uris("a.png"))
    plan.listing_done()
    job = plan.next_group(1000.0)
    assert job is not None
    job.phase = Phase.CANCELLED
    assert plan.group_ended(job)
    assert plan.state.finished == 0 and not plan.lines and not plan.outstanding


def test_bad_lines_duplicates_finished_and_ungranted_items_end_without_a_group() -> None:
    plan = _plan(grants=StorageGrants(("s3://photos/in/ok/",), ("s3://photos/out/",)),
                 input={"list": "s3://photos/lists/all.txt"})
    plan.state.resume([ItemOutcome("s3://photos/in/ok/done.png", "s3://photos/out/ok/done.png", ok=True).line()])
    bad = SpecError("spec.input.list line 2", "not a URI")
    plan.add_page([*_uris("ok/a.png", "ok/a.png", "ok/done.png", "secret.png"), bad])
    plan.listing_done()
    job = plan.next_group(1000.0)
    assert job is not None and _names(job) == ["ok/a.png"]
    assert plan.state.listed == 4  # the repeated line is one item
    reasons = [ItemOutcome.from_line(line) for line in plan.lines]
    assert [(r.input, r.reason) for r in reasons if r] == [("s3://photos/in/secret.png", "StorageNotGranted")]
    assert plan.next_group(1000.0) is None  # the bad line's cell had nothing to run
    assert any('"reason":"InvalidSpec"' in line for line in plan.lines)


def test_flushes_and_status_are_due_by_the_clock_and_a_failed_write_keeps_its_lines() -> None:
    plan = _plan()
    assert plan.take_lines(1000.0) == [] and plan.status_due(1000.0)
    plan.lines = ["one", "two"]
    lines = plan.take_lines(1000.0)
    assert lines == ["one", "two"] and plan.lines == []
    plan.lines = ["three"]
    assert plan.take_lines(1000.5) == []  # within journal_period_s
    plan.unwritten(lines)
    assert plan.lines == ["one", "two", "three"]
    assert plan.take_lines(1000.5, force=True) == ["one", "two", "three"]
    plan.lines = [str(n) for n in range(plan.config.journal_lines)]
    assert len(plan.take_lines(1000.6)) == plan.config.journal_lines  # a full buffer goes before its time
    plan.last_status = 1000.0
    assert not plan.status_due(1002.9) and plan.status_due(1003.0)


def test_overdue_and_drop_outstanding() -> None:
    plan = _plan()
    assert plan.overdue(1100.0) is None
    stop = plan.overdue(1100.5)
    assert stop is not None and stop[:2] == (Phase.FAILED, "Timeout") and "timeoutSeconds=100" in stop[2]
    plan.add_page(_uris("a.png", "b.png"))
    plan.listing_done()
    job = plan.next_group(1000.0)
    assert job is not None and plan.drop_outstanding() == [job.uid]
    assert not plan.pending and not plan.outstanding


def test_a_listing_past_max_items_fails_the_batch_naming_the_field() -> None:
    plan = _plan(input={"prefix": "s3://photos/in/", "maxItems": 10})
    plan.add_page(_uris(*(f"{i}.png" for i in range(10))))
    assert plan.too_many() is None
    plan.add_page(_uris("10.png"))
    stop = plan.too_many()
    assert stop is not None and stop[:2] == (Phase.FAILED, "TooManyItems") and "spec.input.maxItems=10" in stop[2]


def test_a_batch_keeps_no_uri_strings_per_item() -> None:
    """The plan's memory for listed and finished inputs is digests, not the URI strings: 8 bytes
    an input a list object names, none for a prefix's."""
    count = 20_000
    journal = [ItemOutcome(f"s3://photos/in/done-{i:07d}.png", f"s3://photos/out/done-{i:07d}.png", ok=True).line()
               for i in range(count)]
    entries = _uris(*(f"item-{i:07d}.png" for i in range(count)))
    for spec in ({"input": {"list": "s3://photos/lists/all.txt"}}, {}):
        tracemalloc.start()
        try:
            plan = _plan(window=10**9, group_items=16, lookahead=10**9, grants=StorageGrants((), ()), **spec)
            plan.state.resume(journal)
            plan.add_page(entries)
            plan.listing_done()
            while plan.next_group(1000.0) is not None:
                pass
            plan.lines.clear()  # the shell writes them to the journal every second
            plan.pending.clear()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert plan.state.failed == count and plan.state.succeeded == count  # StorageNotGranted, and resumed
        # URI strings in sets would hold about 2 x 20,000 x 120 bytes = 4.8 MB.
        assert held < 2 * count * 8 + 2 * 1024 * 1024, (spec, held)


def test_more_now_while_the_window_has_room_and_the_listing_goes_on() -> None:
    plan = _plan(window=8, group_items=4)
    assert plan.more_now()
    plan.add_page(_uris(*(f"{i}.png" for i in range(12))))
    while plan.has_room() and plan.next_group(1000.0) is not None:
        pass
    assert not plan.more_now()  # the window is full: a group's end wakes the loop
    plan.listing_done()
    assert not plan.more_now()


def test_inputs_that_name_the_same_output_fail_after_the_first() -> None:
    plan = _plan()
    plan.add_page(_uris("a.jpg", "a.png", "a.webp", "b.png"))
    plan.listing_done()
    job = plan.next_group(1000.0)
    assert job is not None and _names(job) == ["a.jpg", "b.png"]
    rows = [ItemOutcome.from_line(line) for line in plan.lines]
    assert [(r.input, r.reason) for r in rows if r] == [("s3://photos/in/a.png", "OutputCollision"),
                                                        ("s3://photos/in/a.webp", "OutputCollision")]
    assert all("s3://photos/out/a.png" in line and "OutputCollision" in line for line in plan.lines)


def test_after_a_restart_the_same_input_wins_a_clash() -> None:
    first = _plan()
    first.add_page(_uris("a.jpg", "a.png"))
    first.listing_done()
    job = first.next_group(1000.0)
    assert job is not None
    _end(first, job, [OK])
    journal = list(first.lines)
    # Restarted with a.jpg (the winner) finished: a.png still clashes with it.
    resumed = _plan()
    assert resumed.resume(journal) == 2
    resumed.add_page(_uris("a.jpg", "a.png"))
    resumed.listing_done()
    assert resumed.next_group(1000.0) is None and not resumed.lines
    # Restarted with only the clash journaled: a.jpg runs, it is not a clash with the loser.
    partial = _plan()
    partial.resume([line for line in journal if "OutputCollision" in line])
    partial.add_page(_uris("a.jpg", "a.png"))
    partial.listing_done()
    job = partial.next_group(1000.0)
    assert job is not None and _names(job) == ["a.jpg"] and not partial.lines


def test_a_listed_input_under_the_output_prefix_fails_alone() -> None:
    plan = _plan(input={"list": "s3://photos/lists/all.txt"})
    plan.add_page([StorageURI("s3", "photos", "out/a.png"), StorageURI("s3", "photos", "in/b.png")])
    plan.listing_done()
    job = plan.next_group(1000.0)
    assert job is not None and [s.key for s, _ in job.spec.items] == ["in/b.png"]
    row = ItemOutcome.from_line(plan.lines[0])
    assert row is not None and row.reason == "InputUnderOutput" and "spec.output.prefix" in row.error


def test_grants_revoked_mid_batch_end_the_items_not_yet_handed_out() -> None:
    plan = _plan(window=4, group_items=4)
    plan.add_page(_uris(*(f"{i}.png" for i in range(8))))
    plan.listing_done()
    first = plan.next_group(1000.0)
    assert first is not None and not plan.has_room()
    _end(plan, first, [OK, SLOW, OK, OK])  # 1.png runs again later
    plan.grants = StorageGrants(("s3://photos/elsewhere/",), ("s3://photos/out/",))  # the admin revoked in/
    assert plan.next_group(1001.0) is None
    rows = [ItemOutcome.from_line(line) for line in plan.lines]
    assert [(r.input.rsplit("/", 1)[1], r.reason) for r in rows if not r.ok] == [
        ("1.png", "StorageNotGranted"), *((f"{i}.png", "StorageNotGranted") for i in range(4, 8))]
    assert all(READ_ANNOTATION in r.error for r in rows if not r.ok)
    assert plan.state.complete and (plan.state.succeeded, plan.state.failed) == (3, 5)
    assert not plan.spent
    revoked_write = _plan()
    revoked_write.grants = StorageGrants(("s3://photos/in/",), ())
    revoked_write.add_page(_uris("a.png"))
    revoked_write.listing_done()
    assert revoked_write.next_group(1000.0) is None and WRITE_ANNOTATION in revoked_write.lines[0]
