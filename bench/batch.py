"""Batch ImageJob against the same images as single ImageJobs, same workers (issue 10).

One control plane (real etcd + kube-apiserver), moto S3, the operator and two CPU
worker processes (one thread each), set up as in bench/control_plane.py. N small PNGs
(32x32, distinct pixels) are uploaded once; then, on the same stack:

- arm A, batch: one batch ImageJob over the prefix holding all N images (`invert`,
  PNG out), from its create to its terminal status seen on a watch;
- arm B, singles: the first M of the same images as M single ImageJobs (same step,
  same output format), created by 4 clients in a burst, to the last terminal status
  seen on the watch. By default M = N (the issue's comparison: the same 10,000 images);
  M may be set smaller for a quicker run (singles run at about 100/s on 2 shared cores).
  Every figure is per item, so the arms also compare at different sizes (both sizes
  are reported).

For each arm: items/s; operator-process CPU per item (/proc/<pid>/stat, from create to
terminal and the writes that settle after it); API writes per item, by resource, read
from the apiserver's own apiserver_request_total (Events, WorkerPool status and the
apiserver's own housekeeping writes included; the bench client's creates are left out
and counted apart); worker-side computations (the workers' gpuroute_worker_jobs_total
{outcome="completed"}) and answers not computed (gpuroute_worker_answered_again_total).
Goals: operator CPU per batch item <= 0.3 ms, API writes per batch item <= 0.01.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import control_plane as cp
from bench.common import percentile, row
from bench.control_plane import BUCKET, NS, PhaseWatch
from gpuroute_dev.localenv.stack import LocalStack

STEPS: list[dict[str, Any]] = [{"op": "invert"}]
FOLDER = "in/batch-bench"
CPU_GOAL_MS = 0.3
WRITES_GOAL = 0.01
# Written by the apiserver itself whatever the operator does (its identity Lease, the
# `kubernetes` Service's endpoints): shown apart so the operator's share is visible.
APISERVER_OWN = ("leases", "endpoints", "endpointslices")


def _png(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _key(i: int) -> str:
    return f"{FOLDER}/img-{i:05d}.png"


def upload(stack: LocalStack, count: int, size: int) -> None:
    client = stack.s3.client()

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=_key(i), Body=_png(i, size))

    with ThreadPoolExecutor(8) as pool:
        for _ in pool.map(put, range(count)):  # re-raises the first failure
            pass


def _worker_counts(stack: LocalStack) -> dict[str, float]:
    names = list(stack.workers)
    return {"computed": sum(stack.worker_metric(w, "gpuroute_worker_jobs_total", {"outcome": "completed"})
                            for w in names),
            "answered_again": sum(stack.worker_metric(w, "gpuroute_worker_answered_again_total") for w in names)}


class Arm:
    """Counters read before and after one arm."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.writes = cp.api_writes(stack.control_plane)
        self.cpu = cp.cpu_snapshot(stack)
        self.workers = _worker_counts(stack)

    def finish(self, items: int, creates: int, started: float, finished: float) -> dict[str, Any]:
        # CPU at once: the terminal status is the operator's last work for the arm, and an
        # idle operator still spends a little on heartbeats, which the settling below would add.
        cpu = cp.cpu_snapshot(self.stack)
        # Its terminal Event follows the terminal status write: wait for the operator's own
        # write counter to stop moving so every write of the arm is counted.
        cp.settled_metric(self.stack, "gpuroute_status_patches_total", quiet_s=1.5)
        writes_after = cp.api_writes(self.stack.control_plane)
        workers = _worker_counts(self.stack)
        delta = {k: writes_after.get(k, 0.0) - self.writes.get(k, 0.0) for k in writes_after}
        delta["imagejobs"] = delta.get("imagejobs", 0.0) - creates
        delta = {k: v for k, v in sorted(delta.items()) if v}
        total = sum(delta.values())
        own = sum(v for k, v in delta.items() if k in APISERVER_OWN)
        cpu_ms = {k: round((cpu[k] - self.cpu.get(k, 0.0)) * 1000.0 / items, 4) for k in cpu}
        return {
            "items": items, "wall_s": round(finished - started, 2),
            "items_per_s": round(items / (finished - started), 2),
            "operator_cpu_ms_per_item": cpu_ms.get("operator", float("nan")),
            "cpu_ms_per_item_by_process": cpu_ms,
            "api_writes": {k: int(v) for k, v in delta.items()},
            "api_writes_per_item": round(total / items, 5),
            "api_writes_per_item_by_resource": {k: round(v / items, 5) for k, v in delta.items()},
            "api_writes_per_item_without_apiserver_own": round((total - own) / items, 5),
            "client_creates": creates, "client_creates_per_item": round(creates / items, 5),
            "worker_computations": int(workers["computed"] - self.workers["computed"]),
            "worker_answered_without_computing": int(workers["answered_again"] - self.workers["answered_again"]),
        }


def _profiler(stack: LocalStack, path: Path | None) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the operator for the batch arm (raw collapsed stacks at `path`), if asked."""
    if path is None or stack.operator is None:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([spy, "record", "--nonblocking", "--format", "raw", "--rate", "250", "-o", str(path),
                             "--pid", str(stack.operator.popen.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _batch_arm(stack: LocalStack, watch: PhaseWatch, items: int, profile: Path | None) -> dict[str, Any]:
    spy = _profiler(stack, profile)
    arm = Arm(stack)
    name = "batch-a"
    started = time.perf_counter()
    stack.create_job(NS, name, {"input": {"prefix": f"s3://{BUCKET}/{FOLDER}/", "match": "*.png"},
                                "output": {"prefix": f"s3://{BUCKET}/out/batch-a/", "format": "png"},
                                "steps": STEPS, "priority": "batch", "timeoutSeconds": 7200, "maxAttempts": 3})
    finished = watch.wait(name, timeout=7200)
    if spy is not None:
        spy.send_signal(2)  # py-spy writes its file on SIGINT
        spy.wait(30)
    status = watch.finished[name][2]
    result = arm.finish(items, 1, started, finished)
    counts = status.get("items") or {}
    if counts.get("succeeded") != items:
        raise RuntimeError(f"batch ended with {counts}, wanted {items} succeeded")
    result["status_items"] = counts
    return result


def _singles_arm(stack: LocalStack, watch: PhaseWatch, items: int, clients: int) -> dict[str, Any]:
    arm = Arm(stack)
    names = [f"single-{i:05d}" for i in range(items)]

    def create(name: str) -> None:
        i = int(name.rsplit("-", 1)[1])
        body = {"apiVersion": f"{cp.GROUP}/{cp.VERSION}", "kind": "ImageJob", "metadata": {"name": name},
                "spec": {"input": {"uri": f"s3://{BUCKET}/{_key(i)}"},
                         "output": {"uri": f"s3://{BUCKET}/out/singles/img-{i:05d}.png", "format": "png"},
                         "steps": STEPS, "priority": "batch", "maxAttempts": 3}}
        stack.custom.create_namespaced_custom_object(cp.GROUP, cp.VERSION, NS, cp.PLURAL, body)

    started = cp.burst(clients, names, create)
    finished = max(watch.wait(n, timeout=3600) for n in names)
    result = arm.finish(items, items, started, finished)
    totals = [float((watch.finished[n][2].get("timing") or {}).get("totalMs", 0.0)) for n in names]
    result["job_total_ms_p50"] = round(percentile(totals, 0.5), 2)
    return result


def _warm_up(stack: LocalStack, watch: PhaseWatch) -> None:
    """Torch, boto3 and the connections start up on a few single jobs and a small batch, so
    neither arm pays for them."""
    for i in range(4):
        name = f"warm-{i}"
        stack.create_job(NS, name, {"input": {"uri": f"s3://{BUCKET}/{_key(i)}"},
                                    "output": {"uri": f"s3://{BUCKET}/out/warm/{i}.png", "format": "png"},
                                    "steps": STEPS})
        watch.wait(name)
    stack.create_job(NS, "warm-batch", {"input": {"prefix": f"s3://{BUCKET}/{FOLDER}/", "match": "img-0000*.png"},
                                        "output": {"prefix": f"s3://{BUCKET}/out/warm-batch/", "format": "png"},
                                        "steps": STEPS})
    watch.wait("warm-batch", timeout=120)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def run(*, batch_items: int = 10_000, single_items: int = 10_000, workers: int = 2, clients: int = 4,
        size: int = 32, profile: Path | None = None) -> dict[str, Any]:
    if single_items > batch_items:
        raise ValueError("the singles arm runs over the batch's first images: single_items <= batch_items")
    with tempfile.TemporaryDirectory(prefix="gpuroute-bench-batch-") as tmp, \
            cp.local_stack(workers, workdir=Path(tmp)) as stack:
        t = time.perf_counter()
        upload(stack, batch_items, size)
        upload_s = time.perf_counter() - t
        watch = PhaseWatch(stack, NS)
        try:
            _warm_up(stack, watch)
            with open("/proc/loadavg") as handle:
                load_before = handle.read().split()[:3]
            batch = _batch_arm(stack, watch, batch_items, profile)
            singles = _singles_arm(stack, watch, single_items, clients)
            with open("/proc/loadavg") as handle:
                load_after = handle.read().split()[:3]
        finally:
            watch.stop()
    ratios = {
        "items_per_s": _ratio(batch["items_per_s"], singles["items_per_s"]),
        "operator_cpu_per_item_singles_over_batch": _ratio(singles["operator_cpu_ms_per_item"],
                                                           batch["operator_cpu_ms_per_item"]),
        "api_writes_per_item_singles_over_batch": _ratio(singles["api_writes_per_item"], batch["api_writes_per_item"]),
    }
    return {
        "workers": workers, "worker_threads": 1, "image": f"{size}x{size} PNG, invert, PNG out",
        "upload_s": round(upload_s, 1), "loadavg_before": load_before, "loadavg_after": load_after,
        "batch": batch, "singles": singles, "ratios": ratios,
        "rows": [
            row("batch", f"items/s, {batch_items}-item batch vs {single_items} singles, {workers} CPU workers",
                batch["items_per_s"], "items/s", "same images as single ImageJobs", singles["items_per_s"],
                higher_is_better=True),
            row("batch", "operator-process CPU per item (/proc)", batch["operator_cpu_ms_per_item"], "ms",
                "single ImageJobs, same run", singles["operator_cpu_ms_per_item"], higher_is_better=False),
            row("batch", "operator-process CPU per item (/proc)", batch["operator_cpu_ms_per_item"], "ms",
                "issue 10 goal", CPU_GOAL_MS, higher_is_better=False),
            row("batch", "API writes per item, Events included", batch["api_writes_per_item"], "writes",
                "single ImageJobs, same run", singles["api_writes_per_item"], higher_is_better=False),
            row("batch", "API writes per item, Events included", batch["api_writes_per_item"], "writes",
                "issue 10 goal", WRITES_GOAL, higher_is_better=False),
            row("batch", "worker computations per item", batch["worker_computations"] / batch_items, "",
                "single ImageJobs", singles["worker_computations"] / single_items, higher_is_better=False),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000, help="batch items (the issue's figure)")
    parser.add_argument("--singles", type=int, default=10_000, help="single ImageJobs over the first of the same images")
    parser.add_argument("--profile", type=Path, help="py-spy's raw stacks of the operator during the batch arm")
    args = parser.parse_args(argv)
    out = run(batch_items=args.items, single_items=args.singles, profile=args.profile)
    for arm in ("batch", "singles"):
        print(arm, {k: v for k, v in out[arm].items()})
    print("ratios", out["ratios"], "load", out["loadavg_before"], "->", out["loadavg_after"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
