"""Invariants every finished ImageJob must satisfy, checked the same way by the dispatcher
unit tests, the property test and the chaos suite."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gpuroute_operator.core.timestamps import parse_rfc3339

TERMINAL_PHASES = ("Completed", "Failed", "Cancelled")
STAGES = ("queueMs", "networkMs", "downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs")
"""The parts of totalMs a status carries once a worker answered."""
ROUNDING_MS = 0.005
"""How far the parts may sum from totalMs: each of the eight values is rounded to 0.001 ms."""


def timing_violations(status: Mapping[str, Any]) -> list[str]:
    """What is wrong with a terminal status's timing (empty when consistent)."""
    timing = status.get("timing") or {}
    stamps = [parse_rfc3339(timing.get(k)) for k in ("queuedAt", "dispatchedAt", "startedAt", "completedAt")]
    present = [s for s in stamps if s is not None]
    problems = []
    if any(b < a - 0.0015 for a, b in zip(present, present[1:], strict=False)):
        problems.append(f"timestamps out of order: {timing}")
    total = timing.get("totalMs")
    parts = [timing.get(k, 0.0) for k in STAGES]
    if total is None or not all(isinstance(p, (int, float)) and math.isfinite(p) and p >= 0 for p in [*parts, total]):
        problems.append(f"durations missing, negative or not finite: {timing}")
    elif any(k in timing for k in STAGES) and abs(sum(parts) - total) > ROUNDING_MS:
        # Every millisecond of the job is in exactly one stage: none missing, none counted twice.
        problems.append(f"stages add up to {sum(parts):.3f} ms, not totalMs {total}")
    if status.get("phase") == "Completed" and not (isinstance(status.get("attempts"), int) and status["attempts"] >= 1):
        problems.append(f"completed with attempts {status.get('attempts')!r}")
    return problems
