"""The autoscaling policy: replica arithmetic, caps, floors and the idle hold."""

from __future__ import annotations

import pytest

from gpuroute_operator.scaling.policy import desired_replicas
from tests.unit.gpuroute_operator.scaling.kubeconfigs import scaling_spec


@pytest.mark.parametrize(
    ("spec_kw", "queued", "in_flight", "current", "idle_since", "now", "want", "reason_part"),
    [
        # Scale-up is immediate and capped.
        ({}, 37, 0, 1, None, 0.0, 8, "queue 37 / 4 per worker -> 10, capped at max 8"),
        ({}, 20, 0, 1, None, 0.0, 5, "queue 20 / 4 per worker -> 5"),
        ({}, 1, 0, 0, None, 0.0, 1, "-> 1"),
        ({}, 30, 7, 2, None, 0.0, 8, "queue 37 (30 queued + 7 in flight)"),
        ({"hi": 3}, 20, 0, 1, None, 0.0, 3, "capped at max 3"),
        # Raised to the floor.
        ({"lo": 2}, 1, 0, 0, None, 0.0, 2, "raised to min 2"),
        # Scale-down while busy: to the target, never below jobs in flight.
        ({}, 4, 0, 6, None, 0.0, 1, "-> 1"),
        ({}, 0, 3, 6, None, 0.0, 3, "holding 3 for 3 in flight"),
        ({}, 2, 5, 8, None, 0.0, 5, "holding 5 for 5 in flight"),
        ({}, 0, 9, 4, None, 0.0, 4, "-> 3"),  # in-flight floor never exceeds current
        # Idle: hold until scaleDownIdleSeconds, then min (zero).
        ({}, 0, 0, 3, 100.0, 150.0, 3, "idle for 50s < 300s, holding 3"),
        ({}, 0, 0, 3, 100.0, 400.0, 0, "idle for 300s >= 300s -> min 0"),
        ({"lo": 1}, 0, 0, 3, 0.0, 1000.0, 1, "-> min 1"),
        ({"idle": 0}, 0, 0, 3, None, 5.0, 0, "-> min 0"),
        ({}, 0, 0, 3, None, 5.0, 3, "holding 3"),
        # The current count outside the bounds is brought inside even when idle.
        ({"hi": 2}, 0, 0, 5, 0.0, 1.0, 2, "outside [0, 2]"),
        ({"lo": 2}, 0, 0, 0, 0.0, 1.0, 2, "holding 2"),
        # Hard cap beats the in-flight floor.
        ({"hi": 2}, 0, 12, 5, None, 0.0, 2, "capped at max 2"),
        # Steady state.
        ({}, 8, 0, 2, None, 0.0, 2, "-> 2"),
        # Negative inputs (a counting bug upstream) count as zero.
        ({}, -3, 0, 2, None, 0.0, 2, "holding 2"),
    ],
)
def test_desired_replicas(
    spec_kw: dict[str, int], queued: int, in_flight: int, current: int, idle_since: float | None,
    now: float, want: int, reason_part: str,
) -> None:
    got, reason = desired_replicas(
        scaling_spec(**spec_kw), queued=queued, in_flight=in_flight, current=current, idle_since=idle_since, now=now
    )
    assert got == want, reason
    assert reason_part in reason
