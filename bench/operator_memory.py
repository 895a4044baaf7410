"""Operator memory: resident set size with 0, 1,000 and 10,000 ImageJobs present.

The pool admits one worker key that no process uses, so no worker ever connects: every
job is admitted and stays Queued, and the operator holds all of them at once, the worst
case for a backlog. RSS is VmRSS from /proc/<pid>/status of the operator process, read
once the operator has admitted every job and its status writes have settled.
Baseline: the same operator process, idle, with 0 jobs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import row
from bench.control_plane import NS, burst, create_job, local_stack, settled_metric
from gpuroute_dev.localenv.stack import LocalStack


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(f"{field}:"))


def _wait_admitted(stack: LocalStack, count: int, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while (admitted := stack.operator_metric("gpuroute_jobs_admitted_total")) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"operator admitted {admitted:.0f} of {count} jobs\n"
                               f"{stack.operator.log_tail() if stack.operator else ''}")
        time.sleep(1.0)


def run(*, counts: tuple[int, ...] = (1000, 10000), clients: int = 6) -> dict[str, Any]:
    results: dict[str, Any] = {"rss_mb": {}, "peak_rss_mb": {}, "kb_per_job": {}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpuroute-bench-mem-") as tmp, local_stack(0, workdir=Path(tmp)) as stack:
        assert stack.operator is not None
        pid = stack.operator.popen.pid
        time.sleep(3.0)  # start-up allocations done, first pool status written
        idle = _status_kb(pid, "VmRSS") / 1024.0
        results["rss_mb"][0] = round(idle, 1)
        created = 0
        for count in sorted(counts):
            burst(clients, [f"mem-{i}" for i in range(created, count)], lambda n: create_job(stack, NS, n))
            created = count
            _wait_admitted(stack, count)
            settled_metric(stack, "gpuroute_status_patches_total", quiet_s=3.0, timeout=120.0)
            rss = _status_kb(pid, "VmRSS") / 1024.0
            results["rss_mb"][count] = round(rss, 1)
            results["peak_rss_mb"][count] = round(_status_kb(pid, "VmHWM") / 1024.0, 1)
            per_job = (rss - idle) * 1024 / count
            results["kb_per_job"][count] = round(per_job, 1)
            results["rows"].append(row("operator memory", f"RSS with {count} queued ImageJobs ({per_job:.1f} KB/job)",
                                       rss, "MB", "idle operator, 0 jobs", idle, higher_is_better=False))
    return results


if __name__ == "__main__":
    out = run(counts=tuple(int(a) for a in sys.argv[1:]) or (1000, 10000))
    print(out["rss_mb"], out["kb_per_job"])
