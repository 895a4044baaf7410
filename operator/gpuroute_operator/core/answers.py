"""Is this answer right, and what does it mean for its job? (pure)

Every answer a worker gives is judged here, after sessions.py has decided that the connection
may say it at all:
- an ERROR: the retry policy in one table (`judge`): the job goes back to a queue (without
  spending the attempt, or spending it), or ends;
- an item of a batch's item group: its own retry rule (`judge_item`);
- a RESULT: whether it answers what was sent (`result_mismatch`: one answer per item of a group,
  in order, or one output for a single image) and what a completed job keeps (`record_output`).
The dispatcher applies the verdicts.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from gpuroute.protocol import AttemptId, Error, ErrorCode, ItemAnswer, Result
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.pools import PoolState, WorkerConn

RETRY_REASONS = {ErrorCode.OOM: "OutOfMemory", ErrorCode.UNAVAILABLE: "WorkerUnavailable", ErrorCode.TIMEOUT: "Timeout",
                 ErrorCode.EXPIRED: "StorageURLRejected"}
"""The status reason of a retried (or finally failed) attempt, by error code."""


class Action(enum.Enum):
    AGAIN = "again"
    """Queue the job again and re-send the same attempt: it never ran (or only its URL failed)."""
    RETRY = "retry"
    """Queue the job again for a new attempt."""
    FAIL = "fail"
    """End the job Failed."""


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    """Status reason."""
    message: str
    """Status message."""
    pause_worker: bool = False
    """The worker refused for capacity: no dispatch to it for a moment."""
    resign: bool = False
    """Storage refused a URL: sign both again before re-sending (allowed once per job)."""


def overdue(job: Job, attempt: AttemptId, now: float, *, accept_within_s: float, floor_s: float,
            expected_ms: Callable[[], float | None], slack: float) -> Error | None:
    """An ERROR standing for an answer that did not come in time, or None while there is time.

    A worker ACCEPTs a JOB the moment it reads it, so one that has not within `accept_within_s`
    while its session lives is broken (or is a stolen key holding jobs). Once accepted, an
    attempt may run `slack` times what the pool is expected to take (`expected_ms`, learned),
    or, for work the pool has no figures for yet, its share of timeoutSeconds over maxAttempts;
    never less than `floor_s`. The job's own deadline still bounds every attempt; an item group
    is bounded by its items' timeouts and the batch's deadline instead."""
    if job.dispatched_at is None or attempt != job.current_attempt:
        return None
    if job.phase is Phase.DISPATCHED:
        if now - job.dispatched_at > accept_within_s:
            return Error(attempt, ErrorCode.UNAVAILABLE, f"not accepted within {accept_within_s:g} s")
        return None
    if job.spec.items:
        # An item group: each item is bounded on the worker by itemTimeoutSeconds, the group by
        # the batch's deadline; the pool's figures are per image, not per group of 16.
        return None
    started = job.started_at if job.started_at is not None else job.dispatched_at
    if now - started <= floor_s:
        return None  # never past the limit yet, whatever was learned: no estimate needed
    expected = expected_ms()
    share_s = (expected / 1000.0 * slack) if expected is not None else job.spec.timeout_s / job.spec.max_attempts
    limit_s = max(floor_s, share_s)
    if now - started > limit_s:
        return Error(attempt, ErrorCode.TIMEOUT, f"no answer within {limit_s:.0f} s of starting (per-attempt limit)")
    return None


class OverdueRules(Protocol):
    """The dispatcher's settings that bound an attempt (DispatcherConfig)."""

    @property
    def accept_within_s(self) -> float: ...

    @property
    def attempt_floor_s(self) -> float: ...

    @property
    def attempt_slack(self) -> float: ...


def overdue_attempts(sessions: Iterable[WorkerConn], jobs: Mapping[str, Job], pools: Mapping[str, PoolState],
                     expected_ms: Callable[[Job, PoolState], float | None], now: float,
                     rules: OverdueRules) -> Iterator[tuple[WorkerConn, Error]]:
    """Each session's attempts whose answer is overdue (`overdue`), as the ERROR that stands for
    it; after a never-accepted one, that session's other attempts are left to its loss."""
    for conn in sessions:
        pool = pools.get(conn.pool)
        for attempt in sorted(conn.attempts):
            job = jobs.get(attempt.uid)
            if job is None or pool is None:
                continue
            error = overdue(job, attempt, now, accept_within_s=rules.accept_within_s, floor_s=rules.attempt_floor_s,
                            expected_ms=functools.partial(expected_ms, job, pool), slack=rules.attempt_slack)
            if error is not None:
                yield conn, error
                if error.code is ErrorCode.UNAVAILABLE:
                    break


def judge(job: Job, error: Error, where: str) -> Verdict:
    """The verdict on `error` (already redacted) for `job`, whose attempt `where` ("pool/worker") ran."""
    if error.rejected:
        # Refused before it started (worker full): not an attempt. The worker is paused briefly
        # so the job is not bounced straight back to it.
        return Verdict(Action.AGAIN, "WorkerBusy", f"{where} was full", pause_worker=True)
    if error.code is ErrorCode.EXPIRED and not job.resigned:
        # The URL, not the attempt, failed: sign again and re-send the same attempt, once.
        return Verdict(Action.AGAIN, "Resigning", f"{where}: {error.message}", resign=True)
    text = f"{where}: {error.message}"
    reason = RETRY_REASONS.get(error.code, "WorkerCancelled")
    if error.code is ErrorCode.INVALID_INPUT:
        return Verdict(Action.FAIL, "InvalidInput", error.message)
    if job.attempts >= job.spec.max_attempts:
        return Verdict(Action.FAIL, reason, f"{text} (after {job.attempts} attempts)")
    return Verdict(Action.RETRY, reason, text)


def result_mismatch(job: Job, result: Result) -> Error | None:
    """An ERROR standing for a RESULT that does not answer what was sent (an item group is
    answered item by item, in order; a single image by its output); None when it does."""
    if len(result.items) == len(job.spec.items) and (result.output is None) == bool(job.spec.items):
        return None
    return Error(result.job, ErrorCode.UNAVAILABLE, "the worker's answer did not match the job: "
                 f"{len(result.items)} answers for {len(job.spec.items)} items")


def record_output(job: Job, result: Result) -> str:
    """Keep a matching RESULT's output (or an item group's answers) on the job; the Completed message."""
    if result.output is None:
        job.item_answers = result.items
        return f"{sum(1 for item in result.items if item.ok)} of {len(result.items)} items written"
    job.output = {"uri": job.spec.output.uri, **result.output.to_header()}
    return f"{result.output.width}x{result.output.height} {result.output.format} written to {job.spec.output.uri}"


class ItemVerdict(enum.Enum):
    """What becomes of one item of a group that ended."""

    DONE = "done"
    """Succeeded or failed for good: it gets its manifest line."""
    AGAIN = "again"
    """Failed for a retryable reason with attempts left: it runs in a later group."""
    EXHAUSTED = "exhausted"
    """Failed for a retryable reason on its last attempt: fails as MaxAttemptsExceeded."""
    NOT_DONE = "not_done"
    """Cancelled with its group: not finished (a resumed batch would run it)."""


def judge_item(answer: ItemAnswer | None, spent: int, max_attempts: int) -> ItemVerdict:
    """The retry rule for one item: `answer` is its worker's (None: its group failed as a
    whole, which already spent the group's attempts), `spent` the attempts its groups took."""
    if answer is None or answer.ok:
        return ItemVerdict.DONE
    if answer.code is ErrorCode.CANCELLED:
        return ItemVerdict.NOT_DONE
    if answer.code is not None and answer.code.retryable:
        return ItemVerdict.AGAIN if spent < max_attempts else ItemVerdict.EXHAUSTED
    return ItemVerdict.DONE
