"""How long a job will take on a pool, learned from the timings its workers return (pure).

A pool's average time per job is a poor guide on its own: a pool that happened to get the
large images looks slow, and one average mixes a 5 ms invert with a 2 s super-resolution.
So each pool keeps one fit per *cost class* (the pipeline's ops and the parameters that
change their cost, `gpuroute.ops_catalog.cost_class`) of

    worker ms = overhead + rate x input megapixels

by exponentially weighted least squares (recent samples count most, so the fit follows a
pool whose GPUs change or slow down). Pools are then compared on the same job: its own
size where the operator knows it (inline inputs), otherwise the typical size of that cost
class across all pools (`SizePrior`), never the sizes a pool happened to see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIT_ALPHA = 0.05
"""Weight of the newest sample in a fit (the last ~20 results per pool and class dominate)."""
MIN_SAMPLES_FOR_SLOPE = 4
"""Results needed before a fit trusts its own overhead/rate split."""
MIN_RELATIVE_SPREAD = 0.1
"""Sizes whose standard deviation is under this share of their mean cannot separate overhead
from rate; the fit then scales its mean time by size instead."""
SIZE_ALPHA = 0.02
"""Weight of the newest sample in the typical input size of a cost class (lognormal sizes
need a long memory for a stable mean)."""


@dataclass
class ServiceFit:
    """Weighted sums of (input megapixels, worker ms) for one pool and one cost class."""

    weight: float = 0.0
    """Sum of the sample weights."""
    sum_x: float = 0.0
    """Weighted sum of input megapixels."""
    sum_y: float = 0.0
    """Weighted sum of worker milliseconds."""
    sum_xx: float = 0.0
    """Weighted sum of squared megapixels."""
    sum_xy: float = 0.0
    """Weighted sum of megapixels times milliseconds."""
    samples: int = 0
    """Results seen (unweighted)."""

    def add(self, mpix: float, ms: float) -> None:
        keep = 1.0 - FIT_ALPHA
        self.weight = self.weight * keep + 1.0
        self.sum_x = self.sum_x * keep + mpix
        self.sum_y = self.sum_y * keep + ms
        self.sum_xx = self.sum_xx * keep + mpix * mpix
        self.sum_xy = self.sum_xy * keep + mpix * ms
        self.samples += 1

    @property
    def mean_ms(self) -> float | None:
        return self.sum_y / self.weight if self.weight else None

    def line(self) -> tuple[float, float] | None:
        """(overhead ms, ms per megapixel), or None before any result with a size."""
        if not self.weight:
            return None
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        if mean_x <= 0.0:
            return None
        proportional = (0.0, mean_y / mean_x)
        variance = self.sum_xx / self.weight - mean_x * mean_x
        if self.samples < MIN_SAMPLES_FOR_SLOPE or variance <= (MIN_RELATIVE_SPREAD * mean_x) ** 2:
            return proportional
        slope = (self.sum_xy / self.weight - mean_x * mean_y) / variance
        intercept = mean_y - slope * mean_x
        if slope < 0.0 or intercept < 0.0:
            # Noise can tilt a fit over a narrow range of sizes; time proportional to size is
            # the safer reading then (it never predicts less than nothing or less for more).
            return proportional
        return intercept, slope

    def predict(self, mpix: float | None) -> float | None:
        """Expected worker ms for an input of `mpix` megapixels (None: the mean job seen here)."""
        line = self.line()
        if mpix is None or line is None:
            return self.mean_ms
        overhead, rate = line
        return overhead + rate * mpix


@dataclass
class SizePrior:
    """Typical input megapixels per cost class, over every pool: the size a job of unknown
    size is compared on."""

    mean_mpix: dict[str, float] = field(default_factory=dict)
    """Moving average of input megapixels by cost class."""

    def add(self, cost_class: str, mpix: float) -> None:
        previous = self.mean_mpix.get(cost_class)
        self.mean_mpix[cost_class] = mpix if previous is None else (1 - SIZE_ALPHA) * previous + SIZE_ALPHA * mpix

    def expected(self, cost_class: str, known_mpix: float | None) -> float | None:
        """The job's own size when known, otherwise its class's typical size (None before any result)."""
        return known_mpix if known_mpix is not None else self.mean_mpix.get(cost_class)
