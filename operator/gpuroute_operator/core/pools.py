"""WorkerPools: their parsed spec, live workers, queue and measurements."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuroute import protocol
from gpuroute.fields import int_in
from gpuroute.protocol import AttemptId
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.queues import FairQueue
from gpuroute_operator.core.router import PoolView
from gpuroute_operator.core.scaling_spec import ScalingSpec, parse_scaling
from gpuroute_operator.core.service_model import MIN_SERVICE_MS, KeyedFit, ServiceFit, fit_for

if TYPE_CHECKING:
    from gpuroute_operator.core.jobs import Job

EWMA_ALPHA = 0.2
"""Weight of the newest sample in moving averages (about the last 10 samples count)."""


class PoolSpecError(ValueError):
    """A WorkerPool spec the operator cannot use; reported on the pool's status."""


@dataclass(frozen=True)
class PoolSpec:
    """A validated WorkerPool spec."""

    name: str
    """WorkerPool name."""
    cloud: str
    """Cloud the pool runs in."""
    region: str
    """Region the pool runs in."""
    price_per_gpu_hour: float
    """USD per GPU-hour, for cost-aware routing."""
    spot: bool
    """Preemptible capacity."""
    keys_secret: tuple[str, str] | None
    """(namespace, name) of the Secret listing admitted worker public keys."""
    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    """Source networks workers may connect from; empty allows any."""
    max_in_flight_per_worker: int
    """Upper bound on jobs sent to one worker, whatever it announces."""
    allowed_namespaces: tuple[str, ...]
    """Namespaces allowed to use the pool; empty allows all."""
    models: frozenset[str]
    """Model names the pool declares (workers also announce theirs)."""
    generation: int
    """metadata.generation of the spec parsed."""
    scaling: ScalingSpec | None = None
    """Remote autoscaling of the pool's worker Deployment, when set."""
    endpoints: tuple[str, ...] = ()
    """Worker addresses (tcp://host:port) the operator dials; empty: workers dial the operator."""
    max_connections_per_key: int = 1
    """Live sessions one worker key may hold at once; more are refused."""


_ENDPOINT = re.compile(r"tcp://(?P<host>[^\s:/]+|\[[0-9a-fA-F:.]+\]):(?P<port>[0-9]{1,5})")


def parse_endpoints(values: Any) -> tuple[str, ...]:
    """Validated `spec.endpoints`: ZeroMQ tcp://host:port addresses, duplicates dropped."""
    if not isinstance(values, (list, tuple)):
        raise PoolSpecError("spec.endpoints must be a list of tcp://host:port addresses")
    endpoints: list[str] = []
    for index, value in enumerate(values):
        match = _ENDPOINT.fullmatch(value) if isinstance(value, str) else None
        if match is None or not 0 < int(match["port"]) < 65536:
            raise PoolSpecError(f"spec.endpoints[{index}]: {value!r} is not tcp://host:port with a port 1-65535")
        if match["host"] in ("*", "0.0.0.0", "[::]"):
            raise PoolSpecError(f"spec.endpoints[{index}]: {value!r} is a wildcard, not an address the operator can dial")
        if value not in endpoints:
            endpoints.append(value)
    return tuple(endpoints)


def parse_pool_spec(name: str, spec: Mapping[str, Any] | None, *, generation: int, default_namespace: str) -> PoolSpec:
    spec = spec or {}
    ref = spec.get("workerKeysSecretRef") or {}
    if ref and not ref.get("name"):
        raise PoolSpecError("spec.workerKeysSecretRef.name is required")
    try:
        price = float(spec.get("pricePerGpuHour") or 0.0)
        max_in_flight = int(spec["maxInFlightPerWorker"]) if spec.get("maxInFlightPerWorker") is not None else 4
    except (TypeError, ValueError) as exc:
        raise PoolSpecError(f"spec.pricePerGpuHour / spec.maxInFlightPerWorker: {exc}") from exc
    if price < 0 or max_in_flight < 1:
        raise PoolSpecError("spec.pricePerGpuHour must be >= 0 and spec.maxInFlightPerWorker >= 1")
    per_key = spec.get("maxConnectionsPerKey", 1)
    if not int_in(per_key, 1, 64):
        raise PoolSpecError(f"spec.maxConnectionsPerKey: must be an integer from 1 to 64, got {per_key!r}")
    try:
        cidrs = parse_cidrs(spec.get("allowedSourceCIDRs") or (), "spec.allowedSourceCIDRs")
        scaling = parse_scaling(spec.get("scaling"), default_namespace=default_namespace)
    except ValueError as exc:
        raise PoolSpecError(str(exc)) from exc
    endpoints = parse_endpoints(spec.get("endpoints") or ())
    return PoolSpec(
        name=name,
        cloud=str(spec.get("cloud") or ""),
        region=str(spec.get("region") or ""),
        price_per_gpu_hour=price,
        spot=bool(spec.get("spot", False)),
        keys_secret=(ref.get("namespace") or default_namespace, ref["name"]) if ref else None,
        cidrs=cidrs,
        max_in_flight_per_worker=max_in_flight,
        allowed_namespaces=tuple(spec.get("allowedNamespaces") or ()),
        models=frozenset(m["name"] for m in spec.get("models") or () if isinstance(m, Mapping) and m.get("name")),
        generation=generation,
        scaling=scaling,
        endpoints=endpoints,
        max_connections_per_key=per_key,
    )


def ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else (1 - EWMA_ALPHA) * previous + EWMA_ALPHA * sample


@dataclass
class WorkerConn:
    """One registered worker session, as the operator sees it."""

    routing_id: bytes
    """The connection's routing id (bound to the key: see Principal.owns)."""
    principal: Principal
    """Who ZAP says it is."""
    worker: str
    """Worker id from READY (the pod name), for display."""
    capacity: int
    """Jobs it may run at once (its READY, capped by the pool's maxInFlightPerWorker)."""
    device: str
    """What computes."""
    models: frozenset[str]
    """Models it serves."""
    last_seen: float
    """Clock time of its last message."""
    rtt_ms: float | None = None
    """Moving average of heartbeat round trips."""
    attempts: set[AttemptId] = field(default_factory=set)
    """Attempts sent on this connection and not answered: the only ones it may answer."""
    foreign: set[AttemptId] = field(default_factory=set)
    """Attempts it reported in READY that are not followed (yet); their slots are busy."""
    answered: set[AttemptId] = field(default_factory=set)
    """Attempts it holds answers for in its cache (no slot): adopted to answer a resumed job."""
    paused_until: float = 0.0
    """After it refused a job for capacity, no dispatch to it before this time."""
    address: str = ""
    """The peer's IP address as the socket saw it at READY ("" when unknown: inproc, ipc)."""
    joined_at: float = 0.0
    """Clock time of its READY."""

    @property
    def pool(self) -> str:
        return self.principal.pool

    def free(self, now: float) -> int:
        if now < self.paused_until:
            return 0
        return max(0, self.capacity - len(self.attempts) - len(self.foreign))

    def expired(self, now: float) -> bool:
        return now - self.last_seen > protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS


@dataclass
class PoolState:
    """A pool's configuration plus what is live right now."""

    spec: PoolSpec
    keys: int = 0
    problem: str = ""
    workers: dict[bytes, WorkerConn] = field(default_factory=dict)
    queue: FairQueue[Job] = field(default_factory=FairQueue)
    service_ms: float | None = None
    """Moving average of worker ms over every job here: how long the jobs ahead in its queue take."""
    mpix_per_s: float | None = None
    """Moving average of output megapixels per second (shown on the status)."""
    fits: dict[str, KeyedFit] = field(default_factory=dict)
    """Worker ms against input megapixels, by cost class and worker key: what one more job of that
    class will take. Only results the placer found plausible (placement.Placer.learn) reach it."""

    @property
    def busy(self) -> int:
        return sum(len(w.attempts) for w in self.workers.values())

    @property
    def rtt_ms(self) -> float | None:
        samples = [w.rtt_ms for w in self.workers.values() if w.rtt_ms is not None]
        return sum(samples) / len(samples) if samples else None

    def view(self, job_service_ms: float | None = None) -> PoolView:
        """What the router sees; `job_service_ms` is this pool's estimate for the job being routed."""
        live = list(self.workers.values())
        return PoolView(
            name=self.spec.name, cloud=self.spec.cloud, region=self.spec.region,
            price_per_gpu_hour=self.spec.price_per_gpu_hour, spot=self.spec.spot,
            allowed_namespaces=self.spec.allowed_namespaces,
            models=frozenset().union(*(w.models for w in live)) if live else frozenset(),
            workers=len(live), slots=sum(w.capacity for w in live), busy=self.busy,
            queued=len(self.queue), rtt_ms=self.rtt_ms, service_ms=self.service_ms, job_service_ms=job_service_ms,
        )

    def record_result(self, worker_ms: float, output_pixels: int, *, cost_class: str = "",
                      input_pixels: int = 0, key: str = "") -> None:
        """One result of worker `key` (its principal): `input_pixels` 0 when the size is unknown."""
        self.service_ms = ewma(self.service_ms, worker_ms)
        if worker_ms > 0:
            self.mpix_per_s = ewma(self.mpix_per_s, output_pixels / 1e6 / (worker_ms / 1000.0))
        if cost_class and input_pixels > 0:
            fit_for(self.fits, cost_class, KeyedFit).add(key, input_pixels / 1e6, worker_ms)

    def job_service_ms(self, cost_class: str, mpix: float | None, shape: ServiceFit | None = None,
                       floor: float = MIN_SERVICE_MS, keys: list[float] | None = None) -> float | None:
        """Expected worker ms here for a job of `cost_class` and `mpix` input megapixels
        (None: this pool has not run that class yet); `shape` is the fit over every pool,
        `floor` the least any one worker key is credited with (service_model.band_floor),
        `keys` this pool's key_predictions for the job if already known."""
        fit = self.fits.get(cost_class)
        return fit.predict(mpix, shape, floor, keys) if fit is not None else None

    def key_predictions(self, cost_class: str, mpix: float | None, shape: ServiceFit | None = None) -> list[float]:
        """Each of this pool's worker keys' expected ms for the job (empty: none ran its class)."""
        fit = self.fits.get(cost_class)
        return fit.key_predictions(mpix, shape) if fit is not None else []

    def free_worker(self, now: float, preferred: str | None = None) -> WorkerConn | None:
        free = [w for w in self.workers.values() if w.free(now) > 0]
        if not free:
            return None
        for conn in free:
            if conn.worker == preferred:
                return conn
        return max(free, key=lambda w: (w.free(now), -len(w.attempts)))


def source_allowed(address: str, cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """An address may be served by a pool with these allowedSourceCIDRs (none: any address).
    An unknown or unparseable address is allowed only when the pool sets no CIDRs."""
    if not cidrs:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in cidrs)


def parse_cidrs(values: Iterable[str], field: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise ValueError(f"{field}: {value!r} is not a CIDR") from exc
    return tuple(nets)
