"""gpuroute in the simulation: the operator's own Dispatcher, driven directly.

For gpuroute the simulation drives the operator's dispatcher directly
(`gpuroute_operator.core.dispatcher.Dispatcher`, the code the operator runs), with no copy
of any of its rules: ImageJobs go in through `Dispatcher.admit`, workers register with
`on_ready`, answer heartbeats and deliver RESULTs through `on_message`, and the clock moves
the dispatcher through `tick` every `TICK_S` (the engine's period). Routing, the fair
queues, dispatch, the preferred pool of a re-queued job, liveness, failover, timeouts and
max attempts are all the dispatcher's; what it wants done arrives at `SimEffects`, the
effects port: a JOB starts simulated GPU work, a CANCEL stops it, and a job's outcome is
read from the terminal status it publishes. The simulation replaces only the clock, the
network, the GPUs and storage signing (instant dummy URLs).

Service-time estimates are the dispatcher's own (`PoolState` fits, `service_model.py`:
worker time against input megapixels per pipeline, pools compared on the same job),
learned from the StageTiming in each simulated RESULT. As in the operator, a job's size
is known only for inline inputs: realtime jobs here stand for inline uploads (their
spec carries input_pixels, as read from the header), batch jobs read from object storage
(size unknown: the pipeline's typical size from `PipelinePriors`).

The gpuroute policies (per-job strategies, or every job forced to fastest / cheapest /
balanced as spec.placement.strategy) are the Dispatcher. When the spot pool fails its
workers stop answering and heartbeating; the dispatcher's own liveness check finds them
silent (HEARTBEAT_LIVENESS missed heartbeats, checked on its tick), re-queues their jobs
and, once the pool has no workers, re-routes its queue. Until then the router still sees
the dead pool's workers and keeps routing (and dispatching) to it, as the operator would.
On recovery the workers send READY again.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.routing_sim.kernel import COMPLETED, FAILED, PAST_DEADLINE, Attempt, SimJob, Simulation
from bench.routing_sim.scenario import Scenario
from bench.routing_sim.trace import TraceJob
from gpuroute import protocol
from gpuroute.protocol import (
    AttemptId,
    Body,
    Cancel,
    Disconnect,
    Heartbeat,
    InputSource,
    JobRequest,
    OutputInfo,
    OutputTarget,
    Ready,
    Result,
    StageTiming,
    routing_id_for,
)
from gpuroute_operator.core.dispatcher import Dispatcher, Signed
from gpuroute_operator.core.effects import TerminalEvent
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.placement import Placer
from gpuroute_operator.core.pools import parse_pool_spec
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.router import Decision, JobNeeds, PoolView, choose
from gpuroute_operator.core.spec import Placement, parse_job_spec
from gpuroute_operator.shell.engine import EngineConfig

PIPELINE_MODEL = "realesrgan-x4"
"""The super-resolution model the pipeline needs; every simulated worker serves it."""
PIPELINE_SPEC = parse_job_spec({
    "input": {"uri": "s3://sim-input/image.png"}, "output": {"uri": "s3://sim-output/image.png"},
    "steps": [{"op": "denoise"}, {"op": "upscale", "method": "model", "model": PIPELINE_MODEL, "scale": 4}]})
"""Every trace job runs this one pipeline (one cost class): pools differ in speed, jobs in size.
Each job's priority, timeout, placement and known size are set on a copy of it."""



def _engine_tick_s() -> float:
    default = next(f.default for f in dataclasses.fields(EngineConfig) if f.name == "tick_s")
    assert isinstance(default, float)
    return default


TICK_S = _engine_tick_s()
"""The engine's housekeeping period (EngineConfig.tick_s): Dispatcher.tick runs this often."""
_ESTIMATE = re.compile(r"est\. (?P<ms>[0-9.]+) ms, \$(?P<usd>[0-9.]+)")
"""The router's estimate inside status.decision (router.choose writes it there)."""


def sign_urls(job: Job, now: float) -> Signed:
    """The dispatcher's signer: storage is not simulated, so every job signs at once with dummy URLs."""
    return (InputSource(f"https://storage.sim/in/{job.uid}"),
            OutputTarget(f"https://storage.sim/out/{job.uid}", job.spec.output_format), ())


@dataclass(frozen=True)
class SimWorker:
    """One simulated worker process: its key (ZAP is not simulated: it is taken as authenticated)."""

    pool: str
    name: str
    principal: Principal
    routing_id: bytes
    """routing_id_for(its public key, its name), as the worker sets it."""
    slots: int
    """The capacity it announces in READY."""


class SimEffects:
    """The dispatcher's Effects port in the simulation: sends reach simulated workers, statuses are recorded.

    Nothing is decided here. A JOB starts the simulated GPU work and a CANCEL stops it; a
    live worker answers a ping with a pong and registers again when told to (DISCONNECT,
    kick), as the worker process does; a dead one does nothing. Terminal statuses (with
    their Event) are the only source of each job's outcome.
    """

    def __init__(self, sim: GpurouteSim) -> None:
        self.sim = sim
        self.counts: Counter[str] = Counter()
        """Effects by kind: bodies sent by type, publish, kick, forget, warn:<reason>."""
        self.terminal: dict[str, tuple[Mapping[str, Any], TerminalEvent]] = {}
        """uid -> its terminal status and Event, as published."""

    def send(self, routing_id: bytes, body: Body, payload: bytes | None = None) -> bool:
        self.counts[type(body).__name__] += 1
        self.sim.deliver(routing_id, body)
        return True  # a vanished peer's socket still takes messages: only silence reveals it

    def kick(self, routing_id: bytes, reason: str) -> None:
        self.counts["kick"] += 1
        self.sim.reconnect(routing_id)

    def publish(self, ref: ObjectRef, status: Mapping[str, Any], *, urgent: bool = False,
                terminal_event: TerminalEvent | None = None) -> None:
        self.counts["publish"] += 1
        self.sim.observe(ref.uid, status)
        if terminal_event is not None:
            if ref.uid in self.terminal:
                raise RuntimeError(f"{ref.uid}: a second terminal status {status['phase']}")
            self.terminal[ref.uid] = (status, terminal_event)
            self.sim.finish(ref.uid, status, terminal_event)

    def forget(self, ref: ObjectRef) -> None:
        self.counts["forget"] += 1

    def warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        self.counts[f"warn:{reason}"] += 1
        if reason == "Requeued":
            self.sim.by_uid[ref.uid].rerouted = True


class CounterfactualPlacer(Placer):
    """The real Placer, with a view filter in front of the router; used only for the counterfactual runs.

    `Placer.decide` asks `needs(job)` just before it calls `self.choose(needs, views)`;
    knowing the job lets a counterfactual change what the views show for it. No rule is
    overridden: `needs` returns what Placer's own does.
    """

    routing: Job | None = None
    """The job whose needs were asked last: the one being routed."""

    def needs(self, job: Job, now: float) -> JobNeeds:
        self.routing = job
        return super().needs(job, now)


class GpurouteSim(Simulation):
    """gpuroute: the operator's own `Dispatcher` makes every decision; this class plays the clock and the workers."""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int, *, strategy: str | None,
                 counterfactual: str | None = None) -> None:
        super().__init__(trace, scenario, seed)
        self.strategy = strategy
        self.label = f"gpuroute, all {strategy}" if strategy else "gpuroute, per-job strategies"
        # Counterfactuals for the report only (router.py and dispatcher.py untouched): change what
        # the views show the router. "realtime-queue": a realtime job sees only the realtime part
        # of each queue (what FairQueue serves before it). "oracle-service": every pool's estimate
        # for the job is its true noise-free service time, and its typical job the true mean:
        # perfect knowledge of speed, to size what the learned fits still miss.
        self.counterfactual = counterfactual
        if counterfactual:
            self.label += f" [{counterfactual}]"
        mean_mpix = statistics.fmean(t.mpix for t in trace) if trace else 1.0
        self.true_service = {m.name: m.service_ms(mean_mpix, 1.0) for m in scenario.pools}
        self.rng = random.Random(seed * 7919 + 17)  # heartbeat RTT jitter: same stream for every strategy
        self.by_uid = {j.uid: j for j in self.jobs}
        self.effects = SimEffects(self)
        self.dispatcher = Dispatcher(self.effects, sign_urls)
        if counterfactual:
            self.dispatcher.placement = CounterfactualPlacer(self.dispatcher.pools, choose=self._counterfactual_choose)
        self.running: dict[AttemptId, Attempt] = {}
        """Attempts a simulated worker has been sent and not finished, stopped or lost."""
        self.last_beat = -math.inf
        self.decisions: dict[str, str] = {}
        """uid -> the last status.decision seen (a new one is a new routing decision)."""
        self.workers: dict[bytes, SimWorker] = {}
        for m in scenario.pools:
            body = {"cloud": m.cloud, "region": m.region, "pricePerGpuHour": m.price_per_gpu_hour, "spot": m.spot,
                    "maxInFlightPerWorker": m.slots_per_worker, "workerKeysSecretRef": {"name": f"{m.name}-keys"}}
            self.dispatcher.set_pool(parse_pool_spec(m.name, body, generation=1, default_namespace="gpuroute-system"),
                                     self.now)
            for i in range(m.workers):
                name = f"w{i}"
                key = f"{m.name}-{name}".ljust(40, "K")[:40]  # a stand-in Z85 public key, one per worker
                worker = SimWorker(m.name, name, Principal(m.name, name, key), routing_id_for(key, name),
                                   m.slots_per_worker)
                self.workers[worker.routing_id] = worker
        for worker in self.workers.values():
            self.ready(worker)

    def _counterfactual_choose(self, job: JobNeeds, pools: Sequence[PoolView]) -> Decision:
        """router.choose's signature: the dispatcher calls it as `choose(needs, views)`."""
        if self.counterfactual == "realtime-queue" and job.priority == "realtime":
            pools = [dataclasses.replace(v, queued=self.dispatcher.pools[v.name].queue.count("realtime"))
                     for v in pools]
        elif self.counterfactual == "oracle-service":
            routing = self.dispatcher.placement
            assert isinstance(routing, CounterfactualPlacer) and routing.routing is not None
            mpix = self.by_uid[routing.routing.uid].t.mpix
            pools = [dataclasses.replace(v, service_ms=self.true_service[v.name],
                                         job_service_ms=self.models[v.name].service_ms(mpix, 1.0)) for v in pools]
        return choose(job, pools)

    # ---- what the operator is told: ImageJobs, READY, heartbeats, results -------------------------

    def job_record(self, job: SimJob) -> Job:
        """The trace job as an admitted ImageJob. Realtime jobs stand for inline uploads: the
        operator knows their size (input_pixels, read from the header); batch inputs are URIs."""
        t = job.t
        spec = dataclasses.replace(
            PIPELINE_SPEC, priority=t.priority, timeout_s=int(t.timeout_s),
            placement=Placement(regions=t.regions, strategy=self.strategy or t.strategy),
            input_pixels=round(t.mpix * 1e6) if t.priority == "realtime" else None)
        return Job(t.uid, t.namespace, t.uid, 1, spec, self.now)

    def arrive(self, job: SimJob) -> None:
        self.dispatcher.admit(self.job_record(job), self.now)

    def ready(self, worker: SimWorker) -> None:
        self.dispatcher.on_ready(worker.routing_id, worker.principal,
                                 Ready(worker.pool, worker.name, worker.slots, "gpu", (PIPELINE_MODEL,)), self.now)

    def tick(self) -> None:
        """The engine's tick loop: every TICK_S, with a heartbeat every HEARTBEAT_INTERVAL_S."""
        beat = self.now - self.last_beat >= protocol.HEARTBEAT_INTERVAL_S
        if beat:
            self.last_beat = self.now
        self.dispatcher.tick(self.now, heartbeat=beat)
        if self.now + TICK_S <= self.horizon:
            self.at(self.now + TICK_S, self.tick)

    def deadline(self, job: SimJob) -> None:
        pass  # the dispatcher times jobs out itself (Dispatcher.expire, on its tick)

    # ---- the workers' side (called through SimEffects) ---------------------------------------

    def deliver(self, routing_id: bytes, body: Body) -> None:
        worker = self.workers[routing_id]
        if isinstance(body, JobRequest):
            job = self.by_uid[body.job.uid]
            job.attempts = body.job.attempt
            att = self.run_attempt(job, worker.pool, str(body.job), routing_id)
            att.attempt = body.job
            self.running[body.job] = att
        elif isinstance(body, Cancel):
            cancelled = self.running.pop(body.job, None)
            if cancelled is not None:
                self.charge(cancelled, self.now)  # the worker stops it: GPU time up to now
                cancelled.dead = True
        elif isinstance(body, Heartbeat):
            if body.ping is not None and self.alive[worker.pool]:
                rtt_s = self.models[worker.pool].rtt_ms * self.rng.lognormvariate(0.0, 0.1) / 1000.0
                self.at(self.now + rtt_s, self.pong, worker, body.ping)
        elif isinstance(body, Disconnect):
            self.reconnect(routing_id)

    def pong(self, worker: SimWorker, ping: float) -> None:
        if self.alive[worker.pool]:  # a pong still in flight when the pool died never arrives
            self.dispatcher.on_message(worker.routing_id, worker.principal, Heartbeat(pong=ping), self.now)

    def reconnect(self, routing_id: bytes) -> None:
        """Told to go (or that it is unknown): a live worker connects again and sends READY."""
        worker = self.workers[routing_id]
        if self.alive[worker.pool]:
            self.at(self.now + self.models[worker.pool].rtt_ms / 1000.0, self.ready, worker)

    def result(self, att: Attempt) -> None:
        if att.dead or att.attempt is None or self.running.get(att.attempt) is not att:
            return  # stopped by a CANCEL, or its pool died under it: no answer
        del self.running[att.attempt]
        self.charge(att, self.now)
        pixels = max(1, round(att.job.t.mpix * 1e6))
        width = max(1, round(math.sqrt(pixels)))
        height = max(1, round(pixels / width))
        result = Result(att.attempt, StageTiming(gpu_ms=att.service_ms),
                        OutputInfo(width * height, 4 * width, 4 * height, "0" * 64, "png"), width, height, "gpu")
        worker = self.workers[att.routing_id]
        self.dispatcher.on_message(att.routing_id, worker.principal, result, self.now)

    # ---- the pool failing and returning ----------------------------------------------------------

    def fail(self) -> None:
        # The workers vanish without a word; the operator learns only from missing pongs.
        name = self.scenario.failing
        self.alive[name] = False
        self.fail_pool_attempts([a for a in self.running.values() if a.pool == name and not a.dead])

    def recover(self) -> None:
        name = self.scenario.failing
        self.alive[name] = True
        for worker in self.workers.values():
            if worker.pool == name:
                self.ready(worker)

    # ---- what the operator says: statuses and their terminal Events --------------------------------

    def observe(self, uid: str, status: Mapping[str, Any]) -> None:
        """Every status write: where the job is, and the router's latest decision and estimate."""
        job = self.by_uid[uid]
        pool = status.get("pool") or None
        if pool is not None and job.pool is not None and pool != job.pool:
            job.rerouted = True  # moved to another pool's queue (its pool lost every worker)
        job.pool = pool or job.pool
        decision = status.get("decision") or ""
        if decision and decision != self.decisions.get(uid):
            self.decisions[uid] = decision
            match = _ESTIMATE.search(decision)
            job.expected_usd = float(match["usd"]) if match else None
            # The dispatcher writes a Queued status right after each decision it makes on admission
            # or re-queueing; a decision first seen later (a queue moved when its pool lost every
            # worker) was made at a moment the status does not tell, so its time estimate is not
            # compared with the actual time.
            known = status.get("phase") == "Queued"
            job.routed_at = self.now
            job.expected_ms = float(match["ms"]) if match and known else None

    def finish(self, uid: str, status: Mapping[str, Any], event: TerminalEvent) -> None:
        job = self.by_uid[uid]
        if status["phase"] == "Completed":
            outcome = COMPLETED
        elif status["phase"] == "Failed":
            outcome = PAST_DEADLINE if event.reason == "Timeout" else FAILED
        else:
            raise RuntimeError(f"{uid}: terminal phase {status['phase']} ({event.reason}) in a run that cancels nothing")
        self.settle(job, outcome)
        job.attempts = int(status["attempts"])
        if outcome == COMPLETED:
            self.pool_done[status["pool"]] += 1

    def idle_slots(self) -> int:
        # A job stays in the queue it was routed to; this counts capacity that could have taken one
        # of them (ignoring placement, so a slight overcount where EU-only jobs wait).
        pools = self.dispatcher.pools
        waiting = [n for n, p in pools.items() if len(p.queue)]
        if not waiting:
            return 0
        free = 0
        for name, pool in pools.items():
            if self.alive[name] and pool.workers and any(w != name for w in waiting):
                free += max(0, sum(w.capacity for w in pool.workers.values()) - pool.busy)
        return free
