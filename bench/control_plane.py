"""Control plane on a real apiserver: ImageJob create -> Completed, end to end.

A real etcd + kube-apiserver (ControlPlane), moto S3, the operator and two CPU worker
processes (LocalStack, one pool). Measured:

- latency, job by job: from the create call's return to the Completed status seen on
  a watch of imagejobs (not polling), for a 256x256 PNG from S3 and one step (invert),
  output written back to S3;
- sustained throughput: N jobs (default 2,000) created by a small pool of concurrent
  clients, from the first create to the last Completed seen on the watch;
- status patches per job: the operator's `gpuroute_status_patches_total` before/after
  the throughput run, over N;
- API writes per job, Events included, measured at the API server: its own
  `apiserver_request_total` (every POST, PUT, PATCH and DELETE, by resource) before
  and after the throughput run, less the bench client's N creates, over N. Nothing is
  assumed about which writes the operator makes: WorkerPool status, Leases and any
  other write show up under their own resource;
- operator-process CPU per job, from /proc/<pid>/stat over the throughput run.

Baseline, the API floor: with the operator and workers stopped, the bench client itself
creates the same ImageJob and patches the status the operator would write at the end
(copied from a real Completed job) onto it, timed to the Completed watch event. Latency
one at a time, throughput with the same clients. The ratio is then what the operator,
the sockets, S3 and the worker's compute add above what the API server costs anyway.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import percentile, row, summary_ms
from gpuroute_dev.localenv.controlplane import ControlPlane, ControlPlaneConfig
from gpuroute_dev.localenv.objectstore import S3Server
from gpuroute_dev.localenv.stack import TERMINAL_PHASES, LocalStack, PoolConfig

GROUP, VERSION, PLURAL = "gpuroute.io", "v1alpha1", "imagejobs"
BUCKET, NS, POOL = "bench", "bench", "bench-pool"
TIMING_FIELDS = ("queueMs", "networkMs", "downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs", "totalMs")


class PhaseWatch:
    """When each ImageJob of a namespace is first seen in a terminal phase, from a watch.

    Lists first and watches from the list's resourceVersion, so no event between the two
    is missed; if the stream ends (server timeout, compaction) it lists and watches again.
    """

    def __init__(self, stack: LocalStack, namespace: str) -> None:
        self.finished: dict[str, tuple[float, str, dict[str, Any]]] = {}
        self._events: queue.Queue[str] = queue.Queue()
        self._api = stack.custom
        self._namespace = namespace
        self._stopped = threading.Event()
        self._watch: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{namespace}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError(f"could not list imagejobs in {namespace}")

    def _note(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES and name not in self.finished:
            self.finished[name] = (time.perf_counter(), str(status["phase"]), status)
            self._events.put(name)

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stopped.is_set():
            try:
                listed = self._api.list_namespaced_custom_object(GROUP, VERSION, self._namespace, PLURAL)
                for item in listed["items"]:
                    self._note(item)
                self._ready.set()
                self._watch = watch.Watch()
                for event in self._watch.stream(self._api.list_namespaced_custom_object, GROUP, VERSION,
                                                self._namespace, PLURAL,
                                                resource_version=listed["metadata"]["resourceVersion"],
                                                timeout_seconds=600):
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._note(event["object"])
            except Exception as exc:  # the stream breaks when the bench tears the apiserver down
                if self._stopped.is_set():
                    return
                self._error = exc
                time.sleep(0.2)

    def wait(self, name: str, timeout: float = 60.0) -> float:
        """perf_counter() when `name` was seen Completed; raises if it ended otherwise."""
        deadline = time.monotonic() + timeout
        while name not in self.finished:
            try:
                self._events.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} never finished (last watch error: {self._error!r})") from None
        seen, phase, status = self.finished[name]
        if phase != "Completed":
            raise RuntimeError(f"{name} ended {phase}: {status.get('reason')}: {status.get('message')}")
        return seen

    def stop(self) -> None:
        self._stopped.set()
        if self._watch is not None:
            self._watch.stop()


def _png_256() -> bytes:
    buffer = io.BytesIO()
    try:
        from skimage import data

        Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC).save(buffer, "PNG")
    except ImportError:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@contextmanager
def local_stack(workers: int, *, workdir: Path, capacity: int = 8) -> Iterator[LocalStack]:
    """Control plane, S3 with a 256x256 input, one pool with `workers` CPU workers (0: none connect)."""
    # moto's werkzeug server logs every request to stderr: thousands of lines per run.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with ControlPlane(ControlPlaneConfig(workdir=workdir / "cp", name="bench")) as cp, S3Server() as s3:
        s3.create_bucket(BUCKET)
        s3.client().put_object(Bucket=BUCKET, Key="in/256.png", Body=_png_256())
        stack = LocalStack(workdir / "stack", cp, s3)
        try:
            stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
            names = tuple(f"w{i + 1}" for i in range(workers))
            # With no workers the pool still admits a key nobody uses: jobs stay Queued.
            stack.add_pool(PoolConfig(POOL, workers=names or ("nobody",), max_in_flight_per_worker=capacity))
            stack.start_operator()
            for name in names:
                stack.start_worker(POOL, name, capacity=capacity)
            stack.wait_for_pool(POOL, workers=workers)
            yield stack
        finally:
            stack.stop()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, summed by thread name (/proc/<pid>/task/*/stat):
    separates the Python event loop from ZeroMQ's I/O thread and the executor threads."""
    out: dict[str, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                raw = handle.read()
        except OSError:
            continue  # the thread ended meanwhile
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        name = re.sub(r"[_/]?\d+$", "", name)  # asyncio_0, asyncio_1 -> asyncio; ZMQbg/IO/0 -> ZMQbg/IO
        fields = raw.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_snapshot(stack: LocalStack) -> dict[str, float]:
    """CPU seconds so far of every process of the stack, by component.

    On 2 shared cores throughput is bounded by CPU, so CPU per job says which component
    the jobs/s figure is paying for. The control plane's processes are read through its
    private child list (no public accessor); absent, they are left out.
    """
    times = os.times()
    snapshot = {"bench process (clients, watch, moto S3)": times.user + times.system}
    if stack.operator is not None:
        snapshot["operator"] = _cpu_seconds(stack.operator.popen.pid)
        for thread, seconds in thread_cpu_seconds(stack.operator.popen.pid).items():
            snapshot[f"operator thread {thread}"] = seconds
    snapshot["workers"] = sum(_cpu_seconds(w.popen.pid) for w in stack.workers.values())
    for child in getattr(stack.control_plane, "_children", []):
        snapshot[str(child.name)] = _cpu_seconds(child.popen.pid)
    return snapshot


WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
_REQUEST_LINE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def api_writes(control_plane: ControlPlane) -> dict[str, float]:
    """Write requests the API server has answered so far, by `resource[/subresource]`.

    Read from the API server's own /metrics, so every client's writes count, whatever
    library made them.
    """
    context = ssl.create_default_context(cafile=str(control_plane.ca_file))
    request = urllib.request.Request(f"{control_plane.server}/metrics",
                                     headers={"Authorization": f"Bearer {control_plane.token}"})
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = _REQUEST_LINE.match(line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("verb") not in WRITE_VERBS:
            continue
        key = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        counts[key] = counts.get(key, 0.0) + float(match["value"])
    return counts


def writes_per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    """Writes per job by resource over a run, without the bench client's own ImageJob creates."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    delta["imagejobs"] = delta.get("imagejobs", 0.0) - jobs
    return {k: round(v / jobs, 4) for k, v in sorted(delta.items()) if v}


def job_body(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageJob", "metadata": {"name": name},
            "spec": {"input": {"uri": f"s3://{BUCKET}/in/256.png"}, "output": {"uri": f"s3://{BUCKET}/out/{name}.png"},
                     "steps": [{"op": "invert"}], "priority": "realtime"}}


def create_job(stack: LocalStack, namespace: str, name: str) -> None:
    stack.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job_body(name))


def burst(clients: int, names: list[str], create: Callable[[str], None]) -> float:
    """Runs create(name) for every name on `clients` threads; returns when the first started."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in pool.map(create, names):  # re-raises the first failure
            pass
    return started


def settled_metric(stack: LocalStack, name: str, *, quiet_s: float = 1.5, timeout: float = 30.0) -> float:
    """The metric once it stopped changing: coalesced status writes land a little later."""
    value, since, deadline = stack.operator_metric(name), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        current = stack.operator_metric(name)
        if current != value:
            value, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return value


def _api_floor(stack: LocalStack, status: dict[str, Any], latency_jobs: int, throughput_jobs: int,
               clients: int) -> tuple[list[float], float]:
    """The client's own create + final status patch + watch event, nothing else running."""
    namespace = "bench-floor"
    stack.ensure_namespace(namespace)
    watch = PhaseWatch(stack, namespace)

    def create_and_complete(name: str) -> None:
        create_job(stack, namespace, name)
        stack.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                           {"status": status})

    try:
        for i in range(5):  # warm-up
            create_and_complete(f"warm-{i}")
            watch.wait(f"warm-{i}")
        latencies = []
        for i in range(latency_jobs):
            started = time.perf_counter()
            create_and_complete(f"lat-{i}")
            latencies.append(watch.wait(f"lat-{i}") - started)
        names = [f"tp-{i}" for i in range(throughput_jobs)]
        started = burst(clients, names, create_and_complete)
        finished = max(watch.wait(n, timeout=600) for n in names)
    finally:
        watch.stop()
    return latencies, throughput_jobs / (finished - started)


def run(*, latency_jobs: int = 200, throughput_jobs: int = 2000, clients: int = 4, workers: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpuroute-bench-") as tmp, local_stack(workers, workdir=Path(tmp)) as stack:
        watch = PhaseWatch(stack, NS)
        try:
            for i in range(5):  # warm-up: first jobs pay torch, boto3 and connection start-up
                create_job(stack, NS, f"warm-{i}")
                watch.wait(f"warm-{i}")
            latencies = []
            # One job at a time: the common case (no queue), where the write budget applies.
            lat_writes_before = api_writes(stack.control_plane)
            for i in range(latency_jobs):
                name = f"lat-{i}"
                started = time.perf_counter()
                create_job(stack, NS, name)
                latencies.append(watch.wait(name) - started)
            patches_before = settled_metric(stack, "gpuroute_status_patches_total")
            lat_writes = writes_per_job(lat_writes_before, api_writes(stack.control_plane), latency_jobs)
            writes_before = api_writes(stack.control_plane)
            cpu_before = cpu_snapshot(stack)
            names = [f"tp-{i}" for i in range(throughput_jobs)]
            started = burst(clients, names, lambda n: create_job(stack, NS, n))
            created = time.perf_counter()
            finished = max(watch.wait(n, timeout=900) for n in names)
            cpu_after = cpu_snapshot(stack)
            patches = settled_metric(stack, "gpuroute_status_patches_total") - patches_before
            writes = writes_per_job(writes_before, api_writes(stack.control_plane), throughput_jobs)
        finally:
            watch.stop()
        # Where the latency goes, from the operator's own timing in the final status.
        timing = {f: round(percentile([float((watch.finished[f"lat-{i}"][2].get("timing") or {}).get(f, 0.0))
                                       for i in range(latency_jobs)], 0.5), 2) for f in TIMING_FIELDS}
        final_status = dict(watch.finished["lat-0"][2])
        # The floor runs with nothing else on the apiserver or the cores.
        for process in [*stack.workers.values(), *([stack.operator] if stack.operator else [])]:
            process.stop()
        floor, floor_rate = _api_floor(stack, final_status, latency_jobs, throughput_jobs, clients)
    lat, base = summary_ms(latencies), summary_ms(floor)
    throughput = throughput_jobs / (finished - started)
    per_job = patches / throughput_jobs
    events = writes.get("events", 0.0)
    all_writes = sum(writes.values())
    cpu_ms = {k: round((cpu_after[k] - cpu_before.get(k, 0.0)) * 1000 / throughput_jobs, 2) for k in cpu_after}
    return {
        "workers": workers, "clients": clients, "latency": lat, "latency_status_timing_p50_ms": timing,
        "api_floor": base, "throughput_jobs": throughput_jobs, "throughput_jobs_per_s": round(throughput, 2),
        "create_rate_jobs_per_s": round(throughput_jobs / (created - started), 1),
        "api_floor_throughput_jobs_per_s": round(floor_rate, 2), "status_patches_per_job": round(per_job, 3),
        "throughput_cpu_ms_per_job": cpu_ms, "api_writes_per_job_by_resource": writes,
        "one_at_a_time_api_writes_per_job_by_resource": lat_writes,
        "api_writes_per_job": round(all_writes, 3), "api_writes_per_job_without_events": round(all_writes - events, 3),
        "throughput_over_floor": round(throughput / floor_rate, 3),
        "throughput_wall_s": round(finished - started, 2),
        "rows": [
            row("control plane", "create->Completed p50", lat["p50_ms"], "ms", "API floor p50", base["p50_ms"],
                higher_is_better=False),
            row("control plane", "create->Completed p95", lat["p95_ms"], "ms", "API floor p95", base["p95_ms"],
                higher_is_better=False),
            row("control plane", "create->Completed p99", lat["p99_ms"], "ms", "API floor p99", base["p99_ms"],
                higher_is_better=False),
            row("control plane", f"throughput, {throughput_jobs} jobs, {workers} CPU workers", throughput, "jobs/s",
                f"API floor, create + status patch, {clients} clients", floor_rate, higher_is_better=True),
            row("control plane", "status patches per job", per_job, "patches", "one per phase change (4)", 4.0,
                higher_is_better=False),
            row("control plane", "API writes per job one at a time, Events included", sum(lat_writes.values()),
                "writes", "issue 10 goal: 2 status writes + 1 terminal Event", 3.0, higher_is_better=False),
            row("control plane", "API writes per job in the burst, Events included", all_writes,
                "writes", "issue 10 goal: 2 status writes + 1 terminal Event", 3.0, higher_is_better=False),
            row("control plane", "API writes per job, without the terminal Event", all_writes - events, "writes",
                "issue 10 goal", 2.0, higher_is_better=False),
            row("control plane", "operator-process CPU per job (/proc)", cpu_ms.get("operator", float("nan")), "ms",
                "issue 10 goal", 3.0, higher_is_better=False),
        ],
    }


if __name__ == "__main__":
    out = run(throughput_jobs=int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
    print({k: v for k, v in out.items() if k != "rows"})
