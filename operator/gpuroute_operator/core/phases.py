"""The ImageJob state machine and the conditions it implies (pure).

    Queued ──► Dispatched ──► Processing ──► Completed
      ▲  │          │              │
      │  └──────────┴──────────────┴──────► Failed | Cancelled
      └─── re-queued after a lost worker or a retryable error

Queued ──► Completed is allowed too: a re-queued job may still receive the result
of its earlier attempt (a worker cut off, or an operator restart), and that result
is accepted once instead of computing the image again.

Terminal phases never change again; that is what makes "every job reaches a terminal
phase exactly once" checkable.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any


class Phase(str, enum.Enum):
    QUEUED = "Queued"
    DISPATCHED = "Dispatched"
    PROCESSING = "Processing"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED})

_ALLOWED: Mapping[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.QUEUED, Phase.DISPATCHED, Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED}),
    Phase.DISPATCHED: frozenset({Phase.QUEUED, Phase.PROCESSING, Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED}),
    Phase.PROCESSING: frozenset({Phase.QUEUED, Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED}),
    Phase.COMPLETED: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
}


class TransitionError(RuntimeError):
    """An attempt to move a job along an edge the state machine does not have."""


def check_transition(current: Phase, target: Phase) -> None:
    if target not in _ALLOWED[current]:
        raise TransitionError(f"{current.value} cannot become {target.value}")


def conditions(phase: Phase, *, reason: str, message: str, now: str, generation: int | None,
               previous: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Kubernetes-style conditions for a phase.

    lastTransitionTime moves only when a condition's status changes, so it is carried
    over from `previous`. Succeeded is what `kubectl wait --for=condition=Succeeded`
    waits on.
    """
    before = {c.get("type"): c for c in previous or ()}
    dispatched = "True" if phase in (Phase.DISPATCHED, Phase.PROCESSING, Phase.COMPLETED) else "False"
    succeeded = {Phase.COMPLETED: "True", Phase.FAILED: "False", Phase.CANCELLED: "False"}.get(phase, "Unknown")
    failed = "True" if phase is Phase.FAILED else "False"
    rows = (
        ("Dispatched", dispatched, "Dispatched" if dispatched == "True" else "Waiting", ""),
        ("Succeeded", succeeded, reason or phase.value, message),
        ("Failed", failed, reason if failed == "True" else "NotFailed", message if failed == "True" else ""),
    )
    out = []
    for kind, status, why, text in rows:
        old = before.get(kind)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        condition: dict[str, Any] = {"type": kind, "status": status, "reason": why, "message": text,
                                     "lastTransitionTime": since or now}
        if generation is not None:
            condition["observedGeneration"] = generation
        out.append(condition)
    return out
