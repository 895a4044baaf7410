"""Routing simulation (issues #3, #9): the operator's own Dispatcher against a synthetic trace.

`python -m bench.routing_sim [JOBS] [SEED]` replays one trace under every policy below and
prints Markdown tables. For gpuroute the simulation drives the operator's dispatcher
directly (`gpuroute_operator.core.dispatcher.Dispatcher`, the code the operator runs), with
no copy of any of its rules: ImageJobs go in through `Dispatcher.admit`, workers register
with `on_ready`, answer heartbeats and deliver RESULTs through `on_message`, and the clock
moves the dispatcher through `tick` every `TICK_S` (the engine's period). Routing, the
fair queues, dispatch, the preferred pool of a re-queued job, liveness, failover,
timeouts and max attempts are all the dispatcher's; what it wants done arrives at
`SimEffects`, the effects port: a JOB starts simulated GPU work, a CANCEL stops it, and a
job's outcome is read from the terminal status it publishes. The simulation replaces
only the clock, the network, the GPUs and storage signing (instant dummy URLs).

Service-time estimates are the dispatcher's own (`PoolState` fits, `service_model.py`:
worker time against input megapixels per pipeline, pools compared on the same job),
learned from the StageTiming in each simulated RESULT. As in the operator, a job's size
is known only for inline inputs: realtime jobs here stand for inline uploads (their
spec carries input_pixels, as read from the header), batch jobs read from object storage
(size unknown: the pipeline's typical size from `PipelinePriors`).

The trace (`make_trace`): Poisson arrivals with short bursts (rate x5 for 3 s, every
~25 s on average) from four namespaces mixing realtime and batch work, plus one namespace
(`bulk-reprocess`) submitting 5,000 batch jobs within 15 s. Work per job is lognormal in
megapixels; every job has its own timeout and strategy; some jobs must stay in the EU
(placement.regions). Pools (`POOLS`) differ in price, speed, capacity (workers x slots)
and RTT; one is a spot pool, and it FAILS at `FAIL_AT_S` (every worker gone at once).

Policies, all over the same trace and the same per-job service-time noise:

- gpuroute (per-job strategies, or every job forced to fastest / cheapest / balanced as
  spec.placement.strategy): the Dispatcher. When the spot pool fails its workers stop
  answering and heartbeating; the dispatcher's own liveness check finds them silent
  (HEARTBEAT_LIVENESS missed heartbeats, checked on its tick), re-queues their jobs and,
  once the pool has no workers, re-routes its queue. Until then the router still sees
  the dead pool's workers and keeps routing (and dispatching) to it, as the operator
  would. On recovery the workers send READY again.
- round-robin: a plain load balancer over the pools, in turn, skipping pools its health
  check (the same 3 missed 1 s beats) has marked down, and pools the job's placement
  excludes. Jobs wait in each pool's own FIFO (no priorities, no namespace fairness).
  ASSUMPTION (a stateless dispatcher has no failover of accepted work): jobs queued in or
  running on a pool that fails stay there until the pool returns; then the pool's job
  controller restarts them (front of its queue) and fails those past their deadline.
  If the pool never returns they are lost.
- round-robin + failover: the same, but given gpuroute's failover (jobs moved on
  detection). Not a real system: it isolates what the router adds over the failover.
- MultiKueue first-to-admit (as the issue specifies it): the job is offered to every
  eligible cluster in a fixed order (POOLS order: fastest first, the spot pool last, as an
  operator wary of preemption would list them) and goes to the first with free quota;
  if none has any it waits in the first eligible cluster's queue (Kueue orders queues by
  priority, so realtime first, then FIFO). Price and speed play no part.
  ASSUMPTION on failure (Kueue's documented behaviour): a dead worker cluster admits
  nothing; workloads it had admitted keep their reservation for `workerLostTimeout`
  (15 minutes by default: kueue config API, MultiKueue.WorkerLostTimeout, added in
  kubernetes-sigs/kueue#1681) and are only then evicted and re-dispatched. If the cluster
  returns first, its Jobs recreate their pods there (we restart them at the front of
  that cluster's queue at once, which is generous: no pod-eviction delay).
- MultiKueue all-at-once: closer to Kueue's real AllAtOnce dispatcher (KEP-693: a copy of
  a pending workload sits in every worker cluster and the first to admit it wins), i.e.
  one global priority-FIFO queue served by whichever cluster frees quota first. Same
  failure behaviour. Shown because the issue's variant above is harsher than Kueue.
  Neither MultiKueue variant pays Kueue's own admission latency (generous).

Two scenarios over the same trace: the failed pool returns at RECOVER_AT_S, or never does.
A third section checks the router's own numbers (the estimate it writes into
status.decision against the actual cost and completion time) and runs two
counterfactuals that change only what the views show the router (a filter in front of
`router.choose`, for those runs only), to size what better inputs would still gain.

Outcomes. A job is `completed` if its result arrives by its deadline (arrival + timeout);
`past_deadline` if the system ends it at its deadline (a Kubernetes Job's
activeDeadlineSeconds for the baselines); `failed` if it ran out of attempts. For gpuroute
these are the dispatcher's terminal statuses (Completed; Failed with reason Timeout;
any other Failed), so its deadline is checked on its tick: a result up to TICK_S after
the deadline still completes, as in the operator. A job is `lost` if it never reaches any
of these before the run ends, which happens only to jobs a failed cluster holds out of
the dispatcher's sight (nobody can time them out, re-run them, or report them). The run
ends one second after the last deadline in the trace: nothing after that could finish
on time.
Latency percentiles are over completed jobs (arrival to result at the dispatcher).

Cost: GPU-seconds used times the pool's price per GPU-hour. A worker is one GPU shared
by its slots (maxInFlightPerWorker jobs at once), so a job holding a slot for t seconds
uses t / slots GPU-seconds. Work cut short (a timeout cancelling it, a pool failing
under it) is charged up to that moment; work sent to an already dead pool costs nothing.
Cost per 1,000 images is all GPU spend over the images delivered on time.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import random
import re
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from gpuroute_operator.core.router import Decision, JobNeeds, PoolView, choose, estimate
from gpuroute_operator.core.spec import Placement, parse_job_spec
from gpuroute_operator.shell.engine import EngineConfig

# ---- scenario ----------------------------------------------------------------------------

FAILING = "aws-spot-t4"
"""The pool whose workers all vanish (the spot pool: the one most likely to)."""
FAIL_AT_S = 40.3
"""Just after the bulk burst, when queues are deepest; off the 1 s heartbeat grid."""
RECOVER_AT_S = 70.3
"""When the failed pool's workers come back, while traffic still arrives (None: never)."""
MULTIKUEUE_WORKER_LOST_TIMEOUT_S = 900.0
"""Kueue's default MultiKueue workerLostTimeout (15 minutes)."""
DETECT_AFTER_S = protocol.HEARTBEAT_INTERVAL_S * protocol.HEARTBEAT_LIVENESS
"""Silence after which a worker (or, for the load balancer, a pool) counts as gone."""
BULK_JOBS = 5_000
"""Batch jobs the bursting namespace submits (capped at half the trace for small runs)."""
BACKGROUND_SPAN_S = 80.0
"""The background traffic lasts about this long (about 44 jobs/s outside bursts at 10,000 jobs)."""
BULK_WINDOW_S = (20.0, 35.0)
"""When the bulk namespace submits them."""
EU_REGIONS = ("westeurope", "eu-west-1", "europe-west4")
"""placement.regions of jobs whose data must stay in the EU."""
PIPELINE_MODEL = "realesrgan-x4"
"""The super-resolution model the pipeline needs; every simulated worker serves it."""
PIPELINE_SPEC = parse_job_spec({
    "input": {"uri": "s3://sim-input/image.png"}, "output": {"uri": "s3://sim-output/image.png"},
    "steps": [{"op": "denoise"}, {"op": "upscale", "method": "model", "model": PIPELINE_MODEL, "scale": 4}]})
"""Every trace job runs this one pipeline (one cost class): pools differ in speed, jobs in size.
Each job's priority, timeout, placement and known size are set on a copy of it."""


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
    pools: tuple[PoolModel, ...] = POOLS
    failing: str = FAILING
    fail_at_s: float = FAIL_AT_S
    recover_at_s: float | None = RECOVER_AT_S


# ---- trace -------------------------------------------------------------------------------

PENDING, COMPLETED, PAST_DEADLINE, FAILED = "pending", "completed", "past_deadline", "failed"


@dataclass(frozen=True)
class TraceJob:
    """One ImageJob of the trace, identical for every policy."""

    uid: str
    namespace: str
    priority: str
    strategy: str
    arrival: float
    timeout_s: float
    mpix: float
    noise: float
    """Service-time factor of this job, the same on every pool and policy (common random numbers)."""
    regions: tuple[str, ...] = ()

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s


# namespace: (share of background jobs, share of them realtime)
NAMESPACES = {"web": (0.35, 0.7), "mobile": (0.25, 0.5), "analytics": (0.25, 0.0), "ml-data": (0.15, 0.0)}


def make_trace(jobs: int, seed: int) -> list[TraceJob]:
    """Background Poisson traffic with bursts, plus one namespace's burst of batch jobs."""
    rng = random.Random(seed)
    bulk = min(BULK_JOBS, jobs // 2)
    out: list[TraceJob] = []
    names, weights = list(NAMESPACES), [w for w, _ in NAMESPACES.values()]
    # A Markov-modulated Poisson process: a base rate, x5 within burst windows (3 s, every ~25 s).
    # The base rate spreads the background over ~BACKGROUND_SPAN_S whatever the job count, so the
    # pool failure hits live traffic in small runs too.
    burst_len, burst_gap, burst_factor = 3.0, 25.0, 5.0
    mean_factor = 1.0 + (burst_factor - 1.0) * burst_len / (burst_len + burst_gap)
    base_rate = max(1.0, (jobs - bulk) / BACKGROUND_SPAN_S / mean_factor)
    burst_rate = base_rate * burst_factor
    t_burst = rng.expovariate(1.0 / burst_gap)
    t = 0.0
    for i in range(jobs - bulk):
        while t_burst + burst_len < t:
            t_burst += burst_len + rng.expovariate(1.0 / burst_gap)
        rate = burst_rate if t_burst <= t <= t_burst + burst_len else base_rate
        t += rng.expovariate(rate)
        namespace = rng.choices(names, weights)[0]
        realtime = rng.random() < NAMESPACES[namespace][1]
        if realtime:
            strategy = rng.choices(("fastest", "balanced"), (0.7, 0.3))[0]
            timeout, mpix = rng.choice((5.0, 10.0, 15.0)), rng.lognormvariate(0.0, 0.5)
        else:
            strategy = rng.choices(("cheapest", "balanced", "fastest"), (0.5, 0.35, 0.15))[0]
            timeout, mpix = rng.choice((120.0, 300.0, 600.0)), rng.lognormvariate(0.8, 0.7)
        eu_only = namespace in ("web", "mobile") and rng.random() < 0.15
        out.append(TraceJob(f"{namespace}-{i}", namespace, "realtime" if realtime else "batch", strategy, t, timeout,
                            min(32.0, max(0.05, mpix)), rng.lognormvariate(0.0, 0.15), EU_REGIONS if eu_only else ()))
    lo, hi = BULK_WINDOW_S
    for i in range(bulk):
        out.append(TraceJob(f"bulk-{i}", "bulk-reprocess", "batch", "cheapest", rng.uniform(lo, hi), 300.0,
                            min(32.0, rng.lognormvariate(0.5, 0.4)), rng.lognormvariate(0.0, 0.15)))
    out.sort(key=lambda j: (j.arrival, j.uid))
    return out


# ---- simulation state shared by every policy ----------------------------------------------


@dataclass(eq=False)  # identity equality: the baselines' deque.remove compares jobs
class SimJob:
    """A job's state during one policy's run."""

    t: TraceJob
    uid: str
    namespace: str
    priority: str
    outcome: str = PENDING
    finished_at: float | None = None
    pool: str | None = None
    """Pool the job is queued at, running on, or completed on."""
    attempts: int = 0
    rerouted: bool = False
    ticket: int = 0
    """Bumped whenever the job leaves a baseline queue: stale queue entries are skipped."""
    routed_at: float = 0.0
    expected_ms: float | None = None
    """The router's expected completion at the job's last routing decision."""
    expected_usd: float | None = None
    """The router's expected cost at that decision."""
    usd: float = 0.0
    """GPU cost of its last attempt."""


@dataclass(eq=False)
class Attempt:
    job: SimJob
    pool: str
    job_id: str
    started: float
    service_ms: float
    rtt_ms: float
    routing_id: bytes = b""
    """gpuroute: the worker session it was sent on."""
    attempt: AttemptId | None = None
    """gpuroute: the dispatcher's id for it."""
    dead: bool = False
    """Its pool failed under it (or it was sent to a dead pool): no result will come."""
    charged: bool = False


class Simulation:
    """Event loop, outcomes and cost accounting; subclasses route and queue."""

    label = ""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.models = {m.name: m for m in scenario.pools}
        self.alive = {m.name: True for m in scenario.pools}
        self.jobs = [SimJob(t, t.uid, t.namespace, t.priority) for t in trace]
        self.events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.horizon = max((t.deadline for t in trace), default=0.0) + 1.0
        self.gpu_usd = 0.0
        self.pool_usd = {m.name: 0.0 for m in scenario.pools}
        self.pool_done = {m.name: 0 for m in scenario.pools}
        self.last_heard = {m.name: 0.0 for m in scenario.pools}
        self.idle_slot_s = 0.0
        self.idle_since = 0.0
        self.idle_now = 0
        self.dirty: set[str] = set()
        """Pools whose queue or free slots changed since the last pump."""
        self.down: set[str] = set()
        """Pools the health check has declared gone (baselines; gpuroute: the dispatcher's own liveness)."""

    # ---- event loop -------------------------------------------------------------------

    def at(self, when: float, handler: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.events, (when, next(self.seq), handler, args))

    def run(self) -> dict[str, Any]:
        for job in self.jobs:
            self.at(job.t.arrival, self.arrive, job)
            self.at(job.t.deadline, self.deadline, job)
        self.at(self.scenario.fail_at_s, self.fail)
        if self.scenario.recover_at_s is not None:
            self.at(self.scenario.recover_at_s, self.recover)
        self.at(0.0, self.tick)
        while self.events:
            when, _, handler, args = heapq.heappop(self.events)
            if when > self.horizon:
                break
            self.now = when
            self.account_idle(when)
            handler(*args)
            self.pump()
            self.idle_now = self.idle_slots()
        return self.summary()

    def account_idle(self, until: float) -> None:
        self.idle_slot_s += (until - self.idle_since) * self.idle_now
        self.idle_since = until

    def idle_slots(self) -> int:
        """Free slots on live pools while jobs wait in another pool's queue (0 where not tracked)."""
        return 0

    def tick(self) -> None:
        """Once per heartbeat interval: what each side learns from heartbeats (or their absence)."""
        for name, alive in self.alive.items():
            if alive:
                self.last_heard[name] = self.now
            elif self.now - self.last_heard[name] > DETECT_AFTER_S:
                self.down.add(name)  # a health check's verdict, on the operator's liveness rule
        self.on_tick()
        if self.now + protocol.HEARTBEAT_INTERVAL_S <= self.horizon:
            self.at(self.now + protocol.HEARTBEAT_INTERVAL_S, self.tick)

    # ---- attempts, outcomes and cost --------------------------------------------------

    def start_attempt(self, job: SimJob, pool: str) -> Attempt:
        job.attempts += 1
        job.pool = pool
        return self.run_attempt(job, pool, f"{job.uid}/{job.attempts}")

    def run_attempt(self, job: SimJob, pool: str, job_id: str, routing_id: bytes = b"") -> Attempt:
        """The GPU side of one attempt: its result comes back after RTT + service time, unless the pool is dead."""
        model = self.models[pool]
        att = Attempt(job, pool, job_id, self.now, model.service_ms(job.t.mpix, job.t.noise),
                      model.rtt_ms * (0.9 + 0.2 * (job.t.noise * 1000.0 % 1.0)), routing_id)
        if self.alive[pool]:
            self.at(self.now + (att.rtt_ms + att.service_ms) / 1000.0, self.result, att)
        else:
            att.dead = att.charged = True  # sent into a dead pool: never runs, costs nothing
        return att

    def charge(self, att: Attempt, until: float) -> None:
        """GPU time of an attempt: all of it on a result, up to `until` when cut short."""
        if att.charged:
            return
        att.charged = True
        used = min(att.service_ms, max(0.0, (until - att.started) * 1000.0 - att.rtt_ms / 2.0))
        usd = self.models[att.pool].usd(used)
        att.job.usd = usd
        self.gpu_usd += usd
        self.pool_usd[att.pool] += usd

    def complete(self, att: Attempt) -> None:
        self.charge(att, self.now)
        job = att.job
        self.settle(job, COMPLETED)
        job.pool = att.pool
        self.pool_done[att.pool] += 1

    def settle(self, job: SimJob, outcome: str) -> None:
        """Give a job its one outcome; a second one would be a bug in the simulation (or the engine)."""
        if job.outcome != PENDING:
            raise RuntimeError(f"{self.label}: {job.uid} already {job.outcome}, now {outcome}")
        job.outcome, job.finished_at = outcome, self.now

    def fail_pool_attempts(self, running: Sequence[Attempt]) -> None:
        for att in running:
            self.charge(att, self.now)  # a preempted spot VM is billed until it goes
            att.dead = True

    # ---- subclass hooks -----------------------------------------------------------------

    def arrive(self, job: SimJob) -> None:
        raise NotImplementedError

    def result(self, att: Attempt) -> None:
        raise NotImplementedError

    def deadline(self, job: SimJob) -> None:
        raise NotImplementedError

    def fail(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        raise NotImplementedError

    def on_tick(self) -> None:
        pass

    def next_dirty(self) -> str:
        """The first pool (in POOLS order) with something to dispatch: set order would vary with hash seeds."""
        name = next(n for n in self.models if n in self.dirty)
        self.dirty.discard(name)
        return name

    def pump(self) -> None:
        pass

    # ---- results ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        done = [j for j in self.jobs if j.outcome == COMPLETED]
        latency = [j.finished_at - j.t.arrival for j in done]  # type: ignore[operator]
        realtime = [j.finished_at - j.t.arrival for j in done if j.priority == "realtime"]  # type: ignore[operator]
        batch = [j.finished_at - j.t.arrival for j in done if j.priority == "batch"]  # type: ignore[operator]
        counts = {k: sum(1 for j in self.jobs if j.outcome == k) for k in (COMPLETED, PAST_DEADLINE, FAILED)}
        return {
            "policy": self.label,
            "jobs": len(self.jobs),
            "completed": counts[COMPLETED],
            "past_deadline": counts[PAST_DEADLINE],
            "failed": counts[FAILED],
            "lost": sum(1 for j in self.jobs if j.outcome == PENDING),
            "realtime_past_deadline": sum(1 for j in self.jobs
                                          if j.priority == "realtime" and j.outcome == PAST_DEADLINE),
            "rerouted": sum(1 for j in self.jobs if j.rerouted),
            "idle_slot_s_while_queued_elsewhere": round(self.idle_slot_s, 1),
            "gpu_usd": self.gpu_usd,
            "cost_per_1000_usd": 1000.0 * self.gpu_usd / counts[COMPLETED] if counts[COMPLETED] else math.nan,
            "p50_s": percentile(latency, 0.50),
            "p95_s": percentile(latency, 0.95),
            "realtime_p95_s": percentile(realtime, 0.95),
            "batch_p95_s": percentile(batch, 0.95),
            "completed_per_pool": dict(self.pool_done),
            "usd_per_pool": {k: round(v, 6) for k, v in self.pool_usd.items()},
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---- gpuroute: the operator's Dispatcher, driven directly -------------------------------------


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


# ---- baselines -----------------------------------------------------------------------------


class LaneQueue:
    """FIFO (optionally realtime-first) with lazy removal: entries whose ticket changed are skipped."""

    def __init__(self, *, by_priority: bool) -> None:
        self.by_priority = by_priority
        self.lanes: dict[str, deque[tuple[int, SimJob]]] = {"realtime": deque(), "batch": deque()}

    def _lane(self, job: SimJob) -> deque[tuple[int, SimJob]]:
        return self.lanes[job.priority if self.by_priority else "batch"]

    def push(self, job: SimJob, *, front: bool = False) -> None:
        job.ticket += 1
        lane = self._lane(job)
        lane.appendleft((job.ticket, job)) if front else lane.append((job.ticket, job))

    def entries(self) -> Iterator[SimJob]:
        for lane in self.lanes.values():
            for ticket, job in lane:
                if ticket == job.ticket and job.outcome == PENDING:
                    yield job

    def take(self, eligible: Callable[[SimJob], bool] | None = None) -> SimJob | None:
        """Remove and return the first valid job (that `eligible` accepts)."""
        for lane in self.lanes.values():
            while lane and (lane[0][0] != lane[0][1].ticket or lane[0][1].outcome != PENDING):
                lane.popleft()
            for ticket, job in lane:
                if ticket == job.ticket and job.outcome == PENDING and (eligible is None or eligible(job)):
                    job.ticket += 1  # leaves the queue (lazily)
                    return job
        return None

    def empty(self) -> bool:
        return next(self.entries(), None) is None


@dataclass(eq=False)
class Cluster:
    """A pool as a baseline sees it: slots, its own queue, and work stranded by a failure."""

    model: PoolModel
    queue: LaneQueue
    running: dict[str, Attempt] = field(default_factory=dict)
    stranded: list[SimJob] = field(default_factory=list)
    """Jobs whose attempt died with the cluster, held by it until it returns."""


def eligible_for(job: SimJob, model: PoolModel) -> bool:
    # Baselines respect data residency too: a fair comparison moves no job out of its region.
    return not job.t.regions or model.region in job.t.regions


class BaselineSim(Simulation):
    """What the baselines share: clusters, per-job timeouts, restart on return."""

    failover = False
    """Whether the dispatcher itself tracks and moves jobs held by a failed cluster."""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int, *, by_priority: bool) -> None:
        super().__init__(trace, scenario, seed)
        self.clusters = {m.name: Cluster(m, LaneQueue(by_priority=by_priority)) for m in scenario.pools}

    def free(self, cluster: Cluster) -> int:
        return cluster.model.slots - len(cluster.running) if self.alive[cluster.model.name] else 0

    def start(self, job: SimJob, cluster: Cluster) -> None:
        cluster.running[job.uid] = self.start_attempt(job, cluster.model.name)

    def next_job(self, cluster: Cluster) -> SimJob | None:
        return cluster.queue.take()

    def pump(self) -> None:
        while self.dirty:
            cluster = self.clusters[self.next_dirty()]
            while self.free(cluster) > 0:
                job = self.next_job(cluster)
                if job is None:
                    break
                self.start(job, cluster)

    def result(self, att: Attempt) -> None:
        cluster = self.clusters[att.pool]
        if att.dead or cluster.running.get(att.job.uid) is not att:
            return
        del cluster.running[att.job.uid]
        self.complete(att)
        self.dirty.add(att.pool)

    def in_limbo(self, job: SimJob) -> bool:
        """Held by a failed cluster out of the dispatcher's sight: no one can time it out."""
        return (not self.failover and job.pool is not None and not self.alive[job.pool]
                and job.pool in self.clusters)

    def deadline(self, job: SimJob) -> None:
        if job.outcome != PENDING or self.in_limbo(job):
            return  # in limbo: enforced when its cluster returns (recover)
        self._expire(job)

    def _expire(self, job: SimJob) -> None:
        if job.pool is not None:
            cluster = self.clusters[job.pool]
            att = cluster.running.pop(job.uid, None)
            if att is not None:
                self.charge(att, self.now)
                self.dirty.add(job.pool)
            if job in cluster.stranded:
                cluster.stranded.remove(job)
        job.ticket += 1  # drops it from any queue
        self.settle(job, PAST_DEADLINE)

    def fail(self) -> None:
        cluster = self.clusters[self.scenario.failing]
        self.alive[self.scenario.failing] = False
        running = list(cluster.running.values())
        self.fail_pool_attempts(running)
        cluster.stranded.extend(a.job for a in running)
        cluster.running.clear()

    def recover(self) -> None:
        name = self.scenario.failing
        cluster = self.clusters[name]
        self.alive[name] = True
        self.down.discard(name)
        # The cluster's job controller enforces deadlines that passed while it was away...
        for job in list(cluster.queue.entries()) + cluster.stranded:
            if job.outcome == PENDING and self.now >= job.t.deadline:
                self._expire(job)
        # ...and restarts what it was running, ahead of its queue.
        for job in reversed(cluster.stranded):
            if job.outcome == PENDING:
                cluster.queue.push(job, front=True)
        cluster.stranded.clear()
        self.dirty.add(name)


class RoundRobinSim(BaselineSim):
    """A load balancer: pools in turn, skipping those its health check marks down."""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int, *, failover: bool) -> None:
        super().__init__(trace, scenario, seed, by_priority=False)
        self.failover = failover
        self.label = "round-robin + failover" if failover else "round-robin"
        self.order = [m.name for m in scenario.pools]
        self.next_index = 0
        self.waiting: list[SimJob] = []
        """Jobs no live, eligible pool could take: retried every tick."""
        self.moved = False

    def pick(self, job: SimJob) -> Cluster | None:
        for k in range(len(self.order)):
            name = self.order[(self.next_index + k) % len(self.order)]
            if name not in self.down and eligible_for(job, self.models[name]):
                self.next_index = (self.next_index + k + 1) % len(self.order)
                return self.clusters[name]
        return None

    def arrive(self, job: SimJob, *, front: bool = False) -> None:
        cluster = self.pick(job)
        if cluster is None:
            job.pool = None
            self.waiting.append(job)
            return
        job.pool = cluster.model.name
        cluster.queue.push(job, front=front)
        self.dirty.add(job.pool)

    def on_tick(self) -> None:
        name = self.scenario.failing
        if self.failover and not self.moved and name in self.down:
            # Given gpuroute's failover: in-flight work first (front), then the queue (back).
            self.moved = True
            cluster = self.clusters[name]
            for job in cluster.stranded:
                if job.outcome == PENDING:
                    job.rerouted = True
                    self.arrive(job, front=True)
            cluster.stranded.clear()
            for job in list(cluster.queue.entries()):
                job.rerouted = True
                self.arrive(job)
        if self.alive[name]:
            self.moved = False
        waiting, self.waiting = self.waiting, []
        for job in waiting:
            if job.outcome == PENDING:
                self.arrive(job)


class MultiKueueSim(BaselineSim):
    """First-to-admit over clusters in a fixed order; see the module docstring for the two variants."""

    def __init__(self, trace: Sequence[TraceJob], scenario: Scenario, seed: int, *, all_at_once: bool) -> None:
        super().__init__(trace, scenario, seed, by_priority=True)  # Kueue WorkloadPriorityClass
        self.all_at_once = all_at_once
        self.label = "MultiKueue all-at-once" if all_at_once else "MultiKueue first-to-admit"
        self.order = [self.clusters[m.name] for m in scenario.pools]
        self.pending = LaneQueue(by_priority=True)
        """all-at-once: workloads pending in every cluster at once."""

    def arrive(self, job: SimJob) -> None:
        eligible = [c for c in self.order if eligible_for(job, c.model)]
        for cluster in eligible:
            # A cluster admits a new workload if it has free quota and nothing queued ahead of it.
            if self.free(cluster) > 0 and (self.all_at_once or cluster.queue.empty()):
                self.start(job, cluster)
                return
        if self.all_at_once:
            job.pool = None
            self.pending.push(job)
        else:
            job.pool = eligible[0].model.name
            eligible[0].queue.push(job)
        self.dirty.update(c.model.name for c in eligible)

    def next_job(self, cluster: Cluster) -> SimJob | None:
        job = cluster.queue.take()  # restarted (returned cluster) work first
        if job is None and self.all_at_once:
            job = self.pending.take(lambda j: eligible_for(j, cluster.model))
        return job

    def fail(self) -> None:
        stranded_before = len(self.clusters[self.scenario.failing].stranded)
        super().fail()
        for job in self.clusters[self.scenario.failing].stranded[stranded_before:]:
            self.at(self.now + MULTIKUEUE_WORKER_LOST_TIMEOUT_S, self.readmit, job)

    def readmit(self, job: SimJob) -> None:
        """workerLostTimeout passed with the cluster still gone: evict and dispatch again."""
        cluster = self.clusters[self.scenario.failing]
        if job.outcome == PENDING and job in cluster.stranded and not self.alive[cluster.model.name]:
            cluster.stranded.remove(job)
            job.pool = None
            job.rerouted = True
            if self.now >= job.t.deadline:
                self._expire(job)
            else:
                self.arrive(job)


# ---- running every policy -------------------------------------------------------------------

Factory = Callable[[Sequence[TraceJob], Scenario, int], Simulation]

POLICIES: tuple[tuple[str, Factory], ...] = (
    ("gpuroute-mix", lambda t, s, seed: GpurouteSim(t, s, seed, strategy=None)),
    ("gpuroute-fastest", lambda t, s, seed: GpurouteSim(t, s, seed, strategy="fastest")),
    ("gpuroute-cheapest", lambda t, s, seed: GpurouteSim(t, s, seed, strategy="cheapest")),
    ("gpuroute-balanced", lambda t, s, seed: GpurouteSim(t, s, seed, strategy="balanced")),
    ("round-robin", lambda t, s, seed: RoundRobinSim(t, s, seed, failover=False)),
    ("round-robin-failover", lambda t, s, seed: RoundRobinSim(t, s, seed, failover=True)),
    ("multikueue", lambda t, s, seed: MultiKueueSim(t, s, seed, all_at_once=False)),
    ("multikueue-all-at-once", lambda t, s, seed: MultiKueueSim(t, s, seed, all_at_once=True)),
)
REFERENCE = "round-robin"
MOVES_JOBS = ("gpuroute-mix", "gpuroute-fastest", "gpuroute-cheapest", "gpuroute-balanced", "round-robin-failover")
"""Policies whose re-routed count means something (the others never move a job)."""


def run_scenario(trace: Sequence[TraceJob], scenario: Scenario, seed: int) -> list[dict[str, Any]]:
    rows = []
    for key, factory in POLICIES:
        row = factory(trace, scenario, seed).run()
        row["key"] = key
        rows.append(row)
    return rows


def router_diagnostics(trace: Sequence[TraceJob], scenario: Scenario, seed: int) -> dict[str, Any]:
    """Checks on the router's own numbers (estimates vs what happened), for the report."""
    sim = GpurouteSim(trace, scenario, seed, strategy=None)
    row = sim.run()
    out: dict[str, Any] = {"estimated_vs_actual_per_pool": {}}
    for name in sim.models:
        done = [j for j in sim.jobs if j.outcome == COMPLETED and j.pool == name and j.expected_usd is not None]
        estimated, actual = sum(j.expected_usd for j in done), sum(j.usd for j in done)  # type: ignore[misc]
        out["estimated_vs_actual_per_pool"][name] = {
            "jobs": len(done), "router_usd_per_image": estimated / len(done) if done else math.nan,
            "actual_usd_per_image": actual / len(done) if done else math.nan,
            "ratio": estimated / actual if actual else math.nan}
    for priority in ("realtime", "batch"):
        ratios = [(j.finished_at - j.routed_at) * 1000.0 / j.expected_ms for j in sim.jobs  # type: ignore[operator]
                  if j.outcome == COMPLETED and j.priority == priority and j.expected_ms]
        out[f"{priority}_actual_over_expected_median"] = statistics.median(ratios) if ratios else math.nan
    keys = ("cost_per_1000_usd", "p95_s", "realtime_p95_s", "past_deadline", "lost")
    out["engine_views"] = {k: row[k] for k in keys}
    for name in ("realtime-queue", "oracle-service"):
        other = GpurouteSim(trace, scenario, seed, strategy=None, counterfactual=name).run()
        out[name] = {k: other[k] for k in keys}
    return out


def pool_estimates(trace: Sequence[TraceJob], pools: Sequence[PoolModel]) -> dict[str, dict[str, float]]:
    """The router's `estimate` for each idle pool given its true mean service time, next to the truth."""
    mean_mpix = statistics.fmean(t.mpix for t in trace) if trace else 1.0
    out = {}
    for m in pools:
        service = m.service_ms(mean_mpix, 1.0)
        view = PoolView(name=m.name, cloud=m.cloud, region=m.region, price_per_gpu_hour=m.price_per_gpu_hour,
                        spot=m.spot, allowed_namespaces=(), models=frozenset(), workers=m.workers, slots=m.slots,
                        busy=0, queued=0, rtt_ms=m.rtt_ms, service_ms=service)
        est = estimate(view)
        out[m.name] = {"mean_mpix": mean_mpix, "expected_ms": est.expected_ms, "true_ms": m.rtt_ms + service,
                       "router_usd_per_image": est.cost_usd, "true_usd_per_image": m.usd(service)}
    return out


def run(*, jobs: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Every policy over one trace, with the failed pool returning and never returning."""
    started = time.perf_counter()
    trace = make_trace(jobs, seed)
    returns = Scenario()
    never = dataclasses.replace(returns, recover_at_s=None)
    out: dict[str, Any] = {
        "jobs": jobs, "seed": seed, "failing": returns.failing, "fail_at_s": returns.fail_at_s,
        "recover_at_s": returns.recover_at_s, "pools": [dataclasses.asdict(p) for p in returns.pools],
        "results": run_scenario(trace, returns, seed),
        "never_returns": run_scenario(trace, never, seed),
        "diagnostics": router_diagnostics(trace, returns, seed),
        "pool_estimates": pool_estimates(trace, returns.pools),
    }
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


# ---- output -----------------------------------------------------------------------------------


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    base = next(r for r in rows if r["key"] == REFERENCE)
    lines = ["| policy | $ / 1,000 images | cost vs RR | p50 s | p95 s | p95 vs RR | realtime p95 s "
             "| past deadline (realtime) | lost | failed | re-routed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['cost_per_1000_usd']:.4f} "
            f"| {r['cost_per_1000_usd'] / base['cost_per_1000_usd']:.2f}x "
            f"| {r['p50_s']:.2f} | {r['p95_s']:.1f} | {r['p95_s'] / base['p95_s']:.2f}x | {r['realtime_p95_s']:.2f} "
            f"| {r['past_deadline']} ({r['realtime_past_deadline']}) "
            f"| {r['lost']} | {r['failed']} | {r['rerouted'] if r['key'] in MOVES_JOBS else '-'} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    pools = results["pools"]
    lines = [
        f"Routing simulation: {results['jobs']:,} jobs (seed {results['seed']}), {len(pools)} pools; "
        f"{results['failing']} loses every worker at {results['fail_at_s']:.0f} s"
        + (f" and returns at {results['recover_at_s']:.0f} s." if results["recover_at_s"] is not None else "."),
        "",
        "| pool | $ / GPU-hour | spot | workers x slots | slot ms per Mpix + overhead | RTT ms "
        "| true $ / 1,000 avg images | router's estimate (idle pool) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    est = results.get("pool_estimates", {})
    for p in pools:
        e = est.get(p["name"], {})
        lines.append(f"| {p['name']} | {p['price_per_gpu_hour']:.2f} | {'yes' if p['spot'] else 'no'} "
                     f"| {p['workers']} x {p['slots_per_worker']} | {p['ms_per_mpix']:.0f} + {p['overhead_ms']:.0f} "
                     f"| {p['rtt_ms']:.0f} | {1000 * e.get('true_usd_per_image', math.nan):.4f} "
                     f"| {1000 * e.get('router_usd_per_image', math.nan):.4f} |")
    lines += ["", "Pool returns:", ""] + _table(results["results"])
    lines += ["", "Pool never returns:", ""] + _table(results["never_returns"])
    lines += ["", "Ratios are against round-robin (< 1 is cheaper / faster). Percentiles over completed jobs; "
              "cost is GPU spend over images delivered on time. Lost: held by the failed cluster, never resolved."]
    diag = results.get("diagnostics")
    if diag:
        per_pool = ", ".join(f"{k} {v['ratio']:.1f}x" for k, v in diag["estimated_vs_actual_per_pool"].items())
        engine, rtq, same = diag["engine_views"], diag["realtime-queue"], diag["oracle-service"]
        lines += ["", "Router checks (gpuroute, per-job strategies; counterfactuals change only what the views show):",
                  f"- router's cost per image over the GPU cost actually used: {per_pool}",
                  f"- completion time actual / expected, median: realtime "
                  f"{diag['realtime_actual_over_expected_median']:.2f}, "
                  f"batch {diag['batch_actual_over_expected_median']:.2f}",
                  f"- realtime jobs shown only the realtime part of each queue: realtime p95 "
                  f"{engine['realtime_p95_s']:.2f} -> {rtq['realtime_p95_s']:.2f} s, $ / 1,000 "
                  f"{engine['cost_per_1000_usd']:.4f} -> {rtq['cost_per_1000_usd']:.4f}",
                  f"- every pool shown its true service time for each job (perfect speed knowledge): $ / 1,000 "
                  f"{engine['cost_per_1000_usd']:.4f} -> {same['cost_per_1000_usd']:.4f}, p95 {engine['p95_s']:.1f} -> "
                  f"{same['p95_s']:.1f} s, past deadline {engine['past_deadline']} -> {same['past_deadline']}"]
        idle = ", ".join(f"{r['policy'].removeprefix('gpuroute, ')} {r['idle_slot_s_while_queued_elsewhere']:,.0f}"
                         for r in results["results"] if r["key"].startswith("gpuroute"))
        lines.append(f"- slot-seconds free on one pool while jobs waited in another's queue (jobs stay where they "
                     f"were routed): {idle}")
    lines += ["", f"({results['seconds']} s)"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    # Each simulated pool failure makes the dispatcher log one warning per lost worker, per run.
    for module in ("gpuroute_operator.core.dispatcher", "gpuroute_operator.core.sessions"):
        logging.getLogger(module).setLevel(logging.ERROR)
    jobs = int(argv[1]) if len(argv) > 1 else 10_000
    seed = int(argv[2]) if len(argv) > 2 else 0
    print(markdown(run(jobs=jobs, seed=seed)))


if __name__ == "__main__":
    main(sys.argv)
