"""ServiceFit and SizePrior: what the router believes a job will cost on a pool."""

from __future__ import annotations

import random

import pytest

from gpuroute_operator.service_model import MIN_SAMPLES_FOR_SLOPE, ServiceFit, SizePrior


def test_empty_fit_knows_nothing() -> None:
    assert ServiceFit().predict(1.0) is None
    assert ServiceFit().predict(None) is None


def test_recovers_overhead_and_rate() -> None:
    fit = ServiceFit()
    rng = random.Random(1)
    for _ in range(200):
        mpix = rng.lognormvariate(0.5, 0.7)
        fit.add(mpix, 30.0 + 80.0 * mpix)
    assert fit.predict(0.0) == pytest.approx(30.0, rel=1e-6)
    assert fit.predict(10.0) == pytest.approx(830.0, rel=1e-6)


def test_pools_compared_on_the_same_job_not_on_what_they_saw() -> None:
    # The fast pool happened to get the big images: its mean time per job is the larger one,
    # yet for the same image it is the faster pool.
    fast, slow = ServiceFit(), ServiceFit()
    for mpix in (8.0, 9.0, 10.0, 11.0, 12.0):
        fast.add(mpix, 20.0 + 40.0 * mpix)
    for mpix in (0.5, 0.75, 1.0, 1.25, 1.5):
        slow.add(mpix, 20.0 + 120.0 * mpix)
    assert fast.mean_ms > slow.mean_ms  # type: ignore[operator]
    assert fast.predict(2.0) < slow.predict(2.0)  # type: ignore[operator]


def test_same_sizes_scale_the_mean_by_size() -> None:
    fit = ServiceFit()
    for _ in range(10):
        fit.add(2.0, 100.0)
    assert fit.predict(4.0) == pytest.approx(200.0)
    assert fit.predict(None) == pytest.approx(100.0)


def test_few_samples_scale_the_mean_by_size() -> None:
    fit = ServiceFit()
    for mpix, ms in list(zip((1.0, 3.0, 5.0), (100.0, 300.0, 500.0)))[:MIN_SAMPLES_FOR_SLOPE - 1]:
        fit.add(mpix, ms)
    assert fit.predict(6.0) == pytest.approx(600.0)


def test_a_tilted_fit_never_predicts_less_for_more() -> None:
    fit = ServiceFit()
    for mpix, ms in ((1.0, 300.0), (1.1, 250.0), (1.2, 200.0), (1.3, 150.0), (1.4, 100.0)):
        fit.add(mpix, ms)
    assert fit.predict(2.0) > fit.predict(1.0) > 0  # type: ignore[operator]


def test_recent_results_dominate() -> None:
    fit = ServiceFit()
    rng = random.Random(2)
    for _ in range(100):
        mpix = rng.uniform(0.5, 4.0)
        fit.add(mpix, 10.0 + 50.0 * mpix)
    for _ in range(100):  # the pool's GPUs got three times slower
        mpix = rng.uniform(0.5, 4.0)
        fit.add(mpix, 10.0 + 150.0 * mpix)
    assert fit.predict(2.0) == pytest.approx(310.0, rel=0.02)


def test_size_prior_uses_the_known_size_first() -> None:
    prior = SizePrior()
    assert prior.expected("invert", None) is None
    prior.add("invert", 4.0)
    assert prior.expected("invert", None) == 4.0
    assert prior.expected("invert", 0.5) == 0.5
    assert prior.expected("blur(radius=2)", None) is None
    for _ in range(500):
        prior.add("invert", 1.0)
    assert prior.expected("invert", None) == pytest.approx(1.0, abs=1e-3)
