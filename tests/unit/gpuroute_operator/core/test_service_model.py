"""ServiceFit and PipelinePriors: what the router believes a job will cost on a pool."""

from __future__ import annotations

import random

import pytest

from gpuroute_operator.core.service_model import (
    MAX_LEARNED_MPIX,
    MIN_SAMPLES_FOR_SLOPE,
    MIN_SERVICE_MS,
    OUTLIER_FACTOR,
    RATE_BAND,
    KeyedFit,
    PipelinePriors,
    ServiceFit,
    band_floor,
    plausible_ms,
)


def _fit(points: list[tuple[float, float]]) -> ServiceFit:
    fit = ServiceFit()
    for mpix, ms in points:
        fit.add(mpix, ms)
    return fit


def test_empty_fit_knows_nothing() -> None:
    assert ServiceFit().predict(1.0) is None
    assert ServiceFit().predict(None) is None
    assert ServiceFit().line() is None


def test_recovers_overhead_and_rate() -> None:
    rng = random.Random(1)
    sizes = [rng.lognormvariate(0.5, 0.7) for _ in range(200)]
    fit = _fit([(mpix, 30.0 + 80.0 * mpix) for mpix in sizes])
    assert fit.predict(0.0) == pytest.approx(30.0, rel=1e-6)
    assert fit.predict(10.0) == pytest.approx(830.0, rel=1e-6)
    assert fit.line() == pytest.approx((30.0, 80.0))


def test_pools_compared_on_the_same_job_not_on_what_they_saw() -> None:
    # The fast pool happened to get the big images: its mean time per job is the larger one,
    # yet for the same image it is the faster pool.
    fast = _fit([(mpix, 20.0 + 40.0 * mpix) for mpix in (8.0, 9.0, 10.0, 11.0, 12.0)])
    slow = _fit([(mpix, 20.0 + 120.0 * mpix) for mpix in (0.5, 0.75, 1.0, 1.25, 1.5)])
    assert fast.mean_ms > slow.mean_ms  # type: ignore[operator]
    assert fast.predict(2.0) < slow.predict(2.0)  # type: ignore[operator]


def test_without_size_spread_time_is_taken_as_independent_of_size() -> None:
    # Only thumbnails so far: scaling their (mostly overhead) time by pixels would call this
    # pool hopeless for a 12 Mpix image, and it would never get one to learn from.
    thumbnails = _fit([(0.003, 140.0)] * 10)
    assert thumbnails.predict(12.0) == pytest.approx(140.0)
    assert thumbnails.predict(None) == pytest.approx(140.0)
    assert thumbnails.line() == pytest.approx((140.0, 0.0))
    few = _fit([(1.0, 100.0), (3.0, 300.0), (5.0, 500.0)][:MIN_SAMPLES_FOR_SLOPE - 1])
    assert few.identified_line() is None


def test_the_shape_over_every_pool_scales_a_pool_that_lacks_its_own() -> None:
    # Every pool together: 50 ms + 100 ms/Mpix. This pool ran 1 Mpix images only, in 300 ms
    # (twice the common curve there): it is judged twice as slow at every size.
    shape = _fit([(mpix, 50.0 + 100.0 * mpix) for mpix in (0.5, 1.0, 2.0, 4.0, 8.0)])
    pool = _fit([(1.0, 300.0)] * 6)
    assert pool.predict(4.0, shape) == pytest.approx(300.0 * 450.0 / 150.0)
    assert pool.predict(1.0, shape) == pytest.approx(300.0)
    # A pool with its own line ignores the shape.
    own = _fit([(mpix, 10.0 + 10.0 * mpix) for mpix in (1.0, 2.0, 3.0, 4.0)])
    assert own.predict(5.0, shape) == pytest.approx(60.0)


def test_a_tilted_fit_never_predicts_less_for_more() -> None:
    fit = _fit([(1.0, 300.0), (1.1, 250.0), (1.2, 200.0), (1.3, 150.0), (1.4, 100.0)])
    assert fit.predict(2.0) >= fit.predict(1.0) > 0  # type: ignore[operator]


def test_recent_results_dominate() -> None:
    rng = random.Random(2)
    points = [(mpix, 10.0 + 50.0 * mpix) for mpix in (rng.uniform(0.5, 4.0) for _ in range(100))]
    points += [(mpix, 10.0 + 150.0 * mpix) for mpix in (rng.uniform(0.5, 4.0) for _ in range(100))]  # 3x slower GPUs
    assert _fit(points).predict(2.0) == pytest.approx(310.0, rel=0.02)


def test_priors_use_the_known_size_first() -> None:
    priors = PipelinePriors()
    assert priors.expected_mpix("invert", None) is None
    assert priors.shape("invert") is None
    priors.add("invert", 4.0, 40.0)
    assert priors.expected_mpix("invert", None) == 4.0
    assert priors.expected_mpix("invert", 0.5) == 0.5
    assert priors.expected_mpix("blur(radius=2)", None) is None
    for _ in range(500):
        priors.add("invert", 1.0, 10.0)
    assert priors.expected_mpix("invert", None) == pytest.approx(1.0, abs=1e-3)
    assert priors.shape("invert") is not None and priors.shape("invert").samples == 501  # type: ignore[union-attr]


def test_cost_classes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Blur radii are user input: a stream of distinct pipelines must not grow memory forever.
    from gpuroute_operator.core import service_model

    monkeypatch.setattr(service_model, "MAX_COST_CLASSES", 3)
    priors = PipelinePriors()
    for _ in range(5):
        priors.add("invert", 1.0, 10.0)
    for radius in range(10):
        priors.add(f"blur(radius={radius})", 1.0, 20.0)
    assert len(priors.shapes) == 3 and set(priors.mean_mpix) == set(priors.shapes)
    assert "invert" in priors.shapes  # the most used class stays
    assert "blur(radius=9)" in priors.shapes


def test_each_worker_key_is_one_equal_share_of_its_pool() -> None:
    fit = KeyedFit()
    for _ in range(100):  # the busy key that claims 0 ms
        fit.add("liar", 4.0, 0.0)
    for _ in range(5):
        fit.add("honest", 4.0, 200.0)
    assert fit.predict(4.0, floor=50.0) == pytest.approx((200.0 + 50.0) / 2)
    assert fit.predict(4.0) == pytest.approx((200.0 + MIN_SERVICE_MS) / 2)
    # Honest workers that differ a little: the fit of every result decides.
    even = KeyedFit()
    for ms in (100.0, 110.0, 90.0, 105.0) * 5:
        even.add(f"k{int(ms)}", 4.0, ms)
    assert even.predict(4.0, floor=25.0) == pytest.approx(even.pooled.predict(4.0))
    assert fit.samples == 105  # the status still counts every result


def test_the_band_is_set_by_the_other_pools_median() -> None:
    assert band_floor([]) == MIN_SERVICE_MS
    assert band_floor([0.0]) == MIN_SERVICE_MS
    assert band_floor([100.0, 120.0, 4000.0]) == pytest.approx(120.0 / RATE_BAND)
    assert plausible_ms(0.0, []) == 0.0  # nothing to judge against: the pool's own floor applies when read
    assert plausible_ms(0.0, [100.0]) is None
    assert plausible_ms(100.0 / OUTLIER_FACTOR * 1.01, [100.0]) == pytest.approx(100.0 / RATE_BAND)
    assert plausible_ms(30.0, [100.0]) == 30.0
    assert plausible_ms(5000.0, [100.0]) == 5000.0  # slower than the rest is believed


def test_predictions_stay_in_the_band_for_any_samples() -> None:
    rng = random.Random(7)
    for _ in range(200):
        fit = KeyedFit()
        for _ in range(rng.randint(1, 30)):
            fit.add(rng.choice("abc"), rng.choice((0.0, 1e-6, rng.uniform(0.0, 300.0))),
                    rng.choice((0.0, rng.uniform(0.0, 1e4))))
        floor = band_floor(rng.uniform(0.0, 500.0) for _ in range(rng.randint(0, 5)))
        for mpix in (None, 0.0, 0.01, 1.0, 64.0, MAX_LEARNED_MPIX):
            predicted = fit.predict(mpix, floor=floor)
            assert predicted is not None and predicted >= floor >= MIN_SERVICE_MS > 0.0
