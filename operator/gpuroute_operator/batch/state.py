"""A batch ImageJob's state: counts, manifest lines, progress, ETA, resume (pure, no I/O).

A batch's items travel in item groups: up to BatchConfig.group_items items of one
batch form one dispatcher Job (job.batch set, job.spec.items), sent as one JOB and
answered by one RESULT with an answer per item, so the per-message and per-job costs
are paid once per group. What the batch itself remembers lives here: how many items
were listed, which inputs are finished (the durable record is the results journal in
object storage; `resume` reads it back), the first failures, and the rate items finish
at. The clock is passed in, so the tests run in milliseconds and the operator's shell
(batch_runner.py) decides when to call what.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuroute.protocol import ItemAnswer
from gpuroute_operator.batch.digests import DigestSet
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.spec import BatchSpec, JobSpec, StorageURI
from gpuroute_operator.core.timestamps import now_rfc3339

MAX_FAILURES = 20
"""status.failures keeps the first this many failures; the manifest has them all."""
RATE_WINDOW_S = 60.0
"""items/s is measured over about this long a window of recent progress."""


def group_uid(batch_uid: str, sources: Sequence[str], retry: int = 0) -> str:
    """An item group's dispatcher uid (and so its wire AttemptId): the batch uid and a digest of
    its inputs. Groups are cut from fixed cells of the listing order (group_cell), so after an
    operator restart the unfinished items of a cell form the same group again, and a worker
    that still runs or holds it is adopted or answers from its cache instead of recomputing.
    `retry` (attempts its items already spent) tells a retry apart from the group that failed
    them: the same uid would be a finished job to the dispatcher and a cached answer to the worker."""
    text = "\n".join(sources) + (f"\n#retry {retry}" if retry else "")
    digest = hashlib.blake2s(text.encode(), digest_size=8).hexdigest()
    return f"{batch_uid[:40]}-{digest}"


def group_cell(position: int, group_items: int) -> int:
    """The cell of the listing an item belongs to: items of one cell, and only they, share a group."""
    return position // max(1, group_items)


def group_spec(batch: BatchSpec, items: Sequence[tuple[StorageURI, StorageURI]], timeout_s: int) -> JobSpec:
    """The spec an item group runs: the batch's pipeline over each (input, output) pair.
    `timeout_s` bounds the group as a whole; each item is bounded by itemTimeoutSeconds."""
    return dataclasses.replace(batch.item, input_uri=None, output=batch.output_prefix, items=tuple(items),
                               item_timeout_s=batch.item_timeout_s, timeout_s=max(1, timeout_s))


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
                   size=_count_field(row.get("size")), attempts=_count_field(row.get("attempts")))

    @classmethod
    def from_answer(cls, group: Job, answer: ItemAnswer | None, source: str, output: str, *, attempts: int,
                    reason: str = "", error: str = "") -> ItemOutcome:
        """One item of a group that ended: its worker's answer (None: the group failed as a
        whole, with the group's reason), or the failure `reason` and `error` given."""
        info = answer.output if answer is not None and not reason else None
        if info is None and not reason:
            reason, error = ("InvalidInput", answer.message) if answer is not None else (group.reason, group.message)
        completed = group.completed_at or 0.0
        timing: dict[str, float] = {}
        if answer is not None and group.dispatched_at is not None:
            timing["queueMs"] = round(max(0.0, group.dispatched_at - group.queued_at) * 1000.0, 3)
            timing.update({k: round(v, 3) for k, v in answer.timing.stages().items()})
        timing["totalMs"] = round(max(0.0, completed - group.queued_at) * 1000.0, 3)
        return cls(input=source, output=output, ok=info is not None, reason=reason, error=error,
                   sha256=info.sha256 if info else "", size=info.bytes if info else 0,
                   width=info.width if info else 0, height=info.height if info else 0, attempts=attempts,
                   worker=f"{group.pool}/{group.worker}" if group.worker else "", completed_at=completed, timing=timing)


@dataclass
class BatchState:
    """What one batch knows about its items; mutable on purpose (one record per batch)."""

    queued_at: float
    """When the batch was first admitted (kept across restarts through status.timing.queuedAt)."""
    results: str
    """URI of the results manifest (status.results)."""
    done: DigestSet = field(default_factory=DigestSet)
    """Input URIs the journal holds as finished before this run (by digest: about 8 bytes
    each): never admitted again. Items finished in this run are not added: the listing
    names each input once (the plan drops a list object's repeats)."""
    succeeded: int = 0
    failed: int = 0
    listed: int = 0
    """Inputs seen by the listing so far (finished ones included)."""
    listing_complete: bool = False
    """The listing reached its end: `listed` is the total."""
    phases: dict[str, Phase] = field(default_factory=dict)
    """Group uid -> phase, for item groups handed to the dispatcher and not finished."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Group uid -> how many items it carries."""
    running: int = 0
    """How many items of `phases` are Dispatched or Processing."""
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

    def resume(self, lines: Iterable[str], taken: Callable[[ItemOutcome], None] | None = None) -> int:
        """Take in the journal written before a restart; returns how many items it holds.
        `taken` is called with each item taken in (once, whatever the journal repeats)."""
        for text in lines:
            outcome = ItemOutcome.from_line(text)
            if outcome is not None and self.done.add(outcome.input):  # a part written twice counts once
                self._count(outcome)
                if taken is not None:
                    taken(outcome)
        self.resumed = self.finished
        return self.resumed

    def track(self, uid: str, phase: Phase, items: int = 1) -> None:
        """An item group of `items` items handed to the dispatcher changed phase (not terminal)."""
        before = self.phases.get(uid)
        self.phases[uid] = phase
        self.sizes[uid] = items
        self.running += items * (_running(phase) - (_running(before) if before is not None else 0))

    def untrack(self, uid: str) -> None:
        before = self.phases.pop(uid, None)
        items = self.sizes.pop(uid, 1)
        if before is not None:
            self.running -= items * _running(before)

    def record(self, outcome: ItemOutcome) -> str:
        """An item ended (each listed item once): count it and return its manifest line."""
        self._count(outcome)
        return outcome.line()

    def _count(self, outcome: ItemOutcome) -> None:
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


def _count_field(value: Any) -> int:
    """A count read back from a journal line; 0 for anything else (the line's object is the
    tenant's to overwrite, so its fields are not trusted)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


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
