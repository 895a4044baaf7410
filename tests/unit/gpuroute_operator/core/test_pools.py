"""WorkerPool spec parsing, live pool state, and worker liveness."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest

from gpuroute import protocol
from gpuroute.protocol import AttemptId
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.pools import EWMA_ALPHA, PoolSpec, PoolSpecError, PoolState, WorkerConn, ewma, parse_pool_spec
from gpuroute_operator.core.router import PoolView


def parse(spec: dict[str, Any] | None, name: str = "gpu-a") -> PoolSpec:
    return parse_pool_spec(name, spec, generation=7, default_namespace="gpuroute-system")


def refusal(spec: dict[str, Any]) -> str:
    with pytest.raises(PoolSpecError) as caught:
        parse(spec)
    return str(caught.value)


@pytest.mark.parametrize("spec", [None, {}])
def test_defaults(spec: dict[str, Any] | None) -> None:
    assert parse(spec) == PoolSpec(name="gpu-a", cloud="", region="", price_per_gpu_hour=0.0, spot=False,
                                   keys_secret=None, cidrs=(), max_in_flight_per_worker=4, allowed_namespaces=(),
                                   models=frozenset(), generation=7, scaling=None, endpoints=())


def test_full_spec() -> None:
    parsed = parse({
        "cloud": "azure", "region": "westeurope", "pricePerGpuHour": 2.5, "spot": True,
        "workerKeysSecretRef": {"name": "gpu-a-keys", "namespace": "keys-ns"},
        "allowedSourceCIDRs": ["10.0.0.0/8", "2001:db8::/32"],
        "maxInFlightPerWorker": 16,
        "allowedNamespaces": ["team-a", "team-b"],
        "models": [{"name": "x4", "uri": "s3://m/x4.pth"}, {"name": "x2"}, {"uri": "nameless"}, "junk"],
        "endpoints": ["tcp://gpu-0.example.com:7701", "tcp://10.1.2.3:7701", "tcp://[2001:db8::1]:7701",
                      "tcp://10.1.2.3:7701"],
    })
    assert (parsed.name, parsed.cloud, parsed.region) == ("gpu-a", "azure", "westeurope")
    assert (parsed.price_per_gpu_hour, parsed.spot, parsed.max_in_flight_per_worker) == (2.5, True, 16)
    assert parsed.keys_secret == ("keys-ns", "gpu-a-keys")
    assert parsed.cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert parsed.allowed_namespaces == ("team-a", "team-b")
    assert parsed.models == frozenset({"x4", "x2"})
    assert parsed.generation == 7 and parsed.scaling is None
    assert parsed.endpoints == ("tcp://gpu-0.example.com:7701", "tcp://10.1.2.3:7701", "tcp://[2001:db8::1]:7701")


def test_keys_secret_defaults_to_the_operator_namespace() -> None:
    assert parse({"workerKeysSecretRef": {"name": "k"}}).keys_secret == ("gpuroute-system", "k")


def test_numeric_strings_and_integral_values_are_coerced() -> None:
    parsed = parse({"pricePerGpuHour": "1.25", "maxInFlightPerWorker": "8"})
    assert (parsed.price_per_gpu_hour, parsed.max_in_flight_per_worker) == (1.25, 8)
    assert type(parsed.price_per_gpu_hour) is float and type(parsed.max_in_flight_per_worker) is int


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"workerKeysSecretRef": {"namespace": "x"}}, "spec.workerKeysSecretRef.name is required"),
    ({"workerKeysSecretRef": {"name": ""}}, "spec.workerKeysSecretRef.name is required"),
    ({"pricePerGpuHour": "cheap"}, "spec.pricePerGpuHour / spec.maxInFlightPerWorker: "),
    ({"pricePerGpuHour": [1]}, "spec.pricePerGpuHour / spec.maxInFlightPerWorker: "),
    ({"maxInFlightPerWorker": "four"}, "spec.pricePerGpuHour / spec.maxInFlightPerWorker: "),
    ({"pricePerGpuHour": -0.01}, "spec.pricePerGpuHour must be >= 0"),
    ({"maxInFlightPerWorker": -1}, "spec.maxInFlightPerWorker >= 1"),
    ({"allowedSourceCIDRs": ["10.0.0.0/8", "not-a-cidr"]}, "spec.allowedSourceCIDRs: 'not-a-cidr' is not a CIDR"),
    ({"scaling": "yes"}, "spec.scaling must be an object"),
    ({"scaling": {"deployment": {"name": "d"}, "maxReplicas": 2, "minReplicas": 3,
                  "kubeconfigSecretRef": {"name": "kc"}}}, "spec.scaling.minReplicas (3) must not exceed"),
    ({"endpoints": "tcp://a:1"}, "spec.endpoints must be a list"),
    ({"endpoints": ["tcp://a:1", "udp://b:2"]}, "spec.endpoints[1]: 'udp://b:2' is not tcp://host:port"),
    ({"endpoints": ["tcp://a:99999"]}, "spec.endpoints[0]: 'tcp://a:99999' is not tcp://host:port with a port 1-65535"),
    ({"endpoints": ["tcp://a:0"]}, "spec.endpoints[0]"),
    ({"endpoints": ["tcp://a/b:1"]}, "spec.endpoints[0]"),
    ({"endpoints": [7701]}, "spec.endpoints[0]: 7701 is not"),
    ({"endpoints": ["tcp://0.0.0.0:7701"]}, "is a wildcard"),
    ({"endpoints": ["tcp://*:7701"]}, "is a wildcard"),
])
def test_errors_name_the_field(spec: dict[str, Any], fragment: str) -> None:
    message = refusal(spec)
    assert fragment in message
    assert isinstance(PoolSpecError(message), ValueError)


def test_zero_in_flight_is_refused_not_defaulted() -> None:
    # 0 is below the documented minimum of 1; it must not silently become the default 4.
    assert "spec.maxInFlightPerWorker >= 1" in refusal({"maxInFlightPerWorker": 0})


def test_scaling_is_parsed() -> None:
    parsed = parse({"scaling": {"deployment": {"name": "workers"}, "maxReplicas": 5,
                                "kubeconfigSecretRef": {"name": "gpu-kubeconfig"}}})
    assert parsed.scaling is not None
    assert parsed.scaling.max_replicas == 5 and parsed.scaling.min_replicas == 0
    assert parsed.scaling.deployment_name == "workers"
    assert parsed.scaling.kubeconfig_secret == ("gpuroute-system", "gpu-kubeconfig")


# --- live state --------------------------------------------------------------------------------

NOW = 1_000_000.0


def worker(name: str, *, capacity: int = 4, jobs: int = 0, models: frozenset[str] = frozenset(),
           rtt_ms: float | None = None, pool: str = "gpu-a") -> WorkerConn:
    conn = WorkerConn(routing_id=name.encode(), principal=Principal(pool, name, "k" * 40), worker=name,
                      capacity=capacity, device="cuda:0", models=models, last_seen=NOW, rtt_ms=rtt_ms)
    conn.attempts = {AttemptId(f"{name}-job{i}", 1) for i in range(jobs)}
    return conn


def state(*workers: WorkerConn, **spec: Any) -> PoolState:
    pool = PoolState(parse({"cloud": "aws", "region": "us-east-1", "pricePerGpuHour": 3.0, "spot": True,
                            "allowedNamespaces": ["team-a"], **spec}))
    pool.workers = {w.routing_id: w for w in workers}
    return pool


@dataclass(frozen=True)
class QJ:
    uid: str
    namespace: str = "team-a"
    priority: str = "batch"


def test_view_of_an_empty_pool() -> None:
    assert state().view() == PoolView(name="gpu-a", cloud="aws", region="us-east-1", price_per_gpu_hour=3.0,
                                      spot=True, allowed_namespaces=("team-a",), models=frozenset(), workers=0,
                                      slots=0, busy=0, queued=0, rtt_ms=None, service_ms=None)


def test_view_counts_workers_slots_and_jobs() -> None:
    pool = state(
        worker("w1", capacity=4, jobs=1, models=frozenset({"x4"}), rtt_ms=10.0),
        worker("w2", capacity=2, jobs=2, models=frozenset({"x2"}), rtt_ms=20.0),
    )
    pool.queue.push(QJ("q1"))  # type: ignore[arg-type]
    pool.queue.push(QJ("q2", namespace="team-b"))  # type: ignore[arg-type]
    pool.service_ms = 123.0
    view = pool.view()
    assert view.workers == 2
    assert view.slots == 6
    assert view.models == frozenset({"x4", "x2"})
    assert view.busy == 3
    assert view.queued == 2
    assert view.rtt_ms == pytest.approx(15.0)       # mean over workers with a measurement
    assert view.service_ms == 123.0
    assert pool.busy == 3


def test_rtt_ignores_unmeasured_workers() -> None:
    pool = state(worker("w1", rtt_ms=None), worker("w2", rtt_ms=8.0))
    assert pool.rtt_ms == 8.0
    assert state(worker("w1")).rtt_ms is None


def test_ewma() -> None:
    assert EWMA_ALPHA == 0.2
    assert ewma(None, 100.0) == 100.0
    assert ewma(100.0, 200.0) == pytest.approx(120.0)


def test_record_result() -> None:
    pool = state()
    pool.record_result(100.0, 4_000_000)          # 4 Mpix in 0.1 s = 40 Mpix/s
    assert pool.service_ms == 100.0
    assert pool.mpix_per_s == pytest.approx(40.0)
    pool.record_result(200.0, 4_000_000)          # 20 Mpix/s
    assert pool.service_ms == pytest.approx(0.8 * 100.0 + 0.2 * 200.0)
    assert pool.mpix_per_s == pytest.approx(0.8 * 40.0 + 0.2 * 20.0)
    pool.record_result(0.0, 1_000)                # zero time: service updated, throughput untouched
    assert pool.service_ms == pytest.approx(0.8 * 120.0)
    assert pool.mpix_per_s == pytest.approx(36.0)
    assert pool.view().service_ms == pool.service_ms


def test_record_result_learns_per_pipeline_and_size() -> None:
    pool = state()
    for mpix in (1.0, 2.0, 3.0, 4.0, 5.0):
        pool.record_result(10.0 + 100.0 * mpix, 0, cost_class="upscale(method=model)", input_pixels=int(mpix * 1e6))
        pool.record_result(2.0 + 1.0 * mpix, 0, cost_class="invert", input_pixels=int(mpix * 1e6))
    assert pool.job_service_ms("upscale(method=model)", 2.0) == pytest.approx(210.0)
    assert pool.job_service_ms("invert", 2.0) == pytest.approx(4.0)
    assert pool.job_service_ms("blur(radius=2)", 2.0) is None  # never ran here
    assert pool.view(pool.job_service_ms("invert", 2.0)).job_service_ms == pytest.approx(4.0)
    # A result without input dimensions (an older worker) still counts toward the typical job.
    pool.record_result(50.0, 0, cost_class="invert", input_pixels=0)
    assert pool.fits["invert"].samples == 5
    assert set(pool.fits) == {"upscale(method=model)", "invert"}


def test_worker_free_slots() -> None:
    conn = worker("w", capacity=4, jobs=1)
    assert conn.free(NOW) == 3
    conn.foreign = {AttemptId("other", 1)}
    assert conn.free(NOW) == 2
    conn.attempts.update(AttemptId(f"x{i}", 1) for i in range(5))
    assert conn.free(NOW) == 0                                    # never negative
    paused = worker("p")
    paused.paused_until = NOW + 60
    assert paused.free(NOW) == 0
    assert paused.free(NOW + 61) == 4


def test_free_worker_prefers_the_named_worker_if_it_has_room() -> None:
    w1, w2 = worker("w1", capacity=4, jobs=3), worker("w2", capacity=4, jobs=0)
    pool = state(w1, w2)
    assert pool.free_worker(NOW, "w1") is w1
    assert pool.free_worker(NOW) is w2        # most free slots
    assert pool.free_worker(NOW, "gone") is w2
    w1.attempts.add(AttemptId("another", 1))
    assert pool.free_worker(NOW, "w1") is w2        # preferred is full


def test_free_worker_tie_breaks_on_fewer_jobs() -> None:
    big, small = worker("big", capacity=8, jobs=4), worker("small", capacity=4, jobs=0)
    assert big.free(NOW) == small.free(NOW) == 4
    assert state(big, small).free_worker(NOW) is small


def test_free_worker_none_when_all_full() -> None:
    assert state().free_worker(NOW) is None
    assert state(worker("w1", capacity=2, jobs=2)).free_worker(NOW, "w1") is None


def test_worker_expiry_follows_heartbeat_constants() -> None:
    limit = protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS
    conn = worker("w")
    now = conn.last_seen
    assert not conn.expired(now)
    assert not conn.expired(now + limit)          # exactly at the limit: still alive
    assert conn.expired(now + limit + 0.001)
    conn.last_seen = now + 10
    assert not conn.expired(now + 10 + limit - 0.5)


def test_max_connections_per_key() -> None:
    assert parse({}).max_connections_per_key == 1
    assert parse({"maxConnectionsPerKey": 3}).max_connections_per_key == 3
    for bad in (0, 65, "2", True, 1.5):
        with pytest.raises(PoolSpecError, match="spec.maxConnectionsPerKey"):
            parse({"maxConnectionsPerKey": bad})
