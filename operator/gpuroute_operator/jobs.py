"""The operator's record of one ImageJob, and the status it renders to (pure)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from gpuroute_operator.kube import now_rfc3339
from gpuroute_operator.phases import Phase, check_transition, conditions
from gpuroute_operator.spec import JobSpec
from gpuroute_operator.status import ObjectRef


def parse_rfc3339(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


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
    sent_monotonic: float | None = None
    resend_current_attempt: bool = False
    preferred_worker: str | None = None
    active: dict[str, bytes] = field(default_factory=dict)
    output: dict[str, Any] | None = None
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
    def current_job_id(self) -> str:
        return f"{self.uid}/{self.attempts}"

    def move(self, phase: Phase, *, reason: str = "", message: str = "") -> None:
        check_transition(self.phase, phase)
        self.phase = phase
        self.reason = reason
        self.message = message
        self.conditions = conditions(phase, reason=reason, message=message, now=now_rfc3339(),
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


def failed_status(*, generation: int, reason: str, message: str, queued_at: float) -> dict[str, Any]:
    """Status of a job refused before it became a Job record (invalid spec)."""
    now = now_rfc3339()
    return {
        "phase": Phase.FAILED.value,
        "reason": reason,
        "message": message,
        "attempts": 0,
        "timing": {"queuedAt": now_rfc3339(queued_at), "completedAt": now, "totalMs": 0.0},
        "conditions": conditions(Phase.FAILED, reason=reason, message=message, now=now, generation=generation),
        "observedGeneration": generation,
    }
