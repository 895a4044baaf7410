"""The operator's core: admits ImageJobs, routes and dispatches them, and follows
each attempt until exactly one terminal phase is written.

Everything here runs on kopf's event loop and never blocks it: Kubernetes reads go
to threads, status writes to the StatusWriter, socket I/O is non-blocking.

The CRs are the durable queue. After a restart, kopf lists every ImageJob again and
each non-terminal one is re-admitted; one that was Dispatched or Processing is sent
again under the same attempt id first, so a worker that still has it joins or
answers from its result cache instead of computing it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq.asyncio

from gpuroute import protocol
from gpuroute.netguard import UnsafeURL, check_public_https_url
from gpuroute.ops_catalog import models_used
from gpuroute.protocol import ErrorCode, Kind, Message
from gpuroute_operator import metrics
from gpuroute_operator.autoscaler import Autoscaler
from gpuroute_operator.jobs import Job, failed_status, parse_rfc3339
from gpuroute_operator.kube import Kube, now_rfc3339
from gpuroute_operator.phases import Phase
from gpuroute_operator.pools import PoolSpec, PoolState, WorkerConn, ewma
from gpuroute_operator.router import Decision, JobNeeds, choose, rejection
from gpuroute_operator.server import WorkerServer
from gpuroute_operator.service_model import PipelinePriors
from gpuroute_operator.spec import JobSpec, SpecError, parse_job_spec
from gpuroute_operator.status import ObjectRef, StatusWriter
from gpuroute_operator.storage import AzureAccount, Presigner, SigningUnavailable, StorageGrants
from gpuroute_operator.zap import ZapHandler

log = logging.getLogger(__name__)

CANCEL_ANNOTATION = "gpuroute.io/cancel"
GRANTS_TTL_S = 10.0
"""How long a namespace's storage grants are cached."""
KEYS_REFRESH_S = 30.0
"""How often pools' key Secrets are re-read (key rotation without a restart)."""
POOL_STATUS_EVERY_S = 10.0
"""Pool status is re-written at least this often, so lastHeartbeat stays meaningful."""
AUTOSCALE_PERIOD_S = 2.0
"""How often pools with spec.scaling are looked at (the autoscaler rate-limits each to 5 s)."""
REJECT_PAUSE_S = 0.5
"""A worker that refused a job for capacity gets no new job for this long."""
SIGNING_RETRY_S = 5.0
"""A job whose storage the operator cannot sign for right now is tried again this often, until its timeout."""
FINISHED_MEMORY = 100_000
"""Terminal job uids remembered, so late events and duplicate results are ignored cheaply."""

_RETRY_REASONS = {ErrorCode.OOM: "OutOfMemory", ErrorCode.UNAVAILABLE: "WorkerUnavailable", ErrorCode.TIMEOUT: "Timeout"}


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs from the operator's configuration."""

    bind: str
    """Endpoint the ROUTER socket binds, e.g. tcp://0.0.0.0:7700."""
    secret_key: bytes
    """The operator's CURVE secret key (Z85)."""
    namespace: str
    """The operator's namespace: default for Secret references without one."""
    kubeconfig: str | None = None
    """Path for pykube; None means in-cluster or $KUBECONFIG."""
    coalesce_s: float = 0.3
    """Window in which status changes of one job are merged into one patch."""
    tick_s: float = 0.5
    """Period of the housekeeping loop (liveness, timeouts, re-routing)."""
    plaintext: bool = False
    """Dev only: no CURVE on the socket. Never used by the demo or tests' main path."""
    azure_accounts: tuple[AzureAccount, ...] = ()
    """Azure storage accounts the operator signs SAS URLs for."""


class Engine:
    def __init__(self, config: EngineConfig, *, presigner: Presigner | None = None) -> None:
        self.config = config
        self.kube = Kube(config.kubeconfig)
        self.writer = StatusWriter(self.kube, coalesce_s=config.coalesce_s)
        self.presigner = presigner or Presigner(azure_accounts=config.azure_accounts)
        self.context = zmq.asyncio.Context()
        self.zap = ZapHandler(self.context)
        self.server = WorkerServer(self.context, bind=config.bind, secret_key=config.secret_key, handler=self,
                                   plaintext=config.plaintext)
        self.jobs: dict[str, Job] = {}
        self.pools: dict[str, PoolState] = {}
        self.unrouted: dict[str, Job] = {}
        self.priors = PipelinePriors()
        self.held: dict[str, tuple[Job, float]] = {}
        """Jobs waiting for storage signing to work again, with when to try next (monotonic)."""
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._grants: dict[str, tuple[StorageGrants, float]] = {}
        self._pool_status_sent: dict[str, tuple[dict[str, Any], float, str]] = {}
        self._keys_read_at: dict[str, float] = {}
        self._tick_task: asyncio.Task[None] | None = None
        self._autoscale_task: asyncio.Task[None] | None = None
        self.autoscaler = Autoscaler(self.kube.read_secret_data)
        self._scale_failures: dict[str, str] = {}

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.presigner.warm)
        if not self.config.plaintext:
            self.zap.start()
        self.server.start()
        self.writer.start()
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop(), name="engine-tick")
        # Its own loop: a slow GPU-cluster API must never delay heartbeats or dispatch.
        self._autoscale_task = asyncio.get_running_loop().create_task(self._autoscale_loop(), name="autoscaler")

    async def stop(self) -> None:
        for task in (self._tick_task, self._autoscale_task):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.autoscaler.close()
        self.presigner.close()  # stops the Azure delegation-key renewal thread
        await self.writer.stop()
        await self.server.stop()
        await self.zap.stop()
        self.context.term()

    # ---- ImageJobs -------------------------------------------------------------------

    async def observe_job(self, body: Mapping[str, Any]) -> None:
        """Called for every ImageJob event except deletion; idempotent."""
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid"))
        if uid in self._finished:
            return
        job = self.jobs.get(uid)
        if job is not None:
            if (meta.get("annotations") or {}).get(CANCEL_ANNOTATION) == "true":
                self._finish(job, Phase.CANCELLED, "CancelRequested", f"cancelled by annotation {CANCEL_ANNOTATION}")
            elif int(meta.get("generation") or 1) != job.generation:
                job.generation = int(meta.get("generation") or 1)
                self.writer.event(job.ref, "SpecChangeIgnored", "spec changes after admission are ignored; "
                                  "delete and re-create the ImageJob to run a new spec", warning=True)
                self._publish(job)
            return
        await self._admit(body)

    async def _admit(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        status = body.get("status") or {}
        uid, name, namespace = str(meta["uid"]), str(meta["name"]), str(meta["namespace"])
        generation = int(meta.get("generation") or 1)
        if status.get("phase") in {p.value for p in Phase if p.terminal}:
            self._remember_finished(uid)
            return
        ref = ObjectRef("ImageJob", name, namespace, uid)
        queued_at = parse_rfc3339((status.get("timing") or {}).get("queuedAt")) or time.time()
        try:
            spec = parse_job_spec(body.get("spec"))
            await self._check_access(spec, namespace)
        except SpecError as exc:
            self._remember_finished(uid)
            self.writer.update(ref, failed_status(generation=generation, reason=exc.reason, message=str(exc),
                                                  queued_at=queued_at), urgent=True)
            self.writer.event(ref, exc.reason, str(exc), warning=True)
            metrics.JOBS_FINISHED.labels(Phase.FAILED.value, exc.reason).inc()
            return
        if (meta.get("annotations") or {}).get(CANCEL_ANNOTATION) == "true":
            job = Job(uid, namespace, name, generation, spec, queued_at)
            self._finish(job, Phase.CANCELLED, "CancelRequested", f"cancelled by annotation {CANCEL_ANNOTATION}")
            return
        job = Job(uid, namespace, name, generation, spec, queued_at, attempts=int(status.get("attempts") or 0))
        previous_phase = status.get("phase")
        if previous_phase in (Phase.DISPATCHED.value, Phase.PROCESSING.value) and job.attempts > 0:
            job.resend_current_attempt = True
            job.preferred_worker = status.get("worker") or None
            job.pool = status.get("pool") or None
        self.jobs[uid] = job
        metrics.JOBS_ADMITTED.labels(spec.priority).inc()
        job.move(Phase.QUEUED, reason="Admitted" if previous_phase is None else "Resumed")
        if job.resend_current_attempt and self._attach_running(job):
            return
        self._route(job, prefer=job.pool)
        if previous_phase is None:
            self._publish(job)
            self.writer.event(ref, "Queued", job.decision or job.message)
        self.pump()

    def _attach_running(self, job: Job) -> bool:
        """A resumed job that a connected worker reported running is followed, not re-sent."""
        job_id = job.current_job_id
        for pool in self.pools.values():
            for conn in pool.workers.values():
                if job_id in conn.foreign:
                    conn.foreign.discard(job_id)
                    conn.jobs[job_id] = job
                    job.active[job_id] = conn.routing_id
                    job.resend_current_attempt = False
                    job.worker, job.gpu, job.pool = conn.worker, conn.device, conn.pool
                    job.dispatched_at = job.dispatched_at or time.time()
                    job.sent_monotonic = time.monotonic()
                    job.move(Phase.PROCESSING, reason="Resumed", message=f"still running on {conn.pool}/{conn.worker}")
                    return True
        return False

    async def _check_access(self, spec: JobSpec, namespace: str) -> None:
        grants = await self._namespace_grants(namespace)
        grants.check(spec, namespace)
        if spec.input_url is not None:
            try:
                await asyncio.to_thread(check_public_https_url, spec.input_url)
            except UnsafeURL as exc:
                raise SpecError("spec.input.uri", str(exc), "UnsafeInput") from exc

    async def _namespace_grants(self, namespace: str) -> StorageGrants:
        cached = self._grants.get(namespace)
        if cached and time.monotonic() - cached[1] < GRANTS_TTL_S:
            return cached[0]
        try:
            annotations = await asyncio.to_thread(self.kube.namespace_annotations, namespace)
        except Exception as exc:  # pykube raises ObjectDoesNotExist or HTTP errors
            log.warning("cannot read namespace %s: %s; granting nothing", namespace, exc)
            annotations = {}
        grants = StorageGrants.from_annotations(annotations)
        self._grants[namespace] = (grants, time.monotonic())
        return grants

    def forget(self, uid: str) -> None:
        """The ImageJob was deleted: stop its work everywhere."""
        job = self.jobs.pop(uid, None)
        if job is None:
            return
        self._unqueue(job)
        self._cancel_attempts(job)
        self.writer.forget(job.ref)
        self._remember_finished(uid)
        log.info("ImageJob %s/%s deleted in phase %s", job.namespace, job.name, job.phase.value)

    # ---- routing and dispatch ----------------------------------------------------------

    def _needs(self, job: Job) -> JobNeeds:
        placement = job.spec.placement
        return JobNeeds(namespace=job.namespace, priority=job.priority, strategy=placement.strategy,
                        timeout_s=max(0.0, job.deadline - time.time()), pools=placement.pools,
                        clouds=placement.clouds, regions=placement.regions, models=models_used(job.spec.steps))

    def _route(self, job: Job, *, front: bool = False, prefer: str | None = None) -> None:
        # Every pool is scored on this job: its pipeline, and its size where known (inline
        # input) or else the typical size of that pipeline, never the sizes a pool happened to get.
        pixels = job.spec.input_pixels
        cost_class = job.spec.cost_class
        mpix = self.priors.expected_mpix(cost_class, pixels / 1e6 if pixels else None)
        shape = self.priors.shape(cost_class)
        views = [p.view(p.job_service_ms(cost_class, mpix, shape)) for p in self.pools.values()]
        decision: Decision = choose(self._needs(job), views)
        if prefer and decision.pool and prefer in self.pools and prefer != decision.pool:
            # A resumed job goes back to its pool if that is still eligible: its worker may hold the result.
            alt = choose(JobNeeds(**{**self._needs(job).__dict__, "pools": (prefer,)}), views)
            decision = alt if alt.pool else decision
        if decision.pool is None:
            job.pool = None
            job.reason, job.message = "NoEligiblePool", decision.reason
            self.unrouted[job.uid] = job
            return
        self.unrouted.pop(job.uid, None)
        job.pool = decision.pool
        job.decision = decision.reason
        self.pools[decision.pool].queue.push(job, front=front)

    def _unqueue(self, job: Job) -> None:
        self.unrouted.pop(job.uid, None)
        self.held.pop(job.uid, None)
        for pool in self.pools.values():
            pool.queue.remove(job.uid)

    def pump(self) -> None:
        """Dispatch queued jobs to free workers, pool by pool."""
        for pool in self.pools.values():
            while len(pool.queue):
                conn = pool.free_worker(None)
                if conn is None:
                    break
                job = pool.queue.pop()
                if job is None:
                    break
                preferred = pool.free_worker(job.preferred_worker) if job.preferred_worker else conn
                self._dispatch(job, preferred or conn)

    def _dispatch(self, job: Job, conn: WorkerConn) -> None:
        new_attempt = not job.resend_current_attempt
        if job.resend_current_attempt:
            job.resend_current_attempt = False
        else:
            if job.attempts >= job.spec.max_attempts:
                self._finish(job, Phase.FAILED, "MaxAttemptsExceeded",
                             f"no attempt succeeded after {job.attempts} attempts; last: {job.message}")
                return
            job.attempts += 1
        job_id = job.current_job_id
        try:
            header, payload = self._job_message(job, job_id)
        except SigningUnavailable as exc:
            # Nothing was sent: not an attempt. The job waits for signing to work again.
            if new_attempt:
                job.attempts -= 1
            else:
                job.resend_current_attempt = True
            self._hold(job, exc)
            return
        except SpecError as exc:
            self._finish(job, Phase.FAILED, exc.reason, str(exc))
            return
        if not self.server.send(conn.routing_id, Kind.JOB, header, payload):
            job.resend_current_attempt = True  # never left the operator: not an attempt
            self._worker_lost(conn, "unreachable")
            self._route(job, front=True)
            return
        first_dispatch = job.dispatched_at is None
        conn.jobs[job_id] = job
        job.active[job_id] = conn.routing_id
        job.worker, job.gpu, job.pool = conn.worker, conn.device, conn.pool
        job.dispatched_at = time.time()
        job.sent_monotonic = time.monotonic()
        job.move(Phase.DISPATCHED, reason="Dispatched", message=f"attempt {job.attempts} sent to {conn.pool}/{conn.worker}")
        if first_dispatch:
            metrics.DISPATCH_SECONDS.observe(job.dispatched_at - job.queued_at)
        self._publish(job)

    def _hold(self, job: Job, exc: SigningUnavailable) -> None:
        first = job.reason != "StorageUnavailable"
        job.pool = None
        job.move(Phase.QUEUED, reason="StorageUnavailable",
                 message=f"{exc}; retrying every {SIGNING_RETRY_S:g} s until timeoutSeconds")
        self.held[job.uid] = (job, time.monotonic() + SIGNING_RETRY_S)
        self._publish(job)
        if first:  # one Event per outage, not one per retry
            log.warning("ImageJob %s/%s waits for storage signing: %s", job.namespace, job.name, exc)
            metrics.JOBS_REQUEUED.labels("StorageUnavailable").inc()
            self.writer.event(job.ref, "StorageUnavailable", job.message, warning=True)

    def _retry_held(self) -> None:
        now = time.monotonic()
        for uid, (job, retry_at) in list(self.held.items()):
            if retry_at <= now:
                del self.held[uid]
                self._route(job)

    def _job_message(self, job: Job, job_id: str) -> tuple[dict[str, Any], bytes | None]:
        spec = job.spec
        expires = int(max(60, job.deadline - time.time() + 60))
        if spec.input_uri is not None:
            source: dict[str, Any] = {"url": self.presigner.get(spec.input_uri, expires_s=expires).url, "untrusted": False}
        elif spec.input_url is not None:
            source = {"url": spec.input_url, "untrusted": True}
        else:
            source = {"inline": True}
        signed = self.presigner.put(spec.output, spec.output_format, expires_s=expires)
        header = {
            "job": job_id,
            "uid": job.uid,
            "attempt": job.attempts,
            "name": f"{job.namespace}/{job.name}",
            "steps": list(spec.steps),
            "input": source,
            "output": {"url": signed.url, "headers": dict(signed.headers), "format": spec.output_format,
                       "quality": spec.quality},
            "timeoutS": max(1.0, job.deadline - time.time()),
        }
        return header, spec.inline

    def _cancel_attempts(self, job: Job, *, keep: str | None = None) -> None:
        for job_id, routing_id in list(job.active.items()):
            if job_id == keep:
                continue
            self.server.send(routing_id, Kind.CANCEL, {"job": job_id})
            for pool in self.pools.values():
                conn = pool.workers.get(routing_id)
                if conn is not None:
                    conn.jobs.pop(job_id, None)
        job.active.clear()

    def _requeue(self, job: Job, reason: str, message: str) -> None:
        job.worker = None
        job.move(Phase.QUEUED, reason=reason, message=message)
        metrics.JOBS_REQUEUED.labels(reason).inc()
        self._route(job, front=True)
        self._publish(job)
        self.writer.event(job.ref, "Requeued", f"{message}; {job.decision or job.message}", warning=True)

    def _finish(self, job: Job, phase: Phase, reason: str, message: str, *, keep: str | None = None) -> None:
        job.move(phase, reason=reason, message=message)
        self._unqueue(job)
        self._cancel_attempts(job, keep=keep)
        job.completed_at = time.time()
        job.timing["totalMs"] = round((job.completed_at - job.queued_at) * 1000.0, 3)
        self.jobs.pop(job.uid, None)
        self._remember_finished(job.uid)
        self._publish(job, urgent=True)
        self.writer.event(job.ref, phase.value if phase is not Phase.FAILED else reason, message,
                          warning=phase is Phase.FAILED)
        metrics.JOBS_FINISHED.labels(phase.value, reason).inc()
        self._remember_recent(job)

    def _publish(self, job: Job, *, urgent: bool = False) -> None:
        self.writer.update(job.ref, job.status(), urgent=urgent)

    def _remember_finished(self, uid: str) -> None:
        self._finished[uid] = None
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _remember_recent(self, job: Job) -> None:
        self.recent[job.uid] = {"namespace": job.namespace, "name": job.name, **job.status()}
        while len(self.recent) > 200:
            self.recent.popitem(last=False)

    # ---- worker messages -------------------------------------------------------------

    def on_message(self, routing_id: bytes, pool: str, message: Message) -> None:
        conn = self._conn(routing_id)
        if message.kind is Kind.READY:
            self._worker_ready(routing_id, pool, message.header)
            return
        if conn is None:
            if message.kind is not Kind.DISCONNECT:
                # Unknown peer (we restarted, or it was expired): ask it to register again.
                metrics.REJECTED_MESSAGES.labels("unregistered").inc()
                self.server.send(routing_id, Kind.DISCONNECT, {"reason": "register again"})
            return
        conn.last_seen = time.monotonic()
        conn.last_heartbeat_wall = time.time()
        header = message.header
        if message.kind is Kind.HEARTBEAT:
            pong = header.get("pong")
            if isinstance(pong, (int, float)):
                conn.rtt_ms = ewma(conn.rtt_ms, max(0.0, (time.monotonic() - pong) * 1000.0))
        elif message.kind is Kind.ACCEPTED:
            job = conn.jobs.get(str(header["job"]))
            if job is not None and job.phase is Phase.DISPATCHED and str(header["job"]) == job.current_job_id:
                job.started_at = job.started_at or time.time()
                job.move(Phase.PROCESSING, reason="Processing", message=f"running on {conn.pool}/{conn.worker}")
                self._publish(job)
        elif message.kind is Kind.RESULT:
            self._job_result(conn, header)
        elif message.kind is Kind.ERROR:
            self._job_error(conn, header)
        elif message.kind is Kind.DISCONNECT:
            self._worker_lost(conn, "shut down")
        elif message.kind is Kind.PROGRESS:
            pass  # liveness only; stages are reported in the RESULT's timing
        else:
            metrics.REJECTED_MESSAGES.labels("unexpected_kind").inc()
        self.pump()

    def _conn(self, routing_id: bytes) -> WorkerConn | None:
        for pool in self.pools.values():
            conn = pool.workers.get(routing_id)
            if conn is not None:
                return conn
        return None

    def _worker_ready(self, routing_id: bytes, authenticated_pool: str, header: Mapping[str, Any]) -> None:
        claimed = str(header["pool"])
        pool_name = authenticated_pool or claimed
        pool = self.pools.get(pool_name)
        if pool is None or (authenticated_pool and claimed != authenticated_pool):
            why = "unknown pool" if pool is None else f"key belongs to pool {authenticated_pool}, READY claims {claimed}"
            metrics.REJECTED_MESSAGES.labels("bad_ready").inc()
            log.warning("refused READY from %r: %s", routing_id[:64], why)
            self.server.send(routing_id, Kind.DISCONNECT, {"reason": why})
            return
        old = self._conn(routing_id)
        carried: dict[str, Job] = {}
        if old is not None:
            # Same worker, new connection: keep the jobs it still runs or is re-answering.
            still = set(header.get("jobs") or ())
            for job_id, job in list(old.jobs.items()):
                if job_id in still:
                    carried[job_id] = job
                    old.jobs.pop(job_id)
            self._worker_lost(old, "reconnected")
        try:
            capacity = max(1, min(int(header["capacity"]), pool.spec.max_in_flight_per_worker))
        except (TypeError, ValueError):
            capacity = 1
        conn = WorkerConn(routing_id, pool_name, str(header["worker"]), capacity, str(header.get("device") or ""),
                          frozenset(str(m) for m in header.get("models") or ()), jobs=carried)
        for job_id, job in carried.items():
            job.active[job_id] = routing_id
        # Jobs it runs that we do not follow (we restarted): their slots are busy, and a
        # resumed job with one of these ids is attached instead of sent again.
        conn.foreign = {str(j) for j in header.get("jobs") or ()} - set(carried)
        pool.workers[routing_id] = conn
        for job_id in list(conn.foreign):
            job = self.jobs.get(job_id.rsplit("/", 1)[0])
            if job is not None and job.resend_current_attempt and job.current_job_id == job_id:
                self._unqueue(job)
                self._attach_running(job)
        metrics.WORKERS.labels(pool_name).set(len(pool.workers))
        log.info("worker %s joined pool %s (%s, capacity %d)", conn.worker, pool_name, conn.device, capacity)
        self.server.send(routing_id, Kind.HEARTBEAT, {"ping": time.monotonic()})
        self._reroute_unrouted()
        self.pump()

    def _worker_lost(self, conn: WorkerConn, why: str, *, pool: PoolState | None = None) -> None:
        pool = pool or self.pools.get(conn.pool)
        if pool is None or pool.workers.get(conn.routing_id) is not conn:
            return
        del pool.workers[conn.routing_id]
        metrics.WORKERS.labels(conn.pool).set(len(pool.workers))
        metrics.WORKER_DISCONNECTS.labels(conn.pool, why.split()[0]).inc()
        log.warning("worker %s of pool %s %s; re-queueing %d jobs", conn.worker, conn.pool, why, len(conn.jobs))
        for job_id, job in list(conn.jobs.items()):
            job.active.pop(job_id, None)
            if job.uid in self.jobs and not job.active and not job.phase.terminal:
                self._requeue(job, "WorkerLost", f"worker {conn.pool}/{conn.worker} {why} during attempt {job.attempts}")
        conn.jobs.clear()
        # Jobs waiting in this pool may now be better off elsewhere.
        if not pool.workers:
            stranded = list(pool.queue)
            for job in stranded:
                pool.queue.remove(job.uid)
                self._route(job)

    def _job_result(self, conn: WorkerConn, header: Mapping[str, Any]) -> None:
        job_id = str(header["job"])
        conn.jobs.pop(job_id, None)
        conn.foreign.discard(job_id)
        job = self.jobs.get(job_id.rsplit("/", 1)[0])
        if job is None:
            metrics.REJECTED_MESSAGES.labels("duplicate_result").inc()
            return
        worker_timing = header.get("timing") or {}
        output = header.get("output") or {}
        now = time.time()
        worker_ms = float(worker_timing.get("workerMs") or 0.0)
        round_trip_ms = (time.monotonic() - (job.sent_monotonic or time.monotonic())) * 1000.0
        job.worker = str(header.get("worker") or conn.worker)
        job.gpu = str(header.get("device") or conn.device)
        job.pool = conn.pool
        job.started_at = job.started_at or job.dispatched_at
        job.timing = {
            # Queueing happens twice: in the operator, and on the worker waiting for its device.
            "queueMs": round(((job.dispatched_at or now) - job.queued_at) * 1000.0
                             + float(worker_timing.get("executorWaitMs") or 0.0), 3),
            "networkMs": round(max(0.0, round_trip_ms - worker_ms), 3),
            **{k: float(worker_timing.get(k) or 0.0) for k in ("downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs")},
        }
        job.output = {"uri": job.spec.output.uri, "bytes": int(output.get("bytes") or 0),
                      "width": int(output.get("width") or 0), "height": int(output.get("height") or 0),
                      "sha256": str(output.get("sha256") or ""), "format": str(output.get("format") or "")}
        pool = self.pools.get(conn.pool)
        if pool is not None and not header.get("cached"):
            source = header.get("input") if isinstance(header.get("input"), Mapping) else {}
            input_pixels = _positive_int(source.get("width")) * _positive_int(source.get("height"))
            pool.record_result(worker_ms, job.output["width"] * job.output["height"],
                               cost_class=job.spec.cost_class, input_pixels=input_pixels)
            if input_pixels:
                self.priors.add(job.spec.cost_class, input_pixels / 1e6, worker_ms)
        message = f"{job.output['width']}x{job.output['height']} {job.output['format']} written to {job.spec.output.uri}"
        self._finish(job, Phase.COMPLETED, "Succeeded", message, keep=job_id)
        metrics.E2E_SECONDS.labels(conn.pool).observe(now - job.queued_at)

    def _job_error(self, conn: WorkerConn, header: Mapping[str, Any]) -> None:
        job_id = str(header["job"])
        conn.jobs.pop(job_id, None)
        conn.foreign.discard(job_id)
        job = self.jobs.get(job_id.rsplit("/", 1)[0])
        code = ErrorCode(header["code"])
        if job is None:
            return
        job.active.pop(job_id, None)
        if header.get("rejected") and job_id == job.current_job_id and not job.phase.terminal:
            # Refused before it started (worker full): not an attempt. Pause that worker briefly
            # so the job is not bounced straight back to it.
            conn.paused_until = time.monotonic() + REJECT_PAUSE_S
            job.resend_current_attempt = True
            job.move(Phase.QUEUED, reason="WorkerBusy", message=f"{conn.pool}/{conn.worker} was full")
            self._route(job, front=True)
            return
        if code is ErrorCode.CANCELLED or job_id != job.current_job_id or job.active:
            return  # an attempt we gave up on, or another attempt is still running
        text = f"{conn.pool}/{conn.worker}: {header['message']}"
        if code is ErrorCode.INVALID_INPUT:
            self._finish(job, Phase.FAILED, "InvalidInput", str(header["message"]))
        elif job.attempts >= job.spec.max_attempts:
            self._finish(job, Phase.FAILED, _RETRY_REASONS[code], f"{text} (after {job.attempts} attempts)")
        else:
            self._requeue(job, _RETRY_REASONS[code], text)

    # ---- pools -----------------------------------------------------------------------

    async def configure_pool(self, spec: PoolSpec) -> None:
        pool = self.pools.get(spec.name)
        if pool is None:
            pool = self.pools[spec.name] = PoolState(spec)
        else:
            pool.spec = spec
        await self._load_keys(pool)
        self._dial_endpoints()
        self._reroute_unrouted()
        self.pump()

    def _dial_endpoints(self) -> None:
        self.server.dial(endpoint for pool in self.pools.values() for endpoint in pool.spec.endpoints)

    async def _load_keys(self, pool: PoolState) -> None:
        from gpuroute.curve_keys import KeyError_, public_keys_from_secret_data

        self._keys_read_at[pool.spec.name] = time.monotonic()
        if pool.spec.keys_secret is None:
            pool.keys, pool.problem = 0, "spec.workerKeysSecretRef is not set: no worker can join"
            self.zap.set_pool_keys(pool.spec.name, (), pool.spec.cidrs)
            return
        namespace, name = pool.spec.keys_secret
        try:
            data = await asyncio.to_thread(self.kube.read_secret_data, namespace, name)
            keys = public_keys_from_secret_data(data, source=f"secret {namespace}/{name}")
        except KeyError_ as exc:
            pool.problem = str(exc)
            log.error("pool %s: %s", pool.spec.name, exc)
            return
        except Exception as exc:  # pykube: ObjectDoesNotExist, HTTP errors
            pool.problem = f"cannot read keys Secret {namespace}/{name}: {exc}"
            log.error("pool %s: %s", pool.spec.name, pool.problem)
            return
        self.zap.set_pool_keys(pool.spec.name, keys.values(), pool.spec.cidrs)
        pool.keys, pool.problem = len(keys), "" if keys else f"Secret {namespace}/{name} lists no worker keys"

    def remove_pool(self, name: str) -> None:
        pool = self.pools.pop(name, None)
        self.autoscaler.forget(name)
        if pool is None:
            return
        self.zap.remove_pool(name)
        self._dial_endpoints()
        for conn in list(pool.workers.values()):
            self.server.send(conn.routing_id, Kind.DISCONNECT, {"reason": "pool deleted"})
            self._worker_lost(conn, "pool deleted", pool=pool)
        for job in list(pool.queue):  # whatever losing the workers did not already move
            pool.queue.remove(job.uid)
            self._route(job)
        self.pump()

    def _reroute_unrouted(self) -> None:
        for job in list(self.unrouted.values()):
            self._route(job)
            if job.uid not in self.unrouted:
                self.writer.event(job.ref, "Routed", job.decision)

    # ---- housekeeping ----------------------------------------------------------------

    async def _tick_loop(self) -> None:
        last_beat = 0.0
        while True:
            await asyncio.sleep(self.config.tick_s)
            try:
                now = time.monotonic()
                if now - last_beat >= protocol.HEARTBEAT_INTERVAL_S:
                    last_beat = now
                    self._heartbeat(now)
                self._expire_deadlines()
                self._retry_held()
                self._reroute_unrouted()
                self.pump()
                self._publish_pools()
                await self._refresh_keys()
            except Exception:  # housekeeping must survive any single failure
                log.exception("engine tick failed")

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(AUTOSCALE_PERIOD_S)
            now = time.monotonic()
            for name, pool in list(self.pools.items()):
                if pool.spec.scaling is None:
                    self.autoscaler.forget(name)  # scaling removed from the spec: close its client
                    continue
                queued = len(pool.queue) + self._waiting_for(pool)
                decision = await self.autoscaler.reconcile(name, pool.spec.scaling, queued=queued,
                                                           in_flight=pool.busy, now=now)
                if decision is None:
                    continue
                ref = ObjectRef("WorkerPool", name)
                if decision.applied:
                    metrics.DESIRED_REPLICAS.labels(name).set(decision.desired or 0)
                    self.writer.event(ref, "Scaled", f"{decision.current} -> {decision.desired} replicas: {decision.reason}")
                if decision.desired is None:
                    # One Event per distinct failure, not one every few seconds while it lasts.
                    if self._scale_failures.get(name) != decision.reason:
                        self._scale_failures[name] = decision.reason
                        self.writer.event(ref, "ScaleFailed", decision.reason, warning=True)
                else:
                    self._scale_failures.pop(name, None)

    def _waiting_for(self, pool: PoolState) -> int:
        """Unrouted jobs this pool could take if it had workers: demand that scales it up from zero."""
        view = dataclasses.replace(pool.view(), workers=1, slots=1)
        return sum(1 for job in self.unrouted.values() if rejection(self._needs(job), view) is None)

    def _heartbeat(self, now: float) -> None:
        for pool in list(self.pools.values()):
            for conn in list(pool.workers.values()):
                if conn.expired(now):
                    self._worker_lost(conn, f"silent for {conn.silent_for(now):.1f}s")
                elif not self.server.send(conn.routing_id, Kind.HEARTBEAT, {"ping": now, "rttMs": conn.rtt_ms}):
                    self._worker_lost(conn, "unreachable")

    def _expire_deadlines(self) -> None:
        now = time.time()
        for job in [j for j in self.jobs.values() if now > j.deadline]:
            self._finish(job, Phase.FAILED, "Timeout",
                         f"not completed within timeoutSeconds={job.spec.timeout_s} (last phase {job.phase.value})")

    async def _refresh_keys(self) -> None:
        now = time.monotonic()
        for pool in list(self.pools.values()):
            if now - self._keys_read_at.get(pool.spec.name, 0.0) >= KEYS_REFRESH_S:
                await self._load_keys(pool)

    def pool_status(self, pool: PoolState) -> dict[str, Any]:
        view = pool.view()
        available = view.workers > 0 and not pool.problem
        phase = "Available" if available else ("Degraded" if view.workers > 0 else "Unavailable")
        reason = "WorkersConnected" if available else ("KeysProblem" if pool.problem else "NoWorkers")
        message = pool.problem or f"{view.workers} workers connected"
        if not pool.problem and not view.workers and pool.spec.endpoints:
            message = f"no worker answered yet; dialing {', '.join(pool.spec.endpoints)}"
        last = max((w.last_heartbeat_wall for w in pool.workers.values()), default=None)
        return {
            "phase": phase,
            "connectedWorkers": view.workers,
            "workers": [{"id": w.worker, "gpu": w.device, "capacity": w.capacity, "inFlight": len(w.jobs),
                         "rttMs": round(w.rtt_ms, 3) if w.rtt_ms is not None else None,
                         "lastHeartbeat": now_rfc3339(w.last_heartbeat_wall)} for w in pool.workers.values()],
            "inFlight": view.busy,
            "queued": view.queued,
            "rttMs": round(view.rtt_ms, 3) if view.rtt_ms is not None else None,
            "throughputMpixPerS": round(pool.mpix_per_s, 3) if pool.mpix_per_s is not None else None,
            "pipelines": _pipeline_status(pool),
            "lastHeartbeat": now_rfc3339(last) if last else None,
            "conditions": [{"type": "Available", "status": "True" if available else "False", "reason": reason,
                            "message": message, "lastTransitionTime": now_rfc3339()}],
            "observedGeneration": pool.spec.generation,
        }

    def _publish_pools(self) -> None:
        now = time.monotonic()
        metrics.UNROUTED.set(len(self.unrouted))
        metrics.STORAGE_WAITING.set(len(self.held))
        by_phase = {phase: 0 for phase in (Phase.QUEUED, Phase.DISPATCHED, Phase.PROCESSING)}
        for job in self.jobs.values():
            by_phase[job.phase] = by_phase.get(job.phase, 0) + 1
        for phase, count in by_phase.items():
            metrics.JOBS_ACTIVE.labels(phase.value).set(count)
        for name, pool in self.pools.items():
            status = self.pool_status(pool)
            for priority in ("realtime", "batch"):
                metrics.QUEUE_DEPTH.labels(name, priority).set(pool.queue.count(priority))
            metrics.IN_FLIGHT.labels(name).set(status["inFlight"])
            if status["rttMs"] is not None:
                metrics.RTT_SECONDS.labels(name).set(status["rttMs"] / 1000.0)
            # Compare without the fields that change every heartbeat.
            key = {k: v for k, v in status.items()
                   if k not in ("lastHeartbeat", "conditions", "workers", "rttMs", "pipelines")}
            key["workerIds"] = sorted(w["id"] for w in status["workers"])
            key["available"] = status["conditions"][0]["status"]
            previous = self._pool_status_sent.get(name)
            if previous and previous[0] == key and now - previous[1] < POOL_STATUS_EVERY_S:
                continue
            if previous and previous[0].get("available") == key["available"]:
                status["conditions"][0]["lastTransitionTime"] = previous[2]
            since = status["conditions"][0]["lastTransitionTime"]
            self._pool_status_sent[name] = (key, now, since)
            self.writer.update(ObjectRef("WorkerPool", name), status, urgent=previous is None or previous[0] != key)


MAX_PIPELINES_SHOWN = 20
"""Cost classes listed on a WorkerPool's status, most used first (the object must stay small)."""


def _pipeline_status(pool: PoolState) -> list[dict[str, Any]]:
    """What the router has learned of the pool's speed, per pipeline."""
    rows = []
    for name, fit in sorted(pool.fits.items(), key=lambda item: -item[1].samples)[:MAX_PIPELINES_SHOWN]:
        line = fit.line()
        if line is None:
            continue
        rows.append({"costClass": name, "jobs": fit.samples, "overheadMs": round(line[0], 3),
                     "msPerMpix": round(line[1], 3)})
    return rows


def _positive_int(value: Any) -> int:
    """A count a worker reported, or 0 when it is missing or not a positive integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
