"""Chaos: many jobs while the leader, workers, storage and the API server are killed.

Everything is real: two operator replicas electing a leader on a Lease, worker
processes over CURVE, moto S3 behind a TCP proxy that goes down, and a kube-apiserver
that is restarted. A supervisor keeps two operator replicas and every worker running,
as a Deployment would. Afterwards every job is checked: terminal exactly once, output
present with the sha256 its status names, one terminal Event, attempts >= 1, timing
consistent. The run prints its figures; the assertions are on correctness only.

Size: GPUROUTE_CHAOS_JOBS (default 1000).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpuroute_dev.localenv.controlplane import ControlPlane, ControlPlaneConfig, kube_assets
from gpuroute_dev.localenv.objectstore import S3Server
from gpuroute_dev.localenv.stack import LocalStack, PoolConfig
from gpuroute_dev.localenv.tcpproxy import TcpProxy
from tests.invariants import TERMINAL_PHASES, timing_violations

JOBS = int(os.environ.get("GPUROUTE_CHAOS_JOBS", "1000"))
NS = "chaos"
POOL = "chaos-pool"
WORKERS = ("w1", "w2", "w3")
BUCKET = "gpuroute-chaos"
DRAIN_TIMEOUT_S = 900.0


@dataclass
class Disruptions:
    """What the chaos driver did, and when (seconds since the load started)."""

    log: list[tuple[float, str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def note(self, started: float, what: str, kind: str) -> None:
        self.log.append((round(time.monotonic() - started, 1), what))
        self.counts[kind] += 1


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, ControlPlane, S3Server, TcpProxy]]:
    workdir = tmp_path_factory.mktemp("chaos")
    # A control plane of its own: this test restarts its API server.
    control_plane = ControlPlane(ControlPlaneConfig(workdir=workdir / "cp", name="gpuroute-chaos", assets=kube_assets()))
    control_plane.start()
    s3 = S3Server().start()
    host, port = s3.endpoint_url.removeprefix("http://").split(":")
    proxy = TcpProxy(host, int(port)).start()
    stack = LocalStack(workdir / "stack", control_plane, s3)
    try:
        s3.create_bucket(BUCKET)
        stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
        stack.add_pool(PoolConfig(name=POOL, workers=WORKERS, max_in_flight_per_worker=4))
        # Storage is reached through the proxy, so "S3 down" is what workers and signing see.
        stack.start_operator(replicas=2, extra_env={"AWS_ENDPOINT_URL_S3": proxy.url})
        stack.wait_for_leader()
        for worker in WORKERS:
            stack.start_worker(POOL, worker, capacity=4)
        stack.wait_for_pool(POOL, workers=len(WORKERS), timeout=90)
        yield stack, control_plane, s3, proxy
    finally:
        stack.stop()
        proxy.stop()
        s3.stop()
        control_plane.stop()


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 40, 90)).save(buffer, "PNG")
    return buffer.getvalue()


class Supervisor:
    """Keeps two operator replicas and every worker running, as Deployments would, and
    remembers each worker process's counters before it goes."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.computed = 0.0
        self.answered_again = 0.0
        self._last: dict[str, tuple[float, float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="chaos-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def scrape(self, worker: str) -> None:
        try:
            done = self.stack.worker_metric(worker, "gpuroute_worker_jobs_total", {"outcome": "completed"})
            again = sum(self.stack.worker_metric(worker, "gpuroute_worker_answered_again_total", {"how": how})
                        for how in ("cache", "joined"))
        except OSError:
            return  # not up yet, or already gone: the last scrape stands
        with self._lock:
            self._last[worker] = (done, again)

    def kill_worker(self, worker: str) -> None:
        self.scrape(worker)
        with self._lock:
            done, again = self._last.pop(worker, (0.0, 0.0))
            self.computed += done
            self.answered_again += again
            self.stack.workers[worker].kill()

    def totals(self) -> tuple[float, float]:
        for worker in WORKERS:
            self.scrape(worker)
        with self._lock:
            return (self.computed + sum(d for d, _ in self._last.values()),
                    self.answered_again + sum(a for _, a in self._last.values()))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                alive = [p for p in self.stack.operators.values() if p.alive]
                for _ in range(2 - len(alive)):
                    self.stack.start_replica()
                for worker in WORKERS:
                    if not self.stack.workers[worker].alive:
                        self.stack.start_worker(POOL, worker, capacity=4)
            for worker in WORKERS:
                self.scrape(worker)


def _disrupt(stack: LocalStack, control_plane: ControlPlane, proxy: TcpProxy, supervisor: Supervisor,
             started: float, done: Disruptions, stop: threading.Event) -> None:
    """The schedule: 3 leader kills, 5 worker kills, 10 s of S3 down, 1 API server restart."""

    def leader() -> None:
        stack.wait_for_leader(timeout=30)  # after an API server restart the old leader may have stepped down
        name = stack.kill_leader()
        done.note(started, f"SIGKILL leader {name}", "leader kills")

    def worker(name: str) -> Callable[[], None]:
        def kill() -> None:
            supervisor.kill_worker(name)
            done.note(started, f"SIGKILL worker {name}", "worker kills")
        return kill

    def storage() -> None:
        def outage() -> None:
            try:
                proxy.outage(10.0)
            except Exception as exc:  # recorded, and the test fails on it: a disruption that did not happen
                done.note(started, f"storage outage failed: {type(exc).__name__}: {exc}", "failed")
                return
            done.note(started, "S3 endpoint was down for 10 s", "storage outages")
        threading.Thread(target=outage, daemon=True).start()

    def apiserver() -> None:
        control_plane.restart_apiserver(down_s=1.0)
        done.note(started, "kube-apiserver restart", "apiserver restarts")

    schedule: list[tuple[float, Callable[[], None]]] = [
        (3, leader), (5, worker("w1")), (7, storage), (9, worker("w2")), (14, leader), (17, apiserver),
        (21, worker("w3")), (24, worker("w1")), (27, leader), (30, worker("w2")),
    ]
    for at, action in schedule:
        if stop.wait(max(0.0, started + at - time.monotonic())):
            return
        try:
            action()
        except Exception as exc:  # recorded, and the test fails on it; the schedule goes on so the run still drains
            done.note(started, f"{action.__name__} failed: {type(exc).__name__}: {exc}", "failed")


@pytest.mark.timeout(int(DRAIN_TIMEOUT_S) + 300)  # the suite's 300 s default is for ordinary tests
def test_chaos_every_job_exactly_once(chaos_stack: tuple[LocalStack, ControlPlane, S3Server, TcpProxy]) -> None:
    stack, control_plane, s3, proxy = chaos_stack
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="in/tile.png", Body=_png())
    names = [f"job-{i:05d}" for i in range(JOBS)]
    spec = {"input": {"uri": f"s3://{BUCKET}/in/tile.png"}, "steps": [{"op": "invert"}],
            "timeoutSeconds": int(DRAIN_TIMEOUT_S), "maxAttempts": 10}

    supervisor = Supervisor(stack)
    supervisor.start()
    disruptions = Disruptions()
    stop = threading.Event()
    started = time.monotonic()
    driver = threading.Thread(target=_disrupt, args=(stack, control_plane, proxy, supervisor, started,
                                                     disruptions, stop), daemon=True)
    driver.start()

    def create(name: str) -> None:
        body = {**spec, "output": {"uri": f"s3://{BUCKET}/out/{name}.png"}}
        for attempt in range(60):  # the API server restart refuses creates for a few seconds
            try:
                stack.create_job(NS, name, body)
                return
            except Exception as exc:  # kubernetes ApiException or urllib3 errors while it is down
                if "AlreadyExists" in str(exc) or "409" in str(exc)[:200]:
                    return
                if attempt == 59:
                    raise
                time.sleep(1.0)

    try:
        # Spread the load over the disruptions rather than front-loading it.
        with ThreadPoolExecutor(max_workers=4) as pool:
            for index, name in enumerate(names):
                pool.submit(create, name)
                if index % 50 == 49:
                    time.sleep(0.5)
        jobs = _wait_all_terminal(stack, names, started)
        drained = time.monotonic() - started
    finally:
        stop.set()
        driver.join(timeout=60)
        supervisor.stop()

    computed, answered_again = supervisor.totals()
    events = _terminal_events(stack)
    violations: list[str] = []
    for name in names:
        body = jobs[name]
        status = body.get("status") or {}
        uid = body["metadata"]["uid"]
        if status.get("phase") != "Completed":
            violations.append(f"{name}: {status.get('phase')} {status.get('reason')}: {status.get('message')}")
            continue
        stored = client.get_object(Bucket=BUCKET, Key=f"out/{name}.png")["Body"].read()
        if status.get("output", {}).get("sha256") != hashlib.sha256(stored).hexdigest():
            violations.append(f"{name}: status sha256 does not match the stored output")
        if events.get(uid, 0) != 1:
            violations.append(f"{name}: {events.get(uid, 0)} terminal Events")
        violations += [f"{name}: {v}" for v in timing_violations(status)]
    duplicates = sum(1 for n in events.values() if n > 1)
    print(f"\nchaos: {JOBS} jobs; disruptions {dict(disruptions.counts)}; drained in {drained:.1f} s "
          f"({JOBS / drained:.1f} jobs/s)\n"
          f"chaos: computed {computed:.0f} times for {JOBS} jobs ({computed - JOBS:+.0f} recomputed after kills), "
          f"{answered_again:.0f} answered from a worker's cache or joined\n"
          f"chaos: duplicate terminal Events {duplicates}, violations {len(violations)}")
    for at, what in disruptions.log:
        print(f"chaos:   t={at:6.1f}s {what}")
    # Every scheduled disruption happened: one that raised is a failed test, not a milder run.
    assert disruptions.counts["failed"] == 0, disruptions.log
    assert dict(disruptions.counts) == {"leader kills": 3, "worker kills": 5, "storage outages": 1,
                                        "apiserver restarts": 1}, disruptions.log
    assert violations == [], "\n".join(violations[:30])


def _wait_all_terminal(stack: LocalStack, names: list[str], started: float) -> dict[str, dict[str, Any]]:
    wanted = set(names)
    while True:
        try:
            seen = {j["metadata"]["name"]: j for j in stack.list_jobs(NS) if j["metadata"]["name"] in wanted}
        except Exception:  # the API server may be restarting
            time.sleep(1.0)
            continue
        pending = [n for n in names if (seen.get(n, {}).get("status") or {}).get("phase") not in TERMINAL_PHASES]
        if not pending:
            return seen
        if time.monotonic() - started > DRAIN_TIMEOUT_S:
            phases = Counter((seen.get(n, {}).get("status") or {}).get("phase") for n in pending)
            logs = "\n".join(f"--- {n}\n{p.log_tail(30)}" for n, p in stack.operators.items() if p.alive)
            raise AssertionError(f"{len(pending)} jobs not terminal after {DRAIN_TIMEOUT_S} s: {dict(phases)}\n{logs}")
        time.sleep(1.0)


def _terminal_events(stack: LocalStack) -> Counter[str]:
    """Terminal Events per ImageJob uid (Completed, Failed and Cancelled reasons alike)."""
    counts: Counter[str] = Counter()
    token = None
    while True:
        page = stack.core.list_namespaced_event(NS, limit=500, _continue=token)
        for event in page.items:
            if event.involved_object.kind == "ImageJob" and (
                    event.reason in TERMINAL_PHASES or event.metadata.name.endswith(".terminal")):
                counts[event.involved_object.uid] += 1
        token = page.metadata._continue
        if not token:
            return counts

