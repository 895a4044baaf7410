"""The ImageJob path against a real kube-apiserver, real CURVE sockets, real worker
processes and a moto S3 server: the guarantees issue #2 lists, one test each."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpuroute.curve_keys import KeyPair, write_key_file
from gpuroute_dev.localenv.stack import LocalStack, PoolConfig

BUCKET = "gpuroute-it"
NS = "team-a"
POOL = "pool-a"


def _png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: compresses like a photo, not like white noise.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# Heavy enough on one CPU thread to be caught mid-flight (a few seconds), small to upload.
# Seconds of work on a CPU worker: long enough to kill, cancel or time out a job mid-way.
SLOW_STEPS = [{"op": "upscale", "width": 4096, "method": "lanczos"}, {"op": "rotate", "angle": 7, "expand": True},
              {"op": "denoise", "method": "median", "size": 5}, {"op": "rotate", "angle": -7, "expand": True},
              {"op": "blur", "radius": 4}]


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s3_server.create_bucket(BUCKET)
    client = s3_server.client()
    client.put_object(Bucket=BUCKET, Key="in/small.png", Body=_png(160, 120))
    client.put_object(Bucket=BUCKET, Key="in/large.png", Body=_png(768, 512, seed=1))
    client.put_object(Bucket=BUCKET, Key="in/corrupt.png", Body=b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    stack = LocalStack(tmp_path_factory.mktemp("stack"), control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig(POOL, workers=("w1", "w2"), max_in_flight_per_worker=2))
    stack.start_operator()
    stack.start_worker(POOL, "w1", capacity=2)
    stack.start_worker(POOL, "w2", capacity=2)
    stack.wait_for_pool(POOL, workers=2)
    yield stack
    stack.stop()


def _spec(name: str, steps: list[dict[str, Any]], *, src: str = "in/small.png", **extra: Any) -> dict[str, Any]:
    return {"input": {"uri": f"s3://{BUCKET}/{src}"}, "output": {"uri": f"s3://{BUCKET}/out/{name}.png"},
            "steps": steps, **extra}


def _events(stack: LocalStack, name: str) -> list[Any]:
    return stack.core.list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items


def _wait_for_worker_assignment(stack: LocalStack, name: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = stack.get_job(NS, name).get("status") or {}
        if status.get("phase") in ("Dispatched", "Processing") and status.get("worker"):
            return status
        time.sleep(0.05)
    raise TimeoutError(f"{name} never reached a worker: {stack.get_job(NS, name).get('status')}")


def _computed(stack: LocalStack) -> float:
    """Images the workers computed so far (answers from a worker's cache or joined runs are not counted)."""
    return sum(stack.worker_metric(worker, "gpuroute_worker_jobs_total", {"outcome": "completed"})
               for worker in stack.workers)


def _restart_missing_workers(stack: LocalStack) -> None:
    for worker, process in list(stack.workers.items()):
        if not process.alive:
            stack.start_worker(POOL, worker, capacity=2)
    stack.wait_for_pool(POOL, workers=2)


def test_job_completes_with_output_timing_conditions_and_events(stack: LocalStack, s3_server: Any) -> None:
    stack.create_job(NS, "basic", _spec("basic", [{"op": "autocontrast"}, {"op": "upscale", "scale": 2, "method": "lanczos"}],
                                        priority="realtime"))
    status = stack.wait_for_jobs(NS, ["basic"])["basic"]["status"]

    assert status["phase"] == "Completed", status
    stored = s3_server.client().get_object(Bucket=BUCKET, Key="out/basic.png")["Body"].read()
    assert status["output"]["sha256"] == hashlib.sha256(stored).hexdigest()
    assert status["output"]["bytes"] == len(stored)
    assert (status["output"]["width"], status["output"]["height"]) == (320, 240)
    assert Image.open(io.BytesIO(stored)).size == (320, 240)
    timing = status["timing"]
    for key in ("queuedAt", "dispatchedAt", "startedAt", "completedAt", "queueMs", "networkMs", "downloadMs",
                "decodeMs", "gpuMs", "encodeMs", "uploadMs", "totalMs"):
        assert key in timing, f"timing lacks {key}: {timing}"
    parts = sum(timing[k] for k in ("queueMs", "networkMs", "downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs"))
    assert 0 < parts <= timing["totalMs"] + 1.0, timing
    assert status["pool"] == POOL and status["worker"] in ("w1", "w2") and status["gpu"] == "cpu"
    assert status["attempts"] == 1
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True"
    assert status["decision"].startswith(f"pool {POOL}:")
    # One Event for the whole life of a successful job: the terminal one (the router's
    # decision is in status.decision, not in a Normal Event per phase).
    assert [e.reason for e in _events(stack, "basic")] == ["Completed"]


def test_inline_input_completes(stack: LocalStack) -> None:
    inline = base64.b64encode(_png(40, 30)).decode()
    stack.create_job(NS, "inline", {"input": {"inline": inline}, "output": {"uri": f"s3://{BUCKET}/out/inline.webp",
                                    "format": "webp", "quality": 80}, "steps": [{"op": "grayscale"}, {"op": "flip"}]})
    status = stack.wait_for_jobs(NS, ["inline"])["inline"]["status"]
    assert status["phase"] == "Completed", status
    assert status["output"]["format"] == "webp" and status["output"]["width"] == 40


@pytest.mark.parametrize(("name", "spec", "reason", "field"), [
    ("even-median", _spec("x", [{"op": "denoise", "size": 4}]), "InvalidSpec", "spec.steps[0].size"),
    ("no-scale", _spec("x", [{"op": "upscale", "method": "bicubic"}]), "InvalidSpec", "spec.steps[0]"),
    ("not-granted-in", _spec("x", [{"op": "invert"}], src="../secret.png"), "StorageNotGranted", "spec.input.uri"),
    ("not-granted-out", {"input": {"uri": f"s3://{BUCKET}/in/small.png"}, "output": {"uri": "s3://other/x.png"},
                         "steps": [{"op": "invert"}]}, "StorageNotGranted", "spec.output.uri"),
    ("metadata-ssrf", {"input": {"uri": "https://169.254.169.254/latest/meta-data"}, "output": {"uri": f"s3://{BUCKET}/out/x.png"},
                       "steps": [{"op": "invert"}]}, "StorageNotGranted", "spec.input.uri"),
])
def test_invalid_spec_fails_once_with_named_field(stack: LocalStack, name: str, spec: dict[str, Any], reason: str,
                                                  field: str) -> None:
    stack.create_job(NS, name, spec)
    status = stack.wait_for_jobs(NS, [name])[name]["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == reason
    assert field in status["message"], status["message"]
    assert status["attempts"] == 0
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == reason


def test_unsafe_https_input_is_refused_even_when_granted(stack: LocalStack) -> None:
    stack.ensure_namespace("team-web", read=["https://127.0.0.1:1/"], write=[f"s3://{BUCKET}/out/"])
    stack.create_job("team-web", "loopback", {"input": {"uri": "https://127.0.0.1:1/x.png"},
                                               "output": {"uri": f"s3://{BUCKET}/out/web.png"}, "steps": [{"op": "invert"}]})
    status = stack.wait_for_jobs("team-web", ["loopback"])["loopback"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "UnsafeInput")
    assert "non-public address 127.0.0.1" in status["message"]


@pytest.mark.parametrize(("name", "url"), [
    ("bad-ipv6", "https://[::1/x.png"),             # the host parser raises ValueError
    ("empty-label", "https://a..example.com/x.png"),  # IDNA raises UnicodeError
    ("long-label", "https://" + "a" * 300 + ".example.com/x.png"),
])
def test_a_url_the_host_parser_chokes_on_still_gets_a_status(stack: LocalStack, name: str, url: str) -> None:
    stack.ensure_namespace("team-chokes", read=["https://"], write=[f"s3://{BUCKET}/out/"])
    stack.create_job("team-chokes", name, {"input": {"uri": url}, "output": {"uri": f"s3://{BUCKET}/out/web.png"},
                                           "steps": [{"op": "invert"}]})
    status = stack.wait_for_jobs("team-chokes", [name])[name]["status"]
    assert status["phase"] == "Failed" and status["reason"] in ("UnsafeInput", "InvalidSpec", "StorageNotGranted"), status
    assert "spec.input.uri" in status["message"], status["message"]
    assert "Traceback" not in stack.operator.log_tail(300)


def test_bad_runtime_input_fails_without_retry(stack: LocalStack) -> None:
    stack.create_job(NS, "corrupt", _spec("corrupt", [{"op": "invert"}], src="in/corrupt.png"))
    stack.create_job(NS, "crop-outside", _spec("crop-outside", [{"op": "crop", "x": 150, "y": 0, "width": 50, "height": 50}]))
    stack.create_job(NS, "missing", _spec("missing", [{"op": "invert"}], src="in/nope.png"))
    jobs = stack.wait_for_jobs(NS, ["corrupt", "crop-outside", "missing"])
    for name, body in jobs.items():
        status = body["status"]
        assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "InvalidInput", 1), (name, status)
    assert "not a readable image" in jobs["corrupt"]["status"]["message"]
    assert "spec.steps[0]" in jobs["crop-outside"]["status"]["message"]
    assert "404" in jobs["missing"]["status"]["message"]
    # Workers survived the bad input.
    assert all(p.alive for p in stack.workers.values())


def test_unknown_worker_key_is_refused(stack: LocalStack) -> None:
    intruder = KeyPair.generate()
    write_key_file(stack.workdir / "intruder.key_secret", intruder.secret)
    refused_before = stack.operator_metric("gpuroute_socket_rejected_connections_total", {"reason": "unknown key"})
    process = stack.spawn("worker-intruder", [
        "worker", "--operator", stack.operator_endpoint, "--pool", POOL, "--id", "intruder",
        "--key-file", str(stack.workdir / "intruder.key_secret"),
        "--server-public-key-file", str(stack.workdir / "server.key"), "--health-port", "0", "--threads", "1"], {})
    try:
        deadline = time.monotonic() + 15
        while stack.operator_metric("gpuroute_socket_rejected_connections_total", {"reason": "unknown key"}) <= refused_before:
            assert time.monotonic() < deadline, "the operator never refused the unknown key"
            time.sleep(0.2)
        ids = [w["id"] for w in stack.worker_pool(POOL)["status"].get("workers", [])]
        assert "intruder" not in ids
        assert "refused connection" in stack.operator.log_tail(200)
    finally:
        process.kill()


def test_worker_killed_mid_job_is_redispatched_and_completes_once(stack: LocalStack) -> None:
    stack.create_job(NS, "survivor", _spec("survivor", SLOW_STEPS, src="in/large.png", maxAttempts=3))
    victim = _wait_for_worker_assignment(stack, "survivor")["worker"]
    stack.workers[victim].kill()
    try:
        status = stack.wait_for_jobs(NS, ["survivor"], timeout=180)["survivor"]["status"]
        assert status["phase"] == "Completed", status
        assert status["attempts"] == 2
        assert status["worker"] != victim
        reasons = [e.reason for e in _events(stack, "survivor")]
        assert reasons.count("Completed") == 1
        assert "Requeued" in reasons
    finally:
        _restart_missing_workers(stack)


def test_timeout_fails_with_reason_timeout(stack: LocalStack) -> None:
    stack.create_job(NS, "too-slow", _spec("too-slow", SLOW_STEPS, src="in/large.png", timeoutSeconds=1))
    status = stack.wait_for_jobs(NS, ["too-slow"], timeout=60)["too-slow"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "Timeout")
    assert "timeoutSeconds=1" in status["message"]


def test_deleting_a_job_in_flight_cancels_it_on_the_worker(stack: LocalStack) -> None:
    stack.create_job(NS, "doomed", _spec("doomed", SLOW_STEPS, src="in/large.png"))
    worker = _wait_for_worker_assignment(stack, "doomed")["worker"]
    before = stack.worker_metric(worker, "gpuroute_worker_jobs_total", {"outcome": "cancelled"})
    stack.delete_job(NS, "doomed")
    deadline = time.monotonic() + 30
    while stack.worker_metric(worker, "gpuroute_worker_jobs_total", {"outcome": "cancelled"}) <= before:
        assert time.monotonic() < deadline, "the worker never saw the cancellation"
        time.sleep(0.2)


def test_operator_restart_every_job_reaches_one_terminal_phase(stack: LocalStack, s3_server: Any) -> None:
    names = [f"restart-{i}" for i in range(8)]
    computed_before = _computed(stack)  # before any is created: a small one may finish at once
    for i, name in enumerate(names):
        steps = SLOW_STEPS if i < 2 else [{"op": "equalize"}, {"op": "rotate", "angle": 10 * i, "expand": True}]
        stack.create_job(NS, name, _spec(name, steps, src="in/large.png" if i < 2 else "in/small.png"))
    _wait_for_worker_assignment(stack, names[0])
    stack.operator.kill()
    time.sleep(1.0)
    stack.start_operator()
    jobs = stack.wait_for_jobs(NS, names, timeout=240)
    # Both workers lived through the restart: every attempt they had was adopted, none sent twice.
    computed = _computed(stack) - computed_before
    assert computed == len(names), f"{computed} computations for {len(names)} jobs"
    for name, body in jobs.items():
        status = body["status"]
        assert status["phase"] == "Completed", (name, status)
        assert status["attempts"] == 1, (name, status)
        stored = s3_server.client().get_object(Bucket=BUCKET, Key=f"out/{name}.png")["Body"].read()
        assert hashlib.sha256(stored).hexdigest() == status["output"]["sha256"]
        completed_events = [e for e in _events(stack, name) if e.reason == "Completed"]
        assert len(completed_events) == 1, (name, [e.reason for e in _events(stack, name)])


def test_malformed_frames_are_dropped_and_counted(stack: LocalStack) -> None:
    import zmq

    pair = stack.worker_keys[(POOL, "w1")]
    before = stack.operator_metric("gpuroute_socket_rejected_messages_total", {"reason": "malformed"})
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDTIMEO, 2000)
    socket.curve_secretkey = pair.secret
    socket.curve_publickey = pair.public
    socket.curve_serverkey = stack.operator_key.public
    socket.connect(stack.operator_endpoint)
    try:
        socket.send_multipart([b"NOT-A-KIND", b"\x00"])
        socket.send_multipart([b"JOB", b"\xc1\xc1"])
        socket.send(b"one frame")
        deadline = time.monotonic() + 10
        while stack.operator_metric("gpuroute_socket_rejected_messages_total", {"reason": "malformed"}) < before + 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        socket.close()
        context.term()
    assert stack.operator.alive
    stack.create_job(NS, "after-garbage", _spec("after-garbage", [{"op": "invert"}]))
    assert stack.wait_for_jobs(NS, ["after-garbage"])["after-garbage"]["status"]["phase"] == "Completed"


def test_cancel_annotation_ends_cancelled_and_stops_the_worker(stack: LocalStack) -> None:
    stack.create_job(NS, "cancel-me", _spec("cancel-me", SLOW_STEPS, src="in/large.png"))
    worker = _wait_for_worker_assignment(stack, "cancel-me")["worker"]
    before = stack.worker_metric(worker, "gpuroute_worker_jobs_total", {"outcome": "cancelled"})
    stack.custom.patch_namespaced_custom_object("gpuroute.io", "v1alpha1", NS, "imagejobs", "cancel-me",
                                                {"metadata": {"annotations": {"gpuroute.io/cancel": "true"}}})
    status = stack.wait_for_jobs(NS, ["cancel-me"], timeout=30)["cancel-me"]["status"]
    assert (status["phase"], status["reason"]) == ("Cancelled", "CancelRequested")
    deadline = time.monotonic() + 30
    while stack.worker_metric(worker, "gpuroute_worker_jobs_total", {"outcome": "cancelled"}) <= before:
        assert time.monotonic() < deadline, "the worker never saw the cancellation"
        time.sleep(0.2)


def test_status_page_shows_waterfall_and_updates(stack: LocalStack) -> None:
    from tests.integration.cdp import Browser, chromium_path

    binary = chromium_path()
    assert binary, "chromium is not installed: `make test` installs it (Debian package chromium)"
    stack.create_job(NS, "page-one", _spec("page-one", [{"op": "blur", "radius": 1}]))
    stack.wait_for_jobs(NS, ["page-one"])
    # The admin's token (system:masters), put where the page's sign-in form keeps it;
    # tests/integration/test_status_api.py covers callers with less.
    url = f"http://127.0.0.1:{stack.operator_web_port}/"
    login = (f"(sessionStorage.getItem('gpuroute-token') ? 0 : "
             f"(sessionStorage.setItem('gpuroute-token', {json.dumps(stack.control_plane.token)}), refresh())), ")
    rows = login + ("JSON.stringify([...document.querySelectorAll('tr.job')].map(r => ({job: r.dataset.job, "
            "phase: r.dataset.phase, stages: [...r.querySelectorAll('.seg')].map(s => s.dataset.stage)})))")
    pools = login + "JSON.stringify([...document.querySelectorAll('#pools tr[data-pool]')].map(r => r.innerText))"
    browser = Browser(binary)
    try:
        def has(name: str):
            return lambda value: value and any(r["job"] == f"{NS}/{name}" for r in json.loads(value))

        first = json.loads(browser.evaluate_over_time(url, rows, until=has("page-one")))
        row = next(r for r in first if r["job"] == f"{NS}/page-one")
        assert row["phase"] == "Completed"
        assert {"gpu", "download", "upload"} <= set(row["stages"]), row
        pool_rows = json.loads(browser.evaluate_over_time(
            url, pools, until=lambda v: bool(v and any(POOL in r and "ms/Mpix" in r for r in json.loads(v)))))
        assert any(POOL in r and "Available" in r for r in pool_rows), pool_rows
        # What the router learned from page-one's timing (the page lists a pool's three most
        # used pipelines; the API has them all).
        request = urllib.request.Request(f"http://127.0.0.1:{stack.operator_web_port}/api/status",
                                         headers={"Authorization": f"Bearer {stack.control_plane.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            learned = next(p["pipelines"] for p in json.load(response)["pools"] if p["name"] == POOL)
        assert any(f["costClass"] == "blur(radius=1)" and f["jobs"] >= 1 for f in learned), learned

        # The same page picks up a job that completes after it was loaded.
        stack.create_job(NS, "page-two", _spec("page-two", [{"op": "invert"}]))
        browser.evaluate_over_time(url, rows, until=lambda v: v and any(
            r["job"] == f"{NS}/page-two" and r["phase"] == "Completed" for r in json.loads(v)), timeout=60)
    finally:
        browser.close()
