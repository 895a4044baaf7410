"""A small world for driving the real Dispatcher in tests: pools, keys, workers, jobs, a clock.

Nothing here re-implements a rule: it builds inputs (principals, READY, RESULT, ERROR
bodies, ImageJob specs), feeds them to the dispatcher, and reads what it recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpuroute.protocol import (
    AttemptId,
    Error,
    ErrorCode,
    InputSource,
    ItemTarget,
    JobRequest,
    OutputInfo,
    OutputTarget,
    Ready,
    Result,
    StageTiming,
    routing_id_for,
)
from gpuroute_operator.core.dispatcher import Dispatcher, DispatcherConfig, Signed
from gpuroute_operator.core.errors import SigningUnavailable
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.pools import parse_pool_spec
from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.core.spec import parse_job_spec
from tests.invariants import timing_violations  # noqa: F401  (re-exported for the dispatcher tests)
from tests.unit.gpuroute_operator.core.recording_effects import RecordingEffects

T0 = 1_800_000_000.0
GOOD_SHA = "a" * 64
"""The digest honest workers report in this world."""


def key_for(pool: str, worker: str) -> str:
    """A stand-in Z85 public key (40 characters), one per worker."""
    return f"{pool}-{worker}".ljust(40, "K")[:40]


class World:
    def __init__(self, pools: Mapping[str, Mapping[str, Any]] | None = None,
                 config: DispatcherConfig | None = None) -> None:
        self.now = T0
        self.effects = RecordingEffects()
        self.signing_down = False
        self.config = config or DispatcherConfig()
        self.pool_specs = {name: parse_pool_spec(name, {"cloud": "c", "region": name, "pricePerGpuHour": 1.0,
                                                          "workerKeysSecretRef": {"name": f"{name}-keys"},
                                                          **(spec or {})},
                                                 generation=1, default_namespace="gpuroute-system")
                           for name, spec in (pools or {"pool-a": {}, "pool-b": {}}).items()}
        self.dispatcher = self._new_dispatcher()

    def _new_dispatcher(self, started_at: float | None = None) -> Dispatcher:
        dispatcher = Dispatcher(self.effects, self._sign, self.config, started_at=started_at)
        for spec in self.pool_specs.values():
            dispatcher.set_pool(spec, self.now)
        return dispatcher

    def restart(self) -> None:
        """A new operator process: no memory, same API server (the recorded statuses)."""
        self.dispatcher = self._new_dispatcher(started_at=self.now)

    def _sign(self, job: Job, now: float) -> Signed:
        if self.signing_down:
            raise SigningUnavailable("spec.input.uri", "no credentials")
        if job.spec.items:
            return InputSource(), OutputTarget("", "png"), tuple(
                ItemTarget(f"https://storage.test/in/{i.key}?sig=x", f"https://storage.test/out/{o.key}?sig=y")
                for i, o in job.spec.items)
        return InputSource(f"https://storage.test/in/{job.uid}?sig=x"), OutputTarget(
            f"https://storage.test/out/{job.uid}?sig=y", "png"), ()

    def advance(self, seconds: float) -> None:
        self.now += seconds

    # ---- workers ------------------------------------------------------------------------

    def principal(self, pool: str, worker: str) -> Principal:
        return Principal(pool, worker, key_for(pool, worker))

    def routing_id(self, pool: str, worker: str) -> bytes:
        return routing_id_for(key_for(pool, worker), worker)

    def connect(self, pool: str, worker: str, *, capacity: int = 2, jobs: tuple[AttemptId, ...] = (),
                answered: tuple[AttemptId, ...] = (),
                claims: str | None = None, principal: Principal | None = None,
                routing_id: bytes | None = None) -> bytes:
        routing_id = routing_id or self.routing_id(pool, worker)
        self.dispatcher.on_ready(routing_id, principal or self.principal(pool, worker),
                                 Ready(pool=claims or pool, worker=worker, capacity=capacity, device="cpu", jobs=jobs,
                                       answered=answered),
                                 self.now)
        return routing_id

    def send(self, routing_id: bytes, body: object, principal: Principal | None = None) -> None:
        session = self.dispatcher.sessions.get(routing_id)
        who = principal or (session.principal if session else Principal("pool-a", "nobody", "N" * 40))
        self.dispatcher.on_message(routing_id, who, body, self.now)

    def result(self, attempt: AttemptId, *, sha: str = GOOD_SHA, cached: bool = False, gpu_ms: float = 30.0,
               timing: StageTiming | None = None, input_size: tuple[int, int] = (16, 16)) -> Result:
        """A RESULT for `attempt`; `timing` and `input_size` are what the worker claims."""
        return Result(attempt, timing or StageTiming(5.0, 2.0, gpu_ms, 3.0, 4.0, 1.0), OutputInfo(100, 8, 8, sha, "png"),
                      *input_size, "cpu", cached)

    def error(self, attempt: AttemptId, code: ErrorCode = ErrorCode.UNAVAILABLE, *, rejected: bool = False) -> Error:
        return Error(attempt, code, f"{code.value} happened", rejected)

    # ---- jobs -----------------------------------------------------------------------------

    def body(self, uid: str, **spec: Any) -> dict[str, Any]:
        full = {"input": {"uri": "s3://bucket/in.png"}, "output": {"uri": f"s3://bucket/{uid}.png"},
                "steps": [{"op": "invert"}], "timeoutSeconds": 600, "maxAttempts": 3, **spec}
        return {"metadata": {"uid": uid, "name": f"job-{uid}", "namespace": "team-a", "generation": 1},
                "spec": full, "status": dict(self.effects.statuses.get(self.ref(uid), {}))}

    def ref(self, uid: str) -> ObjectRef:
        return ObjectRef("ImageJob", f"job-{uid}", "team-a", uid)

    def submit(self, uid: str, **spec: Any) -> None:
        from gpuroute_operator.core.admission import Admitted, admit
        from gpuroute_operator.core.grants import StorageGrants

        outcome = admit(self.body(uid, **spec), StorageGrants(("s3://bucket/",), ("s3://bucket/",)), self.now)
        if isinstance(outcome, Admitted):
            self.dispatcher.admit(outcome.job, self.now, outcome.resume, cancel=outcome.cancel)

    def job(self, uid: str, **spec: Any) -> Job:
        full = {"input": {"uri": "s3://bucket/in.png"}, "output": {"uri": f"s3://bucket/{uid}.png"},
                "steps": [{"op": "invert"}], **spec}
        return Job(uid, "team-a", f"job-{uid}", 1, parse_job_spec(full), self.now)

    # ---- what happened ----------------------------------------------------------------------

    def requests(self, to: bytes | None = None) -> list[JobRequest]:
        return self.effects.sent(JobRequest, to)

    def status(self, uid: str) -> Mapping[str, Any]:
        return self.effects.statuses.get(self.ref(uid), {})

    def terminal_events(self, uid: str) -> list[Any]:
        return self.effects.terminal_events.get(self.ref(uid), [])

    def kicked(self) -> list[bytes]:
        return [r.args["routing_id"] for r in self.effects.log if r.kind == "kick"]
