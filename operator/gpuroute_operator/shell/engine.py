"""The operator's async shell around the dispatcher: sockets, the API server, clocks.

The rules live in dispatcher.py (pure, synchronous). This module only carries events
in (ImageJob and WorkerPool changes, worker messages, ticks of the clock) and the
dispatcher's effects out (sends on the ROUTER socket, status writes and Events through
the StatusWriter), and never blocks the event loop: Kubernetes reads go to threads,
status writes to the StatusWriter, socket I/O is non-blocking.

The CRs are the durable queue. After a restart the watch lists every ImageJob again; each
non-terminal one is admitted again, and one whose status says an attempt was out is
re-sent under the same attempt id to the worker that still has it, which joins the
running attempt or answers from its result cache instead of computing it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq.asyncio

from gpuroute import protocol
from gpuroute.aio import stop_tasks
from gpuroute.netguard import UnsafeURL, check_public_https_url
from gpuroute.protocol import Body, InputSource, ItemTarget, Message, OutputTarget, Ready
from gpuroute_operator import metrics
from gpuroute_operator.batch.runner import BatchRunner
from gpuroute_operator.core import admission
from gpuroute_operator.core.admission import Admitted, Ended, Refused
from gpuroute_operator.core.dispatcher import Dispatcher, Signed
from gpuroute_operator.core.effects import TerminalEvent
from gpuroute_operator.core.grants import StorageGrants
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.pools import PoolSpec, PoolState
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import SpecError, is_batch
from gpuroute_operator.kube.api import AsyncKube, KubeAPIError
from gpuroute_operator.kube.client import Kube
from gpuroute_operator.kube.status_writer import StatusWriter
from gpuroute_operator.link.pool_keys import PoolKeys
from gpuroute_operator.link.server import WorkerServer
from gpuroute_operator.link.zap import ZapHandler
from gpuroute_operator.scaling.autoscaler import Autoscaler, autoscale_loop
from gpuroute_operator.shell.pool_status import PoolStatusPublisher, pool_status
from gpuroute_operator.storage.presign import AzureAccount, Presigner

log = logging.getLogger(__name__)

GRANTS_TTL_S = 10.0
"""How long a namespace's storage grants are cached."""
EVENT_REPAIR_WINDOW_S = 600.0
"""A job found terminal at admission gets its terminal Event re-posted (idempotently) if it
ended this recently: the previous leader may have died between the status write and the Event."""
RECENT_JOBS = 200
"""Finished jobs kept for the status page."""


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
    resume_hold: bool = True
    """Hold jobs without an attempt in status for a moment at start, for workers to claim them
    (False when this replica knows it did not take over from a leader that died)."""
    scaling_azure_ad_scopes: tuple[str, ...] = ()
    """Azure AD scopes, besides the AKS server application's, that a scaling Secret may name
    (azure-ad-scope key or kubelogin --server-id) for the operator's own Azure AD token."""


class _ShellEffects:
    """The dispatcher's effects, carried out: socket sends now, status and Events queued."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def send(self, routing_id: bytes, body: Body, payload: bytes | None = None) -> bool:
        return self._engine.server.send(routing_id, body, payload)

    def kick(self, routing_id: bytes, reason: str) -> None:
        self._engine.server.kick(routing_id, reason)

    def publish(self, ref: ObjectRef, status: Mapping[str, Any], *, urgent: bool = False,
                terminal_event: TerminalEvent | None = None) -> None:
        self._engine.writer.update(ref, status, urgent=urgent, terminal_event=terminal_event)
        if terminal_event is not None:
            self._engine.remember_recent(ref, status)

    def forget(self, ref: ObjectRef) -> None:
        self._engine.writer.forget(ref)

    def warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        self._engine.writer.event(ref, reason, message, warning=True)

    def item(self, job: Job, *, terminal: bool) -> None:
        self._engine.batches.on_item(job, terminal=terminal)


class Engine:
    def __init__(self, config: EngineConfig, *, presigner: Presigner | None = None) -> None:
        self.config = config
        self.kube = Kube(config.kubeconfig)  # blocking, in threads: Secrets only, a few reads a minute
        self.api = AsyncKube(config.kubeconfig)  # on the loop: every per-job request
        self.writer = StatusWriter(self.api, coalesce_s=config.coalesce_s)
        self.presigner = presigner or Presigner(azure_accounts=config.azure_accounts)
        self.context = zmq.asyncio.Context()
        self.zap = ZapHandler(self.context)
        self.keys = PoolKeys(self.zap, self.kube.read_secret_data)
        self.server = WorkerServer(self.context, bind=config.bind, secret_key=config.secret_key, handler=self,
                                   plaintext=config.plaintext)
        # Started now: this process leads (leader election runs before the engine exists).
        self.dispatcher = Dispatcher(_ShellEffects(self), self._sign,
                                     started_at=time.time() if config.resume_hold else None)
        self.pool_publisher = PoolStatusPublisher(self.writer)
        self.autoscaler = Autoscaler(self.kube.read_secret_data,
                                     allowed_scopes=frozenset(config.scaling_azure_ad_scopes))
        self.scaling_problems: dict[str, str] = {}
        """Pool -> why its remote autoscaling last failed (the ScalingReady condition)."""
        self.batches = BatchRunner(self.dispatcher, self.writer, self.presigner, self._namespace_grants)
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._grants: dict[str, tuple[StorageGrants, float]] = {}
        self._admitting: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- what the status page and tests read ---------------------------------------------

    @property
    def jobs(self) -> dict[str, Job]:
        return self.dispatcher.jobs

    @property
    def pools(self) -> dict[str, PoolState]:
        return self.dispatcher.pools

    @property
    def unrouted(self) -> Mapping[str, Job]:
        return self.dispatcher.unrouted

    def snapshot(self) -> dict[str, Any]:
        """What the status page shows, before it is filtered per caller (web.console)."""
        return {
            "pools": [{"name": name, **self.pool_status(pool)} for name, pool in self.pools.items()],
            "activeJobs": [{"namespace": j.namespace, "name": j.name, **j.status()} for j in self.jobs.values()],
            "recentJobs": list(reversed(self.recent.values())),
            "unrouted": len(self.unrouted),
            "statusBacklog": self.writer.backlog,
        }

    def pool_status(self, pool: PoolState) -> dict[str, Any]:
        return pool_status(pool, problem=self.keys.problems.get(pool.spec.name, ""),
                           scaling_problem=self.scaling_problems.get(pool.spec.name, ""), now=time.time())

    def remember_recent(self, ref: ObjectRef, status: Mapping[str, Any]) -> None:
        self.recent[ref.uid] = {"namespace": ref.namespace, "name": ref.name, **status}
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.presigner.warm)
        if not self.config.plaintext:
            self.zap.start()
        self.server.start()
        if self.config.resume_hold:
            # Workers can re-register only from now on: the startup hold counts from here.
            self.dispatcher.started_at = time.time()
        self.writer.start()
        self.batches.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._tick_loop(), name="engine-tick"),
            # Its own loop: a slow GPU-cluster API must never delay heartbeats or dispatch.
            loop.create_task(autoscale_loop(self.autoscaler, self.dispatcher, self.writer, self.scaling_problems),
                             name="autoscaler"),
            loop.create_task(self._grants_loop(), name="grants"),
        ]

    async def stop(self) -> None:
        await stop_tasks(*self._tasks)
        await self.batches.stop()
        self.autoscaler.close()
        self.presigner.close()  # stops the Azure delegation-key renewal thread
        await self.writer.stop()
        await self.server.stop()
        await self.zap.stop()
        self.context.term()

    # ---- ImageJobs -------------------------------------------------------------------

    async def observe_job(self, body: Mapping[str, Any]) -> None:
        """Called for every ImageJob event except deletion; idempotent."""
        if is_batch(body.get("spec")):
            await self.batches.observe(body)  # many images: batch_runner.py
            return
        ref = admission.object_ref(body)
        if self.dispatcher.is_finished(ref.uid) or ref.uid in self._admitting:
            return
        if ref.uid in self.dispatcher.jobs:
            if admission.cancel_requested(body):
                self.dispatcher.cancel(ref.uid, f"cancelled by annotation {admission.CANCEL_ANNOTATION}", time.time())
            else:
                self.dispatcher.spec_changed(ref.uid, int((body.get("metadata") or {}).get("generation") or 1))
            return
        self._admitting.add(ref.uid)
        try:
            await self._admit(body, ref)
        finally:
            self._admitting.discard(ref.uid)

    async def _admit(self, body: Mapping[str, Any], ref: ObjectRef) -> None:
        grants = await self._namespace_grants(ref.namespace or "")
        now = time.time()
        outcome = admission.admit(body, grants, now)
        if isinstance(outcome, Admitted) and outcome.job.spec.input_url is not None:
            outcome = await self._check_url(outcome, ref, now)
        if isinstance(outcome, Ended):
            self.dispatcher.ended_elsewhere(ref.uid)
            if outcome.completed_at is not None and now - outcome.completed_at < EVENT_REPAIR_WINDOW_S:
                self.writer.ensure_terminal_event(ref, outcome.event)
        elif isinstance(outcome, Refused):
            self.dispatcher.ended_elsewhere(ref.uid)
            metrics.JOBS_FINISHED.labels("Failed", outcome.event.reason).inc()
            self.writer.update(ref, outcome.status, urgent=True, terminal_event=outcome.event)
            self.remember_recent(ref, outcome.status)
        else:
            self.dispatcher.admit(outcome.job, time.time(), outcome.resume, cancel=outcome.cancel)

    async def _check_url(self, outcome: Admitted, ref: ObjectRef, now: float) -> Admitted | Refused:
        url = outcome.job.spec.input_url
        assert url is not None
        try:
            await asyncio.to_thread(check_public_https_url, url)
        except UnsafeURL as exc:
            error = SpecError("spec.input.uri", str(exc), "UnsafeInput")
        except Exception as exc:  # the host parser raises on odd hosts (bad IPv6 literal, empty IDNA label)
            error = SpecError("spec.input.uri", f"is not a usable https URL ({type(exc).__name__}: {exc})", "UnsafeInput")
        else:
            return outcome
        return admission.refuse(ref, error, generation=outcome.job.generation, queued_at=outcome.job.queued_at, now=now)

    async def _namespace_grants(self, namespace: str) -> StorageGrants:
        cached = self._grants.get(namespace)
        if cached and time.monotonic() - cached[1] < GRANTS_TTL_S:
            return cached[0]
        try:
            annotations = await self.api.namespace_annotations(namespace)
        except Exception as exc:  # HTTP errors (404 for a deleted namespace) or transport errors
            if cached and not (isinstance(exc, KubeAPIError) and exc.status == 404):
                # The API server is unreachable: what it last said still stands (no job fails for a blip).
                log.warning("cannot read namespace %s: %s; keeping its last grants", namespace, exc)
                return cached[0]
            log.warning("cannot read namespace %s: %s; granting nothing", namespace, exc)
            annotations = {}
        grants = StorageGrants.from_annotations(annotations)
        self._grants[namespace] = (grants, time.monotonic())
        return grants

    async def _grants_loop(self) -> None:
        """Keep the grants of every namespace with live jobs at most GRANTS_TTL_S old, off the tick:
        each attempt is signed against them (_sign), so a revoked prefix stops being signed within
        that time, for retries as for first attempts."""
        while True:
            await asyncio.sleep(GRANTS_TTL_S / 2)
            for namespace in {job.namespace for job in list(self.dispatcher.jobs.values())}:
                try:
                    await self._namespace_grants(namespace)
                except Exception:  # one namespace must not stop the others' refresh
                    log.exception("refreshing the grants of namespace %s failed", namespace)

    def forget(self, uid: str) -> None:
        """The ImageJob was deleted: stop its work everywhere."""
        if not self.batches.forget(uid):
            self.dispatcher.forget(uid, time.time())

    def _sign(self, job: Job, now: float) -> Signed:
        spec = job.spec
        grants = self._grants.get(job.namespace)
        if grants is not None and not spec.items:  # a batch's items are checked by its runner
            # Grants change: an attempt is signed only under what the namespace is granted now
            # (SpecError StorageNotGranted ends the job, as at admission).
            grants[0].check(spec, job.namespace)
        expires = int(max(60, job.deadline - now + 60))
        options = {"background": spec.background, "keepMetadata": spec.keep_metadata}
        if spec.items:
            items = []
            for source_uri, output_uri in spec.items:
                signed_put = self.presigner.put(output_uri, spec.output_format, expires_s=expires)
                items.append(ItemTarget(self.presigner.get(source_uri, expires_s=expires).url, signed_put.url,
                                        dict(signed_put.headers)))
            return InputSource(), OutputTarget("", spec.output_format, spec.quality, {}, options), tuple(items)
        if spec.input_uri is not None:
            source = InputSource(self.presigner.get(spec.input_uri, expires_s=expires).url)
        elif spec.input_url is not None:
            source = InputSource(spec.input_url, untrusted=True)
        else:
            source = InputSource()
        signed = self.presigner.put(spec.output, spec.output_format, expires_s=expires)
        return source, OutputTarget(signed.url, spec.output_format, spec.quality, dict(signed.headers), options), ()

    # ---- pools -----------------------------------------------------------------------

    async def configure_pool(self, spec: PoolSpec) -> None:
        self.dispatcher.set_pool(spec, time.time())
        await self._load_keys(spec)
        self._dial_endpoints()

    async def _load_keys(self, spec: PoolSpec) -> None:
        admitted = await self.keys.load(spec, time.monotonic())
        if admitted is not None:
            self.dispatcher.set_keys(spec.name, admitted, time.time())

    def _dial_endpoints(self) -> None:
        self.server.dial(endpoint for pool in self.pools.values() for endpoint in pool.spec.endpoints)

    def remove_pool(self, name: str) -> None:
        self.dispatcher.remove_pool(name, time.time())
        self.keys.remove(name)
        self.pool_publisher.forget(name)
        self.autoscaler.forget(name)
        self._dial_endpoints()

    # ---- worker messages -------------------------------------------------------------

    def on_message(self, routing_id: bytes, user_id: str, message: Message, address: str = "") -> None:
        now = time.time()
        body = message.body
        if self.config.plaintext:
            # Dev only: nobody is authenticated, so the session's own claim stands in.
            session = self.dispatcher.sessions.get(routing_id)
            pool = body.pool if isinstance(body, Ready) else (session.pool if session else "")
            principal: Principal | None = Principal(pool, "dev-plaintext", routing_id[:40].decode(errors="replace"))
        else:
            principal = Principal.from_user_id(user_id)
        if principal is None:
            metrics.REJECTED_MESSAGES.labels("unauthenticated").inc()
            return
        if isinstance(body, Ready):
            self.dispatcher.on_ready(routing_id, principal, body, now, address=address)
        else:
            self.dispatcher.on_message(routing_id, principal, body, now)

    def on_disconnected(self, routing_id: bytes) -> None:
        self.dispatcher.on_lost(routing_id, "disconnected", time.time())

    # ---- housekeeping ----------------------------------------------------------------

    async def _tick_loop(self) -> None:
        last_beat = 0.0
        while True:
            await asyncio.sleep(self.config.tick_s)
            try:
                now = time.time()
                beat = now - last_beat >= protocol.HEARTBEAT_INTERVAL_S
                if beat:
                    last_beat = now
                self.dispatcher.tick(now, heartbeat=beat)
                self.pool_publisher.publish(self.dispatcher, self.keys.problems, now, self.scaling_problems)
                for name, pool in list(self.pools.items()):
                    if self.keys.due(name, time.monotonic()):
                        await self._load_keys(pool.spec)
            except Exception:  # housekeeping must survive any single failure
                log.exception("engine tick failed")
