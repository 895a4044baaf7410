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
from gpuroute_operator.core.grants import READ_ANNOTATION, WRITE_ANNOTATION, StorageGrants
from gpuroute_operator.core.jobs import Job, Resume, failed_status
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import BatchSpec, SpecError, parse_batch_spec, parse_job_spec
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


@dataclass(frozen=True)
class BatchAdmitted:
    """A batch ImageJob to run (batch/runner.py carries it out)."""

    ref: ObjectRef
    """The ImageJob."""
    generation: int
    """metadata.generation it was admitted at."""
    spec: BatchSpec
    """The validated batch spec."""
    queued_at: float
    """When it was first admitted (status.timing.queuedAt, kept across restarts)."""
    resumed: bool
    """Its stored status has a phase: an operator before this one ran it."""
    cancel: str | None
    """Set when the resource already carries the cancel annotation."""


Outcome = Admitted | Refused | Ended
BatchOutcome = BatchAdmitted | Refused | Ended


@dataclass(frozen=True)
class _Read:
    """What admission reads of any ImageJob before its spec: tolerant of every malformed field."""

    ref: ObjectRef
    generation: int
    status: Mapping[str, Any]
    phase: Phase | None
    timing: Mapping[str, Any]
    queued_at: float

    def ended(self) -> Ended | None:
        if self.phase is None or not self.phase.terminal:
            return None
        reason = str(self.status.get("reason") or self.phase.value)
        return Ended(self.ref, TerminalEvent(self.phase.value if self.phase is not Phase.FAILED else reason,
                                             str(self.status.get("message") or ""), warning=self.phase is Phase.FAILED),
                     parse_rfc3339(self.timing.get("completedAt")))

    def refuse(self, exc: SpecError, now: float) -> Refused:
        return refuse(self.ref, exc, generation=self.generation, queued_at=self.queued_at, now=now)


def _read(body: Mapping[str, Any], now: float) -> _Read:
    meta = body.get("metadata") or {}
    raw_status = body.get("status")
    status: Mapping[str, Any] = raw_status if isinstance(raw_status, Mapping) else {}
    try:
        generation = int(meta.get("generation") or 1)
    except (TypeError, ValueError):
        generation = 1
    raw_timing = status.get("timing")
    timing: Mapping[str, Any] = raw_timing if isinstance(raw_timing, Mapping) else {}
    queued_at = min(parse_rfc3339(timing.get("queuedAt")) or now, now)
    return _Read(object_ref(body), generation, status, _phase(status.get("phase")), timing, queued_at)


def object_ref(body: Mapping[str, Any]) -> ObjectRef:
    meta = body.get("metadata") or {}
    return ObjectRef("ImageJob", str(meta.get("name") or ""), str(meta.get("namespace") or ""), str(meta.get("uid") or ""))


def cancel_requested(body: Mapping[str, Any]) -> bool:
    return ((body.get("metadata") or {}).get("annotations") or {}).get(CANCEL_ANNOTATION) == "true"


def is_ended(body: Mapping[str, Any]) -> bool:
    """The stored status is terminal: nothing to admit (checked before any grants are read)."""
    return _read(body, 0.0).ended() is not None


def admit(body: Mapping[str, Any], grants: StorageGrants, now: float) -> Outcome:
    """Decide what to do with a single-image ImageJob seen for the first time by this process."""
    read = _read(body, now)
    if (ended := read.ended()) is not None:
        return ended
    ref, status, phase, timing, queued_at = read.ref, read.status, read.phase, read.timing, read.queued_at
    try:
        spec = parse_job_spec(body.get("spec"))
        grants.check(spec, ref.namespace or "")
    except SpecError as exc:
        return read.refuse(exc, now)
    except Exception as exc:  # a parser bug must still end in a status, never in silence
        log.exception("admitting ImageJob %s/%s failed", ref.namespace, ref.name)
        return read.refuse(SpecError("spec", f"cannot be read: {type(exc).__name__}: {exc}"), now)
    job = Job(ref.uid, ref.namespace or "", ref.name, read.generation, spec, queued_at)
    resume = None
    attempts = status.get("attempts")
    if phase in (Phase.DISPATCHED, Phase.PROCESSING) and isinstance(attempts, int) and attempts >= 1:
        resume = Resume(phase, attempts, str(status.get("pool") or ""), str(status.get("worker") or ""))
        job.dispatched_at = _bounded(parse_rfc3339(timing.get("dispatchedAt")), queued_at, now)
    elif isinstance(attempts, int) and attempts >= 1:
        job.attempts = attempts  # re-queued before the restart: its next attempt counts on
    return Admitted(job, resume, _cancel(body))


def admit_batch(body: Mapping[str, Any], grants: StorageGrants, now: float) -> BatchOutcome:
    """Decide what to do with a batch ImageJob seen for the first time by this process: the same
    reading of metadata and status as `admit`, the batch's spec and its storage grants."""
    read = _read(body, now)
    if (ended := read.ended()) is not None:
        return ended
    ref = read.ref
    try:
        spec = parse_batch_spec(body.get("spec"))
        check_batch_grants(spec, grants, ref.namespace or "")
    except SpecError as exc:
        return read.refuse(exc, now)
    except Exception as exc:  # a parser bug must still end in a status, never in silence
        log.exception("admitting batch ImageJob %s/%s failed", ref.namespace, ref.name)
        return read.refuse(SpecError("spec", f"cannot be read: {type(exc).__name__}: {exc}"), now)
    return BatchAdmitted(ref, read.generation, spec, read.queued_at, resumed=read.phase is not None,
                         cancel=_cancel(body))


def check_batch_grants(spec: BatchSpec, grants: StorageGrants, namespace: str) -> None:
    """The batch's input (prefix or list object) is readable and its output prefix writable."""
    source_field, source = (("spec.input.prefix", spec.prefix) if spec.prefix is not None
                            else ("spec.input.list", spec.list_uri))
    assert source is not None
    if not grants.may_read(source.uri):
        raise SpecError(source_field, f"{source.uri} is outside the read prefixes granted to namespace {namespace!r} "
                        f"({READ_ANNOTATION}: {', '.join(grants.read) or 'none'})", "StorageNotGranted")
    if not grants.may_write(spec.output_prefix.uri):
        raise SpecError("spec.output.prefix", f"{spec.output_prefix.uri} is outside the write prefixes granted to "
                        f"namespace {namespace!r} ({WRITE_ANNOTATION}: {', '.join(grants.write) or 'none'})",
                        "StorageNotGranted")


def _cancel(body: Mapping[str, Any]) -> str | None:
    return f"cancelled by annotation {CANCEL_ANNOTATION}" if cancel_requested(body) else None


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
