"""The operator's record of one ImageJob, and the status it renders to (pure)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gpuroute.protocol import AttemptId, ItemAnswer
from gpuroute_operator.core.phases import Phase, check_transition, conditions
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import JobSpec
from gpuroute_operator.core.timestamps import now_rfc3339


class Place(enum.Enum):
    """Where a live job is; the dispatcher's indexes follow this field."""

    NEW = "new"
    QUEUED = "queued"
    """In its pool's queue (job.pool)."""
    UNROUTED = "unrouted"
    """No eligible pool right now."""
    HELD = "held"
    """Waiting for storage signing to work again."""
    RESUMING = "resuming"
    """Resumed after a restart; waiting briefly for the worker that ran it to come back."""
    RUNNING = "running"
    """At least one attempt is out."""
    DONE = "done"


@dataclass
class Job:
    """Mutable on purpose: one record follows the job through its phases."""

    uid: str
    namespace: str
    name: str
    generation: int
    spec: JobSpec
    queued_at: float
    phase: Phase = Phase.QUEUED
    attempts: int = 0
    reason: str = ""
    message: str = ""
    decision: str = ""
    pool: str | None = None
    worker: str | None = None
    gpu: str | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    reuse_attempt: bool = False
    """The next dispatch re-sends the current attempt (it never ran: refused, or resumed)."""
    batch: str | None = None
    """uid of the batch ImageJob this is an item of; None for a single-image ImageJob. Items
    have no resource of their own: their batch aggregates them (effects.item)."""
    resigned: bool = False
    """Storage already refused one of its URLs and it was signed again (done at most once)."""
    preferred_worker: str | None = None
    live: set[AttemptId] = field(default_factory=set)
    """Attempts sent and not yet answered (normally one; more after a cut-off worker)."""
    place: Place = Place.NEW
    """Where the job is: one field, so no two structures can disagree."""
    output: dict[str, Any] | None = None
    item_answers: tuple[ItemAnswer, ...] = ()
    """An item group's answers, one per spec.items entry, once it completed."""
    timing: dict[str, Any] = field(default_factory=dict)
    conditions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def priority(self) -> str:
        return self.spec.priority

    @property
    def deadline(self) -> float:
        return self.queued_at + self.spec.timeout_s

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("ImageJob", self.name, self.namespace, self.uid)

    @property
    def current_attempt(self) -> AttemptId:
        return AttemptId(self.uid, max(1, self.attempts))

    def sent(self, number: int, pool: str, worker: str, device: str, now: float) -> None:
        """Attempt `number` has left for `pool`/`worker`: the job is Dispatched, its attempt counted."""
        self.attempts = number
        self.reuse_attempt = False
        self.pool, self.worker, self.gpu = pool, worker, device
        self.dispatched_at = now
        self.started_at = None
        self.move(Phase.DISPATCHED, at=now, reason="Dispatched", message=f"attempt {number} sent to {pool}/{worker}")

    def resume(self, resume: Resume, now: float) -> None:
        """Admitted after a restart with an attempt out (its stored status): take that attempt up again."""
        self.attempts = resume.attempts
        self.pool = resume.pool or None
        self.preferred_worker = resume.worker or None
        self.move(Phase.QUEUED, at=now, reason="Resumed", message=f"resumed after an operator restart; "
                  f"attempt {resume.attempts} was on {resume.pool}/{resume.worker}")

    def move(self, phase: Phase, *, at: float, reason: str = "", message: str = "") -> None:
        """Change phase at clock time `at` (conditions' lastTransitionTime)."""
        check_transition(self.phase, phase)
        self.phase = phase
        self.reason = reason
        self.message = message
        if self.batch is None:  # an item has no resource of its own: its conditions would never be written
            self.conditions = conditions(phase, reason=reason, message=message, now=now_rfc3339(at),
                                         generation=self.generation, previous=self.conditions)

    def status(self) -> dict[str, Any]:
        """The full status subresource for this job's current state."""
        timing = {"queuedAt": now_rfc3339(self.queued_at)}
        for key, value in (("dispatchedAt", self.dispatched_at), ("startedAt", self.started_at),
                           ("completedAt", self.completed_at)):
            if value is not None:
                timing[key] = now_rfc3339(value)
        timing.update(self.timing)
        status: dict[str, Any] = {
            "phase": self.phase.value,
            "reason": self.reason,
            "message": self.message,
            "attempts": self.attempts,
            "pool": self.pool or "",
            "worker": self.worker or "",
            "gpu": self.gpu or "",
            "decision": self.decision,
            "timing": timing,
            "conditions": self.conditions,
            "observedGeneration": self.generation,
        }
        if self.output is not None:
            status["output"] = self.output
        return status


def failed_status(*, generation: int, reason: str, message: str, queued_at: float, now: float) -> dict[str, Any]:
    """Status of a job refused before it became a Job record (invalid spec)."""
    stamp = now_rfc3339(now)
    return {
        "phase": Phase.FAILED.value,
        "reason": reason,
        "message": message,
        "attempts": 0,
        "timing": {"queuedAt": now_rfc3339(min(queued_at, now)), "completedAt": stamp,
                   "totalMs": round(max(0.0, now - queued_at) * 1000.0, 3)},
        "conditions": conditions(Phase.FAILED, reason=reason, message=message, now=stamp, generation=generation),
        "observedGeneration": generation,
    }


@dataclass(frozen=True)
class Resume:
    """What the stored status says about a job admitted after a restart."""

    phase: Phase
    """The stored phase (Dispatched or Processing)."""
    attempts: int
    """status.attempts: the attempt that was out."""
    pool: str
    """status.pool."""
    worker: str
    """status.worker."""
