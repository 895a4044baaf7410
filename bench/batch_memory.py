"""Operator memory for one batch ImageJob of 10,000, 100,000 and 1,000,000 listed items.

One control plane (real etcd + kube-apiserver), moto S3 and the operator, set up as in
bench/control_plane.py, with no worker. Each batch reads a list object (spec.input.list)
naming N inputs outside the namespace's read grant, so every item ends at once as
StorageNotGranted: the operator lists, checks, journals and manifests all N items (the
per-item memory a batch costs the operator) without any worker time. This is the shape
of security finding 1: a 35 MiB list object of ungranted keys. Batches run one after the
other on the same operator, smallest first.

Per batch: the operator's VmRSS (/proc/<pid>/status) just before the batch is created
(the baseline, same process, same run), the highest VmRSS sampled every 0.2 s until its
terminal status, and the batch's wall time. Goal: the 1,000,000-item batch's peak under
250 MB and within 20% of the 10,000-item one's.

    PYTHONPATH=operator:worker_image:. python -m bench.batch_memory [COUNT ...]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import row
from bench.control_plane import BUCKET, NS, local_stack
from gpuroute_dev.localenv.stack import LocalStack

GOAL_MB = 250.0
GOAL_RATIO = 1.2


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024.0


class _Sampler:
    """The highest VmRSS of `pid` seen while it runs."""

    def __init__(self, pid: int, period_s: float = 0.2) -> None:
        self.pid, self.period_s, self.peak = pid, period_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb(self.pid))
            self._stop.wait(self.period_s)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb(self.pid))


def _list_object(stack: LocalStack, count: int) -> str:
    """A list object of `count` input URIs outside the read grant (in/ is granted, secret/ not)."""
    key = f"in/lists/ungranted-{count}.txt"
    body = "".join(f"s3://{BUCKET}/secret/photos/img-{i:07d}.jpg\n" for i in range(count)).encode()
    stack.s3.client().put_object(Bucket=BUCKET, Key=key, Body=body)
    return f"s3://{BUCKET}/{key}"


def _batch(stack: LocalStack, pid: int, count: int) -> dict[str, Any]:
    name = f"mem-{count}"
    source = _list_object(stack, count)
    time.sleep(3.0)  # the previous batch's writes settled
    before = _rss_mb(pid)
    started = time.monotonic()
    with _Sampler(pid) as sampler:
        stack.create_job(NS, name, {"input": {"list": source}, "output": {"prefix": f"s3://{BUCKET}/out/{name}/"},
                                    "steps": [{"op": "invert"}], "timeoutSeconds": 3600})
        status = stack.wait_for_jobs(NS, [name], timeout=3600)[name]["status"]
    wall = time.monotonic() - started
    items = status.get("items", {})
    if items.get("failed") != count or status.get("reason") != "ItemsFailed":
        raise RuntimeError(f"{name}: unexpected end {status.get('reason')}: {items}")
    return {"items": count, "rss_before_mb": round(before, 1), "peak_rss_mb": round(sampler.peak, 1),
            "growth_mb": round(sampler.peak - before, 1), "wall_s": round(wall, 1),
            "bytes_per_item": round((sampler.peak - before) * 1024 * 1024 / count, 1)}


def run(*, counts: tuple[int, ...] = (10_000, 100_000, 1_000_000)) -> dict[str, Any]:
    results: dict[str, Any] = {"batches": [], "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpuroute-bench-batchmem-") as tmp, \
            local_stack(0, workdir=Path(tmp)) as stack:
        assert stack.operator is not None
        pid = stack.operator.popen.pid
        time.sleep(3.0)  # start-up allocations done
        results["idle_rss_mb"] = round(_rss_mb(pid), 1)
        for count in sorted(counts):
            figures = _batch(stack, pid, count)
            results["batches"].append(figures)
            print(figures, flush=True)
        smallest, largest = results["batches"][0], results["batches"][-1]
        ratio = largest["peak_rss_mb"] / smallest["peak_rss_mb"]
        results["ratio_largest_to_smallest"] = round(ratio, 3)
        results["goal_met"] = largest["peak_rss_mb"] < GOAL_MB and ratio <= GOAL_RATIO
        for figures in results["batches"]:
            results["rows"].append(row(
                "batch memory", f"operator peak RSS, one batch of {figures['items']:,} listed items "
                f"(StorageNotGranted)", figures["peak_rss_mb"], "MB", "RSS just before the batch",
                figures["rss_before_mb"], higher_is_better=False))
    return results


if __name__ == "__main__":
    out = run(counts=tuple(int(a) for a in sys.argv[1:]) or (10_000, 100_000, 1_000_000))
    print({k: v for k, v in out.items() if k != "rows"})
