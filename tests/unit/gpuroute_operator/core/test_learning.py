"""What RESULT timings teach the router, against workers that lie about them (security review,
finding 4): the real Dispatcher learns from every RESULT, and one worker must not be able to
make its pool look free by reporting 0 ms for inputs it claims are enormous."""

from __future__ import annotations

import base64
import random
import struct

import pytest

from gpuroute.protocol import StageTiming
from gpuroute_operator.core import service_model
from gpuroute_operator.core.router import PRIOR_SERVICE_MS, estimate
from tests.unit.gpuroute_operator.core.dispatcher_world import World

HUGE = (1 << 20, 1 << 20)
"""The largest input size the wire format lets a worker claim (about 1.1e12 pixels)."""


def _honest_ms(mpix: float) -> float:
    return 20.0 + 25.0 * mpix


def _world() -> World:
    return World({"cheap": {"pricePerGpuHour": 1.0}, "dear": {"pricePerGpuHour": 9.0}})


Claim = tuple[float, tuple[int, int]]
"""What a worker reports for a job: worker ms, input (width, height)."""


def honest(rng: random.Random) -> Claim:
    side = rng.randint(800, 3000)
    return _honest_ms(side * side / 1e6) * rng.lognormvariate(0.0, 0.1), (side, side)


class Jobs:
    """Runs jobs one at a time in a pool; whichever worker gets one answers with what it claims."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        self.claims: dict[str, Claim | None] = {}
        self.count = 0

    def connect(self, pool: str, worker: str, claim: Claim | None = None) -> None:
        """`claim`: what the worker reports for every job; None for an honest worker.
        One slot each, so that jobs sent together to a pool go to each of its workers."""
        self.world.connect(pool, worker, capacity=1)
        self.claims[worker] = claim

    def run(self, pool: str, together: int = 1, **spec: object) -> list[str]:
        """Submit `together` jobs to `pool`, then answer each; the workers that ran them."""
        uids = []
        for _ in range(together):
            self.count += 1
            uids.append(f"{pool}-{self.count}")
            self.world.submit(uids[-1], placement={"pools": [pool]}, **spec)
        workers = []
        for uid in uids:
            worker = self.world.dispatcher.jobs[uid].worker
            assert worker is not None
            request = next(r for r in self.world.requests() if r.job.uid == uid)
            claim = self.claims[worker]
            ms, size = honest(self.rng) if claim is None else claim
            self.world.advance(0.01)
            self.world.send(self.world.routing_id(pool, worker),
                            self.world.result(request.job, timing=StageTiming(gpu_ms=ms), input_size=size))
            assert self.world.status(uid)["phase"] == "Completed"
            workers.append(worker)
        return workers


def _cheapest_goes_to(world: World) -> str | None:
    uid = f"probe-{world.now}"
    world.submit(uid, placement={"strategy": "cheapest"})
    return world.dispatcher.jobs[uid].pool


def _service_ms(world: World, pool: str) -> float:
    """What the router expects a pool's worker time to be for a typical job (no queue, no RTT)."""
    views = {view.name: view for view in world.dispatcher.placement.views(world.job("probe"))}
    view = views[pool]
    if view.job_service_ms is not None:
        return view.job_service_ms
    return view.service_ms if view.service_ms is not None else PRIOR_SERVICE_MS  # as router.estimate does


@pytest.mark.parametrize("poison_first", [False, True])
def test_zero_ms_for_huge_claimed_inputs_does_not_make_a_dear_pool_cheapest(poison_first: bool) -> None:
    world = _world()
    jobs = Jobs(world, random.Random(4))
    jobs.connect("cheap", "h1")
    jobs.connect("dear", "p1", (0.0, HUGE))
    runs = ["dear"] * 60 + ["cheap"] * 30
    for pool in (runs if poison_first else runs[::-1]):
        jobs.run(pool)
    assert _cheapest_goes_to(world) == "cheap"
    assert _service_ms(world, "dear") > 0.0


@pytest.mark.parametrize("size", [(2000, 2000), (8000, 8000), HUGE])
def test_a_lying_worker_cannot_drag_its_pool_below_its_share(size: tuple[int, int]) -> None:
    # dear has one honest worker and one that answers in 0 ms; each key is one half of the pool,
    # so the pool's estimate stays at no less than about half the honest worker's.
    world = _world()
    jobs = Jobs(world, random.Random(5))
    jobs.connect("dear", "p1", (0.0, size))
    for _ in range(20):
        jobs.run("dear")
    jobs.connect("cheap", "h1")
    jobs.connect("dear", "h2")
    for _ in range(30):
        jobs.run("cheap")
        assert sorted(jobs.run("dear", together=2)) == ["h2", "p1"]
    assert _cheapest_goes_to(world) == "cheap"
    assert _service_ms(world, "dear") >= 0.45 * _service_ms(world, "cheap")


def test_an_inline_input_is_learned_at_the_size_its_header_gives() -> None:
    world = _world()
    jobs = Jobs(world, random.Random(1))
    jobs.connect("dear", "p1", (50.0, HUGE))
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 100, 100) + bytes(64)
    inline = {"input": {"inline": base64.b64encode(header).decode()}}
    jobs.run("dear", **inline)
    # The pipeline's typical size is 100 x 100, not 2^40 pixels.
    assert world.dispatcher.placement.priors.expected_mpix("invert", None) == pytest.approx(0.01)


def test_learned_rates_stay_in_the_band_whatever_one_worker_reports() -> None:
    rng = random.Random(6)
    world = World({"cheap": {"pricePerGpuHour": 1.0}, "mid": {"pricePerGpuHour": 2.0},
                   "dear": {"pricePerGpuHour": 9.0}})
    jobs = Jobs(world, rng)
    for pool, worker in (("cheap", "h1"), ("mid", "h2"), ("mid", "h3"), ("dear", "p1")):
        jobs.connect(pool, worker)
    for _ in range(150):
        if rng.random() < 0.5:
            side = rng.choice((1, 16, 4000, 1 << 14, 1 << 20))
            jobs.claims["p1"] = (rng.choice((0.0, 0.001, rng.uniform(0.0, 5.0))), (side, rng.choice((1, side))))
            jobs.run("dear")
        else:
            jobs.run(rng.choice(("cheap", "mid")))
        honest = _service_ms(world, "cheap")
        for pool in ("cheap", "mid", "dear"):
            learned = _service_ms(world, pool)
            assert learned >= service_model.MIN_SERVICE_MS
            if honest:
                assert learned >= honest / (service_model.RATE_BAND * 2.5), (pool, learned, honest)
    assert _cheapest_goes_to(world) == "cheap"


def test_the_router_never_prices_a_pool_at_zero() -> None:
    world = _world()
    jobs = Jobs(world, random.Random(2))
    jobs.connect("dear", "p1", (0.0, (16, 16)))
    for _ in range(30):
        jobs.run("dear")
    for view in world.dispatcher.placement.views(world.job("probe")):
        if view.workers:
            est = estimate(view)
            assert est.cost_usd > 0.0 and est.expected_ms > 0.0
