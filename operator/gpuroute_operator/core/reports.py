"""How a job's changes reach the world through the Effects port (pure).

A single-image ImageJob is its own resource: its status is published (coalesced by the
shell), its warnings become Events, and its end is one urgent status write carrying the
terminal Event. A batch item has no resource: every change goes to its batch, which counts
it, and its troubles show in the batch's counts and manifest, not as one Event each.
"""

from __future__ import annotations

from gpuroute_operator.core.effects import Effects, TerminalEvent
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase


def changed(effects: Effects, job: Job) -> None:
    """The job moved (not to a terminal phase)."""
    if job.batch is not None:
        effects.item(job, terminal=False)
    else:
        effects.publish(job.ref, job.status())


def ended(effects: Effects, job: Job) -> None:
    """The job reached its terminal phase (job.phase, job.reason, job.message)."""
    if job.batch is not None:
        effects.item(job, terminal=True)
        return
    failed = job.phase is Phase.FAILED
    event = TerminalEvent(job.reason if failed else job.phase.value, job.message, warning=failed)
    effects.publish(job.ref, job.status(), urgent=True, terminal_event=event)


def warn(effects: Effects, job: Job, reason: str, message: str) -> None:
    """Something the job's owner should see as a Warning Event."""
    if job.batch is None:
        effects.warn(job.ref, reason, message)
