"""A batch ImageJob's state: counts, manifest lines, progress, ETA, resume (pure, no I/O).

A batch's items are ordinary dispatcher Jobs (job.batch set). What the batch itself
remembers lives here: how many items were listed, which inputs are finished (the
durable record is the results journal in object storage; `resume` reads it back), the
first failures, and the rate items finish at. The clock is passed in, so the tests run
in milliseconds and the operator's shell (batch_runner.py) decides when to call what.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gpuroute_operator.jobs import Job
from gpuroute_operator.kube import now_rfc3339
from gpuroute_operator.phases import Phase
from gpuroute_operator.spec import BatchSpec, JobSpec, StorageURI

MAX_FAILURES = 20
"""status.failures keeps the first this many failures; the manifest has them all."""
RATE_WINDOW_S = 60.0
"""items/s is measured over about this long a window of recent progress."""
_STAGES = ("queueMs", "networkMs", "downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs", "totalMs")


def item_uid(batch_uid: str, source: str) -> str:
    """The item's dispatcher uid (and so its wire AttemptId): the batch uid and a digest of the
    input URI. Stable across restarts and listing orders, so a worker that still holds an
    item's result answers it from its cache after an operator restart instead of recomputing."""
    digest = hashlib.blake2s(source.encode(), digest_size=8).hexdigest()
    return f"{batch_uid[:40]}-{digest}"


def item_spec(batch: BatchSpec, source: StorageURI, output: StorageURI, timeout_s: int) -> JobSpec:
    """The spec one item runs: the batch's pipeline on one input and output."""
    return dataclasses.replace(batch.item, input_uri=source, output=output, timeout_s=max(1, timeout_s))


@dataclass(frozen=True)
class ItemOutcome:
    """One finished item: one line of the results manifest."""

    input: str
    """The input URI."""
    output: str
    """The output URI (written only when `ok`)."""
    ok: bool
    """The item succeeded."""
    reason: str = ""
    """Failure reason (InvalidInput, Timeout, MaxAttemptsExceeded, StorageNotGranted, ...)."""
    error: str = ""
    """Failure message; empty on success."""
    sha256: str = ""
    """SHA-256 of the written output."""
    size: int = 0
    """Bytes written."""
    width: int = 0
    """Output width in pixels."""
    height: int = 0
    """Output height in pixels."""
    attempts: int = 0
    """Attempts the item took."""
    worker: str = ""
    """pool/worker that produced the result."""
    completed_at: float = 0.0
    """When the item ended (seconds, wall clock)."""
    timing: dict[str, float] = field(default_factory=dict)
    """The item's stage durations in ms (queueMs ... totalMs)."""

    def line(self) -> str:
        """The manifest line (JSON, no newline)."""
        row: dict[str, Any] = {"input": self.input, "output": self.output if self.ok else None,
                               "status": "succeeded" if self.ok else "failed"}
        if self.ok:
            row.update(sha256=self.sha256, size=self.size, width=self.width, height=self.height)
        else:
            row.update(reason=self.reason, error=self.error)
        row.update(attempts=self.attempts, worker=self.worker, completedAt=now_rfc3339(self.completed_at),
                   timing=self.timing)
        return json.dumps(row, separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_line(cls, text: str) -> ItemOutcome | None:
        """Parse a manifest line; None for a line that is not one (a torn write, a blank)."""
        try:
            row = json.loads(text)
        except ValueError:
            return None
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            return None
        ok = row.get("status") == "succeeded"
        return cls(input=row["input"], output=str(row.get("output") or ""), ok=ok, reason=str(row.get("reason") or ""),
                   error=str(row.get("error") or ""), sha256=str(row.get("sha256") or ""),
                   size=int(row.get("size") or 0), attempts=int(row.get("attempts") or 0))

    @classmethod
    def from_job(cls, job: Job, source: str, output: str) -> ItemOutcome:
        """A dispatcher Job that ended (Completed or Failed) as a manifest entry."""
        out = job.output or {}
        ok = job.phase is Phase.COMPLETED
        return cls(input=source, output=output, ok=ok, reason="" if ok else job.reason, error="" if ok else job.message,
                   sha256=str(out.get("sha256") or ""), size=int(out.get("bytes") or 0),
                   width=int(out.get("width") or 0), height=int(out.get("height") or 0), attempts=job.attempts,
                   worker=f"{job.pool}/{job.worker}" if job.worker else "", completed_at=job.completed_at or 0.0,
                   timing={k: float(job.timing[k]) for k in _STAGES if k in job.timing})


@dataclass
class BatchState:
    """What one batch knows about its items; mutable on purpose (one record per batch)."""

    queued_at: float
    """When the batch was first admitted (kept across restarts through status.timing.queuedAt)."""
    results: str
    """URI of the results manifest (status.results)."""
    done: set[str] = field(default_factory=set)
    """Input URIs finished, in this run or before a restart: never admitted again."""
    succeeded: int = 0
    failed: int = 0
    listed: int = 0
    """Inputs seen by the listing so far (finished ones included)."""
    listing_complete: bool = False
    """The listing reached its end: `listed` is the total."""
    phases: dict[str, Phase] = field(default_factory=dict)
    """Item uid -> phase, for items handed to the dispatcher and not finished."""
    running: int = 0
    """How many of `phases` are Dispatched or Processing."""
    failures: list[dict[str, str]] = field(default_factory=list)
    """The first MAX_FAILURES failures: input, reason, message."""
    resumed: int = 0
    """Items found finished in the journal when this run started."""
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    """(clock, finished count) samples for the rate."""

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def total(self) -> int:
        return self.listed

    @property
    def queued(self) -> int:
        return max(0, self.listed - self.finished - self.running)

    @property
    def complete(self) -> bool:
        """Every listed item is finished and nothing is out."""
        return self.listing_complete and not self.phases and self.finished >= self.listed

    def resume(self, lines: Iterable[str]) -> int:
        """Take in the journal written before a restart; returns how many items it holds."""
        for text in lines:
            outcome = ItemOutcome.from_line(text)
            if outcome is not None and outcome.input not in self.done:
                self._count(outcome)
        self.resumed = self.finished
        return self.resumed

    def track(self, uid: str, phase: Phase) -> None:
        """An item handed to the dispatcher changed phase (not terminal)."""
        before = self.phases.get(uid)
        self.phases[uid] = phase
        self.running += _running(phase) - (_running(before) if before is not None else 0)

    def untrack(self, uid: str) -> None:
        before = self.phases.pop(uid, None)
        if before is not None:
            self.running -= _running(before)

    def record(self, uid: str, outcome: ItemOutcome) -> str:
        """An item ended: count it and return its manifest line."""
        self.untrack(uid)
        if outcome.input not in self.done:
            self._count(outcome)
        return outcome.line()

    def _count(self, outcome: ItemOutcome) -> None:
        self.done.add(outcome.input)
        if outcome.ok:
            self.succeeded += 1
        else:
            self.failed += 1
            if len(self.failures) < MAX_FAILURES:
                self.failures.append({"input": outcome.input, "reason": outcome.reason or "Failed",
                                      "message": outcome.error[:1024]})

    def rate(self, now: float) -> float:
        """Items per second over the recent window (items finished in this run only)."""
        samples = self._samples
        if not samples or samples[-1][0] < now:
            samples.append((now, self.finished))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW_S:
            samples.popleft()
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def status(self, now: float) -> dict[str, Any]:
        """The batch's counts and progress, merged into its status by the shell."""
        total = self.total
        percent = 100.0 if self.complete else (math.floor(1000.0 * self.finished / total) / 10.0 if total else 0.0)
        rate = self.rate(now)
        remaining = total - self.finished
        eta: str | None = None
        if self.listing_complete and remaining > 0 and rate > 0:
            eta = now_rfc3339(now + remaining / rate)
        return {
            "items": {"total": total, "succeeded": self.succeeded, "failed": self.failed, "running": self.running,
                      "queued": self.queued, "listingComplete": self.listing_complete},
            "progress": f"{self.finished}/{total}{'' if self.listing_complete else '+'}",
            "percent": percent,
            "itemsPerSecond": round(rate, 3),
            "estimatedCompletionAt": eta,
            "failures": list(self.failures),
            "results": self.results,
        }

    def ending(self) -> tuple[Phase, str, str]:
        """The terminal phase, reason and message of a complete batch."""
        if self.failed:
            return (Phase.FAILED, "ItemsFailed",
                    f"{self.failed} of {self.total} items failed; the first are in status.failures, all in {self.results}")
        if not self.total:
            return Phase.COMPLETED, "Succeeded", "no inputs matched"
        return Phase.COMPLETED, "Succeeded", f"all {self.total} items succeeded; results in {self.results}"


def _running(phase: Phase) -> int:
    return 1 if phase in (Phase.DISPATCHED, Phase.PROCESSING) else 0


def results_uri(output_prefix: StorageURI, name: str) -> StorageURI:
    """The results manifest of batch `name`."""
    return StorageURI(output_prefix.scheme, output_prefix.container, f"{output_prefix.key}_gpuroute/{name}.results.jsonl")


def journal_prefix(output_prefix: StorageURI, uid: str) -> StorageURI:
    """Where the results journal (one part per flush) of batch `uid` lives; the uid keeps a
    re-created batch of the same name from resuming the old one's journal."""
    return StorageURI(output_prefix.scheme, output_prefix.container, f"{output_prefix.key}_gpuroute/journal-{uid}/")


def journal_part(prefix: StorageURI, number: int) -> StorageURI:
    return StorageURI(prefix.scheme, prefix.container, f"{prefix.key}part-{number:08d}.jsonl")
