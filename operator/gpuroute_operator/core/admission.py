"""From an ImageJob resource to a Job the dispatcher can run, or a refusal (pure).

Whatever goes wrong while reading a resource ends in a refusal that names the field:
no exception escapes, so no ImageJob is ever left without a status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpuroute_operator.core.effects import TerminalEvent
from gpuroute_operator.core.grants import StorageGrants
from gpuroute_operator.core.jobs import Job, Resume, failed_status
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import SpecError, parse_job_spec
from gpuroute_operator.core.timestamps import parse_rfc3339

log = logging.getLogger(__name__)

CANCEL_ANNOTATION = "gpuroute.io/cancel"


@dataclass(frozen=True)
class Admitted:
    """A job to hand to the dispatcher."""

    job: Job
    """The record, in phase Queued."""
    resume: Resume | None
    """Set when the stored status says an attempt was out (the operator restarted)."""
    cancel: str | None
    """Set when the resource already carries the cancel annotation."""


@dataclass(frozen=True)
class Refused:
    """A spec the operator cannot run: it ends Failed, never retried."""

    ref: ObjectRef
    """The ImageJob."""
    status: Mapping[str, Any]
    """Its Failed status."""
    event: TerminalEvent
    """Its terminal Event (a Warning naming the field)."""


@dataclass(frozen=True)
class Ended:
    """Its stored status is already terminal: nothing to run; no second terminal Event."""

    ref: ObjectRef
    """The ImageJob."""
    event: TerminalEvent
    """The terminal Event it should have (re-posted idempotently if a restart lost it)."""
    completed_at: float | None
    """status.timing.completedAt."""


Outcome = Admitted | Refused | Ended


def object_ref(body: Mapping[str, Any]) -> ObjectRef:
    meta = body.get("metadata") or {}
    return ObjectRef("ImageJob", str(meta.get("name") or ""), str(meta.get("namespace") or ""), str(meta.get("uid") or ""))


def cancel_requested(body: Mapping[str, Any]) -> bool:
    return ((body.get("metadata") or {}).get("annotations") or {}).get(CANCEL_ANNOTATION) == "true"


def admit(body: Mapping[str, Any], grants: StorageGrants, now: float) -> Outcome:
    """Decide what to do with an ImageJob seen for the first time by this process."""
    ref = object_ref(body)
    meta = body.get("metadata") or {}
    raw_status = body.get("status")
    status: Mapping[str, Any] = raw_status if isinstance(raw_status, Mapping) else {}
    try:
        generation = int(meta.get("generation") or 1)
    except (TypeError, ValueError):
        generation = 1
    phase = _phase(status.get("phase"))
    raw_timing = status.get("timing")
    timing: Mapping[str, Any] = raw_timing if isinstance(raw_timing, Mapping) else {}
    if phase is not None and phase.terminal:
        reason = str(status.get("reason") or phase.value)
        return Ended(ref, TerminalEvent(phase.value if phase is not Phase.FAILED else reason,
                                        str(status.get("message") or ""), warning=phase is Phase.FAILED),
                     parse_rfc3339(timing.get("completedAt")))
    queued_at = min(parse_rfc3339(timing.get("queuedAt")) or now, now)
    try:
        spec = parse_job_spec(body.get("spec"))
        grants.check(spec, ref.namespace or "")
    except SpecError as exc:
        return refuse(ref, exc, generation=generation, queued_at=queued_at, now=now)
    except Exception as exc:  # a parser bug must still end in a status, never in silence
        log.exception("admitting ImageJob %s/%s failed", ref.namespace, ref.name)
        return refuse(ref, SpecError("spec", f"cannot be read: {type(exc).__name__}: {exc}"),
                      generation=generation, queued_at=queued_at, now=now)
    job = Job(ref.uid, ref.namespace or "", ref.name, generation, spec, queued_at)
    resume = None
    attempts = status.get("attempts")
    if phase in (Phase.DISPATCHED, Phase.PROCESSING) and isinstance(attempts, int) and attempts >= 1:
        resume = Resume(phase, attempts, str(status.get("pool") or ""), str(status.get("worker") or ""))
        job.dispatched_at = _bounded(parse_rfc3339(timing.get("dispatchedAt")), queued_at, now)
    elif isinstance(attempts, int) and attempts >= 1:
        job.attempts = attempts  # re-queued before the restart: its next attempt counts on
    cancel = f"cancelled by annotation {CANCEL_ANNOTATION}" if cancel_requested(body) else None
    return Admitted(job, resume, cancel)


def refuse(ref: ObjectRef, exc: SpecError, *, generation: int, queued_at: float, now: float) -> Refused:
    status = failed_status(generation=generation, reason=exc.reason, message=str(exc), queued_at=queued_at, now=now)
    return Refused(ref, status, TerminalEvent(exc.reason, str(exc), warning=True))


def _phase(value: Any) -> Phase | None:
    try:
        return Phase(value)
    except ValueError:
        return None


def _bounded(value: float | None, low: float, high: float) -> float | None:
    return None if value is None else min(max(value, low), high)
