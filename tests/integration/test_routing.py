"""Cross-cloud routing with several real pools: placement filters, price-aware choice,
failover when a pool dies, a pool coming back, and a network cut with results in hand."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpuroute_dev.localenv.stack import LocalStack, PoolConfig

BUCKET = "gpuroute-routing"
NS = "team-r"
CHEAP, FAST = "aws-spot", "azure-ondemand"
SLOW_STEPS = [{"op": "upscale", "width": 3072, "method": "lanczos"}, {"op": "sharpen", "radius": 3}]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s3_server.create_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="in/small.png", Body=_png(96, 64))
    s3_server.client().put_object(Bucket=BUCKET, Key="in/large.png", Body=_png(768, 512))
    stack = LocalStack(tmp_path_factory.mktemp("routing"), control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.ensure_namespace("team-other", read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig(CHEAP, cloud="aws", region="us-east-1", price_per_gpu_hour=0.9, spot=True, workers=("c1",)))
    stack.add_pool(PoolConfig(FAST, cloud="azure", region="westeurope", price_per_gpu_hour=3.4, workers=("f1",),
                              allowed_namespaces=(NS,)))
    stack.start_operator()
    stack.start_worker(CHEAP, "c1")
    stack.start_worker(FAST, "f1")
    stack.wait_for_pool(CHEAP, workers=1)
    stack.wait_for_pool(FAST, workers=1)
    yield stack
    stack.stop()


def _spec(name: str, *, steps: list[dict[str, Any]] | None = None, src: str = "in/small.png", **extra: Any) -> dict[str, Any]:
    return {"input": {"uri": f"s3://{BUCKET}/{src}"}, "output": {"uri": f"s3://{BUCKET}/out/{name}.png"},
            "steps": steps or [{"op": "invert"}], **extra}


def _ensure_workers(stack: LocalStack) -> None:
    for pool, worker in ((CHEAP, "c1"), (FAST, "f1")):
        if not stack.workers[worker].alive:
            stack.start_worker(pool, worker)
        stack.wait_for_pool(pool, workers=1)


def test_placement_is_a_hard_filter(stack: LocalStack) -> None:
    stack.create_job(NS, "eu-only", _spec("eu-only", placement={"regions": ["westeurope"], "strategy": "cheapest"}))
    stack.create_job(NS, "aws-only", _spec("aws-only", placement={"clouds": ["aws"], "strategy": "fastest"}))
    jobs = stack.wait_for_jobs(NS, ["eu-only", "aws-only"])
    assert jobs["eu-only"]["status"]["pool"] == FAST
    assert jobs["aws-only"]["status"]["pool"] == CHEAP


def test_pool_namespace_allowlist(stack: LocalStack) -> None:
    stack.create_job("team-other", "not-allowed", _spec("not-allowed", placement={"pools": [FAST]}, timeoutSeconds=3))
    queued = stack.wait_for_jobs("team-other", ["not-allowed"], phases=frozenset({"Queued"}))["not-allowed"]["status"]
    assert queued["reason"] == "NoEligiblePool"
    assert f"{FAST}: namespace team-other not allowed" in queued["message"]
    assert stack.wait_for_jobs("team-other", ["not-allowed"])["not-allowed"]["status"]["reason"] == "Timeout"


def test_cheapest_prefers_the_cheap_pool_and_records_why(stack: LocalStack) -> None:
    stack.create_job(NS, "frugal", _spec("frugal", placement={"strategy": "cheapest"}))
    status = stack.wait_for_jobs(NS, ["frugal"])["frugal"]["status"]
    assert status["pool"] == CHEAP
    assert status["decision"].startswith(f"pool {CHEAP}: est.") and "(cheapest, 2 eligible)" in status["decision"]
    reasons = [e.reason for e in stack.core.list_namespaced_event(NS, field_selector="involvedObject.name=frugal").items]
    assert reasons == ["Completed"]  # the decision lives in status, not in a Normal Event


def _jpeg(width: int, height: int) -> bytes:
    # A smooth gradient: many pixels in few bytes, so a large image fits inline.
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([np.tile(ramp, (height, 1))] * 3)).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


def _estimated_ms(decision: str) -> float:
    match = re.search(r"est\. (\d+) ms", decision)
    assert match, decision
    return float(match.group(1))


def test_pools_learn_speed_per_pipeline_and_size(stack: LocalStack) -> None:
    _ensure_workers(stack)
    steps = [{"op": "blur", "radius": 4}, {"op": "sharpen", "radius": 3}]
    names = [f"learn-{size}-{i}" for size in ("small", "large") for i in range(3)]
    for name in names:
        src = "in/small.png" if "small" in name else "in/large.png"
        stack.create_job(NS, name, _spec(name, steps=steps, src=src, placement={"pools": [FAST]}))
    assert {j["status"]["phase"] for j in stack.wait_for_jobs(NS, names).values()} == {"Completed"}

    # The WorkerPool shows what was learned, under the pipeline's cost class.
    cost_class = "blur(radius=4)>sharpen(radius=3)"
    deadline = time.monotonic() + 30
    while True:
        learned = {p["costClass"]: p for p in (stack.worker_pool(FAST).get("status") or {}).get("pipelines") or ()}
        if learned.get(cost_class, {}).get("jobs", 0) >= len(names):
            break
        assert time.monotonic() < deadline, f"pool status never showed {cost_class}: {learned}"
        time.sleep(0.5)
    fit = learned[cost_class]
    assert fit["msPerMpix"] > 0 and fit["overheadMs"] >= 0, fit

    # Inline inputs have a known size, so the estimate follows it: 256 times the pixels.
    for name, size in (("est-small", (96, 64)), ("est-large", (1536, 1024))):
        stack.create_job(NS, name, {"input": {"inline": base64.b64encode(_jpeg(*size)).decode()},
                                    "output": {"uri": f"s3://{BUCKET}/out/{name}.png"}, "steps": steps,
                                    "placement": {"pools": [FAST], "strategy": "fastest"}})
    done = stack.wait_for_jobs(NS, ["est-small", "est-large"])
    small, large = (_estimated_ms(done[n]["status"]["decision"]) for n in ("est-small", "est-large"))
    assert large > 2 * small, (small, large, fit)


def test_dead_pool_is_marked_unavailable_and_its_jobs_complete_elsewhere(stack: LocalStack) -> None:
    names = [f"failover-{i}" for i in range(3)]
    for name in names:
        stack.create_job(NS, name, _spec(name, steps=SLOW_STEPS, src="in/large.png",
                                         placement={"pools": [CHEAP, FAST], "strategy": "cheapest"}))
    deadline = time.monotonic() + 30
    while not any((stack.get_job(NS, n).get("status") or {}).get("pool") == CHEAP
                  and stack.get_job(NS, n)["status"].get("phase") in ("Dispatched", "Processing") for n in names):
        assert time.monotonic() < deadline, "no job reached the cheap pool"
        time.sleep(0.05)
    killed_at = time.monotonic()
    stack.workers["c1"].kill()
    try:
        while (stack.worker_pool(CHEAP).get("status") or {}).get("phase") != "Unavailable":
            assert time.monotonic() - killed_at < 10, "pool not marked Unavailable within 10 s"
            time.sleep(0.1)
        condition = stack.worker_pool(CHEAP)["status"]["conditions"][0]
        assert (condition["type"], condition["status"], condition["reason"]) == ("Available", "False", "NoWorkers")
        jobs = stack.wait_for_jobs(NS, names, timeout=240)
        for name, body in jobs.items():
            status = body["status"]
            assert status["phase"] == "Completed", (name, status)
            assert status["pool"] == FAST, (name, status)
        moved = [n for n, b in jobs.items() if b["status"]["attempts"] > 1]
        assert moved, "at least the in-flight job was re-dispatched"
    finally:
        _ensure_workers(stack)


def test_a_pool_that_comes_back_is_used_again(stack: LocalStack) -> None:
    stack.workers["c1"].kill()
    stack.wait_for_pool(CHEAP, workers=0)
    stack.create_job(NS, "pinned", _spec("pinned", placement={"pools": [CHEAP]}))
    queued = stack.wait_for_jobs(NS, ["pinned"], phases=frozenset({"Queued"}))["pinned"]["status"]
    assert queued["reason"] == "NoEligiblePool"
    stack.start_worker(CHEAP, "c1")
    status = stack.wait_for_jobs(NS, ["pinned"], timeout=60)["pinned"]["status"]
    assert (status["phase"], status["pool"]) == ("Completed", CHEAP)


def test_network_cut_results_in_hand_are_delivered_once(stack: LocalStack, s3_server: Any) -> None:
    # Freezing the operator cuts the link from both sides: the worker sees silence and
    # re-dials, the operator (when it wakes) sees a silent worker. The worker keeps
    # computing meanwhile and must hand its result over after reconnecting.
    stack.create_job(NS, "cut", _spec("cut", steps=SLOW_STEPS, src="in/large.png", placement={"pools": [FAST]}))
    deadline = time.monotonic() + 30
    while (stack.get_job(NS, "cut").get("status") or {}).get("phase") not in ("Dispatched", "Processing"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stack.operator.signal(signal.SIGSTOP)
    try:
        time.sleep(8.0)
    finally:
        stack.operator.signal(signal.SIGCONT)
    status = stack.wait_for_jobs(NS, ["cut"], timeout=120)["cut"]["status"]
    assert status["phase"] == "Completed", status
    stored = s3_server.client().get_object(Bucket=BUCKET, Key="out/cut.png")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == status["output"]["sha256"]
    events = stack.core.list_namespaced_event(NS, field_selector="involvedObject.name=cut").items
    assert [e.reason for e in events].count("Completed") == 1


def test_deleted_pool_turns_its_workers_away_without_a_reconnect_storm(stack: LocalStack) -> None:
    stack.add_pool(PoolConfig("temp-pool", cloud="gcp", region="europe-west4", workers=("t1",)))
    stack.start_worker("temp-pool", "t1")
    stack.wait_for_pool("temp-pool", workers=1)
    stack.custom.delete_cluster_custom_object("gpuroute.io", "v1alpha1", "workerpools", "temp-pool")
    time.sleep(2.0)  # the worker is told DISCONNECT, then refused on every READY
    before = stack.worker_metric("t1", "gpuroute_worker_reconnects_total")
    time.sleep(6.0)
    retries = stack.worker_metric("t1", "gpuroute_worker_reconnects_total") - before
    assert retries <= 4, f"{retries} reconnects in 6 s: the refused worker is not backing off"
    stack.create_job(NS, "to-deleted", _spec("to-deleted", placement={"pools": ["temp-pool"]}, timeoutSeconds=4))
    queued = stack.wait_for_jobs(NS, ["to-deleted"], phases=frozenset({"Queued"}))["to-deleted"]["status"]
    assert queued["reason"] == "NoEligiblePool"
    stack.workers["t1"].stop()
