"""Two operator replicas behind a Lease with real workers: the leader is SIGKILLed under
load and every job still completes exactly once (issue 9, standby operator)."""

from __future__ import annotations

import hashlib
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from gpuroute_dev.localenv.stack import TERMINAL_PHASES, LocalStack, PoolConfig
from tests.images import noise_png

pytestmark = pytest.mark.integration

BUCKET = "gpuroute-failover"
NS = "team-ha"
POOL = "pool-ha"
TAKEOVER_GOAL_S = 5.0
# A few seconds on one CPU thread: such a job is still running when the leader dies.
SLOW_STEPS = [{"op": "upscale", "width": 2048, "method": "lanczos"}, {"op": "sharpen", "radius": 3}]


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s3_server.create_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="in/small.png", Body=noise_png(96, 64, 0))
    s3_server.client().put_object(Bucket=BUCKET, Key="in/large.png", Body=noise_png(512, 384, 1))
    stack = LocalStack(tmp_path_factory.mktemp("failover"), control_plane, s3_server, namespace="gpuroute-ha")
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig(POOL, workers=("w1", "w2"), max_in_flight_per_worker=2))
    stack.start_operator(replicas=2)
    stack.start_worker(POOL, "w1", capacity=2)
    stack.start_worker(POOL, "w2", capacity=2)
    stack.wait_for_leader()
    stack.wait_for_pool(POOL, workers=2, timeout=90)
    yield stack
    stack.stop()


def _spec(name: str, slow: bool) -> dict[str, Any]:
    steps = SLOW_STEPS if slow else [{"op": "equalize"}, {"op": "rotate", "angle": 15, "expand": True}]
    return {"input": {"uri": f"s3://{BUCKET}/in/{'large' if slow else 'small'}.png"},
            "output": {"uri": f"s3://{BUCKET}/out/{name}.png"}, "steps": steps}


def _terminal_events(stack: LocalStack, name: str) -> list[str]:
    events = stack.core.list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items
    return [e.reason for e in events if e.reason in TERMINAL_PHASES]


def test_only_the_leader_serves_and_the_follower_stands_by(stack: LocalStack) -> None:
    leader = stack.wait_for_leader()
    (follower,) = [name for name in stack.operators if name != leader]
    assert stack.operators[follower].alive
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.operator_liveness_ports[follower]}/healthz",
                                timeout=5) as response:
        body = response.read().decode()
    assert body.startswith("standby") and leader in body, body
    assert "standing by" in stack.operators[follower].log_tail(400)
    # The shared web port (engine metrics) answers, and it is the leader's: it holds both
    # workers' sessions (a follower's engine would have none).
    assert stack.operator_metric("gpuroute_pool_connected_workers", {"pool": POOL}) == 2


def _computed(stack: LocalStack) -> float:
    """Images the workers computed so far (answers from a worker's cache or joined runs are not counted)."""
    return sum(stack.worker_metric(worker, "gpuroute_worker_jobs_total", {"outcome": "completed"})
               for worker in stack.workers)


def _answered_again(stack: LocalStack) -> float:
    return sum(stack.worker_metric(worker, "gpuroute_worker_answered_again_total", {"how": how})
               for worker in stack.workers for how in ("cache", "joined"))


def test_leader_sigkill_under_load_every_job_completes_exactly_once(stack: LocalStack, s3_server: Any) -> None:
    names = [f"ha-{i}" for i in range(16)]
    computed_before, again_before = _computed(stack), _answered_again(stack)
    for i, name in enumerate(names):
        stack.create_job(NS, name, _spec(name, slow=i % 4 == 0))
    # Mid-load: some jobs on workers, most still queued or running.
    deadline = time.monotonic() + 60
    while True:
        phases = [(j.get("status") or {}).get("phase") for j in stack.list_jobs(NS) if j["metadata"]["name"] in names]
        if sum(p in ("Dispatched", "Processing") for p in phases) >= 2:
            break
        assert time.monotonic() < deadline, f"jobs never reached the workers: {phases}"
        time.sleep(0.05)
    killed = stack.kill_leader()
    killed_at = time.monotonic()
    new_leader = stack.wait_for_leader(other_than=killed, timeout=TAKEOVER_GOAL_S + 10)
    takeover = time.monotonic() - killed_at
    print(f"\nleader {killed} SIGKILLed with {phases.count('Completed')}/{len(names)} jobs completed; "
          f"{new_leader} took over in {takeover:.2f}s")
    # The Deployment would restart the killed pod: a replacement joins as follower.
    stack.start_replica()

    jobs = stack.wait_for_jobs(NS, names, timeout=240)
    drained = time.monotonic() - killed_at
    print(f"all {len(names)} jobs terminal {drained:.1f}s after the kill")
    problems = []
    for name, body in sorted(jobs.items()):
        status = body["status"]
        if status["phase"] != "Completed":
            problems.append(f"{name}: {status['phase']} {status.get('reason')}: {status.get('message')}")
            continue
        # No worker failed: the new leader adopts every attempt the workers still run or
        # hold answered, so none is sent twice.
        if status.get("attempts") != 1:
            problems.append(f"{name}: completed with attempts={status.get('attempts')} (no worker failed)")
        stored = s3_server.client().get_object(Bucket=BUCKET, Key=f"out/{name}.png")["Body"].read()
        if hashlib.sha256(stored).hexdigest() != status["output"]["sha256"]:
            problems.append(f"{name}: stored output does not match status.output.sha256")
    # Events are posted after the terminal status write; give the last ones a moment.
    time.sleep(2.0)
    for name in names:
        reasons = _terminal_events(stack, name)
        if len(reasons) != 1:
            problems.append(f"{name}: {len(reasons)} terminal Events {reasons}")
    computed = _computed(stack) - computed_before
    print(f"workers computed {computed:.0f} images for {len(names)} jobs; "
          f"{_answered_again(stack) - again_before:.0f} answered again from a cache or a running attempt")
    if computed != len(names):
        problems.append(f"the workers computed {computed:.0f} images for {len(names)} jobs: each once expected")
    assert takeover < TAKEOVER_GOAL_S, f"takeover took {takeover:.2f}s"
    assert not problems, "\n".join(problems) + f"\nnew leader log:\n{stack.operators[new_leader].log_tail(60)}"


def test_a_stopped_leader_hands_over_at_once_and_jobs_keep_completing(stack: LocalStack) -> None:
    """A rolling update or drain: SIGTERM, kopf's cleanup, then the Lease is released,
    so the follower takes over without waiting for it to expire."""
    leader = stack.wait_for_leader()
    process = stack.operators[leader]
    process.signal(signal.SIGTERM)
    stopped = time.monotonic()
    new_leader = stack.wait_for_leader(other_than=leader, timeout=15)
    handover = time.monotonic() - stopped
    assert process.popen.wait(15) == 0, process.log_tail()
    print(f"\n{leader} stopped; {new_leader} took over in {handover:.2f}s")
    assert "released Lease" in process.log_tail(50), process.log_tail(50)
    # kopf's cleanup takes a moment; still far below waiting for expiry plus a poll.
    assert handover < 3.0
    stack.start_replica()
    names = [f"after-stop-{i}" for i in range(4)]
    for name in names:
        stack.create_job(NS, name, _spec(name, slow=False))
    jobs = stack.wait_for_jobs(NS, names, timeout=120)
    assert {j["status"]["phase"] for j in jobs.values()} == {"Completed"}
