"""How long a job will take on a pool, learned from the timings its workers return (pure).

A pool's average time per job is a poor guide on its own: a pool that happened to get the
large images looks slow, and one average mixes a 5 ms invert with a 2 s super-resolution.
So each pool keeps one fit per *cost class* (the pipeline's ops and the parameters that
change their cost, `gpuroute.ops_catalog.cost_class`) of

    worker ms = overhead + rate x input megapixels

by exponentially weighted least squares (recent samples count most, so the fit follows a
pool whose GPUs change or slow down). Pools are then compared on the same job: its own
size where the operator knows it (inline inputs), otherwise the typical size of that cost
class across all pools (`PipelinePriors`), never the sizes a pool happened to see.

Every number here comes from a worker, so none is taken on trust (a worker that reported
0 ms for an enormous input would otherwise make its pool look free, and the cheapest
for every job). The placer checks a claimed input size against what the operator
knows; each worker key keeps its own fit and counts for one equal share of its pool's
estimate; and no pool is believed more than RATE_BAND times faster than the median
worker of the *other* pools on the same job (a pool cannot vouch for itself). A sample
far faster than that is ignored, one slightly faster is clamped to the band, and no
estimate is ever below MIN_SERVICE_MS.

Until a pool has run jobs of different sizes its own fit cannot split overhead from
rate. It then keeps its own average time and borrows the *shape* of the size curve from
the fit over every pool; with no shape anywhere, time is taken as independent of size.
Scaling a thumbnail's time up in proportion to pixels would make a pool that only ever
got thumbnails look hopeless for large images, so it would never get one to learn from.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

FIT_ALPHA = 0.05
"""Weight of the newest sample in a fit (the last ~20 results per pool and class dominate)."""
MIN_SAMPLES_FOR_SLOPE = 4
"""Results needed before a fit trusts its own overhead/rate split."""
MIN_RELATIVE_SPREAD = 0.1
"""Sizes whose standard deviation is under this share of their mean cannot separate overhead
from rate; the fit then scales its mean time by size instead."""
MAX_COST_CLASSES = 1000
"""Fits kept per pool (and priors overall). Radii and scales are user input, so the number of
classes is unbounded; past this the least-used class is forgotten."""
MAX_KEYS_PER_CLASS = 64
"""Worker keys with a fit of their own per pool and class; past this the least-used is forgotten."""
MAX_LEARNED_MPIX = 268.0
"""Largest input (megapixels) a result is learned from when the operator cannot check its size
(object-storage inputs): the largest image a default worker writes at all (16384 x 16384,
its inputs are capped at 64). A larger claim is false, and the result teaches nothing."""
RATE_BAND = 4.0
"""No pool is believed more than this many times faster than the median worker of the other
pools on the same job. Real GPUs differ by less on one pipeline (bench/routing_sim.py's
pools by under 2x); a lying worker gains at most this factor, on its own share of its pool."""
OUTLIER_FACTOR = 16.0
"""A result this many times faster than the other pools' median is ignored, not clamped."""
MIN_SERVICE_MS = 1.0
"""Floor on any expected worker time, so that no pool's time or cost is ever 0."""
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
    _line: tuple[tuple[float, float] | None] | None = field(default=None, repr=False, compare=False)
    """identified_line() since the last sample (every routing decision asks every key's fit)."""

    def add(self, mpix: float, ms: float) -> None:
        self._line = None
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

    def identified_line(self) -> tuple[float, float] | None:
        """(overhead ms, ms per megapixel) once sizes spread enough to tell them apart, else None."""
        if self._line is None:
            self._line = (self._identify(),)
        return self._line[0]

    def _identify(self) -> tuple[float, float] | None:
        if self.samples < MIN_SAMPLES_FOR_SLOPE or not self.weight:
            return None
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        variance = self.sum_xx / self.weight - mean_x * mean_x
        if mean_x <= 0.0 or variance <= (MIN_RELATIVE_SPREAD * mean_x) ** 2:
            return None
        slope = (self.sum_xy / self.weight - mean_x * mean_y) / variance
        intercept = mean_y - slope * mean_x
        if slope < 0.0:
            # Noise can tilt a fit over a narrow range of sizes: never predict less for more.
            return mean_y, 0.0
        if intercept < 0.0:
            return 0.0, mean_y / mean_x
        return intercept, slope

    def line(self) -> tuple[float, float] | None:
        """What the status shows: the identified line, or (mean ms, 0) before one exists."""
        mean = self.mean_ms
        return None if mean is None else (self.identified_line() or (mean, 0.0))

    def predict(self, mpix: float | None, shape: ServiceFit | None = None) -> float | None:
        """Expected worker ms for an input of `mpix` megapixels (None: the mean job seen here).
        `shape`, the fit over every pool, scales this pool's mean by size until its own line exists."""
        if not self.weight:
            return None
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        if mpix is None:
            return mean_y
        own = self.identified_line()
        if own is not None:
            return own[0] + own[1] * mpix
        curve = shape.identified_line() if shape is not None else None
        if curve is not None:
            at_mean = curve[0] + curve[1] * mean_x
            if at_mean > 0.0:
                return mean_y * (curve[0] + curve[1] * mpix) / at_mean
        return mean_y


class _Counted(Protocol):
    @property
    def samples(self) -> int: ...


Fit = TypeVar("Fit", bound=_Counted)


def fit_for(fits: dict[str, Fit], name: str, make: Callable[[], Fit], limit: int | None = None) -> Fit:
    """The fit kept under `name`, made room for (the least-used one forgotten) if new;
    `limit`: how many are kept (None: MAX_COST_CLASSES)."""
    fit = fits.get(name)
    if fit is None:
        if len(fits) >= (MAX_COST_CLASSES if limit is None else limit):
            del fits[min(fits, key=lambda other: fits[other].samples)]
        fit = fits[name] = make()
    return fit


@dataclass
class KeyedFit:
    """One pool's fits for one cost class: one per worker key, each an equal share of the
    pool's estimate, plus their union (what the status shows)."""

    by_key: dict[str, ServiceFit] = field(default_factory=dict)
    """Fit of each worker key's own results."""
    pooled: ServiceFit = field(default_factory=ServiceFit)
    """Fit of every result of the pool's workers (status only: one busy key would dominate it)."""

    def add(self, key: str, mpix: float, ms: float) -> None:
        fit_for(self.by_key, key, ServiceFit, MAX_KEYS_PER_CLASS).add(mpix, ms)
        self.pooled.add(mpix, ms)

    @property
    def samples(self) -> int:
        return self.pooled.samples

    def line(self) -> tuple[float, float] | None:
        return self.pooled.line()

    def key_predictions(self, mpix: float | None, shape: ServiceFit | None = None) -> list[float]:
        """Each worker key's expected ms for the job."""
        return [ms for fit in self.by_key.values() if (ms := fit.predict(mpix, shape)) is not None]

    def predict(self, mpix: float | None, shape: ServiceFit | None = None,
                floor: float = MIN_SERVICE_MS, keys: list[float] | None = None) -> float | None:
        """Expected ms for the job: the fit of every result, but never under `floor`, nor under
        the keys' equal shares (the mean over keys of each key's expectation, at least `floor`,
        the lowest key's taken at `floor`). So a key that reports 0 ms for most of the pool's
        jobs moves the pool by one share only, while the ordinary spread between honest
        workers leaves the fit of every result in charge. `keys`: key_predictions(mpix, shape),
        when the caller has them already."""
        pooled = self.pooled.predict(mpix, shape)
        if pooled is None:
            return None
        shares = sorted(max(floor, ms) for ms in (self.key_predictions(mpix, shape) if keys is None else keys))
        share_bound = (floor + sum(shares[1:])) / len(shares) if shares else floor
        return max(floor, pooled, share_bound)


def band_floor(others: Iterable[float]) -> float:
    """The least expected ms a pool is credited with, given the other pools' keys' estimates
    for the same job: RATE_BAND times under their median (MIN_SERVICE_MS with none)."""
    samples = list(others)
    if not samples:
        return MIN_SERVICE_MS
    return max(MIN_SERVICE_MS, statistics.median(samples) / RATE_BAND)


def plausible_ms(ms: float, others: Iterable[float]) -> float | None:
    """A worker's reported time for a job, judged against the other pools' keys' estimates for
    the same job: None (ignored) when OUTLIER_FACTOR times under their median, otherwise
    clamped to at most RATE_BAND times under it. Slower than the others is believed: a
    worker that makes its own pool look slow takes work from nobody else."""
    samples = list(others)
    if not samples:
        return ms
    median = statistics.median(samples)
    if ms < median / OUTLIER_FACTOR:
        return None
    return max(ms, median / RATE_BAND)


@dataclass
class PipelinePriors:
    """What every pool's results say about each cost class: the size a job of unknown size
    is compared on, and the shape of time against size."""

    mean_mpix: dict[str, float] = field(default_factory=dict)
    """Moving average of input megapixels by cost class."""
    shapes: dict[str, ServiceFit] = field(default_factory=dict)
    """Fit of worker ms against megapixels over every pool, by cost class."""

    def add(self, cost_class: str, mpix: float, ms: float) -> None:
        new_class = cost_class not in self.shapes
        fit_for(self.shapes, cost_class, ServiceFit).add(mpix, ms)
        if new_class:  # making room may have forgotten a class: forget its size too
            for forgotten in self.mean_mpix.keys() - self.shapes.keys():
                del self.mean_mpix[forgotten]
        previous = self.mean_mpix.get(cost_class)
        self.mean_mpix[cost_class] = mpix if previous is None else (1 - SIZE_ALPHA) * previous + SIZE_ALPHA * mpix

    def expected_mpix(self, cost_class: str, known_mpix: float | None) -> float | None:
        """The job's own size when known, otherwise its class's typical size (None before any result)."""
        return known_mpix if known_mpix is not None else self.mean_mpix.get(cost_class)

    def shape(self, cost_class: str) -> ServiceFit | None:
        return self.shapes.get(cost_class)
