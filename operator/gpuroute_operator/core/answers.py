"""What a worker's ERROR means for its job: the retry policy in one table (pure).

A worker reports why an attempt ended without a result; the job then goes back to a queue
(without spending the attempt, or spending it), or ends. The dispatcher applies the verdict.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gpuroute.protocol import Error, ErrorCode
from gpuroute_operator.core.jobs import Job

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
