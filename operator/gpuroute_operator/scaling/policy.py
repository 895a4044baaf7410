"""The autoscaling policy (pure): how many workers a pool should have, and why.

No clock, no I/O: the Autoscaler (:mod:`gpuroute_operator.scaling.autoscaler`) feeds in
the pool's demand, the remote Deployment's current count and when demand last reached
zero, and carries the answer to the GPU cluster (:mod:`gpuroute_operator.scaling.remote`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpuroute_operator.core.scaling_spec import ScalingSpec


@dataclass(frozen=True)
class ScaleDecision:
    """What one reconcile of one pool found and did."""

    pool: str
    """WorkerPool name."""
    current: int | None
    """spec.replicas of the remote Deployment as read; None when it could not be read."""
    desired: int | None
    """Replica count the autoscaler wants; None when it could not decide (error before reading)."""
    reason: str
    """Human-readable explanation, e.g. "queue 37 / 4 per worker -> 10, capped at max 8", or the error."""
    applied: bool
    """True when a patch changed the remote replica count in this reconcile."""


def desired_replicas(
    spec: ScalingSpec, *, queued: int, in_flight: int, current: int, idle_since: float | None, now: float
) -> tuple[int, str]:
    """The replica count the pool should have, and why.

    - demand = queued + in_flight; target = ceil(demand / targetQueuePerWorker),
      clamped to [minReplicas, maxReplicas].
    - A higher target applies at once (scale-up is never delayed).
    - A lower target while there is demand applies, but never below the number of jobs
      in flight (capped at the current count): Kubernetes, not the operator, picks which
      pods to delete, and any of them may hold one of those jobs, which would then be
      retried elsewhere.
    - With no demand the count holds until demand has been zero for
      scaleDownIdleSeconds (``idle_since`` is when it became zero; None means just now),
      then drops to minReplicas, possibly 0.
    - maxReplicas is a hard cap and minReplicas a hard floor, also for the current count.
    """
    queued = max(0, queued)
    in_flight = max(0, in_flight)
    lo, hi = spec.min_replicas, spec.max_replicas
    per = spec.target_queue_per_worker
    demand = queued + in_flight
    if demand == 0:
        idle_for = max(0.0, now - idle_since) if idle_since is not None else 0.0
        if idle_for >= spec.scale_down_idle_seconds:
            return lo, f"idle for {idle_for:.0f}s >= {spec.scale_down_idle_seconds}s -> min {lo}"
        held = min(max(current, lo), hi)
        reason = f"idle for {idle_for:.0f}s < {spec.scale_down_idle_seconds}s, holding {held}"
        if held != current:
            reason += f" (current {current} outside [{lo}, {hi}])"
        return held, reason
    raw = math.ceil(demand / per)
    target = min(max(raw, lo), hi)
    reason = f"queue {demand} / {per} per worker -> {raw}"
    if in_flight:
        reason = f"queue {demand} ({queued} queued + {in_flight} in flight) / {per} per worker -> {raw}"
    if raw > hi:
        reason += f", capped at max {hi}"
    elif raw < lo:
        reason += f", raised to min {lo}"
    if target < current:
        floor = min(current, in_flight, hi)
        if floor > target:
            return floor, f"{reason}, holding {floor} for {in_flight} in flight"
    return target, reason
