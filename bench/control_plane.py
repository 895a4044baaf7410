"""Control plane on a real apiserver: ImageJob create -> Completed, end to end.

A real etcd + kube-apiserver, moto S3, the operator and two CPU workers. Latency is
measured job by job (create returns -> Completed seen on a watch) for a 256x256 image
and one step; throughput over N jobs created by a few concurrent clients. Baseline:
the API floor, the client's own create + status patch + watch event for the same
kind of object with no operator involved.
"""

from __future__ import annotations

import io
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import row, summary_ms
from gpuroute.localenv.controlplane import ControlPlane, ControlPlaneConfig
from gpuroute.localenv.objectstore import S3Server
from gpuroute.localenv.stack import LocalStack, PoolConfig

GROUP, VERSION, PLURAL = "gpuroute.io", "v1alpha1", "imagejobs"
BUCKET, NS = "bench", "bench"


class PhaseWatch:
    """Records when each ImageJob is first seen in a phase, from a watch stream."""

    def __init__(self, stack: LocalStack, namespace: str, phase: str) -> None:
        from kubernetes import watch

        self.seen: dict[str, float] = {}
        self._events: queue.Queue[str] = queue.Queue()
        self._watch = watch.Watch()
        self._api = stack.custom
        self._namespace, self._phase = namespace, phase
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.3)

    def _run(self) -> None:
        try:
            self._stream()
        except Exception:  # the stream breaks when the bench tears the apiserver down
            if not self._stopped:
                raise

    def _stream(self) -> None:
        for event in self._watch.stream(self._api.list_namespaced_custom_object, GROUP, VERSION, self._namespace,
                                        PLURAL, timeout_seconds=3600):
            obj = event["object"]
            name = obj["metadata"]["name"]
            if (obj.get("status") or {}).get("phase") == self._phase and name not in self.seen:
                self.seen[name] = time.perf_counter()
                self._events.put(name)

    def wait(self, name: str, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while name not in self.seen:
            try:
                self._events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty as exc:
                raise TimeoutError(f"{name} never reached {self._phase}") from exc
        return self.seen[name]

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


@contextmanager
def local_stack(workers: int, *, workdir: Path) -> Iterator[LocalStack]:
    with ControlPlane(ControlPlaneConfig(workdir=workdir / "cp", name="bench")) as cp, S3Server() as s3:
        s3.create_bucket(BUCKET)
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
        s3.client().put_object(Bucket=BUCKET, Key="in/256.png", Body=buffer.getvalue())
        stack = LocalStack(workdir / "stack", cp, s3)
        try:
            stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
            names = tuple(f"w{i + 1}" for i in range(workers))
            stack.add_pool(PoolConfig("bench-pool", workers=names or ("none",), max_in_flight_per_worker=8))
            stack.start_operator()
            for name in names:
                stack.start_worker("bench-pool", name, capacity=8)
            stack.wait_for_pool("bench-pool", workers=workers)
            yield stack
        finally:
            stack.stop()


def job_body(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageJob", "metadata": {"name": name},
            "spec": {"input": {"uri": f"s3://{BUCKET}/in/256.png"}, "output": {"uri": f"s3://{BUCKET}/out/{name}.png"},
                     "steps": [{"op": "invert"}], "priority": "realtime"}}


def api_floor(stack: LocalStack, samples: int) -> list[float]:
    """Create + status patch + see the patch on a watch, by the client itself, no operator."""
    stack.ensure_namespace("floor")
    watch = PhaseWatch(stack, "floor", "Completed")
    timings = []
    try:
        for i in range(samples):
            name = f"floor-{i}"
            body = job_body(name)
            body["metadata"]["annotations"] = {"gpuroute.io/cancel": "true"}  # the operator only cancels it
            started = time.perf_counter()
            stack.custom.create_namespaced_custom_object(GROUP, VERSION, "floor", PLURAL, body)
            stack.custom.patch_namespaced_custom_object_status(GROUP, VERSION, "floor", PLURAL, name,
                                                               {"status": {"phase": "Completed"}})
            timings.append(watch.wait(name) - started)
    finally:
        watch.stop()
    return timings


def run(*, latency_jobs: int = 100, throughput_jobs: int = 2000, clients: int = 4) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpuroute-bench-") as tmp, local_stack(2, workdir=Path(tmp)) as stack:
        watch = PhaseWatch(stack, NS, "Completed")
        try:
            for i in range(5):  # warm-up: first jobs pay torch and boto3 start-up
                stack.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, job_body(f"warm-{i}"))
                watch.wait(f"warm-{i}")
            latencies = []
            for i in range(latency_jobs):
                name = f"lat-{i}"
                started = time.perf_counter()
                stack.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, job_body(name))
                latencies.append(watch.wait(name) - started)
            patches_before = stack.operator_metric("gpuroute_status_patches_total")
            names = [f"tp-{i}" for i in range(throughput_jobs)]
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda n: stack.custom.create_namespaced_custom_object(
                    GROUP, VERSION, NS, PLURAL, job_body(n)), names))
            finished = max(watch.wait(n, timeout=600) for n in names)
            elapsed = finished - started
            time.sleep(1.0)  # let the last coalesced patches land before reading the counter
            patches = stack.operator_metric("gpuroute_status_patches_total") - patches_before
        finally:
            watch.stop()
        floor = api_floor(stack, 50)
    lat, base = summary_ms(latencies), summary_ms(floor)
    throughput = throughput_jobs / elapsed
    return {
        "latency": lat, "api_floor": base, "throughput_jobs_per_s": round(throughput, 2),
        "throughput_jobs": throughput_jobs, "status_patches_per_job": round(patches / throughput_jobs, 2),
        "rows": [
            row("control plane", "create->Completed p50", lat["p50_ms"], "ms", "API floor p50", base["p50_ms"], higher_is_better=False),
            row("control plane", "create->Completed p95", lat["p95_ms"], "ms", "API floor p95", base["p95_ms"], higher_is_better=False),
            row("control plane", "create->Completed p99", lat["p99_ms"], "ms", "API floor p99", base["p99_ms"], higher_is_better=False),
            row("control plane", f"throughput over {throughput_jobs} jobs", throughput, "jobs/s",
                "API floor (1 client, sequential)", 1000.0 / base["mean_ms"], higher_is_better=True),
            row("control plane", "status patches per job", patches / throughput_jobs, "patches", "one per phase (4)", 4.0,
                higher_is_better=False),
        ],
    }


if __name__ == "__main__":
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    out = run(throughput_jobs=jobs)
    print({k: v for k, v in out.items() if k != "rows"})
