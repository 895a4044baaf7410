"""The simulated world: the pools, which of them fails and when, and the liveness rule.

Pools (`POOLS`) differ in price, speed, capacity (workers x slots) and RTT; one is a spot
pool, and it FAILS at `FAIL_AT_S` (every worker gone at once). It returns at
`RECOVER_AT_S`, or never (`Scenario(recover_at_s=None)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpuroute import protocol

FAILING = "aws-spot-t4"
"""The pool whose workers all vanish (the spot pool: the one most likely to)."""
FAIL_AT_S = 40.3
"""Just after the bulk burst, when queues are deepest; off the 1 s heartbeat grid."""
RECOVER_AT_S = 70.3
"""When the failed pool's workers come back, while traffic still arrives (None: never)."""
DETECT_AFTER_S = protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS
"""Silence after which a worker (or, for the load balancer, a pool) counts as gone."""


@dataclass(frozen=True)
class PoolModel:
    """A simulated WorkerPool: what the operator is told (price, spot) and what it is not (speed)."""

    name: str
    cloud: str
    region: str
    price_per_gpu_hour: float
    """USD per GPU-hour."""
    spot: bool
    workers: int
    """Workers, one GPU each."""
    slots_per_worker: int
    """maxInFlightPerWorker: jobs a worker runs at once, sharing its GPU."""
    overhead_ms: float
    """Per-job time not proportional to pixels (download, decode, encode, upload)."""
    ms_per_mpix: float
    """Slot time per megapixel with the worker's slots busy (GPU shared by `slots_per_worker`)."""
    rtt_ms: float
    """Round trip between the operator (AWS eu-west-1) and the pool."""

    @property
    def slots(self) -> int:
        return self.workers * self.slots_per_worker

    def service_ms(self, mpix: float, noise: float) -> float:
        return (self.overhead_ms + self.ms_per_mpix * mpix) * noise

    def usd(self, slot_ms: float) -> float:
        return self.price_per_gpu_hour / self.slots_per_worker * slot_ms / 3_600_000.0


# On-demand list prices per GPU-hour (A100 80GB, A10G, L4) and a typical T4 spot price.
POOLS: tuple[PoolModel, ...] = (
    PoolModel("azure-a100", "azure", "westeurope", 3.67, False, 3, 4, 25.0, 48.0, 20.0),
    PoolModel("aws-a10g", "aws", "eu-west-1", 1.01, False, 4, 2, 30.0, 60.0, 2.0),
    PoolModel("gcp-l4", "gcp", "europe-west4", 0.71, False, 5, 2, 40.0, 80.0, 22.0),
    PoolModel(FAILING, "aws", "us-east-1", 0.21, True, 10, 1, 45.0, 90.0, 70.0),
)


@dataclass(frozen=True)
class Scenario:
    """One run's world: the pools and the failure every policy faces."""

    pools: tuple[PoolModel, ...] = POOLS
    """The pools, in the order the fixed-order baselines try them."""
    failing: str = FAILING
    """The pool whose workers all vanish."""
    fail_at_s: float = FAIL_AT_S
    """When they vanish."""
    recover_at_s: float | None = RECOVER_AT_S
    """When they come back (None: never)."""
